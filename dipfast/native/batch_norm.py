"""Training-mode BatchNorm fused with LeakyReLU, and its merge and reflection-pad variants (CPU, C++).

    y = act((x - mean) * weight * rstd + bias),   act(z) = z if z > 0 else negative_slope * z

with mean and biased variance per channel over (N, H, W), rstd = 1 / sqrt(var + eps): what
F.leaky_relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps), negative_slope)
returns; negative_slope = 1.0 is BatchNorm alone. No running statistics are kept (DIP always
normalises with the batch's). Kernels: csrc/native/batch_norm_act.cpp (two passes forward, two
backward, fp32 statistics, deterministic for any thread count).

x: (N, C, H, W), NCHW or channels_last, fp32, bf16 or float64, on the CPU; weight, bias: (C,),
any float dtype (used in fp32, float64 for float64 input). The output has x's dtype and layout:
under torch.autocast("cpu", dtype=torch.bfloat16) a bf16 conv output stays bf16, with fp32
statistics and parameters, as eager autocast's batch_norm does. The backward recomputes the
activation's mask from x, so only x is saved (eager saves x and the BatchNorm output).

Ops: the differentiable dipfast_native::batch_norm_act (pad=0, or the reflection-padded output)
and concat_batch_norm, whose autograd is C++ (csrc/native/autograd.cpp), and the kernel ops they
pair: batch_norm_act_fwd / _bwd, batch_norm_act_reflect_pad_fwd / _bwd, concat_batch_norm_fwd / _bwd.
Their fake (shape-only) implementations are registered here, for torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipfast.native._tensors import channel_vector, compute_dtype, kernels_take, layout, readable

_ops = torch.ops.dipfast_native


def _eager_batch_norm_act(x, weight, bias, eps, negative_slope):
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    return y if negative_slope == 1.0 else F.leaky_relu(y, negative_slope)


def _batch_norm_act(x, weight, bias, eps, negative_slope, pad):
    """batch_norm_act, reflection-padded by `pad` (0: not padded): the op, or its eager twin."""
    if not kernels_take(x):
        y = _eager_batch_norm_act(x, weight, bias, eps, negative_slope)
        return F.pad(y, (pad,) * 4, mode="reflect") if pad else y
    return _ops.batch_norm_act(
        readable(x), channel_vector(weight, x), channel_vector(bias, x), float(eps), float(negative_slope), int(pad)
    )


def batch_norm_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, negative_slope: float = 0.2
) -> torch.Tensor:
    """LeakyReLU(BatchNorm(x)) with batch statistics. x: (N, C, H, W); weight, bias: (C,). Returns x's shape."""
    return _batch_norm_act(x, weight, bias, eps, negative_slope, pad=0)


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm(x) with batch statistics, no activation. x: (N, C, H, W); weight, bias: (C,)."""
    return batch_norm_act(x, weight, bias, eps, negative_slope=1.0)


def concat_batch_norm(
    skip: torch.Tensor,
    deeper: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    pad: int = 0,
) -> torch.Tensor:
    """BatchNorm(cat([skip, deeper], 1)) without the concatenation: each part is normalised
    straight into its channel slice of the one output buffer (the next conv's input).

    skip: (N, Cs, H, W), deeper: (N, Cd, H, W) (crop them to a common H, W first: views are fine);
    weight, bias: (Cs + Cd,). Returns (N, Cs + Cd, H, W) in deeper's layout (skip's if Cd == 1).
    pad > 0 (< H and < W): F.pad of that by reflection, written in the same buffer, for a following
    conv to read with padding=0 (as batch_norm_act_reflect_pad).
    """
    if skip.dtype != deeper.dtype:  # as torch.cat would
        dtype = torch.promote_types(skip.dtype, deeper.dtype)
        skip, deeper = skip.to(dtype), deeper.to(dtype)
    if not kernels_take(skip, deeper):
        y = F.batch_norm(torch.cat([skip, deeper], 1), None, None, weight, bias, training=True, eps=eps)
        return F.pad(y, (pad,) * 4, mode="reflect") if pad else y
    return _ops.concat_batch_norm(
        readable(skip),
        readable(deeper),
        channel_vector(weight, deeper),
        channel_vector(bias, deeper),
        float(eps),
        int(pad),
    )


def batch_norm_act_reflect_pad(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pad: int,
    eps: float = 1e-5,
    negative_slope: float = 0.2,
) -> torch.Tensor:
    """F.pad(batch_norm_act(x, ...), (pad,) * 4, mode="reflect"), written in one buffer.

    x: (N, C, H, W) with pad < H and pad < W. Returns (N, C, H + 2 pad, W + 2 pad) in x's layout:
    the input of a following conv that pads by reflection. The caller runs that conv with
    padding=0 on this buffer instead of F.pad + conv (PadConv does F.pad itself, so a block
    that uses this must call its nn.Conv2d directly). The backward folds the padded gradient
    back onto the interior (a gather) before the BatchNorm backward.
    """
    return _batch_norm_act(x, weight, bias, eps, negative_slope, pad)


# ---- fake (shape-only) implementations, registered once the library is loaded ---------------------------


def _channel_stats(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(c, dtype=compute_dtype(x)), x.new_empty(c, dtype=compute_dtype(x))


def _batch_norm_act_fwd_fake(x, weight, bias, eps, negative_slope):
    return torch.empty_like(x, memory_format=layout(x)), *_channel_stats(x, x.shape[1])


def _batch_norm_act_bwd_fake(grad, x, weight, bias, mean, rstd, negative_slope):
    return torch.empty_like(x, memory_format=layout(x)), *_channel_stats(x, x.shape[1])


def _concat_batch_norm_fwd_fake(skip, deeper, weight, bias, eps, pad=0):
    n, c, h, w = deeper.shape[0], skip.shape[1] + deeper.shape[1], deeper.shape[2], deeper.shape[3]
    like = deeper if deeper.shape[1] > 1 else skip
    shape = (n, c, h + 2 * pad, w + 2 * pad)
    y = torch.empty(shape, dtype=deeper.dtype, device=deeper.device, memory_format=layout(like))
    return y, *_channel_stats(deeper, c)


def _concat_batch_norm_bwd_fake(grad, skip, deeper, weight, mean, rstd, pad=0):
    c = skip.shape[1] + deeper.shape[1]
    dskip = torch.empty_like(skip, memory_format=layout(skip))
    ddeeper = torch.empty_like(deeper, memory_format=layout(deeper))
    return dskip, ddeeper, *_channel_stats(deeper, c)


def _reflect_pad_fwd_fake(x, weight, bias, eps, negative_slope, pad):
    n, c, h, w = x.shape
    y = torch.empty((n, c, h + 2 * pad, w + 2 * pad), dtype=x.dtype, device=x.device, memory_format=layout(x))
    return y, *_channel_stats(x, c)


def _reflect_pad_bwd_fake(grad, x, weight, bias, mean, rstd, negative_slope, pad):
    return torch.empty_like(x, memory_format=layout(x)), *_channel_stats(x, x.shape[1])


def _batch_norm_act_fake(x, weight, bias, eps, negative_slope, pad=0):
    return _reflect_pad_fwd_fake(x, weight, bias, eps, negative_slope, pad)[0]


def _concat_batch_norm_fake(skip, deeper, weight, bias, eps, pad=0):
    return _concat_batch_norm_fwd_fake(skip, deeper, weight, bias, eps, pad)[0]


def register_fakes() -> None:
    """Called by dipfast.native once the library has defined the ops."""
    for name, fake in [
        ("batch_norm_act", _batch_norm_act_fake),
        ("batch_norm_act_fwd", _batch_norm_act_fwd_fake),
        ("batch_norm_act_bwd", _batch_norm_act_bwd_fake),
        ("concat_batch_norm", _concat_batch_norm_fake),
        ("concat_batch_norm_fwd", _concat_batch_norm_fwd_fake),
        ("concat_batch_norm_bwd", _concat_batch_norm_bwd_fake),
        ("batch_norm_act_reflect_pad_fwd", _reflect_pad_fwd_fake),
        ("batch_norm_act_reflect_pad_bwd", _reflect_pad_bwd_fake),
    ]:
        torch.library.register_fake(f"dipfast_native::{name}", fake)
