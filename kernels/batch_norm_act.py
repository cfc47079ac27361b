"""Training-mode BatchNorm + LeakyReLU written reflection-padded, in any memory format, forward and backward, in Triton.

out = F.pad(act(batch_norm(x, training=True, weight, bias, eps)), (pad,) * 4, mode="reflect"),
act(z) = z if z > 0 else negative_slope * z (negative_slope = 1.0: BatchNorm alone), batch statistics with the
biased variance per channel over (N, H, W), no running statistics (DIP never reads them). The padded buffer is the
input of the next conv, which runs with padding=0 on it: no separate pad op, and none of the layout conversions
that CUDA's ReflectionPad2d (NCHW only, atomicAdd backward) forces on a channels_last net. The merge variant,
concat_batch_norm, normalises the concatenation [skip, deeper] (per group) without forming it. The CPU twins of
these ops are the csrc ones (dipfast.native.batch_norm); the eager twins are dipfast.reference.batch_norm_act and
dipfast.reference.concat_batch_norm.

Layout: any strides in, x's memory format out. The inputs may be views (a centre crop of the merge's parts); the
output, mean and rstd, and the gradients are new dense tensors: out and dx channels_last where the input keeps its
channels innermost (stride 1 along C, not along W), NCHW contiguous otherwise (dipfast.native._tensors.layout's
rule, so either backend hands the next conv the same layout). Tiles are one image row by BLOCK_W x BLOCK_C with
the long side along the layout's unit-stride axis, so loads and stores coalesce in either format (configs.py); where
the channel tiles divide the channels (EVEN_C) and one source is read (not a merge), a channels_last tile moves its
channels in 16-byte vectors too (bench/results/2026-12-05-cpu-channels-last-codegen/).
Precisions: x fp32 or bf16 (the output and dx in x's dtype); weight and bias any float dtype, used in fp32 (their
gradients come back in their dtypes); statistics, normalisation and every sum in fp32.

Forward (three launches, deterministic):
  1. _batch_norm_stats_kernel: each program walks some rows of some channels, merging each tile's (count, mean,
     M2) into its own with Chan's formula; one finalize launch merges the programs' partials the same way
     (channel_sums.chan_finalize: no E[x^2] - mean^2 cancellation), rstd = 1 / sqrt(var + eps). Inside
     channel_sums.folded_finalize(True) the last program of each channel tile to finish does it instead (an atomic
     arrival count: channel_sums.last_to_arrive), in the same order: one launch fewer.
  2. _batch_norm_act_pad_kernel: one program per output row (padded rows included) and tile: the row's source
     (i < 0 -> -i, i >= H -> 2H - 2 - i) read in column order, each pad column's mirror one (BLOCK_C,) load by the
     tiles that hold it; normalises, applies act, stores. Read in order, a tile's loads coalesce, and an unpadded
     NCHW one moves 16-byte vectors (a reflected index per element hid the order from Triton, whose code then read
     one element a thread across channels and moved the tile through shared memory to store it:
     `python bench/sm90_codegen.py --step`).
  Saved for backward: x (or skip and deeper), weight, bias, mean, rstd; xhat and z are recomputed.
Backward (three launches, deterministic; the gradient of the padded output, any strides):
  3. _batch_norm_act_bwd_sums_kernel: the reflection pad's adjoint as a gather, g(i, j) = the sum of the incoming
     gradient over i's <= 3 pre-images per axis (9 masked loads), dz = g * act'(z), and per-program partial sums
     of dz (= dbias) and dz * xhat (= dweight), summed by one launch (channel_sums.column_sums), or folded in
     the last program as the forward's.
  4. _batch_norm_act_bwd_apply_kernel: the same gather and dz, dx = weight * rstd * (dz - dbias / M -
     xhat * dweight / M), stored in x's layout (d(skip) and d(deeper) for the merge).
Under torch.func.vmap a rule folds the vmapped networks into the channels (groups for the merge: vmap_fold.py):
BatchNorm's statistics are per channel, so the networks stay independent in one launch.

Ops: dipfast::batch_norm_act_fwd / _bwd and dipfast::concat_batch_norm_act_fwd / _bwd (torch.library.custom_op
with register_fake and register_autograd, so torch.compile(fullgraph=True) traces through; no double backward).
Without CUDA (and without TRITON_INTERPRET=1 when this module was imported), without triton, or for dtypes other
than fp32 and bf16, the public functions call the twins; batch_norm_act_path(x) says which path a tensor takes.
"""

from __future__ import annotations

import os

import torch

from dipfast import reference
from dipfast.errors import InputError
from dipfast.kernels.channel_sums import arrival_counters, chan_finalize, column_sums, finalize_folded
from dipfast.kernels.configs import PlaneTiles, precision_of, tiles
from dipfast.kernels.conv_bn_lrelu import kernels_take
from dipfast.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from dipfast.kernels.vmap_fold import batch_first, fold_into_channels, fold_into_rows, unfold_channels, unfold_rows

try:
    import triton
    import triton.language as tl

    from dipfast.kernels.channel_sums import PARTIAL_ROWS, chan_merge, column_sum, last_to_arrive

    _HAS_TRITON = True
except ImportError:  # the package always works: the public functions fall back to dipfast.reference
    _HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as conv_bn_lrelu: read when the kernels are built
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False


# Sizes and counts, which bound loops and masks, left unspecialised: Triton compiles a kernel again for each pattern
# of its int arguments' divisibility by 16 (and == 1). With them specialised, and a tile width per level, one
# default-net step at 512 px made 77 compilations of its 8 kernels with Hopper's tiles, 11 without (each 0.06-0.2 s
# for sm_90 on a Xeon core with a cold cache: bench/results/2026-12-04-cpu-triton-specializations/). Strides stay
# specialised: they set the addresses, whose alignment lets loads vectorise. So does the width: the tiles' masks
# along W are only as uniform as Triton can prove it a multiple of 16, and a vector needs its whole mask uniform; in
# NCHW a row's stride is the width, already specialised, so this adds no compilation there.
_SIZES = ["height", "channels", "cs", "cd"]
_SIZES_AND_ROWS = ["n_rows", "rows_per_program", *_SIZES]

