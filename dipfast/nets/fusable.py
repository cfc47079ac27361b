"""When a fused op computes exactly what a block's modules do: the rules every fast BlockOps shares.

A backend's block ops (dipfast.native.blocks on the CPU, dipfast.kernels.blocks on CUDA) replace a
ConvBNAct's BatchNorm + activation, and write its output reflection-padded for the next conv, only where
the result is the modules' own; anything else takes the reference block. One place for these rules, so
the CPU and CUDA paths cannot drift apart on what they fuse.
"""

from __future__ import annotations

import torch
from torch import nn

from dipfast.nets.layers import ConvBNAct


def batch_norm_reason(bn: nn.Module) -> str | None:
    """Why bn is not an affine BatchNorm2d normalising with the batch's statistics; None when it is.

    The batch statistics are used in training mode, and in eval mode when the running buffers are
    None: nn.BatchNorm2d.forward's own rule, which is what the fused ops compute.
    """
    if not isinstance(bn, nn.BatchNorm2d):
        return f"norm is {type(bn).__name__}, not BatchNorm2d"
    if not bn.affine:
        return "BatchNorm2d without affine parameters"
    if not (bn.training or (bn.running_mean is None and bn.running_var is None)):
        return "BatchNorm2d in eval mode normalises with running statistics"
    return None


def leaky_relu_slope(act: nn.Module) -> float | None:
    """The activation as a LeakyReLU slope (1.0 for nn.Identity: BatchNorm alone), or None if it is neither."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.Identity):
        return 1.0
    return None


def conv_bias_cancels(m: nn.Module) -> bool:
    """Whether m's conv bias cancels exactly in the BatchNorm the fused ops compute straight after its conv.

    A BatchNorm with batch statistics subtracts each channel's mean, so a per-channel constant added before it
    changes nothing after it, and the constant's gradient is zero in exact arithmetic: the fast block ops leave
    the bias out (an add, and the sum that is its gradient, per conv per step). The output is the reference's;
    the bias keeps its initial value, where the reference's takes rounding noise for a gradient and Adam, which
    normalises it, walks it about at the learning rate, unseen by the output. The state dict keeps every bias.
    """
    return (
        isinstance(m, ConvBNAct)
        and m.conv.downsample is None
        and leaky_relu_slope(m.act) is not None
        and batch_norm_reason(m.bn) is None
    )


def cancelled_conv_biases(net: nn.Module) -> frozenset[str]:
    """The names of net's conv biases that conv_bias_cancels leaves out: what a fast block op never reads."""
    cancelled = {id(m.conv.conv2d.bias) for m in net.modules() if conv_bias_cancels(m)}
    return frozenset(name for name, p in net.named_parameters() if id(p) in cancelled)


def takes_padded_input(m: nn.Module, y: torch.Tensor) -> bool:
    """Whether m's conv can read y written reflection-padded by the op that produces it.

    m must be a ConvBNAct whose conv pads by reflection (its nn.Conv2d then has padding=0) with no
    downsampler after the conv, and the pad must fit y (reflection needs H and W > pad).
    """
    return (
        isinstance(m, ConvBNAct)
        and m.conv.reflection_pad > 0
        and m.conv.downsample is None
        and m.conv.reflection_pad < min(y.shape[-2:])
    )
