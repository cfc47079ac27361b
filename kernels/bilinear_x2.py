"""Bilinear x2 upsampling (align_corners=False) and its transpose as Triton gathers, in any memory format.

The fast step upsamples five times a step. Torch's ops for it (dipfast.nets.bilinear_x2: its forward, and the
transpose as a replicate pad + depthwise conv) ran 0.22 + 0.42 ms of the H200's 9.0 ms bf16 step, 5-9x what
their bytes need (bench/results/2026-12-04-h200-222367b4a8/call1/profile): the pad writes a copy of the
gradient, the depthwise conv reads it back through a kernel made for general filters. Here each direction is one
pass, each output element a gather with fp32 arithmetic:

    forward    out[o] = l0 * x[i0] + l1 * x[i1] per axis, torch's source index (o + 0.5) / 2 - 0.5 clamped at 0,
               i1 = min(i0 + 1, size - 1): upsample_bilinear2d's weights and order, nested rows over columns
    transpose  dx[j] = g[2j - 1] / 4 + 3 g[2j] / 4 + 3 g[2j + 1] / 4 + g[2j + 2] / 4 per axis, g's indices
               clamped to the edge (the border's folded weights): 16 loads, each row's taps summed, then the rows

One program per output row and BLOCK_W columns; strides in, the input's memory format out (batch_norm_act's
layout rule). Ops dipfast::bilinear_x2_fwd / _bwd (custom ops with fake kernels, autograd and vmap rules that
fold the vmapped networks into the channels: the maps are per channel). Without CUDA (and without
TRITON_INTERPRET=1 when this module was imported), without triton, or for dtypes other than fp32 and bf16,
upsample_bilinear2x_fast takes dipfast.nets.bilinear_x2's torch ops.
"""

from __future__ import annotations

import torch

from dipfast.kernels.batch_norm_act import layout
from dipfast.kernels.conv_bn_lrelu import kernels_take
from dipfast.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from dipfast.kernels.vmap_fold import channel_folding_rule
from dipfast.nets.bilinear_x2 import upsample_bilinear2x

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

# One program per row of the result and tile of its columns, 4 columns a thread (8-byte stores in bf16): the forward's
# rows are 2W wide, the transpose's W.
_UPSAMPLE_TILE, _UPSAMPLE_WARPS = 512, 4
_TRANSPOSE_TILE, _TRANSPOSE_WARPS = 256, 2
_SIZES = ["C", "H"]  # unspecialised: one compilation for every level (batch_norm_act.py's _SIZES); W is a row's
# stride in NCHW, specialised anyway, and with it Triton can prove a tile's mask uniform over a vector


