"""The per-channel finalize of the Triton BatchNorm kernels: their per-program partial sums reduced in one launch.

The statistics and backward-sums kernels of batch_norm_act.py, conv_bn_lrelu.py and concat_bn_conv_bn_lrelu.py
leave (programs, C) fp32 partials (no atomics: deterministic). Reduced in torch, one BatchNorm's forward finalize
was about ten small kernels (two sums, arange, clamp, divide, subtract, square, multiply, a third sum, rsqrt) and
its backward two more sums: for the default net's 30 BatchNorms some 400 launches per step, most of the 1.7 ms
that the H200's native bf16 step spent in its elementwise group (30x that group's floor;
bench/results/2026-12-04-h200-222367b4a8/call1/profile). Here each finalize is one launch over channel tiles,
every program summing its channels' partials in a fixed order (deterministic, fp32):

    chan_finalize(psum, pm2, n, block, eps)   per-tile (sum, M2) of `block` elements each (the last tile the rest
                                              of n) -> (mean, rstd): Chan's merge, var = (sum M2 + sum count *
                                              (tile mean - mean)^2) / n, biased; no E[x^2] - mean^2 cancellation
    column_sums(a, b)                         (a.sum(0), b.sum(0)) of two (programs, C) partials

Without triton, or for CPU tensors outside Triton's interpreter, both are their torch expressions.

Folded (folded_finalize(True), the harness's native-folded-finalize): the padded BatchNorm kernels finalize in the
last of their reduction's programs to finish, with the same sums in the same order (chan_merge, column_sum), found
by an atomic arrival count that the last program returns to zero (last_to_arrive, arrival_counters): two launches
fewer per BatchNorm, one forward and one backward, at the price of that program's serial tail.
"""

from __future__ import annotations

import contextlib
import os

import torch

from dipfast.kernels.dependent_launch import launch_options, wait_for_previous_kernel

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as the kernels' modules: read when the kernels are built
_BLOCK_T, _BLOCK_C = 32, 32  # partial rows x channels per load: the partials are a few hundred rows at most


# the counts bound loops and masks: left unspecialised, one compilation serves every BatchNorm of a net (as
# batch_norm_act.py's _SIZES)
_COUNTS = ["n_tiles", "C"]

