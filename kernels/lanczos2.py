"""Fused Lanczos2 decimation (the SR loss operator) and its exact adjoint, in Triton.

y = S_f(h * R(x)) per channel: R is replication padding by P = (K - f) / 2, h the separable
Lanczos2 kernel (K = 4f taps per axis, phase 0.5: dipfast.operators.lanczos2_taps, whose outer
product is lanczos_kernel to 1e-16), S_f keeps every f-th sample. Factors 2, 4, 8; any H, W with
H // f >= 1 and W // f >= 1; the output is (H // f, W // f).

Layout: x (N, C, H, W) contiguous, fp32 or bf16 (loaded and converted to fp32); all math, the
outputs and the loss are fp32 (the design keeps the loss path in fp32); dx is returned in x's dtype.

Two 1-D strided passes, one kernel each way, on a (O, L, I) view of the tensor (the pass runs
along L): horizontal on (N*C*H, W, 1), then vertical on (N*C, H, W // f). R is folded into the
index by clamping. The backward is the transposed pair written as a gather: each high-res sample
l sums the <= K / f output windows that cover it, with weight taps[l - s] (s the window start);
at l = 0 and l = L - 1 the clamp folds every tap past the border onto the edge sample, whose
weight is then the prefix (suffix) sum of the taps. No atomics. The fused MSE variant computes
the residual A x - y in the vertical pass and writes one partial sum of squares per program,
summed on the host side of the op (deterministic). See ../shared/notes/kernels.md, section 1.5.

Ops: dipfast::lanczos2_downsample_fwd, dipfast::lanczos2_downsample_bwd, dipfast::lanczos2_mse_fwd
(torch.library.custom_op with register_fake and register_autograd, so torch.compile(fullgraph=True)
traces through). Reference twins: dipfast.reference.lanczos2_downsample and lanczos2_mse.
Without CUDA (and without TRITON_INTERPRET=1 when this module was imported), or without triton,
the public functions call the twins; lanczos2_path(x) says which path a tensor takes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from dipfast import reference
from dipfast.kernels.configs import pass_tiles
from dipfast.kernels.vmap_fold import batch_first, fold_into_rows, unfold_rows
from dipfast.operators import LANCZOS_FACTORS, lanczos2_taps

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # the package always works: the public functions fall back to dipfast.reference
    _HAS_TRITON = False

# Kernels are built for the interpreter or for the GPU when this module is imported (triton.jit reads
# TRITON_INTERPRET then), so the dispatch keys on the value seen at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False


if _HAS_TRITON:

    @triton.jit
    def _lanczos2_fwd_kernel(
        x_ptr,  # (O, L, I) fp32 or bf16, contiguous
        taps_ptr,  # (K,) fp32 Lanczos2 taps
        tgt_ptr,  # (O, L_out, I) target, read only when FUSE_MSE
        out_ptr,  # (O, L_out, I) fp32: A x along L, or the residual A x - target when FUSE_MSE
        part_ptr,  # (programs,) fp32 partial sums of squared residuals, written only when FUSE_MSE
        total,  # O * L_out * I
        length,
        l_out,
        inner,
        FACTOR: tl.constexpr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        FUSE_MSE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        i = offs % inner
        lo = (offs // inner) % l_out
        o = offs // (inner * l_out)
        base = o * length * inner + i
        start = lo * FACTOR - PAD
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            idx = tl.minimum(tl.maximum(start + k, 0), length - 1)  # replication pad folded into the index
            w = tl.load(taps_ptr + k)
            v = tl.load(x_ptr + base + idx * inner, mask=mask, other=0.0).to(tl.float32)
            acc += w * v
        if FUSE_MSE:
            t = tl.load(tgt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc = acc - t
            tl.store(part_ptr + pid, tl.sum(tl.where(mask, acc * acc, 0.0), axis=0))
        tl.store(out_ptr + offs, acc, mask=mask)

    @triton.jit
    def _lanczos2_bwd_kernel(
        g_ptr,  # (O, L_out, I) fp32 incoming gradient, contiguous
        taps_ptr,  # (3, K) fp32: taps, prefix sums, suffix sums
        dx_ptr,  # (O, L, I) fp32
        total,  # O * L * I
        length,
        l_out,
        inner,
        FACTOR: tl.constexpr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        i = offs % inner
        pos = (offs // inner) % length
        o = offs // (inner * length)
        base = o * l_out * inner + i
        last = (pos + PAD) // FACTOR  # the last window that starts at or before pos (pos + PAD >= 0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K // FACTOR):  # the <= K / f windows that cover pos
            lout = last - j
            k = pos - (lout * FACTOR - PAD)  # tap of window lout that lands on pos; k >= 0
            valid = mask & (lout >= 0) & (lout < l_out) & (k < K)
            kc = tl.minimum(k, K - 1)
            w_in = tl.load(taps_ptr + kc, mask=valid, other=0.0)
            w_left = tl.load(taps_ptr + K + kc, mask=valid, other=0.0)  # taps 0..k all clamp onto pos = 0
            w_right = tl.load(taps_ptr + 2 * K + kc, mask=valid, other=0.0)  # taps k..K-1 onto pos = length - 1
            w = tl.where(pos == 0, w_left, tl.where(pos == length - 1, w_right, w_in))
            g = tl.load(g_ptr + base + lout * inner, mask=valid, other=0.0)
            acc += w * g
        tl.store(dx_ptr + offs, acc, mask=mask)


@functools.lru_cache(maxsize=None)
def _taps(factor: int, device: torch.device) -> torch.Tensor:
    taps = lanczos2_taps(factor)
    table = np.stack([taps, np.cumsum(taps), np.cumsum(taps[::-1])[::-1]])
    return torch.from_numpy(table.astype(np.float32)).to(device)


def _alloc(shape, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _fwd_pass(x, factor, o, length, inner, target=None):
    """x viewed as (o, length, inner) -> (o, length // factor, inner) fp32; with target, the residual."""
    l_out = length // factor
    out = _alloc((o, l_out, inner), x.device)
    total = out.numel()
    tile = pass_tiles(x.dtype)
    grid = (triton.cdiv(total, tile.block),)
    part = _alloc((grid[0],), x.device) if target is not None else out
    _lanczos2_fwd_kernel[grid](
        x,
        _taps(factor, x.device),
        target if target is not None else out,
        out,
        part,
        total,
        length,
        l_out,
        inner,
        FACTOR=factor,
        K=4 * factor,
        PAD=3 * factor // 2,
        FUSE_MSE=target is not None,
        BLOCK=tile.block,
        num_warps=tile.num_warps,
    )
    return out, part


def _bwd_pass(g, factor, o, length, inner):
    """g viewed as (o, length // factor, inner) -> the adjoint (o, length, inner) fp32."""
    dx = _alloc((o, length, inner), g.device)
    total = dx.numel()
    tile = pass_tiles(g.dtype)
    _lanczos2_bwd_kernel[(triton.cdiv(total, tile.block),)](
        g,
        _taps(factor, g.device),
        dx,
        total,
        length,
        length // factor,
        inner,
        FACTOR=factor,
        K=4 * factor,
        PAD=3 * factor // 2,
        BLOCK=tile.block,
        num_warps=tile.num_warps,
    )
    return dx


@torch.library.custom_op("dipfast::lanczos2_downsample_fwd", mutates_args=())
def _lanczos2_downsample_fwd(x: torch.Tensor, factor: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.contiguous()
    tmp, _ = _fwd_pass(x, factor, n * c * h, w, 1)
    y, _ = _fwd_pass(tmp, factor, n * c, h, w // factor)
    return y.view(n, c, h // factor, w // factor)


@_lanczos2_downsample_fwd.register_fake
def _(x, factor):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h // factor, w // factor), dtype=torch.float32)


@torch.library.custom_op("dipfast::lanczos2_downsample_bwd", mutates_args=())
def _lanczos2_downsample_bwd(grad: torch.Tensor, factor: int, h: int, w: int) -> torch.Tensor:
    n, c = grad.shape[:2]
    grad = grad.contiguous().float()
    tmp = _bwd_pass(grad, factor, n * c, h, w // factor)  # vertical adjoint: (N*C, H // f, W // f) -> H
    dx = _bwd_pass(tmp, factor, n * c * h, w, 1)  # horizontal adjoint: (N*C*H, W // f) -> W
    return dx.view(n, c, h, w)


@_lanczos2_downsample_bwd.register_fake
def _(grad, factor, h, w):
    return grad.new_empty((grad.shape[0], grad.shape[1], h, w), dtype=torch.float32)


def _downsample_bwd_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


def _downsample_bwd_backward(ctx, grad):
    """The backward is linear in its incoming gradient: its own adjoint is A (double backward)."""
    return _lanczos2_downsample_fwd(grad.contiguous(), ctx.factor), None, None, None


_lanczos2_downsample_bwd.register_autograd(_downsample_bwd_backward, setup_context=_downsample_bwd_setup)


def _downsample_setup(ctx, inputs, output):
    x, factor = inputs
    ctx.factor, ctx.size, ctx.dtype = factor, tuple(x.shape[-2:]), x.dtype


def _downsample_backward(ctx, grad):
    dx = _lanczos2_downsample_bwd(grad.contiguous(), ctx.factor, *ctx.size)
    return dx.to(ctx.dtype), None


_lanczos2_downsample_fwd.register_autograd(_downsample_backward, setup_context=_downsample_setup)


@torch.library.custom_op("dipfast::lanczos2_mse_fwd", mutates_args=())
def _lanczos2_mse_fwd(x: torch.Tensor, y: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    x, y = x.contiguous(), y.contiguous()
    tmp, _ = _fwd_pass(x, factor, n * c * h, w, 1)
    residual, part = _fwd_pass(tmp, factor, n * c, h, w // factor, target=y)
    return part.sum() / residual.numel(), residual.view(n, c, h // factor, w // factor)


@_lanczos2_mse_fwd.register_fake
def _(x, y, factor):
    n, c, h, w = x.shape
    return x.new_empty((), dtype=torch.float32), x.new_empty((n, c, h // factor, w // factor), dtype=torch.float32)


def _mse_setup(ctx, inputs, output):
    x, y, factor = inputs
    ctx.factor, ctx.size, ctx.dtypes = factor, tuple(x.shape[-2:]), (x.dtype, y.dtype)
    ctx.save_for_backward(output[1])


def _mse_backward(ctx, grad_loss, grad_residual):
    (residual,) = ctx.saved_tensors
    dr = residual * (2 * grad_loss) / residual.numel()  # d mean(r^2) / dr (no SymFloat: divide the tensor)
    if grad_residual is not None:
        dr = dr + grad_residual
    dx = _lanczos2_downsample_bwd(dr.contiguous(), ctx.factor, *ctx.size)
    return dx.to(ctx.dtypes[0]), (-dr).to(ctx.dtypes[1]), None


_lanczos2_mse_fwd.register_autograd(_mse_backward, setup_context=_mse_setup)


# vmap rules (vmap_fold.py): the decimation is per image, so B networks' images fold into the batch.


@_lanczos2_downsample_fwd.register_vmap
def _(info, in_dims, x, factor):
    b = info.batch_size
    return unfold_rows(_lanczos2_downsample_fwd(fold_into_rows(batch_first(x, in_dims[0], b)), factor), b), 0


@_lanczos2_downsample_bwd.register_vmap
def _(info, in_dims, grad, factor, h, w):
    b = info.batch_size
    return unfold_rows(_lanczos2_downsample_bwd(fold_into_rows(batch_first(grad, in_dims[0], b)), factor, h, w), b), 0


@_lanczos2_mse_fwd.register_vmap
def _(info, in_dims, x, y, factor):
    """Each network's own mean: from the folded residual (one pass over the small low-resolution tensor)."""
    b = info.batch_size
    x, y = (fold_into_rows(batch_first(t, d, b)) for t, d in zip((x, y), in_dims[:2], strict=True))
    _, residual = _lanczos2_mse_fwd(x, y, factor)
    residual = unfold_rows(residual, b)
    return (residual.square().flatten(1).mean(1), residual), (0, 0)


def lanczos2_path(x: torch.Tensor) -> str:
    """'triton' or 'reference': the path lanczos2_downsample and lanczos2_mse take for x.

    Triton runs for fp32/bf16 inputs on CUDA, or on CPU when TRITON_INTERPRET=1 was set before this
    module was imported; otherwise (no triton, CPU without the interpreter, other dtypes) the twin.
    """
    if not _HAS_TRITON or x.dtype not in _KERNEL_DTYPES:
        return "reference"
    on_device = x.device.type == "cpu" if _INTERPRET else x.device.type == "cuda"
    return "triton" if on_device else "reference"


def _check(x: torch.Tensor, factor: int) -> None:
    if factor not in LANCZOS_FACTORS:
        raise ValueError(f"Lanczos2 decimation factor must be one of {LANCZOS_FACTORS}; got {factor!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W); got {tuple(x.shape)}")
    if x.shape[-2] < factor or x.shape[-1] < factor:
        raise ValueError(f"x of {tuple(x.shape)} gives an empty output at factor {factor}: H and W must be >= {factor}")


def lanczos2_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x: (N, C, H, W) fp32 or bf16 -> (N, C, H // f, W // f) fp32; y = S_f(h * R(x)), f in {2, 4, 8}.

    Differentiable in x (the backward is the exact adjoint, returned in x's dtype). Same maths as
    dipfast.reference.lanczos2_downsample, which runs instead off the Triton path (lanczos2_path).
    """
    _check(x, factor)
    if lanczos2_path(x) == "triton":
        return _lanczos2_downsample_fwd(x, factor)
    return reference.lanczos2_downsample(x, factor)


def lanczos2_mse(x: torch.Tensor, y: torch.Tensor, factor: int) -> torch.Tensor:
    """x: (N, C, H, W), y: (N, C, H // f, W // f) -> fp32 scalar mean((lanczos2_downsample(x) - y)^2).

    One pass: the residual and the partial sums of squares come out of the decimation kernel.
    Differentiable in x and y. Twin: dipfast.reference.lanczos2_mse.
    """
    _check(x, factor)
    expected = (*x.shape[:2], x.shape[-2] // factor, x.shape[-1] // factor)
    if tuple(y.shape) != expected:
        raise ValueError(f"y must be {expected} for x of {tuple(x.shape)} at factor {factor}; got {tuple(y.shape)}")
    if lanczos2_path(x) == "triton":
        return _lanczos2_mse_fwd(x, y, factor)[0]
    return reference.lanczos2_mse(x, y, factor)
