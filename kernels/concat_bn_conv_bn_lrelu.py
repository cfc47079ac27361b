"""The merge of a skip level, concat + BatchNorm + (reflect-pad + conv + BatchNorm + LeakyReLU), in Triton.

out = conv_bn_lrelu(batch_norm(merged, training=True, merge_gamma, merge_beta, eps),
                    weight, bias, gamma, beta, stride=1, groups=groups, eps=eps, slope=slope)
merged = the concatenation of skip and deeper per group, [skip_g, deeper_g] for g < groups (cat([skip, deeper], 1)
for groups = 1: dipfast.nets.skip.SkipLevel's merge_bn then up; ../shared/notes/reference_dip.md, section 2).
skip: (N, G * Cs, H, W) and deeper: (N, G * Cd, H, W) are already cropped to one size (the caller runs
concat_cropped's crop); Cs >= 1 and Cd >= 1: a level without a skip branch (Cs = 0) has no concat, and its merge BN
is a plain BN that the caller runs with dipfast.kernels.conv_bn_lrelu on a normalised tensor, or the twins. weight:
(C_out, Cs + Cd, k, k), k in {1, 3, 5, 7}, stride 1 (the skip level's conv_fu); merge_gamma, merge_beta:
(G * (Cs + Cd),), group-major. Groups are independent networks side by side: the vmap rule folds vmapped networks
into them (vmap_fold.py). The merge BN and the output BN use the batch statistics with the biased variance. Layout
as in conv_bn_lrelu: NCHW or channels_last, deeper's (skip is brought to it), every kernel indexing by strides, the
results in that layout and d(weight) in the weight's. Precisions (fp32 with IEEE or TF32 dots, bf16 operands
with fp32 accumulation and statistics) and dispatch as in conv_bn_lrelu; float64, CPU without the interpreter or no
triton take the twin dipfast.reference.concat_bn_conv_bn_lrelu
(concat_bn_conv_bn_lrelu_path says which).

The op boundary, and what is fused:
  The concatenated tensor and its normalised copy are never written. The backward writes one merge-sized tensor,
  d(merged), the gradient of the normalised merge (steps 7-8); d(skip) and d(deeper) are written directly.
  Forward (four launches, no atomics, deterministic):
    1. _merge_stats_kernel, once over skip and once over deeper (channel offsets 0 and Cs into one buffer):
       per-tile partials sum(v) and sum((v - tile mean)^2) per merged channel; the C-sized finalize in torch
       merges them with Chan's formula into the merge BN's mean and rstd (the same merge as conv_bn_lrelu).
    2. _merge_conv_fwd_kernel: conv_bn_lrelu's implicit GEMM whose input load gathers from the two sources at the
       reflect-folded index and applies (v - mean) * rstd * merge_gamma + merge_beta on the fly (exact under
       reflection padding: the pad copies normalised values); epilogue: bias, store y, per-tile statistics of y.
       Its K runs over the skip's share, then the deeper branch's, each against its part of the weight, so a
       chunk's loads start aligned in their own tensors (in channels_last the deeper branch's come in vectors
       through the pipeline whatever Cs is). A source narrower than a chunk (the skip's 4 channels) takes its
       (tap, channel) pairs flattened, 36 columns in one 64-wide chunk; one chunk per tap, as a wider source
       takes, was 9 of the 27 K steps at 4 + 128 channels with 60 of each one's 64 columns masked (19 steps now).
    3. conv_bn_lrelu's _bn_lrelu_kernel after the same Chan finalize. Materialised: y and out, as in
       conv_bn_lrelu (the block's own output is the next op's input).
  Backward (eleven launches, ten for k = 1; no atomics, deterministic):
    4-5. conv_bn_lrelu's _bn_lrelu_bwd_kernel (APPLY False, True): dbeta, dgamma, dy, dbias.
    6. _merge_wgrad_kernel: conv_bn_lrelu's wgrad (a tap and a block of one source's channels per program, or for
       a narrow skip a block of its flattened (tap, channel) columns, as in the forward) normalising on load.
    7-8. conv_bn_lrelu's _conv_dgrad_kernel, once per source (its weight part into its channels: one launch over
       all Cs + Cd would tile 4 + 128 channels as two 128-wide tiles), into the padded gradient (fp32), and
       _reflect_fold_kernel (k > 1) on its frame, in place: d(merged), the gradient of the normalised merge,
       (N, G * (Cs + Cd), H, W), is the padded gradient's interior, whose pixels off the frame
       (conv_bn_lrelu.frame_bounds) have no pre-image in the pad (a whole fold into a buffer of its own wrote and
       read 8 more bytes an element). Materialised: the merge BN's backward needs two per-channel sums of it before
       any d(skip) element can be formed, so it is written once and read twice.
    9-10. _merge_bn_bwd_kernel, launched once per source for each step. 9 (APPLY False): partial sums of
       d(merged) and d(merged) * xhat, i.e. d(merge_beta) and d(merge_gamma). 10 (APPLY True): d(source) =
       merge_gamma * rstd * (g - dbeta / M - xhat * dgamma / M), written straight into d(skip) and d(deeper), so
       their concatenation is never formed either.
  Saved for backward: skip, deeper, merge_gamma, merge_beta, weight, y, the two BNs' mean and rstd, gamma, beta.
Tiles: configs.py's, the conv family's for the forward GEMM (as conv_bn_lrelu's); the parity tests run them under
the CPU interpreter, and tests/parity/test_cuda_shapes.py on a GPU.

Ops: dipfast::concat_bn_conv_bn_lrelu_fwd and dipfast::concat_bn_conv_bn_lrelu_bwd (custom_op with register_fake
and register_autograd; torch.compile(fullgraph=True) traces through; no double backward).
"""