if _HAS_TRITON:
    PARTIAL_ROWS = tl.constexpr(_BLOCK_T)  # for kernels that finalize their own partials (last_to_arrive)

    @triton.jit
    def chan_merge(psum, pm2, c, c_mask, n_tiles, C, n, block, eps, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """(mean, rstd) of channels c from per-tile (sum, M2) partials, (n_tiles, C) fp32, of `block` elements each
        (the last tile n's rest): Chan's merge, partial rows summed in a fixed order. Loads bypass L1 (.cg): where a
        kernel's last program finalizes, the partials were written by other SMs during the kernel."""
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < n_tiles) & c_mask[None, :]
            total += tl.sum(tl.load(psum + t[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg"), 0)
        mean = total / n
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < n_tiles) & c_mask[None, :]
            count = tl.minimum(n - t * block, block).to(tl.float32)
            count = tl.where(t < n_tiles, count, 1.0)[:, None]
            tile_sum = tl.load(psum + t[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            tile_m2 = tl.load(pm2 + t[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            shift = tile_sum / count - mean[None, :]
            m2 += tl.sum(tl.where(mask, tile_m2 + count * shift * shift, 0.0), axis=0)
        return mean, tl.rsqrt(m2 / n + eps)

    @triton.jit
    def column_sum(a, c, c_mask, n_tiles, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """a[:, c].sum(0) of (n_tiles, C) fp32 partials, rows in a fixed order (loads past L1, as chan_merge's)."""
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < n_tiles) & c_mask[None, :]
            total += tl.sum(tl.load(a + t[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg"), 0)
        return total

    @triton.jit
    def last_to_arrive(counter_ptr, programs):
        """Whether this program is the last of `programs` to reach this point (each program calls it once, after
        storing its partials); the last returns the counter to zero for the next launch. The barrier makes every
        thread's stores precede the one thread's release (the atomic), whose acquire side makes the others' stores
        visible to the last program: CUDA's last-block reduction (threadFenceReduction), ordered as Inductor's grid
        barrier for its cooperative reductions orders it (torch/_inductor/runtime/triton_helpers.py, x_grid_barrier:
        tl.debug_barrier, then one atomic_add with release semantics)."""
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        last = arrived == programs - 1
        if last:
            tl.store(counter_ptr, 0)
        return last

    @triton.jit(do_not_specialize=[*_COUNTS, "n", "block"])
    def _chan_finalize_kernel(psum, pm2, mean_out, rstd_out, n_tiles, C, n, block, eps,
                              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        wait_for_previous_kernel(PDL)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mean, rstd = chan_merge(psum, pm2, c, c_mask, n_tiles, C, n, block, eps, BLOCK_T, BLOCK_C)
        tl.store(mean_out + c, mean, mask=c_mask)
        tl.store(rstd_out + c, rstd, mask=c_mask)

    @triton.jit(do_not_specialize=_COUNTS)
    def _column_sums_kernel(
        a, b, a_out, b_out, n_tiles, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tl.store(a_out + c, column_sum(a, c, c_mask, n_tiles, C, BLOCK_T, BLOCK_C), mask=c_mask)
        tl.store(b_out + c, column_sum(b, c, c_mask, n_tiles, C, BLOCK_T, BLOCK_C), mask=c_mask)


def _check(*partials: torch.Tensor) -> None:
    shape = partials[0].shape
    for p in partials:
        if p.dim() != 2 or p.shape != shape or p.dtype != torch.float32 or not p.is_contiguous():
            raise ValueError(f"partials must be contiguous (programs, C) fp32 tensors of one shape; got "
                             f"{[(tuple(q.shape), q.dtype) for q in partials]}")  # fmt: skip


def _in_triton(t: torch.Tensor) -> bool:
    return _HAS_TRITON and (t.is_cuda or _INTERPRET)


_folded = False


@contextlib.contextmanager
def folded_finalize(enabled: bool = True):
    """Within the block, the padded BatchNorm kernels (batch_norm_act.py) finalize in their reduction's last program
    (last_to_arrive), not in a launch of their own: two launches fewer per BatchNorm, forward and backward. A
    process-wide switch, as dependent_launch's: the backward's ops run on autograd's device thread."""
    global _folded
    saved, _folded = _folded, enabled
    try:
        yield
    finally:
        _folded = saved


def finalize_folded(t: torch.Tensor, block_c: int) -> bool:
    """Whether a kernel reducing t in tiles of block_c channels finalizes in its last program: inside
    folded_finalize(True), in Triton, and for tiles no wider than the finalize launch's own (channels_last's 128-wide
    tiles would hold 32 x 128 partials at once, 48 -> 168 registers for every program of the statistics kernel on
    sm_90, and leave one program to merge the partials of all 128 channels)."""
    return _folded and _in_triton(t) and block_c <= _BLOCK_C


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # buffers replaced by larger ones, kept: a captured graph may still count in them
_MIN_COUNTERS = 1024  # a default-net BatchNorm has a few dozen channel tiles; vmap multiplies them by the networks


def arrival_counters(t: torch.Tensor, n: int) -> torch.Tensor:
    """n int32 counters at zero on t's device for a kernel launched on the current stream (last_to_arrive: each
    launch leaves them at zero). One buffer per stream: kernels on one stream run one after another, and with
    programmatic dependent launch each waits for the one before before its first atomic; kernels on two streams may
    run at once. Made at the first call (inside a CUDA graph's capture: from the graph's pool, its zeroing a node).
    A graph keeps the buffer of the stream it was captured on: two graphs captured on one stream (torch.cuda.graph's
    default) share it, so they must not replay at once on two streams (dipfast's steps replay one at a time)."""
    stream = torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0
    counters = _COUNTERS.get((t.device, stream))
    if counters is None or counters.numel() < n:
        size = max(n, _MIN_COUNTERS if counters is None else 2 * counters.numel())
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = _COUNTERS[(t.device, stream)] = torch.zeros(size, dtype=torch.int32, device=t.device)
    return counters


def chan_finalize(psum: torch.Tensor, pm2: torch.Tensor, n: int, block: int, eps: float):
    """Per-tile (sum, M2) partials, (tiles, C) fp32, of `block` elements each (the last tile n's rest) ->
    (mean, rstd), (C,) fp32 each: the batch statistics of n elements per channel, biased variance."""
    _check(psum, pm2)
    n_tiles, channels = psum.shape
    if not _in_triton(psum):
        counts = (n - torch.arange(n_tiles, device=psum.device) * block).clamp(max=block).float()[:, None]
        mean = psum.sum(0) / n
        var = (pm2.sum(0) + (counts * (psum / counts - mean) ** 2).sum(0)) / n
        return mean, torch.rsqrt(var + eps)
    mean = torch.empty(channels, device=psum.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _chan_finalize_kernel[(triton.cdiv(channels, _BLOCK_C),)](
        psum, pm2, mean, rstd, n_tiles, channels, n, block, eps, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
        **launch_options(psum),
    )  # fmt: skip
    return mean, rstd


def column_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a.sum(0), b.sum(0)) of two (programs, C) fp32 partials, in one launch."""
    _check(a, b)
    if not _in_triton(a):
        return a.sum(0), b.sum(0)
    n_tiles, channels = a.shape
    a_out = torch.empty(channels, device=a.device, dtype=torch.float32)
    b_out = torch.empty_like(a_out)
    _column_sums_kernel[(triton.cdiv(channels, _BLOCK_C),)](
        a, b, a_out, b_out, n_tiles, channels, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, **launch_options(a)
    )  # fmt: skip
    return a_out, b_out
