"""Plain-PyTorch reference twins of the fused ops in dipfast.kernels (STYLE.md, section 5.5).

Each twin has the signature of its kernel op and is the oracle of tests/parity and the baseline of
bench/ops. The Lanczos2 twins call dipfast.operators.Lanczos2Decimation, so the engine's SR operator
and the oracle are one implementation; conv_bn_lrelu computes what dipfast.nets.layers.ConvBNAct
computes with reflection padding, and concat_bn_conv_bn_lrelu what dipfast.nets.skip.SkipLevel's
merge_bn then up compute (tests/test_reference.py holds them equal); batch_norm_act and
concat_batch_norm are a block's BatchNorm + activation and a merge's BatchNorm, written as the
reflection-padded input of the next conv.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dipfast.operators import Lanczos2Decimation


@functools.lru_cache(maxsize=None)
def _decimation(factor: int) -> Lanczos2Decimation:
    return Lanczos2Decimation(factor)


def lanczos2_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C, H // f, W // f); y = S_f(h * R(x)).

    R is replication padding by (K - f) / 2 (K = 4f taps), h the 2-D Lanczos2 kernel of
    dipfast.operators.lanczos_kernel, applied per channel, S_f keeps every f-th sample.
    Exactly Lanczos2Decimation(factor).A.
    """
    return _decimation(factor).A(x)


def lanczos2_mse(x: torch.Tensor, y: torch.Tensor, factor: int) -> torch.Tensor:
    """x: (N, C, H, W), y: (N, C, H // f, W // f) -> scalar mean((lanczos2_downsample(x) - y)^2)."""
    return F.mse_loss(lanczos2_downsample(x, factor), y)


def conv_bn_lrelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    stride: int = 1,
    groups: int = 1,
    eps: float = 1e-5,
    slope: float = 0.2,
) -> torch.Tensor:
    """leaky_relu(batch_norm(conv2d(pad(x, reflect, (k - 1) // 2), weight, bias, stride, groups), training), slope).

    x: (N, C_in, H, W); weight: (C_out, C_in / groups, k, k), k odd; bias: (C_out,) or None;
    gamma, beta: (C_out,). BatchNorm uses the batch statistics (biased variance), as DIP always
    does; no running statistics are kept. groups > 1 carries independent networks side by side.
    """
    pad = (weight.shape[-1] - 1) // 2
    if pad:
        x = F.pad(x, (pad,) * 4, mode="reflect")
    y = F.conv2d(x, weight, bias, stride=stride, groups=groups)
    y = F.batch_norm(y, None, None, gamma, beta, training=True, eps=eps)
    return F.leaky_relu(y, slope)


def concat_bn_conv_bn_lrelu(
    skip: torch.Tensor,
    deeper: torch.Tensor,
    merge_gamma: torch.Tensor,
    merge_beta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    groups: int = 1,
    eps: float = 1e-5,
    slope: float = 0.2,
) -> torch.Tensor:
    """The merge of a skip level: conv_bn_lrelu(batch_norm(merged, training), ..., stride=1, groups=groups).

    skip: (N, G * Cs, H, W) and deeper: (N, G * Cd, H, W), already cropped to one size, G = groups; merged is their
    concatenation per group, [skip_g, deeper_g] for each g (skip channels first; cat([skip, deeper], 1) for G = 1);
    merge_gamma, merge_beta: (G * (Cs + Cd),), the affine parameters of the merge BatchNorm (batch statistics, no
    activation), in merged's channel order; weight: (C_out, Cs + Cd, k, k) and the rest as in conv_bn_lrelu.
    With G = 1, what dipfast.nets.skip.SkipLevel computes with merge_bn then up; G networks side by side otherwise.
    """
    n, _, h, w = skip.shape
    merged = torch.cat([skip.reshape(n, groups, -1, h, w), deeper.reshape(n, groups, -1, h, w)], 2)
    merged = F.batch_norm(merged.reshape(n, -1, h, w), None, None, merge_gamma, merge_beta, training=True, eps=eps)
    return conv_bn_lrelu(merged, weight, bias, gamma, beta, groups=groups, eps=eps, slope=slope)


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pad: int = 0,
    eps: float = 1e-5,
    negative_slope: float = 0.2,
) -> torch.Tensor:
    """F.pad(leaky_relu(batch_norm(x, training), negative_slope), (pad,) * 4, mode="reflect").

    x: (N, C, H, W); weight, bias: (C,). Batch statistics (biased variance), no running statistics;
    negative_slope = 1.0 is BatchNorm alone; pad = 0 pads nothing. Returns (N, C, H + 2 pad, W + 2 pad).
    """
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    if negative_slope != 1.0:
        y = F.leaky_relu(y, negative_slope)
    return F.pad(y, (pad,) * 4, mode="reflect") if pad else y


def concat_batch_norm(
    skip: torch.Tensor,
    deeper: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pad: int = 0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """batch_norm_act(cat([skip, deeper], 1), weight, bias, pad=pad, eps=eps, negative_slope=1.0).

    skip: (N, Cs, H, W), deeper: (N, Cd, H, W), already cropped to one H, W; weight, bias: (Cs + Cd,).
    A skip level's merge_bn, written as the padded input of level.up's conv.
    """
    merged = torch.cat([skip, deeper], 1)
    return batch_norm_act(merged, weight, bias, pad=pad, eps=eps, negative_slope=1.0)
