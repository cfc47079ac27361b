"""Reflection padding in the input's memory format, forward and adjoint as Triton gathers.

torch's CUDA reflection pad is NCHW-only: its forward calls input.contiguous() and writes NCHW, its backward zero-fills
an NCHW gradient and scatters into it with atomicAdd (aten/src/ATen/native/cuda/ReflectionPad.cu). The native step's
level inputs are the only activations no BatchNorm writes padded for the conv that reads them (dipfast.nets
.padded_writes): on the H200 their pads took 0.18 ms of the bf16 step in NCHW (4 + 4 calls), and 1.0 ms in
channels_last (14 + 14, conversions around them: bench/results/2026-12-04-h200-222367b4a8/call1/profile). Here:

    forward    out[hp, wp] = x[reflect(hp - pad), reflect(wp - pad)]: one gather, every element written once
    backward   dx = conv_bn_lrelu.reflect_fold(grad): each pixel sums its pre-images in fp32, no atomics, no zero fill

both in the input's layout (batch_norm_act's rule), any strides in. Ops dipfast::reflection_pad_fwd / _bwd with fake
kernels, autograd and vmap rules (the pad is per channel: the vmapped networks fold into the channels). Where the
kernels do not run (kernels_take: no CUDA and no interpreter, no triton, float64), reflection_pad is F.pad's, its
result copied to the input's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipfast.kernels.batch_norm_act import layout
from dipfast.kernels.configs import pass_tiles
from dipfast.kernels.conv_bn_lrelu import kernels_take, reflect_fold
from dipfast.kernels.vmap_fold import channel_folding_rule

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

_SIZES = ["total", "channels", "in_h", "in_w"]  # unspecialised: one compilation for every level (batch_norm_act.py)
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False

if _HAS_TRITON:
    from dipfast.kernels.batch_norm_act import _reflect

    @triton.jit(do_not_specialize=_SIZES)
    def _reflection_pad_kernel(
        x_ptr,  # (N, C, H, W) any strides
        out_ptr,  # (N, C, H + 2 PAD, W + 2 PAD), NCHW or channels_last
        total,  # out's elements
        channels,
        in_h,
        in_w,
        sx_n, sx_c, sx_h, sx_w,
        so_n, so_c, so_h, so_w,
        PAD: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,  # out's layout: the elements are enumerated in its memory order
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        out_w = in_w + 2 * PAD
        out_h = in_h + 2 * PAD
        if CHANNELS_LAST:
            c = offs % channels
            wp = (offs // channels) % out_w
            hp = (offs // (channels * out_w)) % out_h
        else:
            wp = offs % out_w
            hp = (offs // out_w) % out_h
            c = (offs // (out_w * out_h)) % channels
        n = offs // (channels * out_w * out_h)
        h = _reflect(hp - PAD, in_h)
        w = _reflect(wp - PAD, in_w)
        v = tl.load(x_ptr + n * sx_n + c * sx_c + h * sx_h + w * sx_w, mask=mask)
        tl.store(out_ptr + n * so_n + c * so_c + hp * so_h + wp * so_w, v, mask=mask)


def _padded_empty(x: torch.Tensor, pad: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return torch.empty((n, c, h + 2 * pad, w + 2 * pad), dtype=x.dtype, device=x.device, memory_format=layout(x))


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


@torch.library.custom_op("dipfast::reflection_pad_fwd", mutates_args=())
def _reflection_pad_fwd(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H + 2 pad, W + 2 pad), reflected, in x's dtype and layout."""
    out = _poisoned(_padded_empty(x, pad))
    if out.numel():
        tile = pass_tiles(x.dtype)
        _reflection_pad_kernel[(triton.cdiv(out.numel(), tile.block),)](
            x, out, out.numel(), x.shape[1], x.shape[2], x.shape[3], *x.stride(), *out.stride(), PAD=pad,
            CHANNELS_LAST=layout(x) == torch.channels_last, BLOCK=tile.block, num_warps=tile.num_warps,
        )  # fmt: skip
    return out


@_reflection_pad_fwd.register_fake
def _(x, pad):
    return _padded_empty(x, pad)


def _unpadded_empty(grad: torch.Tensor, pad: int) -> torch.Tensor:
    n, c, hp, wp = grad.shape
    shape = (n, c, hp - 2 * pad, wp - 2 * pad)
    return torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout(grad))


@torch.library.custom_op("dipfast::reflection_pad_bwd", mutates_args=())
def _reflection_pad_bwd(grad: torch.Tensor, pad: int) -> torch.Tensor:
    """The pad's adjoint: (N, C, H + 2 pad, W + 2 pad) -> (N, C, H, W), each pixel the fp32 sum of its pre-images, in
    grad's dtype and layout."""
    dx = _poisoned(_unpadded_empty(grad, pad))
    if dx.numel():
        reflect_fold(grad, dx, pad)
    return dx


@_reflection_pad_bwd.register_fake
def _(grad, pad):
    return _unpadded_empty(grad, pad)


def _setup(ctx, inputs, output):
    ctx.pad = inputs[1]


def _backward_of_fwd(ctx, grad):
    return _reflection_pad_bwd(grad, ctx.pad), None


_reflection_pad_fwd.register_autograd(_backward_of_fwd, setup_context=_setup)


for _op in (_reflection_pad_fwd, _reflection_pad_bwd):  # the pad is per channel
    _op.register_vmap(channel_folding_rule(_op))


def reflection_pad_path(x: torch.Tensor, pad: int) -> str:
    """'triton' where reflection_pad runs the kernels for x, else 'torch'."""
    fits = 0 < pad < min(x.shape[-2:])  # a wider pad has no reflection: F.pad says so
    return "triton" if fits and kernels_take(x.dtype, x.device) else "torch"


def reflection_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """F.pad(x, (pad,) * 4, mode='reflect') of an (N, C, H, W) x, in x's layout: by the Triton gathers where they run
    for x (reflection_pad_path), else by F.pad, copied to x's layout where it is channels_last."""
    if x.dim() != 4:
        raise ValueError(f"reflection_pad takes (N, C, H, W); got shape {tuple(x.shape)}")
    if reflection_pad_path(x, pad) == "triton":
        return _reflection_pad_fwd(x, pad)
    return F.pad(x, (pad,) * 4, mode="reflect").contiguous(memory_format=layout(x))