from __future__ import annotations

import importlib

import torch

from dipfast import reference
from dipfast.kernels.channel_sums import chan_finalize, column_sums
from dipfast.kernels.configs import pass_tiles, shape_key
from dipfast.kernels.vmap_fold import batch_first, fold_into_channels, fold_into_rows, unfold_channels, unfold_rows

# the module, not the function: dipfast.kernels re-exports the op under the module's own name
_conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")

_HAS_TRITON = _conv_bn_lrelu_module._HAS_TRITON
if _HAS_TRITON:
    import triton
    import triton.language as tl

    from dipfast.kernels.conv_bn_lrelu import (
        _bn_lrelu_kernel,
        _conv_epilogue,
        _reflect,
        _split_range,
        bn_lrelu_backward,
        dgrad,
        memory_format,
        padded_gradient,
        plane_strides,
        reflect_fold,
        weight_rows,
    )

# Read at import, as in conv_bn_lrelu (triton.jit reads TRITON_INTERPRET when the kernels are built).
_INTERPRET = _conv_bn_lrelu_module._INTERPRET
_KERNEL_DTYPES = _conv_bn_lrelu_module._KERNEL_DTYPES
KERNEL_SIZES = _conv_bn_lrelu_module.KERNEL_SIZES
OP = "concat_bn_conv_bn_lrelu"  # configs.TileKey's op field
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False