if _HAS_TRITON:

    @triton.jit
    def _source(o, size):
        """torch's bilinear source of output index o at scale 2 (align_corners=False): (i0, i1, l0, l1)."""
        src = tl.maximum((o.to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
        i0 = src.to(tl.int32)  # src >= 0: truncation is floor
        i1 = tl.minimum(i0 + 1, size - 1)
        l1 = src - i0.to(tl.float32)
        return i0.to(tl.int64), i1.to(tl.int64), 1.0 - l1, l1

    @triton.jit(do_not_specialize=_SIZES)
    def _upsample_kernel(
        x, out, C, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow, BLOCK_W: tl.constexpr, PDL: tl.constexpr
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0)  # over N * C * 2H output rows
        oh = row % (2 * H)
        c = (row // (2 * H)) % C
        n = row // (2 * H * C)
        ow = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = ow < 2 * W
        h0, h1, lh0, lh1 = _source(oh, H)
        w0, w1, lw0, lw1 = _source(ow, W)
        base = x + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
        x00 = tl.load(base + h0 * sxh + w0 * sxw, mask=mask, other=0.0).to(tl.float32)
        x01 = tl.load(base + h0 * sxh + w1 * sxw, mask=mask, other=0.0).to(tl.float32)
        x10 = tl.load(base + h1 * sxh + w0 * sxw, mask=mask, other=0.0).to(tl.float32)
        x11 = tl.load(base + h1 * sxh + w1 * sxw, mask=mask, other=0.0).to(tl.float32)
        value = lh0 * (lw0 * x00 + lw1 * x01) + lh1 * (lw0 * x10 + lw1 * x11)
        target = out + n.to(tl.int64) * son + c.to(tl.int64) * soc + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
        tl.store(target, value.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_taps(row_base, j, W, sgw, mask):
        """sum over the four columns 2j - 1 .. 2j + 2 of one gradient row (clamped), with taps 1/4, 3/4, 3/4, 1/4."""
        b0 = tl.maximum(2 * j - 1, 0).to(tl.int64)
        b1 = (2 * j).to(tl.int64)
        b2 = (2 * j + 1).to(tl.int64)
        b3 = tl.minimum(2 * j + 2, 2 * W - 1).to(tl.int64)
        g0 = tl.load(row_base + b0 * sgw, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(row_base + b1 * sgw, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(row_base + b2 * sgw, mask=mask, other=0.0).to(tl.float32)
        g3 = tl.load(row_base + b3 * sgw, mask=mask, other=0.0).to(tl.float32)
        return 0.25 * g0 + 0.75 * g1 + 0.75 * g2 + 0.25 * g3

    @triton.jit(do_not_specialize=_SIZES)
    def _transpose_kernel(
        g, dx, C, H, W, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw, BLOCK_W: tl.constexpr, PDL: tl.constexpr
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0)  # over N * C * H rows of dx
        i = row % H
        c = (row // H) % C
        n = row // (H * C)
        j = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = j < W
        base = g + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
        a0 = tl.maximum(2 * i - 1, 0).to(tl.int64)
        a1 = (2 * i).to(tl.int64)
        a2 = (2 * i + 1).to(tl.int64)
        a3 = tl.minimum(2 * i + 2, 2 * H - 1).to(tl.int64)
        acc = 0.25 * _row_taps(base + a0 * sgh, j, W, sgw, mask) + 0.75 * _row_taps(base + a1 * sgh, j, W, sgw, mask)
        acc += 0.75 * _row_taps(base + a2 * sgh, j, W, sgw, mask) + 0.25 * _row_taps(base + a3 * sgh, j, W, sgw, mask)
        target = dx + n.to(tl.int64) * sdn + c.to(tl.int64) * sdc + i.to(tl.int64) * sdh + j.to(tl.int64) * sdw
        tl.store(target, acc.to(dx.dtype.element_ty), mask=mask)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout(x))
    if out.numel():
        grid = (n * c * 2 * h, triton.cdiv(2 * w, _UPSAMPLE_TILE))
        _upsample_kernel[grid](
            x, out, c, h, w, *x.stride(), *out.stride(), BLOCK_W=_UPSAMPLE_TILE, num_warps=_UPSAMPLE_WARPS,
            **launch_options(x),
        )  # fmt: skip
    return out


def _transpose(grad: torch.Tensor) -> torch.Tensor:
    n, c, h2, w2 = grad.shape
    h, w = h2 // 2, w2 // 2
    dx = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=layout(grad))
    if dx.numel():
        grid = (n * c * h, triton.cdiv(w, _TRANSPOSE_TILE))
        _transpose_kernel[grid](
            grad, dx, c, h, w, *grad.stride(), *dx.stride(), BLOCK_W=_TRANSPOSE_TILE, num_warps=_TRANSPOSE_WARPS,
            **launch_options(grad),
        )  # fmt: skip
    return dx


@torch.library.custom_op("dipfast::bilinear_x2_fwd", mutates_args=())
def _bilinear_x2_fwd(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) in x's dtype and memory format."""
    return _upsample(x)


@_bilinear_x2_fwd.register_fake
def _(x):
    n, c, h, w = x.shape
    return torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout(x))


@torch.library.custom_op("dipfast::bilinear_x2_bwd", mutates_args=())
def _bilinear_x2_bwd(grad: torch.Tensor) -> torch.Tensor:
    """The upsample's transpose: (N, C, 2H, 2W) -> (N, C, H, W) in grad's dtype and memory format."""
    return _transpose(grad)


@_bilinear_x2_bwd.register_fake
def _(grad):
    n, c, h2, w2 = grad.shape
    return torch.empty((n, c, h2 // 2, w2 // 2), dtype=grad.dtype, device=grad.device, memory_format=layout(grad))


def _backward_of_fwd(ctx, grad):
    return _bilinear_x2_bwd(grad)


_bilinear_x2_fwd.register_autograd(_backward_of_fwd)


for _op in (_bilinear_x2_fwd, _bilinear_x2_bwd):  # both maps are per channel
    _op.register_vmap(channel_folding_rule(_op))


def bilinear_x2_path(x: torch.Tensor) -> str:
    """'triton' where upsample_bilinear2x_fast runs the kernels for x, else 'torch'."""
    return "triton" if kernels_take(x.dtype, x.device) else "torch"


def upsample_bilinear2x_fast(x: torch.Tensor) -> torch.Tensor:
    """nn.Upsample(scale_factor=2, mode='bilinear') of an (N, C, H, W) x in x's dtype (under autocast too), by the
    Triton gathers where they run for x (bilinear_x2_path), else dipfast.nets.bilinear_x2's torch ops."""
    if x.dim() != 4:
        raise ValueError(f"upsample_bilinear2x_fast takes (N, C, H, W); got shape {tuple(x.shape)}")
    if bilinear_x2_path(x) != "triton":
        return upsample_bilinear2x(x)
    return _bilinear_x2_fwd(x)
