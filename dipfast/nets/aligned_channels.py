"""Convolutions with their channel counts padded to the multiple that tensor cores read, results unchanged.

cuDNN's tensor-core kernels load channels in 16-byte vectors: 8 bf16 values, or 4 fp32 values for TF32. A conv
whose input or output channel count is not a multiple of that cannot run them as it is: cuDNN converts and pads
it, or runs its legacy kernels. The default net has such convs at every level: the 132-channel merge conv (4 skip
channels + 128) and the skip convs' 4 outputs, and the 3-channel head. On an H200 the bf16 step spent 1.3 of its
11.9 ms in the legacy `dgrad_engine` and `precomputed_convolve_sgemm` kernels on four calls, most likely the
128 -> 4 skip convs (bench/results/2026-12-04-h200-504226cc86/profile; bench/conv_layouts.py names them).

Zero channels add nothing to any sum, so the padded conv computes the module's outputs (in another order of
summation) and its weight gradient's real part; the padding's own gradient is dropped. The module's parameters
keep their shapes (state dicts, Adam state and the original's layout are untouched): the weight is padded on
the fly, a copy of a few hundred kB per conv and step.

    align_conv_channels(net, multiple)     every PadConv of net pads its conv to `multiple` (1: none)
    aligned_conv2d(conv, x, multiple)      one conv so
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VECTOR_BYTES = 16  # what a tensor-core kernel loads per channel vector


def channel_multiple(dtype: torch.dtype) -> int:
    """The channel multiple tensor cores read in `dtype`: 16 bytes' worth (bf16: 8, fp32 under TF32: 4)."""
    return VECTOR_BYTES // torch.empty((), dtype=dtype).element_size()


def aligned_conv2d(conv: nn.Conv2d, x: torch.Tensor, multiple: int, bias: bool = True) -> torch.Tensor:
    """conv(x), computed with input and output channels zero-padded to a multiple of `multiple`; bias=False leaves
    the conv's bias out (as PadConv.from_padded does).

    Grouped convs and padding modes other than zeros run as they are (the nets have none; under vmap the
    networks become groups only below this call, so each network's channels are padded alone).
    """
    extra_in, extra_out = -conv.in_channels % multiple, -conv.out_channels % multiple
    if not (extra_in or extra_out) or conv.groups != 1 or conv.padding_mode != "zeros":
        return conv._conv_forward(x, conv.weight, conv.bias if bias else None)
    # F.pad pads the last dimensions first: (W, H, C_in, C_out) for the weight, (W, H, C) for x
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, extra_in, 0, extra_out))
    bias = None if conv.bias is None or not bias else F.pad(conv.bias, (0, extra_out))
    if extra_in:
        x = F.pad(x, (0, 0, 0, 0, 0, extra_in))
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
    return y[:, : conv.out_channels] if extra_out else y


def align_conv_channels(net: nn.Module, multiple: int) -> nn.Module:
    """Every PadConv of `net` (in place) runs its conv with channels padded to `multiple`; 1 undoes it. A PadConv
    is known by its channel_multiple attribute (as use_block_ops knows its modules: layers imports this file)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}")
    for module in net.modules():
        if hasattr(module, "channel_multiple"):
            module.channel_multiple = multiple
    return net