if _HAS_TRITON:

    @triton.jit
    def _merged_channel(c, c_src, c_in, c_off):
        """The merged channel of source channel c: group c // c_src, at c_off + c % c_src within the group."""
        return (c // c_src) * c_in + c_off + c % c_src

    @triton.jit
    def _merge_stats_kernel(
        x_ptr,  # (N, groups * C_src, H, W) compute dtype: source (skip or deeper), dense in the op's layout
        psum_ptr,  # (tiles, groups * C_in) fp32: per-tile sum of v
        pm2_ptr,  # (tiles, groups * C_in) fp32: per-tile sum of (v - tile mean)^2
        n_pix,  # N * H * W, the BN reduction size
        c_src,  # this source's channels per group
        c_in,  # merged channels per group, Cs + Cd
        c_off,  # merged channel (within a group) of this source's channel 0
        groups,
        hw,
        s_n,  # the source's strides: image, channel, pixel (H and W flattened)
        s_c,
        s_pix,
        BLOCK_C: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """A (BLOCK_C source channels) x (BLOCK pixels) tile; the partials reduce over its pixels."""
        pid = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = c < groups * c_src
        cm = _merged_channel(c, c_src, c_in, c_off)
        c_total = groups * c_in
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = mask_c[:, None] & (offs < n_pix)[None, :]
        idx = ((offs // hw) * s_n + (offs % hw) * s_pix)[None, :] + (c * s_c)[:, None]
        v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(n_pix - pid * BLOCK, BLOCK).to(tl.float32)
        tsum = tl.sum(v, axis=1)
        dev = tl.where(mask, v - (tsum / count)[:, None], 0.0)
        tl.store(psum_ptr + pid * c_total + cm, tsum, mask=mask_c)
        tl.store(pm2_ptr + pid * c_total + cm, tl.sum(dev * dev, axis=1), mask=mask_c)

    @triton.jit
    def _normalised_load(x_ptr, offs, mask, cm, mask_c, mean_ptr, rstd_ptr, mg_ptr, mb_ptr):
        """The merge BN's output at x_ptr + offs (a tile of one source), 0 where masked: cm, mask_c are the tile's
        merged channels per column (group-major) and which columns are channels at all."""
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cm, mask=mask_c, other=0.0)[None, :]
        rstd = tl.load(rstd_ptr + cm, mask=mask_c, other=0.0)[None, :]
        mg = tl.load(mg_ptr + cm, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        mb = tl.load(mb_ptr + cm, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        return tl.where(mask, (v - mean) * rstd * mg + mb, 0.0)

    @triton.jit
    def _flat_columns(t, c_src, K: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr):
        """Chunk t of a narrow source's (tap, channel) pairs, flattened: column kk = tap * c_src + channel, so the
        skip's 4 channels x 9 taps fill one 64-wide chunk where one chunk per tap left 60 of 64 columns masked. ->
        (the columns' row and column offsets of the tap, channel, tap, valid)."""
        kk = t * BLOCK + tl.arange(0, BLOCK)
        tap = kk // c_src
        return tap // K - PAD, tap % K - PAD, kk % c_src, tap, kk < K * K * c_src

    @triton.jit
    def _source_conv(
        acc, x_ptr, w_ptr, w_row, nb, oh, ow, mask_m, co, mask_n, g, c_src, c_off, c_in, in_h, in_w, s_n, s_c, s_h,
        s_w, mean_ptr, rstd_ptr, mg_ptr, mb_ptr, FLAT: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """acc += one source's share of the merge conv: its normalised channels against its weight part (rows of
        w_row). FLAT: chunks of (tap, channel) pairs (_flat_columns), for a source narrower than a chunk; else one
        loop over (tap, channel chunk), each chunk contiguous and aligned in the source and in its weight rows."""
        if FLAT:
            # one trip for DIP's 4-channel skip: pipelined, it held three stages of gather indices (spills, triton 3.6)
            for t in tl.range(tl.cdiv(K * K * c_src, BLOCK_K), num_stages=1):
                off_h, off_w, c, tap, mask_c = _flat_columns(t, c_src, K, PAD, BLOCK_K)
                ih = _reflect(oh[:, None] + off_h[None, :], in_h)  # reflection pad folded into the index
                iw = _reflect(ow[:, None] + off_w[None, :], in_w)
                offs = nb[:, None] * s_n + ih * s_h + iw * s_w + (g * c_src + c)[None, :] * s_c
                a = _normalised_load(
                    x_ptr, offs, mask_m[:, None] & mask_c[None, :], g * c_in + c_off + c, mask_c,
                    mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
                )  # fmt: skip
                b = tl.load(
                    w_ptr + co[None, :] * (K * K * w_row) + (tap * w_row + c)[:, None],
                    mask=mask_c[:, None] & mask_n[None, :],
                    other=0.0,
                )
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        else:
            chunks = tl.cdiv(c_src, BLOCK_K)
            for t in range(K * K * chunks):  # one loop over (tap, chunk): see conv_bn_lrelu's forward
                tap = t // chunks
                ih = _reflect(oh + tap // K - PAD, in_h)
                iw = _reflect(ow + tap % K - PAD, in_w)
                offs_c = (t % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
                mask_c = offs_c < c_src
                a = _normalised_load(
                    x_ptr, (nb * s_n + ih * s_h + iw * s_w)[:, None] + (g * c_src + offs_c)[None, :] * s_c,
                    mask_m[:, None] & mask_c[None, :], g * c_in + c_off + offs_c, mask_c,
                    mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
                )  # fmt: skip
                b = tl.load(
                    w_ptr + co[None, :] * (K * K * w_row) + tap * w_row + offs_c[:, None],
                    mask=(offs_c < w_row)[:, None] & mask_n[None, :],  # the rows' zero padding, as conv_bn_lrelu's
                    other=0.0,
                )
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _merge_conv_fwd_kernel(
        s_ptr,  # (N, groups * Cs, H, W) skip, strides ss_*
        d_ptr,  # (N, groups * Cd, H, W) deeper, strides sd_*
        mean_ptr,  # (groups * (Cs + Cd),) merge BN statistics and affine parameters, group-major
        rstd_ptr,
        mg_ptr,
        mb_ptr,
        ws_ptr,  # (C_out, K, K, ws_row) compute dtype: the weight's skip channels as rows (weight_rows)
        wd_ptr,  # (C_out, K, K, wd_row) compute dtype: its deeper channels as rows
        b_ptr,  # (C_out,) compute dtype or fp32, read only when HAS_BIAS
        y_ptr,  # (N, C_out, H, W) compute dtype, strides sy_*: the conv output
        psum_ptr,  # (tiles_m, C_out) fp32: per-tile sum of y
        pm2_ptr,  # (tiles_m, C_out) fp32: per-tile sum of (y - tile mean)^2
        n_pix,  # N * H * W
        c_skip,  # per group
        c_deep,  # per group
        c_out,
        cout_g,
        in_h,
        in_w,
        ws_row,  # >= c_skip, the rows' lengths
        wd_row,  # >= c_deep
        ss_n,
        ss_c,
        ss_h,
        ss_w,
        sd_n,
        sd_c,
        sd_h,
        sd_w,
        sy_n,
        sy_c,
        sy_h,
        sy_w,
        K: tl.constexpr,
        PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SKIP_FLAT: tl.constexpr,  # c_skip < BLOCK_K: the skip's K in (tap, channel) chunks (_source_conv)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr,  # conv_bn_lrelu._dot_options
        PRECISION: tl.constexpr,
    ):
        """conv_bn_lrelu's forward GEMM on the merged input, normalised as it is loaded: the deeper branch's K steps,
        then the skip's, each reading one source (and its weight part) so that its chunks start aligned whatever
        the other's width."""
        pid_m = tl.program_id(0)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        co = g * cout_g + offs_n
        mask_m = offs_m < n_pix
        mask_n = offs_n < cout_g
        hw = in_h * in_w
        nb = offs_m // hw
        oh = (offs_m % hw) // in_w
        ow = offs_m % in_w
        c_in = c_skip + c_deep
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # the deeper branch's pipelined loop first, on a fresh accumulator: after the skip's dots, ptxas serialized
        # its wgmmas (each waited for before the next: bench/results/2026-12-06-cpu-device-stack/)
        acc = _source_conv(
            acc, d_ptr, wd_ptr, wd_row, nb, oh, ow, mask_m, co, mask_n, g, c_deep, c_skip, c_in, in_h, in_w,
            sd_n, sd_c, sd_h, sd_w, mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
            False, K, PAD, BLOCK_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        acc = _source_conv(
            acc, s_ptr, ws_ptr, ws_row, nb, oh, ow, mask_m, co, mask_n, g, c_skip, 0, c_in, in_h, in_w,
            ss_n, ss_c, ss_h, ss_w, mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
            SKIP_FLAT, K, PAD, BLOCK_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        y_offs = (nb * sy_n + oh * sy_h + ow * sy_w)[:, None] + co[None, :] * sy_c
        _conv_epilogue(
            acc, b_ptr, y_ptr, y_offs, psum_ptr, pm2_ptr, co, mask_m, mask_n, pid_m, n_pix, c_out, HAS_BIAS, BLOCK_M
        )

    @triton.jit
    def _source_wgrad(
        dw_ptr, dy_ptr, x_ptr, block, co, mask_co, g, c_src, c_off, c_in, n_pix, k_lo, k_hi, in_h, in_w,
        sy_n, sy_c, sy_h, sy_w, s_n, s_c, s_h, s_w, mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
        FLAT: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dW[co, tap, c_off + c] (at dw_ptr: this split's (C_out, K, K, c_in)) for one block of a source's columns:
        FLAT, block of its (tap, channel) pairs (_flat_columns); else a tap and a block of its channels, as
        conv_bn_lrelu's wgrad picks a tap and a block of input channels."""
        if FLAT:
            off_h, off_w, c, tap, mask_c = _flat_columns(block, c_src, K, PAD, BLOCK_N)
        else:
            chunks = tl.cdiv(c_src, BLOCK_N)
            tap = block // chunks
            off_h = tap // K - PAD
            off_w = tap % K - PAD
            c = (block % chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_c = c < c_src
        hw = in_h * in_w
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = m0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_pix
            nb = offs_k // hw
            oh = (offs_k % hw) // in_w
            ow = offs_k % in_w
            a = tl.load(
                dy_ptr + (nb * sy_n + oh * sy_h + ow * sy_w)[None, :] + co[:, None] * sy_c,
                mask=mask_co[:, None] & mask_k[None, :],
                other=0.0,
            )
            if FLAT:
                ih = _reflect(oh[:, None] + off_h[None, :], in_h)
                iw = _reflect(ow[:, None] + off_w[None, :], in_w)
                offs = nb[:, None] * s_n + ih * s_h + iw * s_w
            else:
                offs = (nb * s_n + _reflect(oh + off_h, in_h) * s_h + _reflect(ow + off_w, in_w) * s_w)[:, None]
            b = _normalised_load(
                x_ptr, offs + (g * c_src + c)[None, :] * s_c, mask_k[:, None] & mask_c[None, :], g * c_in + c_off + c,
                mask_c, mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
            )  # fmt: skip
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        offs = co[:, None] * (K * K * c_in) + (tap * c_in + c_off + c)[None, :]
        tl.store(dw_ptr + offs, acc, mask=mask_co[:, None] & mask_c[None, :])

    @triton.jit
    def _merge_wgrad_kernel(
        dy_ptr,  # (N, C_out, H, W) compute dtype, strides sy_*
        s_ptr,  # skip, strides ss_*
        d_ptr,  # deeper, strides sd_*
        mean_ptr,
        rstd_ptr,
        mg_ptr,
        mb_ptr,
        dw_ptr,  # (SPLIT_K, C_out, K, K, Cs + Cd): compute dtype if SPLIT_K = 1, else fp32 partials
        n_pix,  # N * H * W, the GEMM reduction
        c_skip,  # per group
        c_deep,  # per group
        c_out,
        cout_g,
        in_h,
        in_w,
        sy_n,
        sy_c,
        sy_h,
        sy_w,
        ss_n,
        ss_c,
        ss_h,
        ss_w,
        sd_n,
        sd_c,
        sd_h,
        sd_w,
        K: tl.constexpr,
        PAD: tl.constexpr,
        SKIP_FLAT: tl.constexpr,  # c_skip < BLOCK_N: the skip's columns are (tap, channel) pairs (_source_wgrad)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,  # programs per output tile, each reducing one contiguous share of the pixels
        DOT_DTYPE: tl.constexpr,  # conv_bn_lrelu._dot_options
        PRECISION: tl.constexpr,
    ):
        """dW[co, tap, merged channel]: program_id(1) picks a block of the skip's columns (skip_blocks of them), else
        a tap and a block of the deeper branch's channels."""
        g = tl.program_id(2) // SPLIT_K
        k_lo, k_hi = _split_range(tl.program_id(2) % SPLIT_K, n_pix, SPLIT_K, BLOCK_K)
        offs_co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        co = g * cout_g + offs_co
        mask_co = offs_co < cout_g
        c_in = c_skip + c_deep
        dw_ptr += (tl.program_id(2) % SPLIT_K) * c_out * K * K * c_in
        if SKIP_FLAT:
            skip_blocks = tl.cdiv(K * K * c_skip, BLOCK_N)
        else:
            skip_blocks = K * K * tl.cdiv(c_skip, BLOCK_N)
        block = tl.program_id(1)
        if block < skip_blocks:
            _source_wgrad(
                dw_ptr, dy_ptr, s_ptr, block, co, mask_co, g, c_skip, 0, c_in, n_pix, k_lo, k_hi, in_h, in_w,
                sy_n, sy_c, sy_h, sy_w, ss_n, ss_c, ss_h, ss_w, mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
                SKIP_FLAT, K, PAD, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION,
            )  # fmt: skip
        else:
            _source_wgrad(
                dw_ptr, dy_ptr, d_ptr, block - skip_blocks, co, mask_co, g, c_deep, c_skip, c_in, n_pix, k_lo, k_hi,
                in_h, in_w, sy_n, sy_c, sy_h, sy_w, sd_n, sd_c, sd_h, sd_w, mean_ptr, rstd_ptr, mg_ptr, mb_ptr,
                False, K, PAD, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION,
            )  # fmt: skip

    @triton.jit
    def _merge_bn_bwd_kernel(
        g_ptr,  # (N, groups * C_in, H, W) fp32: gradient of the normalised merge, group-major, strides sg_* (a view)
        x_ptr,  # (N, groups * C_src, H, W) compute dtype: source (skip or deeper), strides s_*
        mean_ptr,  # (groups * C_in,) fp32
        rstd_ptr,  # (groups * C_in,) fp32
        mg_ptr,  # (groups * C_in,) compute dtype or fp32: merge_gamma
        dbeta_ptr,  # (groups * C_in,) fp32 sum(g), read only when APPLY
        dgamma_ptr,  # (groups * C_in,) fp32 sum(g * xhat), read only when APPLY
        dx_ptr,  # (N, groups * C_src, H, W) compute dtype, x's strides: gradient of the source, written when APPLY
        p1_ptr,  # (tiles, groups * C_in) fp32: partial sum(g), written only when not APPLY
        p2_ptr,  # (tiles, groups * C_in) fp32: partial sum(g * xhat), written only when not APPLY
        n_pix,  # N * H * W
        inv_m,  # 1 / n_pix
        c_src,  # this source's channels per group
        c_in,  # merged channels per group
        c_off,  # merged channel (within a group) of this source's channel 0
        groups,
        hw,
        width,
        s_n,  # the source's strides: image, channel, pixel (H and W flattened)
        s_c,
        s_pix,
        sg_n,  # g's: image, channel, row, column (the padded gradient's interior: rows apart)
        sg_c,
        sg_h,
        sg_w,
        APPLY: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """A (BLOCK_C source channels) x (BLOCK pixels) tile; the partials reduce over its pixels."""
        pid = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = c < groups * c_src
        cm = _merged_channel(c, c_src, c_in, c_off)
        c_total = groups * c_in
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = mask_c[:, None] & (offs < n_pix)[None, :]
        nb = offs // hw
        s = offs % hw
        idx = (nb * s_n + s * s_pix)[None, :] + (c * s_c)[:, None]
        rstd = tl.load(rstd_ptr + cm, mask=mask_c, other=0.0)[:, None]
        mean = tl.load(mean_ptr + cm, mask=mask_c, other=0.0)[:, None]
        xhat = (tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        g_pix = nb * sg_n + (s // width) * sg_h + (s % width) * sg_w
        g = tl.load(g_ptr + g_pix[None, :] + (cm * sg_c)[:, None], mask=mask, other=0.0)
        if APPLY:
            db = tl.load(dbeta_ptr + cm, mask=mask_c, other=0.0)[:, None] * inv_m
            dg = tl.load(dgamma_ptr + cm, mask=mask_c, other=0.0)[:, None] * inv_m
            mg = tl.load(mg_ptr + cm, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            tl.store(dx_ptr + idx, mg * rstd * (g - db - xhat * dg), mask=mask)
        else:
            tl.store(p1_ptr + pid * c_total + cm, tl.sum(g, axis=1), mask=mask_c)
            tl.store(p2_ptr + pid * c_total + cm, tl.sum(tl.where(mask, g * xhat, 0.0), axis=1), mask=mask_c)


def merge_shape(skip: torch.Tensor, deeper: torch.Tensor, weight: torch.Tensor, groups: int) -> str:
    """The op's shape as configs.TileKey's shape field."""
    n, c_skip, h, w = skip.shape
    return shape_key(n=n, c_skip=c_skip, c_deep=deeper.shape[1], h=h, w=w, c_out=weight.shape[0], k=weight.shape[-1],
                     groups=groups)  # fmt: skip


def _alloc(shape, device, dtype=torch.float32, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@torch.library.custom_op("dipfast::concat_bn_conv_bn_lrelu_fwd", mutates_args=())
def _concat_bn_conv_bn_lrelu_fwd(
    skip: torch.Tensor,
    deeper: torch.Tensor,
    merge_gamma: torch.Tensor,
    merge_beta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int,
    eps: float,
    slope: float,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, y, mean, rstd, merge_mean, merge_rstd): the output and the conv output in skip's dtype and deeper's
    layout, both BNs' fp32 statistics."""
    layout = memory_format(deeper)
    skip, deeper = skip.contiguous(memory_format=layout), deeper.contiguous(memory_format=layout)
    mg, mb = merge_gamma.contiguous(), merge_beta.contiguous()
    n, h, w = skip.shape[0], *skip.shape[2:]
    cs, cd = skip.shape[1] // groups, deeper.shape[1] // groups  # per group
    c_in, c_out, k = cs + cd, weight.shape[0], weight.shape[-1]
    cout_g = c_out // groups
    n_pix, dev = n * h * w, skip.device
    # 1. merge BN statistics: per-tile partials over both sources, Chan's merge
    tile = _source_tiles(skip.dtype, layout)
    tiles_p = triton.cdiv(n_pix, tile.block)
    psum, pm2 = _alloc((tiles_p, groups * c_in), dev), _alloc((tiles_p, groups * c_in), dev)
    for src, c_src, off in ((skip, cs, 0), (deeper, cd, cs)):
        _merge_stats_kernel[(tiles_p, triton.cdiv(groups * c_src, tile.block_c))](
            src, psum, pm2, n_pix, c_src, c_in, off, groups, h * w, *plane_strides(src),
            BLOCK_C=tile.block_c, BLOCK=tile.block, num_warps=tile.num_warps,
        )  # fmt: skip
    mmean, mrstd = chan_finalize(psum, pm2, n_pix, tile.block, eps)
    # 2. conv normalising each source as it is loaded (the skip's K, then the deeper's), statistics of y in the epilogue
    shape = merge_shape(skip, deeper, weight, groups)
    config, launch = _conv_bn_lrelu_module.gemm_launch(OP, "conv", skip, tf32, n_pix, cout_g, c_in, shape)
    tiles_m = triton.cdiv(n_pix, config.block_m)
    y = _alloc((n, c_out, h, w), dev, skip.dtype, layout)
    ysum, ym2 = _alloc((tiles_m, c_out), dev), _alloc((tiles_m, c_out), dev)
    (ws, ws_row), (wd, wd_row) = weight_rows(weight[:, :cs]), weight_rows(weight[:, cs:])
    _merge_conv_fwd_kernel[(tiles_m, triton.cdiv(cout_g, config.block_n), groups)](
        skip, deeper, mmean, mrstd, mg, mb, ws, wd, bias.contiguous() if bias is not None else weight, y, ysum, ym2,
        n_pix, cs, cd, c_out, cout_g, h, w, ws_row, wd_row, *skip.stride(), *deeper.stride(), *y.stride(),
        K=k, PAD=(k - 1) // 2, HAS_BIAS=bias is not None, SKIP_FLAT=cs < config.block_k, **launch,
    )  # fmt: skip
    mean, rstd = chan_finalize(ysum, ym2, n_pix, config.block_m, eps)
    # 3. normalise + LeakyReLU
    out = _alloc((n, c_out, h, w), dev, skip.dtype, layout)
    elementwise = pass_tiles(skip.dtype)
    _bn_lrelu_kernel[(triton.cdiv(out.numel(), elementwise.block),)](
        y, mean, rstd, gamma.contiguous(), beta.contiguous(), out, out.numel(), c_out, y.stride(1), slope,
        BLOCK=elementwise.block, num_warps=elementwise.num_warps,
    )  # fmt: skip
    return out, y, mean, rstd, mmean, mrstd


def _source_tiles(dtype: torch.dtype, layout: torch.memory_format):
    """The per-channel passes' tiles over the sources and d(merged): along the channels in channels_last."""
    return pass_tiles(dtype, channels_last=layout == torch.channels_last)


@_concat_bn_conv_bn_lrelu_fwd.register_fake
def _(skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, groups, eps, slope, tf32):
    n, _, h, w = skip.shape
    c_in, c_out = skip.shape[1] + deeper.shape[1], weight.shape[0]
    shape = (n, c_out, h, w)
    out = torch.empty(shape, dtype=skip.dtype, device=skip.device, memory_format=memory_format(deeper))
    return (
        out,
        torch.empty_like(out),
        skip.new_empty((c_out,), dtype=torch.float32),
        skip.new_empty((c_out,), dtype=torch.float32),
        skip.new_empty((c_in,), dtype=torch.float32),
        skip.new_empty((c_in,), dtype=torch.float32),
    )


@torch.library.custom_op("dipfast::concat_bn_conv_bn_lrelu_bwd", mutates_args=())
def _concat_bn_conv_bn_lrelu_bwd(
    grad: torch.Tensor,
    skip: torch.Tensor,
    deeper: torch.Tensor,
    merge_gamma: torch.Tensor,
    merge_beta: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    merge_mean: torch.Tensor,
    merge_rstd: torch.Tensor,
    groups: int,
    slope: float,
    tf32: bool,
    bias_grad: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """-> (dskip, ddeeper, dmerge_gamma, dmerge_beta, dweight, dbias, dgamma, dbeta), each in its tensor's dtype
    (dbias fp32; empty unless bias_grad) and layout."""
    layout = memory_format(deeper)
    grad, skip, deeper, y = (t.contiguous(memory_format=layout) for t in (grad, skip, deeper, y))
    mg, mb, gamma, beta = (t.contiguous() for t in (merge_gamma, merge_beta, gamma, beta))
    n, h, w = skip.shape[0], *skip.shape[2:]
    cs, cd = skip.shape[1] // groups, deeper.shape[1] // groups  # per group
    c_in, c_out, k = cs + cd, weight.shape[0], weight.shape[-1]
    cout_g = c_out // groups
    pad = (k - 1) // 2
    n_pix, hw, dev = n * h * w, h * w, skip.device
    # 4-5. output BN + LeakyReLU backward (conv_bn_lrelu's)
    dy, dbias, dgamma, dbeta = bn_lrelu_backward(grad, y, mean, rstd, gamma, beta, slope, bias_grad)
    # 6. wgrad, normalising the merged input on load: dW[co, tap, merged channel]
    shape = merge_shape(skip, deeper, weight, groups)
    config, launch = _conv_bn_lrelu_module.gemm_launch(OP, "wgrad", skip, tf32, cout_g, c_in, n_pix, shape)
    flat = cs < config.block_n  # the skip's columns as (tap, channel) pairs (_source_wgrad)
    skip_blocks = triton.cdiv(k * k * cs, config.block_n) if flat else k * k * triton.cdiv(cs, config.block_n)
    tiles_n = skip_blocks + k * k * triton.cdiv(cd, config.block_n)
    config, grid = _conv_bn_lrelu_module.wgrad_grid(
        config, launch, triton.cdiv(cout_g, config.block_m), tiles_n, groups, n_pix, dev
    )
    dw = _conv_bn_lrelu_module.wgrad_output((c_out, k, k, c_in), weight, config.split_k)
    _merge_wgrad_kernel[grid](
        dy, skip, deeper, merge_mean, merge_rstd, mg, mb, dw, n_pix, cs, cd, c_out, cout_g, h, w,
        *dy.stride(), *skip.stride(), *deeper.stride(), K=k, PAD=pad, SKIP_FLAT=flat, **launch,
    )  # fmt: skip
    # 7-8. dgrad to the padded normalised merge (group-major channels), then the adjoint of the reflection pad
    # (conv_bn_lrelu's kernels)
    hp, wp = h + 2 * pad, w + 2 * pad
    dxp = padded_gradient((n, groups * c_in, hp, wp), dev, torch.float32, layout)
    dw = _conv_bn_lrelu_module.sum_splits(dw, weight, config.split_k).permute(0, 3, 1, 2)
    # One launch per source, each on its own weight part and into its channels of dxp: the merged 132 channels in one
    # launch took two 128-wide tiles, the second with 4 channels in it, doubling the step's largest GEMM.
    for c0, c_part in ((0, cs), (cs, cd)):
        dgrad(dy, weight[:, c0 : c0 + c_part], dxp[:, c0:], groups, c_in, 1, OP, shape, tf32)
    # d(merged) is dxp's interior, completed in place: only its frame has pre-images in the pad (reflect_fold), so
    # the fold reads and writes no pixel but the frame's, and no merge-sized buffer is written a second time
    dmerged = dxp[:, :, pad : pad + h, pad : pad + w]
    if pad:
        reflect_fold(dxp, dmerged, pad, frame_only=True)
    # 9-10. merge BN backward, per source, straight into d(skip) and d(deeper)
    tile = _source_tiles(skip.dtype, layout)
    passes = dict(BLOCK_C=tile.block_c, BLOCK=tile.block, num_warps=tile.num_warps)
    tiles_p = triton.cdiv(n_pix, tile.block)
    q1, q2 = _alloc((tiles_p, groups * c_in), dev), _alloc((tiles_p, groups * c_in), dev)
    sources = ((skip, cs, 0), (deeper, cd, cs))
    for src, c_src, off in sources:
        _merge_bn_bwd_kernel[(tiles_p, triton.cdiv(groups * c_src, tile.block_c))](
            dmerged, src, merge_mean, merge_rstd, mg, mg, mg, src, q1, q2, n_pix, 1.0 / n_pix, c_src, c_in, off,
            groups, hw, w, *plane_strides(src), *dmerged.stride(), APPLY=False, **passes,
        )  # fmt: skip
    dmb, dmg = column_sums(q1, q2)
    dsrc = []
    for src, c_src, off in sources:
        dx = _alloc(src.shape, dev, src.dtype, layout)
        _merge_bn_bwd_kernel[(tiles_p, triton.cdiv(groups * c_src, tile.block_c))](
            dmerged, src, merge_mean, merge_rstd, mg, dmb, dmg, dx, q1, q2, n_pix, 1.0 / n_pix, c_src, c_in, off,
            groups, hw, w, *plane_strides(src), *dmerged.stride(), APPLY=True, **passes,
        )  # fmt: skip
        dsrc.append(dx)
    dmg, dmb = dmg.to(merge_gamma.dtype), dmb.to(merge_beta.dtype)
    dw = dw.contiguous(memory_format=memory_format(weight))
    return dsrc[0], dsrc[1], dmg, dmb, dw, dbias, dgamma.to(gamma.dtype), dbeta.to(beta.dtype)


@_concat_bn_conv_bn_lrelu_bwd.register_fake
def _(
    grad,
    skip,
    deeper,
    merge_gamma,
    merge_beta,
    weight,
    y,
    mean,
    rstd,
    gamma,
    beta,
    mmean,
    mrstd,
    groups,
    slope,
    tf32,
    bias_grad,
):
    def like(t, dtype=None):
        return t.new_empty(t.shape, dtype=dtype or t.dtype)

    return (
        torch.empty_like(skip, memory_format=memory_format(deeper)),
        torch.empty_like(deeper, memory_format=memory_format(deeper)),
        like(merge_gamma),
        like(merge_beta),
        torch.empty_like(weight, memory_format=memory_format(weight)),
        gamma.new_empty(gamma.shape if bias_grad else (0,), dtype=torch.float32),
        like(gamma),
        like(beta),
    )


def _fwd_setup(ctx, inputs, output):
    skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, groups, eps, slope, tf32 = inputs
    _, y, mean, rstd, mmean, mrstd = output
    ctx.save_for_backward(skip, deeper, merge_gamma, merge_beta, weight, y, mean, rstd, gamma, beta, mmean, mrstd)
    ctx.groups, ctx.slope, ctx.tf32 = groups, slope, tf32
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(y, mean, rstd, mmean, mrstd)  # internals saved for the backward
    # else autograd hands the backward zero-filled gradients for them, y's the size of the conv output
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad, *_internal_grads):
    bias_grad = ctx.needs_input_grad[5]  # no sum of dy for a bias left out (TritonBlocks) or frozen
    ds, dd, dmg, dmb, dw, db, dgamma, dbeta = _concat_bn_conv_bn_lrelu_bwd(
        grad, *ctx.saved_tensors, ctx.groups, ctx.slope, ctx.tf32, bias_grad
    )
    db = db.to(ctx.bias_dtype) if bias_grad else None
    return ds, dd, dmg, dmb, dw, db, dgamma, dbeta, None, None, None, None


_concat_bn_conv_bn_lrelu_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@_concat_bn_conv_bn_lrelu_fwd.register_vmap
def _(info, in_dims, skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, groups, eps, slope, tf32):
    """B networks as B * groups groups (vmap_fold.py): each group concatenates its own [skip_g, deeper_g]."""
    b = info.batch_size
    skip, deeper = (fold_into_channels(batch_first(t, d, b)) for t, d in zip((skip, deeper), in_dims[:2], strict=True))
    params = (merge_gamma, merge_beta, weight, bias, gamma, beta)
    params = (fold_into_rows(batch_first(t, d, b)) for t, d in zip(params, in_dims[2:8], strict=True))
    out, y, *stats = _concat_bn_conv_bn_lrelu_fwd(skip, deeper, *params, b * groups, eps, slope, tf32)
    return (unfold_channels(out, b), unfold_channels(y, b), *(unfold_rows(t, b) for t in stats)), (1, 1, 0, 0, 0, 0)


@_concat_bn_conv_bn_lrelu_bwd.register_vmap
def _(info, in_dims, grad, skip, deeper, *rest):
    b = info.batch_size
    # merge_gamma, merge_beta, weight, y, mean, rstd, gamma, beta, the merge's mean and rstd
    *tensors, groups, slope, tf32, bias_grad = rest
    grad, skip, deeper = (
        fold_into_channels(batch_first(t, d, b)) for t, d in zip((grad, skip, deeper), in_dims[:3], strict=True)
    )
    y_index = 3  # y is per pixel (channels), the other saved tensors are per channel (rows)
    tensors = [
        fold_into_channels(batch_first(t, d, b)) if i == y_index else fold_into_rows(batch_first(t, d, b))
        for i, (t, d) in enumerate(zip(tensors, in_dims[3:13], strict=True))
    ]
    args = (grad, skip, deeper, *tensors, b * groups, slope, tf32, bias_grad)
    dskip, ddeeper, *dparams = _concat_bn_conv_bn_lrelu_bwd(*args)
    outputs = (unfold_channels(dskip, b), unfold_channels(ddeeper, b), *(unfold_rows(t, b) for t in dparams))
    return outputs, (1, 1, 0, 0, 0, 0, 0, 0)


def concat_bn_conv_bn_lrelu_path(skip: torch.Tensor) -> str:
    """'triton' or 'reference': the path concat_bn_conv_bn_lrelu takes for skip (the rules of conv_bn_lrelu_path)."""
    if not _HAS_TRITON or skip.dtype not in _KERNEL_DTYPES:
        return "reference"
    on_device = skip.device.type == "cpu" if _INTERPRET else skip.device.type == "cuda"
    return "triton" if on_device else "reference"


def _check(skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, groups) -> None:
    if skip.dim() != 4 or deeper.dim() != 4:
        raise ValueError(f"skip and deeper must be (N, C, H, W); got {tuple(skip.shape)} and {tuple(deeper.shape)}")
    if skip.shape[0] != deeper.shape[0] or skip.shape[2:] != deeper.shape[2:]:
        raise ValueError(
            "skip and deeper must share N, H and W (crop them first); "
            f"got {tuple(skip.shape)} and {tuple(deeper.shape)}"
        )
    if not isinstance(groups, int) or groups < 1 or skip.shape[1] % groups or deeper.shape[1] % groups:
        raise ValueError(
            f"groups={groups!r} must be >= 1 and divide the channels of skip ({skip.shape[1]}) and deeper "
            f"({deeper.shape[1]})"
        )
    cs, cd = skip.shape[1] // groups, deeper.shape[1] // groups
    if cs < 1 or cd < 1:
        raise ValueError(f"skip and deeper need >= 1 channel each (no skip branch: no concat); got {cs} and {cd}")
    c_in = cs + cd
    k = weight.shape[-1]
    if weight.dim() != 4 or weight.shape[-2] != k or k not in KERNEL_SIZES or weight.shape[1] != c_in:
        raise ValueError(f"weight must be (C_out, {c_in}, k, k) with k in {KERNEL_SIZES}; got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if c_out % groups:
        raise ValueError(f"weight's C_out ({c_out}) must be a multiple of groups={groups}")
    for name, t, size in (
        ("merge_gamma", merge_gamma, groups * c_in),
        ("merge_beta", merge_beta, groups * c_in),
        ("bias", bias, c_out),
        ("gamma", gamma, c_out),
        ("beta", beta, c_out),
    ):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must be ({size},); got {tuple(t.shape)}")
    _conv_bn_lrelu_module.check_dtypes((skip, deeper, weight), (merge_gamma, merge_beta, bias, gamma, beta))
    pad = (k - 1) // 2
    if pad >= min(skip.shape[-2:]):
        raise ValueError(f"reflection pad {pad} needs H and W > {pad}; got {tuple(skip.shape[-2:])}")


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
    """skip: (N, G * Cs, H, W), deeper: (N, G * Cd, H, W) fp32, Cs, Cd >= 1, G = groups -> (N, C_out, H, W) fp32.

    conv_bn_lrelu(batch_norm(merged, training=True, merge_gamma, merge_beta, eps), weight, bias, gamma, beta,
    stride=1, groups=groups, eps=eps, slope=slope), merged = the concatenation per group [skip_g, deeper_g] (for
    groups=1, cat([skip, deeper], 1)), without writing it or its normalised copy. Groups carry independent networks
    side by side (dipfast.kernels' vmap rule folds the vmapped axis into them). merge_gamma, merge_beta:
    (G * (Cs + Cd),), group-major; weight: (C_out, Cs + Cd, k, k), k in {1, 3, 5, 7}, C_out a multiple of G;
    bias: (C_out,) or None; gamma, beta: (C_out,). Differentiable in all eight tensors. Same maths as
    dipfast.reference.concat_bn_conv_bn_lrelu, which runs instead off the Triton path.
    """
    _check(skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, groups)
    if concat_bn_conv_bn_lrelu_path(skip) == "triton":
        return _concat_bn_conv_bn_lrelu_fwd(
            skip,
            deeper,
            merge_gamma,
            merge_beta,
            weight,
            bias,
            gamma,
            beta,
            groups,
            eps,
            slope,
            _conv_bn_lrelu_module.tf32_enabled(),
        )[0]
    bias = bias.to(skip.dtype) if bias is not None else None  # F.conv2d takes no fp32 bias for bf16 inputs
    return reference.concat_bn_conv_bn_lrelu(
        skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, groups=groups, eps=eps, slope=slope
    )
