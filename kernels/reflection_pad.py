"""Reflection padding in the input's memory format, forward and adjoint as Triton gathers.

torch's CUDA reflection pad is NCHW-only: its forward calls input.contiguous() and writes NCHW, its backward zero-fills
an NCHW gradient and scatters into it with atomicAdd (aten/src/ATen/native/cuda/ReflectionPad.cu). The native step's
level inputs are the only activations no BatchNorm writes padded for the conv that reads them (dipfast.nets
.padded_writes): on the H200 their pads took 0.18 ms of the bf16 step in NCHW (4 + 4 calls), and 1.0 ms in
channels_last (14 + 14, conversions around them: bench/results/2026-12-04-h200-222367b4a8/call1/profile). Here:

    forward    out[hp, wp] = x[reflect(hp - pad), reflect(wp - pad)]: one gather, every element written once
    backward   dx[h, w] = the sum of grad over (h, w)'s pre-images, in fp32: no atomics, no zero fill

both in the input's layout (batch_norm_act's rule), any strides in. They are batch_norm_act's padded write and
padded gradient without the normalisation, on its tiles and its helpers (_padded_row, _folded_grad): one program per
row and (BLOCK_W, BLOCK_C) tile, no per-element index division, the source's columns read in order. Ops
dipfast::reflection_pad_fwd / _bwd with fake kernels, autograd and vmap rules (the pad is per channel: the vmapped
networks fold into the channels). Where the kernels do not run (kernels_take: no CUDA and no interpreter, no triton,
float64), reflection_pad is F.pad's, its result copied to the input's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipfast.kernels.batch_norm_act import _plane, layout
from dipfast.kernels.conv_bn_lrelu import kernels_take
from dipfast.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from dipfast.kernels.vmap_fold import channel_folding_rule

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

_SIZES = ["height", "channels"]  # unspecialised: one compilation for every level (batch_norm_act.py's _SIZES)
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False

if _HAS_TRITON:
    from dipfast.kernels.batch_norm_act import _channel_mask, _folded_grad, _padded_row, _row_tile

    @triton.jit(do_not_specialize=_SIZES)
    def _reflection_pad_kernel(
        x_ptr,  # (N, C, H, W) any strides
        out_ptr,  # (N, C, H + 2 PAD, W + 2 PAD), x's layout
        height,
        width,
        channels,
        sx_n, sx_c, sx_h, sx_w,
        so_n, so_c, so_h, so_w,
        PAD: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,  # BLOCK_C divides the channels (batch_norm_act's _channel_mask)
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        n, hp, w0, wp, c = _row_tile(height + 2 * PAD, BLOCK_W, BLOCK_C)  # padded rows too
        mask_w = wp < width + 2 * PAD
        mask_c = _channel_mask(c, channels, EVEN_C)
        # x as a merge's deeper part, with no skip part (0 channels)
        v = _padded_row(
            x_ptr, x_ptr, n, hp, w0, wp, c, mask_w, height, width, mask_c, 0, channels,
            sx_n, sx_c, sx_h, sx_w, sx_n, sx_c, sx_h, sx_w, PAD, BLOCK_W,
        )  # fmt: skip
        mask = mask_w[:, None] & mask_c[None, :]
        tl.store(out_ptr + n * so_n + hp * so_h + (wp * so_w)[:, None] + (c * so_c)[None, :], v, mask=mask)

    @triton.jit(do_not_specialize=_SIZES)
    def _reflection_fold_kernel(
        g_ptr,  # (N, C, H + 2 PAD, W + 2 PAD) any strides
        dx_ptr,  # (N, C, H, W), g's layout
        height,
        width,
        channels,
        g_sn, g_sc, g_sh, g_sw,
        sx_n, sx_c, sx_h, sx_w,
        PAD: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,  # BLOCK_C divides the channels (batch_norm_act's _channel_mask)
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        n, h, w0, w, c = _row_tile(height, BLOCK_W, BLOCK_C)
        mask_c = _channel_mask(c, channels, EVEN_C)
        mask = (w < width)[:, None] & mask_c[None, :]
        acc = _folded_grad(g_ptr, n, h, w0, w, c, mask, mask_c, height, width, g_sn, g_sc, g_sh, g_sw, PAD, BLOCK_W)
        tl.store(dx_ptr + n * sx_n + h * sx_h + (w * sx_w)[:, None] + (c * sx_c)[None, :], acc, mask=mask)


def _launch(kernel, src: torch.Tensor, dst: torch.Tensor, pad: int, unpadded: torch.Tensor) -> None:
    """kernel with one program per row of dst and tile, on batch_norm_act's tiles for dst's layout; the sizes it
    takes are those of the unpadded one of src and dst."""
    _, c, h, w = unpadded.shape
    rows = dst.shape[0] * dst.shape[2]
    block_w, block_c, c_tiles, *_, config = _plane(layout(dst), dst.dtype, rows, dst.shape[3], c)
    kernel[(rows, triton.cdiv(dst.shape[3], block_w), c_tiles)](
        src, dst, h, w, c, *src.stride(), *dst.stride(), PAD=pad, BLOCK_W=block_w, BLOCK_C=block_c,
        EVEN_C=c % block_c == 0, num_warps=config.num_warps, **launch_options(src),
    )  # fmt: skip


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
        _launch(_reflection_pad_kernel, x, out, pad, unpadded=x)
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
        _launch(_reflection_fold_kernel, grad, dx, pad, unpadded=dx)
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