if _HAS_TRITON:

    @triton.jit
    def _reflect(i, size):
        i = tl.where(i < 0, -i, i)
        return tl.where(i >= size, 2 * size - 2 - i, i)

    @triton.jit
    def _row_tile(rows_per_image, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """A row-tiled pass's program (grid: N x rows_per_image rows, column tiles, channel tiles) -> (n, row,
        w0, w0 + arange(BLOCK_W), its BLOCK_C channels)."""
        row = tl.program_id(0)
        w0 = tl.program_id(1) * BLOCK_W
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        return row // rows_per_image, row % rows_per_image, w0, w0 + tl.arange(0, BLOCK_W), c

    @triton.jit
    def _channel_mask(c, channels, EVEN_C: tl.constexpr):
        """c < channels: all true where the channel tiles divide the channels (EVEN_C), in a form Triton sees as
        uniform, so that a tile whose channels run at unit stride (channels_last) moves them in vectors (with the
        unspecialised count in the mask, every channels_last access moved one element)."""
        if EVEN_C:
            mask = tl.full(c.shape, True, tl.int1)
        else:
            mask = c < channels
        return mask

    @triton.jit
    def _channels(c, cs, cd):
        """Merged channel c -> where it lives: [skip_g, deeper_g] for each group g of cs + cd channels."""
        width = cs + cd
        group = c // width
        local = c - group * width
        return local < cs, group * cs + local, local >= cs, group * cd + local - cs

    @triton.jit
    def _load_merged(
        skip_ptr, deeper_ptr, n, h, w, c, mask_c, cs, cd, mask_w,
        s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
    ):  # fmt: skip
        """The (BLOCK_W, BLOCK_C) tile of the merged input at image n, row h, columns w, channels c, in fp32."""
        mask = mask_w[:, None] & mask_c[None, :]
        if cs == 0:  # one source: its channels are c itself, whose contiguity the merge's mapping would hide
            v = tl.load(
                deeper_ptr + n * d_sn + h * d_sh + w[:, None] * d_sw + c[None, :] * d_sc, mask=mask, other=0.0
            ).to(tl.float32)
        else:
            in_skip, c_skip, in_deeper, c_deeper = _channels(c, cs, cd)
            a = tl.load(
                skip_ptr + n * s_sn + h * s_sh + w[:, None] * s_sw + c_skip[None, :] * s_sc,
                mask=mask & in_skip[None, :],
                other=0.0,
            )
            b = tl.load(
                deeper_ptr + n * d_sn + h * d_sh + w[:, None] * d_sw + c_deeper[None, :] * d_sc,
                mask=mask & in_deeper[None, :],
                other=0.0,
            )
            v = tl.where(in_skip[None, :], a.to(tl.float32), b.to(tl.float32))
        return v

    @triton.jit
    def _merged_column(
        skip_ptr, deeper_ptr, n, h, col, c, mask_c, cs, cd, s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
    ):  # fmt: skip
        """One pixel's channels c of the merged input, (BLOCK_C,) fp32: a pad column's source."""
        if cs == 0:  # one source (_load_merged's)
            v = tl.load(deeper_ptr + n * d_sn + h * d_sh + col * d_sw + c * d_sc, mask=mask_c, other=0.0)
            v = v.to(tl.float32)
        else:
            in_skip, c_skip, in_deeper, c_deeper = _channels(c, cs, cd)
            a = tl.load(skip_ptr + n * s_sn + h * s_sh + col * s_sw + c_skip * s_sc, mask=mask_c & in_skip, other=0.0)
            b = tl.load(
                deeper_ptr + n * d_sn + h * d_sh + col * d_sw + c_deeper * d_sc, mask=mask_c & in_deeper, other=0.0
            )  # fmt: skip
            v = tl.where(in_skip, a.to(tl.float32), b.to(tl.float32))
        return v

    @triton.jit
    def _padded_row(
        skip_ptr, deeper_ptr, n, hp, w0, wp, c, mask_w, height, width, mask_c, cs, cd,
        s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw, PAD: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """The (BLOCK_W, BLOCK_C) tile at padded row hp, columns wp = w0 + arange(BLOCK_W) of the merged input
        reflection-padded by PAD, in fp32. The source columns are read in order, so the loads coalesce (and, where
        nothing is padded, vectorise); each pad column is one (BLOCK_C,) load by the tiles that hold it (a reflected
        index tile-wide hides the columns' order from Triton)."""
        h = _reflect(hp - PAD, height)  # a scalar: the program's row
        w = wp - PAD
        v = _load_merged(
            skip_ptr, deeper_ptr, n, h, w, c, mask_c, cs, cd, mask_w & (w >= 0) & (w < width),
            s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
        )  # fmt: skip
        if PAD > 0:
            if w0 < PAD:  # pad column j mirrors column PAD - j
                for j in tl.static_range(PAD):
                    m = _merged_column(
                        skip_ptr, deeper_ptr, n, h, PAD - j, c, mask_c, cs, cd,
                        s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
                    )  # fmt: skip
                    v = tl.where((wp == j)[:, None], m[None, :], v)
            if w0 + BLOCK_W > width + PAD:  # pad column width + PAD + j mirrors column width - 2 - j
                for j in tl.static_range(PAD):
                    m = _merged_column(
                        skip_ptr, deeper_ptr, n, h, width - 2 - j, c, mask_c, cs, cd,
                        s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
                    )  # fmt: skip
                    v = tl.where((wp == width + PAD + j)[:, None], m[None, :], v)
        return v

    @triton.jit
    def _row_pre_images(
        base_c, row, w, col0, mask, mask_c, width, g_sw, near_left, near_right, PAD: tl.constexpr
    ):  # fmt: skip
        """One padded row's share of the adjoint: each column itself, then the pad columns that mirror onto it, each
        one (BLOCK_C,) load by the tiles that reach them (a gather tile-wide would need a layout of its own)."""
        acc = tl.load(base_c[None, :] + row + col0, mask=mask, other=0.0).to(tl.float32)
        if near_left:
            for j in tl.static_range(PAD):  # pad column j mirrors column PAD - j
                g = tl.load(base_c + row + j * g_sw, mask=mask_c, other=0.0).to(tl.float32)
                acc += tl.where((w == PAD - j)[:, None], g[None, :], 0.0)
        if near_right:
            for j in tl.static_range(PAD):  # pad column width + PAD + j mirrors column width - 2 - j
                g = tl.load(base_c + row + (width + PAD + j) * g_sw, mask=mask_c, other=0.0).to(tl.float32)
                acc += tl.where((w == width - 2 - j)[:, None], g[None, :], 0.0)
        return acc

    @triton.jit
    def _folded_grad(
        g_ptr, n, h, w0, w, c, mask, mask_c, height, width, g_sn, g_sc, g_sh, g_sw,
        PAD: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """The reflection pad's adjoint at (n, h, w, c), w = w0 + arange(BLOCK_W): the padded gradient summed over
        the pixel's pre-images, itself and its mirrors in the top/left and bottom/right pads (<= 3 per axis), in
        fp32. The mirror rows and columns are read only by the tiles next to an edge (uniform branches)."""
        base_c = g_ptr + n * g_sn + c * g_sc
        col0 = ((w + PAD) * g_sw)[:, None]
        row0 = (h + PAD) * g_sh
        if PAD > 0:
            near_left = w0 <= PAD
            near_right = w0 + BLOCK_W > width - 1 - PAD
            acc = _row_pre_images(base_c, row0, w, col0, mask, mask_c, width, g_sw, near_left, near_right, PAD)
            if (h >= 1) & (h <= PAD):  # h mirrored into the top pad, row PAD - h
                acc += _row_pre_images(
                    base_c, (PAD - h) * g_sh, w, col0, mask, mask_c, width, g_sw, near_left, near_right, PAD
                )  # fmt: skip
            if (h >= height - 1 - PAD) & (h <= height - 2):  # and into the bottom pad
                acc += _row_pre_images(
                    base_c, (2 * height - 2 - h + PAD) * g_sh, w, col0, mask, mask_c, width, g_sw, near_left,
                    near_right, PAD,
                )  # fmt: skip
        else:
            acc = tl.load(base_c[None, :] + row0 + col0, mask=mask, other=0.0).to(tl.float32)
        return acc

    @triton.jit(do_not_specialize=_SIZES_AND_ROWS)
    def _batch_norm_stats_kernel(
        skip_ptr,  # (N, G * Cs, H, W) fp32 or bf16, any strides (deeper_ptr when there is no skip)
        deeper_ptr,  # (N, G * Cd, H, W) x's dtype, any strides
        psum_ptr,  # (programs, C) fp32: each program's sum
        pm2_ptr,  # (programs, C) fp32: each program's sum of squared deviations from its own mean
        mean_ptr,  # (C,) fp32, written under FINALIZE
        rstd_ptr,  # (C,) fp32, written under FINALIZE
        counters_ptr,  # (channel tiles,) int32 at zero, under FINALIZE (channel_sums.arrival_counters)
        n_rows,  # N * H
        rows_per_program,
        height,
        width,
        channels,  # C = G * (Cs + Cd)
        cs,
        cd,
        eps,
        s_sn, s_sc, s_sh, s_sw,  # skip's strides
        d_sn, d_sc, d_sh, d_sw,  # deeper's strides
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,  # BLOCK_C divides the channels: no tile runs past them
        FINALIZE: tl.constexpr,  # the last program of each channel tile writes mean and rstd (no finalize launch)
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        pid = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = _channel_mask(c, channels, EVEN_C)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)  # the same for every channel
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r in range(0, rows_per_program):
            row = pid * rows_per_program + r
            n = row // height
            h = row % height
            for w0 in range(0, width, BLOCK_W):
                w = w0 + tl.arange(0, BLOCK_W)
                mask_w = (w < width) & (row < n_rows)
                v = _load_merged(
                    skip_ptr, deeper_ptr, n, h, w, c, mask_c, cs, cd, mask_w,
                    s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
                )  # fmt: skip
                tile_count = tl.sum(mask_w.to(tl.float32), axis=0)
                tile_mean = tl.sum(v, axis=0) / tl.maximum(tile_count, 1.0)
                dev = tl.where(mask_w[:, None], v - tile_mean[None, :], 0.0)
                total = count + tile_count
                delta = tile_mean - mean
                share = tile_count / tl.maximum(total, 1.0)
                mean += delta * share
                m2 += tl.sum(dev * dev, axis=0) + delta * delta * count * share
                count = total
        tl.store(psum_ptr + pid * channels + c, mean * count, mask=mask_c)
        tl.store(pm2_ptr + pid * channels + c, m2, mask=mask_c)
        if FINALIZE:
            programs = tl.num_programs(0)
            if last_to_arrive(counters_ptr + tl.program_id(1), programs):
                batch_mean, rstd = chan_merge(psum_ptr, pm2_ptr, c, mask_c, programs, channels, n_rows * width,
                                              rows_per_program * width, eps, PARTIAL_ROWS, BLOCK_C)  # fmt: skip
                tl.store(mean_ptr + c, batch_mean, mask=mask_c)
                tl.store(rstd_ptr + c, rstd, mask=mask_c)

    @triton.jit(do_not_specialize=_SIZES)
    def _batch_norm_act_pad_kernel(
        skip_ptr,  # (N, G * Cs, H, W) any strides (deeper_ptr when there is no skip)
        deeper_ptr,  # (N, G * Cd, H, W) any strides
        mean_ptr,  # (C,) fp32
        rstd_ptr,  # (C,) fp32
        weight_ptr,  # (C,) fp32
        bias_ptr,  # (C,) fp32
        out_ptr,  # (N, C, H + 2 PAD, W + 2 PAD) x's dtype, NCHW or channels_last
        height,
        width,
        channels,
        cs,
        cd,
        negative_slope,
        s_sn, s_sc, s_sh, s_sw,  # skip's strides
        d_sn, d_sc, d_sh, d_sw,  # deeper's strides
        o_sn, o_sc, o_sh, o_sw,  # out's strides
        PAD: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,  # BLOCK_C divides the channels: no tile runs past them
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        n, hp, w0, wp, c = _row_tile(height + 2 * PAD, BLOCK_W, BLOCK_C)  # padded rows too
        mask_w = wp < width + 2 * PAD
        mask_c = _channel_mask(c, channels, EVEN_C)
        v = _padded_row(
            skip_ptr, deeper_ptr, n, hp, w0, wp, c, mask_w, height, width, mask_c, cs, cd,
            s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw, PAD, BLOCK_W,
        )  # fmt: skip
        mean = tl.load(mean_ptr + c, mask=mask_c, other=0.0)
        scale = tl.load(rstd_ptr + c, mask=mask_c, other=0.0) * tl.load(weight_ptr + c, mask=mask_c, other=0.0)
        z = (v - mean[None, :]) * scale[None, :] + tl.load(bias_ptr + c, mask=mask_c, other=0.0)[None, :]
        out = tl.where(z > 0, z, z * negative_slope)
        mask = mask_w[:, None] & mask_c[None, :]
        tl.store(out_ptr + n * o_sn + hp * o_sh + (wp * o_sw)[:, None] + (c * o_sc)[None, :], out, mask=mask)

    @triton.jit
    def _normalised_and_grad(
        grad_ptr, skip_ptr, deeper_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, n, h, w0, w, c, mask_w,
        height, width, mask_c, cs, cd, negative_slope,
        s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw, g_sn, g_sc, g_sh, g_sw,
        PAD: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """(xhat, dz, gamma * rstd) on a tile: dz = the folded gradient times act'(z), zero off the tile."""
        mask = mask_w[:, None] & mask_c[None, :]
        v = _load_merged(
            skip_ptr, deeper_ptr, n, h, w, c, mask_c, cs, cd, mask_w,
            s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw,
        )  # fmt: skip
        rstd = tl.load(rstd_ptr + c, mask=mask_c, other=0.0)
        gamma = tl.load(weight_ptr + c, mask=mask_c, other=0.0)
        xhat = (v - tl.load(mean_ptr + c, mask=mask_c, other=0.0)[None, :]) * rstd[None, :]
        z = xhat * gamma[None, :] + tl.load(bias_ptr + c, mask=mask_c, other=0.0)[None, :]
        g = _folded_grad(
            grad_ptr, n, h, w0, w, c, mask, mask_c, height, width, g_sn, g_sc, g_sh, g_sw, PAD, BLOCK_W
        )  # fmt: skip
        dz = tl.where(mask, tl.where(z > 0, g, g * negative_slope), 0.0)  # leaky_relu_backward: self > 0
        return tl.where(mask, xhat, 0.0), dz, gamma * rstd

    @triton.jit(do_not_specialize=_SIZES_AND_ROWS)
    def _batch_norm_act_bwd_sums_kernel(
        grad_ptr,  # (N, C, H + 2 PAD, W + 2 PAD) x's dtype, any strides
        skip_ptr,  # (N, G * Cs, H, W) any strides (deeper_ptr when there is no skip)
        deeper_ptr,  # (N, G * Cd, H, W) any strides
        mean_ptr,  # (C,) fp32
        rstd_ptr,  # (C,) fp32
        weight_ptr,  # (C,) fp32
        bias_ptr,  # (C,) fp32
        pdz_ptr,  # (programs, C) fp32: partial sums of dz
        pdzx_ptr,  # (programs, C) fp32: partial sums of dz * xhat
        dbias_ptr,  # (C,) fp32: the sum of dz, written under FINALIZE
        dweight_ptr,  # (C,) fp32: the sum of dz * xhat, written under FINALIZE
        counters_ptr,  # (channel tiles,) int32 at zero, under FINALIZE
        n_rows,  # N * H
        rows_per_program,
        height,
        width,
        channels,
        cs,
        cd,
        negative_slope,
        s_sn, s_sc, s_sh, s_sw,  # skip's strides
        d_sn, d_sc, d_sh, d_sw,  # deeper's strides
        g_sn, g_sc, g_sh, g_sw,  # grad's strides
        PAD: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,  # BLOCK_C divides the channels: no tile runs past them
        FINALIZE: tl.constexpr,  # the last program of each channel tile writes dbias and dweight
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        pid = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = _channel_mask(c, channels, EVEN_C)
        sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dzx = tl.zeros([BLOCK_C], dtype=tl.float32)
        # the last program's rows may run out first: none past them is visited (the pad columns' loads of
        # _row_pre_images are masked by channel alone, and read past the gradient there)
        for r in range(0, tl.minimum(rows_per_program, n_rows - pid * rows_per_program)):
            row = pid * rows_per_program + r
            n = row // height
            h = row % height
            for w0 in range(0, width, BLOCK_W):
                w = w0 + tl.arange(0, BLOCK_W)
                xhat, dz, _ = _normalised_and_grad(
                    grad_ptr, skip_ptr, deeper_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, n, h, w0, w, c,
                    w < width, height, width, mask_c, cs, cd, negative_slope,
                    s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw, g_sn, g_sc, g_sh, g_sw, PAD, BLOCK_W,
                )  # fmt: skip
                sum_dz += tl.sum(dz, axis=0)
                sum_dzx += tl.sum(dz * xhat, axis=0)
        tl.store(pdz_ptr + pid * channels + c, sum_dz, mask=mask_c)
        tl.store(pdzx_ptr + pid * channels + c, sum_dzx, mask=mask_c)
        if FINALIZE:
            programs = tl.num_programs(0)
            if last_to_arrive(counters_ptr + tl.program_id(1), programs):
                dbias = column_sum(pdz_ptr, c, mask_c, programs, channels, PARTIAL_ROWS, BLOCK_C)
                dweight = column_sum(pdzx_ptr, c, mask_c, programs, channels, PARTIAL_ROWS, BLOCK_C)
                tl.store(dbias_ptr + c, dbias, mask=mask_c)
                tl.store(dweight_ptr + c, dweight, mask=mask_c)

    @triton.jit(do_not_specialize=_SIZES)
    def _batch_norm_act_bwd_apply_kernel(
        grad_ptr,  # (N, C, H + 2 PAD, W + 2 PAD) x's dtype, any strides
        skip_ptr,  # (N, G * Cs, H, W) any strides (deeper_ptr when there is no skip)
        deeper_ptr,  # (N, G * Cd, H, W) any strides
        mean_ptr,  # (C,) fp32
        rstd_ptr,  # (C,) fp32
        weight_ptr,  # (C,) fp32
        bias_ptr,  # (C,) fp32
        dbias_ptr,  # (C,) fp32: sum of dz
        dweight_ptr,  # (C,) fp32: sum of dz * xhat
        dskip_ptr,  # (N, G * Cs, H, W) skip's dtype, its layout (ddeeper_ptr when there is no skip)
        ddeeper_ptr,  # (N, G * Cd, H, W) deeper's dtype, its layout
        inv_m,  # 1 / (N * H * W)
        height,
        width,
        channels,
        cs,
        cd,
        negative_slope,
        s_sn, s_sc, s_sh, s_sw,  # skip's strides
        d_sn, d_sc, d_sh, d_sw,  # deeper's strides
        g_sn, g_sc, g_sh, g_sw,  # grad's strides
        ds_sn, ds_sc, ds_sh, ds_sw,  # dskip's strides
        dd_sn, dd_sc, dd_sh, dd_sw,  # ddeeper's strides
        PAD: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,  # BLOCK_C divides the channels: no tile runs past them
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        n, h, w0, w, c = _row_tile(height, BLOCK_W, BLOCK_C)
        mask_w = w < width
        mask_c = _channel_mask(c, channels, EVEN_C)
        xhat, dz, scale = _normalised_and_grad(
            grad_ptr, skip_ptr, deeper_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, n, h, w0, w, c, mask_w,
            height, width, mask_c, cs, cd, negative_slope,
            s_sn, s_sc, s_sh, s_sw, d_sn, d_sc, d_sh, d_sw, g_sn, g_sc, g_sh, g_sw, PAD, BLOCK_W,
        )  # fmt: skip
        mean_dz = tl.load(dbias_ptr + c, mask=mask_c, other=0.0) * inv_m
        mean_dzx = tl.load(dweight_ptr + c, mask=mask_c, other=0.0) * inv_m
        dx = scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])
        mask = mask_w[:, None] & mask_c[None, :]
        if cs == 0:  # one source (_load_merged's)
            tl.store(ddeeper_ptr + n * dd_sn + h * dd_sh + (w * dd_sw)[:, None] + (c * dd_sc)[None, :], dx, mask=mask)
        else:
            in_skip, c_skip, in_deeper, c_deeper = _channels(c, cs, cd)
            tl.store(
                dskip_ptr + n * ds_sn + h * ds_sh + (w * ds_sw)[:, None] + (c_skip * ds_sc)[None, :],
                dx,
                mask=mask & in_skip[None, :],
            )
            tl.store(
                ddeeper_ptr + n * dd_sn + h * dd_sh + (w * dd_sw)[:, None] + (c_deeper * dd_sc)[None, :],
                dx,
                mask=mask & in_deeper[None, :],
            )


def layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format of the output computed from t: channels_last when t keeps its channels innermost (the
    native ops' rule, dipfast.native._tensors.layout)."""
    channels_last = t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) != 1  # a 1 x 1 NCHW map has both
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty(shape, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def _merged_layout(skip: torch.Tensor | None, deeper: torch.Tensor) -> torch.memory_format:
    return layout(deeper if skip is None or deeper.shape[1] > 1 else skip)


def _plane(fmt: torch.memory_format, dtype: torch.dtype, n_rows: int, width: int, channels: int):
    """(BLOCK_W, BLOCK_C, channel tiles, rows per reduction program, reduction programs, config) for a plane."""
    config: PlaneTiles = tiles("plane", precision_of(dtype == torch.bfloat16, False))
    np2 = triton.next_power_of_2
    if fmt == torch.channels_last:  # C has unit stride: the long side along C
        block_c = max(2, min(np2(channels), config.max_c))
        block_w = max(2, min(np2(width), config.max_w, config.elements // block_c))
    else:  # one tile width for every level: each width its own would be another compilation (five levels, four
        # kernels, two pads); a narrow level's tiles run mostly masked, microseconds on planes that small
        block_w = config.max_w
        block_c = max(2, min(np2(channels), config.max_c, config.elements // block_w))
    c_tiles = triton.cdiv(channels, block_c)
    rows = triton.cdiv(n_rows, max(1, config.programs // c_tiles))
    return block_w, block_c, c_tiles, rows, triton.cdiv(n_rows, rows), config


def _sources(skip: torch.Tensor | None, deeper: torch.Tensor, groups: int):
    """(skip or deeper as the skip pointer, cs, cd per group, C): the kernels' view of the merge's two parts."""
    cs = skip.shape[1] // groups if skip is not None else 0
    cd = deeper.shape[1] // groups
    return (skip if skip is not None else deeper), cs, cd, groups * (cs + cd)


def _finalize_args(x: torch.Tensor, block_c: int, c_tiles: int, *partials: torch.Tensor):
    """(FINALIZE, the two (C,) outputs, the arrival counters) of a reduction launch with (programs, C) partials: where
    its last program finalizes (channel_sums.finalize_folded), fresh outputs and the stream's counters; else those
    pointers go unread (the partials stand in) and a launch of its own finalizes."""
    if not finalize_folded(x, block_c):
        return False, *partials, partials[0]
    channels = partials[0].shape[1]
    return True, *(_empty((channels,), torch.float32, x.device) for _ in partials), arrival_counters(x, c_tiles)


def _forward(skip, deeper, weight, bias, groups, eps, negative_slope, pad):
    n, _, h, w = deeper.shape
    first, cs, cd, c = _sources(skip, deeper, groups)
    fmt = _merged_layout(skip, deeper)
    block_w, block_c, c_tiles, rows, programs, config = _plane(fmt, deeper.dtype, n * h, w, c)
    dev = deeper.device
    psum, pm2 = _empty((programs, c), torch.float32, dev), _empty((programs, c), torch.float32, dev)
    strides = (*first.stride(), *deeper.stride())
    blocks = dict(BLOCK_W=block_w, BLOCK_C=block_c, EVEN_C=c % block_c == 0, num_warps=config.num_warps)
    blocks.update(launch_options(deeper))
    folded, mean, rstd, counters = _finalize_args(deeper, block_c, c_tiles, psum, pm2)
    _batch_norm_stats_kernel[(programs, c_tiles)](
        first, deeper, psum, pm2, mean, rstd, counters, n * h, rows, h, w, c, cs, cd, eps, *strides,
        FINALIZE=folded, **blocks,
    )  # fmt: skip
    if not folded:
        mean, rstd = chan_finalize(psum, pm2, n * h * w, rows * w, eps)
    out = _empty((n, c, h + 2 * pad, w + 2 * pad), deeper.dtype, dev, fmt)
    _batch_norm_act_pad_kernel[(n * (h + 2 * pad), triton.cdiv(w + 2 * pad, block_w), c_tiles)](
        first, deeper, mean, rstd, weight.float().contiguous(), bias.float().contiguous(), out,
        h, w, c, cs, cd, negative_slope, *strides, *out.stride(), PAD=pad, **blocks,
    )  # fmt: skip
    return out, mean, rstd


def _backward(grad, skip, deeper, weight, bias, mean, rstd, groups, negative_slope, pad):
    """-> (dskip or None, ddeeper, dweight, dbias)."""
    n, _, h, w = deeper.shape
    first, cs, cd, c = _sources(skip, deeper, groups)
    block_w, block_c, c_tiles, rows, programs, config = _plane(_merged_layout(skip, deeper), deeper.dtype, n * h, w, c)
    dev = deeper.device
    gamma, beta = weight.float().contiguous(), bias.float().contiguous()
    pdz, pdzx = _empty((programs, c), torch.float32, dev), _empty((programs, c), torch.float32, dev)
    strides = (*first.stride(), *deeper.stride(), *grad.stride())
    blocks = dict(PAD=pad, BLOCK_W=block_w, BLOCK_C=block_c, EVEN_C=c % block_c == 0, num_warps=config.num_warps)
    blocks.update(launch_options(deeper))
    args = (grad, first, deeper, mean, rstd, gamma, beta)
    folded, dbias, dweight, counters = _finalize_args(deeper, block_c, c_tiles, pdz, pdzx)
    _batch_norm_act_bwd_sums_kernel[(programs, c_tiles)](
        *args, pdz, pdzx, dbias, dweight, counters, n * h, rows, h, w, c, cs, cd, negative_slope, *strides,
        FINALIZE=folded, **blocks,
    )  # fmt: skip
    if not folded:
        dbias, dweight = column_sums(pdz, pdzx)
    ddeeper = _empty(deeper.shape, deeper.dtype, dev, layout(deeper))
    dskip = _empty(skip.shape, skip.dtype, dev, layout(skip)) if skip is not None else None
    dfirst = dskip if dskip is not None else ddeeper
    _batch_norm_act_bwd_apply_kernel[(n * h, triton.cdiv(w, block_w), c_tiles)](
        *args, dbias, dweight, dfirst, ddeeper, 1.0 / (n * h * w), h, w, c, cs, cd, negative_slope,
        *strides, *dfirst.stride(), *ddeeper.stride(), **blocks,
    )  # fmt: skip
    return dskip, ddeeper, dweight.to(weight.dtype), dbias.to(bias.dtype)


def _padded_shape(t: torch.Tensor, channels: int, pad: int) -> tuple[int, int, int, int]:
    n, _, h, w = t.shape
    return n, channels, h + 2 * pad, w + 2 * pad


def _stats_fake(t: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return t.new_empty((channels,), dtype=torch.float32), t.new_empty((channels,), dtype=torch.float32)


# ---- the ops: one input ----------------------------------------------------------------------------------------


@torch.library.custom_op("dipfast::batch_norm_act_fwd", mutates_args=())
def _batch_norm_act_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, negative_slope: float, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd): the padded output in x's dtype and layout, the fp32 batch statistics."""
    return _forward(None, x, weight, bias, 1, eps, negative_slope, pad)


@_batch_norm_act_fwd.register_fake
def _(x, weight, bias, eps, negative_slope, pad):
    out = torch.empty(
        _padded_shape(x, x.shape[1], pad), dtype=x.dtype, device=x.device, memory_format=layout(x)
    )  # fmt: skip
    return out, *_stats_fake(x, x.shape[1])


@torch.library.custom_op("dipfast::batch_norm_act_bwd", mutates_args=())
def _batch_norm_act_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    negative_slope: float,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight, dbias) for the gradient of the padded output; dx in x's layout."""
    _, dx, dweight, dbias = _backward(grad, None, x, weight, bias, mean, rstd, 1, negative_slope, pad)
    return dx, dweight, dbias


@_batch_norm_act_bwd.register_fake
def _(grad, x, weight, bias, mean, rstd, negative_slope, pad):
    return torch.empty_like(x, memory_format=layout(x)), torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    x, weight, bias, _, negative_slope, pad = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.negative_slope, ctx.pad = negative_slope, pad
    ctx.mark_non_differentiable(mean, rstd)  # saved for the backward, not part of the block
    ctx.set_materialize_grads(False)  # else autograd fills their (never used) gradients with zeros: 2 launches


def _backward_of_fwd(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _batch_norm_act_bwd(grad, x, weight, bias, mean, rstd, ctx.negative_slope, ctx.pad)
    return dx, dweight, dbias, None, None, None


_batch_norm_act_fwd.register_autograd(_backward_of_fwd, setup_context=_setup)


@_batch_norm_act_fwd.register_vmap
def _(info, in_dims, x, weight, bias, eps, negative_slope, pad):
    """B networks as B * C channels (vmap_fold.py): one launch, per-network (per-channel) statistics."""
    b = info.batch_size
    x = fold_into_channels(batch_first(x, in_dims[0], b))
    weight, bias = (fold_into_rows(batch_first(t, d, b)) for t, d in zip((weight, bias), in_dims[1:3], strict=True))
    out, mean, rstd = _batch_norm_act_fwd(x, weight, bias, eps, negative_slope, pad)
    return (unfold_channels(out, b), unfold_rows(mean, b), unfold_rows(rstd, b)), (1, 0, 0)


@_batch_norm_act_bwd.register_vmap
def _(info, in_dims, grad, x, weight, bias, mean, rstd, negative_slope, pad):
    b = info.batch_size
    grad, x = (fold_into_channels(batch_first(t, d, b)) for t, d in zip((grad, x), in_dims[:2], strict=True))
    weight, bias, mean, rstd = (
        fold_into_rows(batch_first(t, d, b)) for t, d in zip((weight, bias, mean, rstd), in_dims[2:6], strict=True)
    )
    dx, dweight, dbias = _batch_norm_act_bwd(grad, x, weight, bias, mean, rstd, negative_slope, pad)
    return (unfold_channels(dx, b), unfold_rows(dweight, b), unfold_rows(dbias, b)), (1, 0, 0)


# ---- the ops: the merge's two parts -----------------------------------------------------------------------------


@torch.library.custom_op("dipfast::concat_batch_norm_act_fwd", mutates_args=())
def _concat_batch_norm_act_fwd(
    skip: torch.Tensor,
    deeper: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    negative_slope: float,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, mean, rstd) of the merge [skip_g, deeper_g] per group, padded, in deeper's layout."""
    return _forward(skip, deeper, weight, bias, groups, eps, negative_slope, pad)


@_concat_batch_norm_act_fwd.register_fake
def _(skip, deeper, weight, bias, groups, eps, negative_slope, pad):
    c = skip.shape[1] + deeper.shape[1]
    shape = _padded_shape(deeper, c, pad)
    out = torch.empty(shape, dtype=deeper.dtype, device=deeper.device, memory_format=_merged_layout(skip, deeper))
    return out, *_stats_fake(deeper, c)


@torch.library.custom_op("dipfast::concat_batch_norm_act_bwd", mutates_args=())
def _concat_batch_norm_act_bwd(
    grad: torch.Tensor,
    skip: torch.Tensor,
    deeper: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    negative_slope: float,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dskip, ddeeper, dweight, dbias), each part's gradient in its own layout."""
    return _backward(grad, skip, deeper, weight, bias, mean, rstd, groups, negative_slope, pad)


@_concat_batch_norm_act_bwd.register_fake
def _(grad, skip, deeper, weight, bias, mean, rstd, groups, negative_slope, pad):
    dskip = torch.empty_like(skip, memory_format=layout(skip))
    ddeeper = torch.empty_like(deeper, memory_format=layout(deeper))
    return dskip, ddeeper, torch.empty_like(weight), torch.empty_like(bias)


def _concat_setup(ctx, inputs, output):
    skip, deeper, weight, bias, groups, _, negative_slope, pad = inputs
    _, mean, rstd = output
    ctx.save_for_backward(skip, deeper, weight, bias, mean, rstd)
    ctx.groups, ctx.negative_slope, ctx.pad = groups, negative_slope, pad
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # as _setup


def _concat_backward_of_fwd(ctx, grad, _grad_mean, _grad_rstd):
    skip, deeper, weight, bias, mean, rstd = ctx.saved_tensors
    grads = _concat_batch_norm_act_bwd(
        grad, skip, deeper, weight, bias, mean, rstd, ctx.groups, ctx.negative_slope, ctx.pad
    )  # fmt: skip
    return *grads, None, None, None, None


_concat_batch_norm_act_fwd.register_autograd(_concat_backward_of_fwd, setup_context=_concat_setup)


@_concat_batch_norm_act_fwd.register_vmap
def _(info, in_dims, skip, deeper, weight, bias, groups, eps, negative_slope, pad):
    """B networks as B * groups groups: network b's [skip, deeper] channels stay together (vmap_fold.py)."""
    b = info.batch_size
    skip, deeper = (fold_into_channels(batch_first(t, d, b)) for t, d in zip((skip, deeper), in_dims[:2], strict=True))
    weight, bias = (fold_into_rows(batch_first(t, d, b)) for t, d in zip((weight, bias), in_dims[2:4], strict=True))
    out, mean, rstd = _concat_batch_norm_act_fwd(skip, deeper, weight, bias, b * groups, eps, negative_slope, pad)
    return (unfold_channels(out, b), unfold_rows(mean, b), unfold_rows(rstd, b)), (1, 0, 0)


@_concat_batch_norm_act_bwd.register_vmap
def _(info, in_dims, grad, skip, deeper, weight, bias, mean, rstd, groups, negative_slope, pad):
    b = info.batch_size
    grad, skip, deeper = (
        fold_into_channels(batch_first(t, d, b)) for t, d in zip((grad, skip, deeper), in_dims[:3], strict=True)
    )
    weight, bias, mean, rstd = (
        fold_into_rows(batch_first(t, d, b)) for t, d in zip((weight, bias, mean, rstd), in_dims[3:7], strict=True)
    )
    dskip, ddeeper, dweight, dbias = _concat_batch_norm_act_bwd(
        grad, skip, deeper, weight, bias, mean, rstd, b * groups, negative_slope, pad
    )  # fmt: skip
    return (
        (unfold_channels(dskip, b), unfold_channels(ddeeper, b), unfold_rows(dweight, b), unfold_rows(dbias, b)),
        (1, 1, 0, 0),
    )


# ---- the public functions --------------------------------------------------------------------------------------


def batch_norm_act_path(x: torch.Tensor) -> str:
    """'triton' or 'reference': the path batch_norm_act and concat_batch_norm take for x (conv_bn_lrelu_path's
    rule: fp32 and bf16 on CUDA, or on the CPU under TRITON_INTERPRET=1 set before import; else the twins)."""
    return "triton" if _HAS_TRITON and kernels_take(x.dtype, x.device) else "reference"


def _check_params(channels: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (channels,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be a ({channels},) tensor, one value per channel; got {got}")


def _check_plane(x: torch.Tensor, name: str, pad: int) -> None:
    if x.dim() != 4:
        raise InputError(f"{name} must be (N, C, H, W); got {tuple(x.shape)}")
    if not isinstance(pad, int) or pad < 0:
        raise InputError(f"pad must be an int >= 0; got {pad!r}")
    if pad >= min(x.shape[-2:]):
        raise InputError(f"a reflection pad of {pad} needs H and W > {pad}; got {tuple(x.shape[-2:])}: lower pad")


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pad: int = 0,
    eps: float = 1e-5,
    negative_slope: float = 0.2,
) -> torch.Tensor:
    """x: (N, C, H, W) fp32 or bf16, NCHW or channels_last (any strides) -> (N, C, H + 2 pad, W + 2 pad), x's dtype
    and memory format (layout(x)).

    weight, bias: (C,), any float dtype (fp32 under autocast). out = F.pad(act(batch_norm(x, training=True)),
    (pad,) * 4, mode="reflect") with act = leaky_relu(negative_slope) (1.0: BatchNorm alone) and the batch
    statistics (biased variance) in fp32; pad < H and pad < W. The input of a conv that pads by `pad`, to run with
    padding=0. Differentiable in x, weight and bias. Same maths as dipfast.reference.batch_norm_act (and the CPU op
    dipfast.native.batch_norm_act_reflect_pad), which runs instead off the Triton path (batch_norm_act_path).
    """
    _check_plane(x, "x", pad)
    _check_params(x.shape[1], weight, bias)
    if batch_norm_act_path(x) == "triton":
        return _batch_norm_act_fwd(x, weight, bias, float(eps), float(negative_slope), pad)[0]
    return reference.batch_norm_act(x, weight, bias, pad=pad, eps=eps, negative_slope=negative_slope)


def concat_batch_norm(
    skip: torch.Tensor,
    deeper: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pad: int = 0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """skip: (N, Cs, H, W), deeper: (N, Cd, H, W) -> (N, Cs + Cd, H + 2 pad, W + 2 pad) in deeper's dtype and layout
    (skip's when Cd = 1).

    F.pad(batch_norm(cat([skip, deeper], 1), training=True), (pad,) * 4, mode="reflect") without the concatenation:
    a skip level's merge_bn, written as the padded input of level.up's conv. Crop the parts to one H, W first
    (views are fine: dipfast.nets.layers.crop_to_smallest); dtypes are promoted as torch.cat does. weight, bias:
    (Cs + Cd,). Gradients for skip and deeper come back in their own layouts. Twin: dipfast.reference.concat_batch_norm.
    """
    for name, t in (("skip", skip), ("deeper", deeper)):
        _check_plane(t, name, pad)
    if skip.shape[0] != deeper.shape[0] or skip.shape[2:] != deeper.shape[2:]:
        raise InputError(
            "skip and deeper must share N, H and W (crop them first); "
            f"got {tuple(skip.shape)} and {tuple(deeper.shape)}"
        )
    _check_params(skip.shape[1] + deeper.shape[1], weight, bias)
    if skip.dtype != deeper.dtype:  # as torch.cat would
        dtype = torch.promote_types(skip.dtype, deeper.dtype)
        skip, deeper = skip.to(dtype), deeper.to(dtype)
    if batch_norm_act_path(deeper) == "triton":
        return _concat_batch_norm_act_fwd(skip, deeper, weight, bias, 1, float(eps), 1.0, pad)[0]
    return reference.concat_batch_norm(skip, deeper, weight, bias, pad=pad, eps=eps)
