"""Fused reflect-pad + conv2d + BatchNorm (training statistics) + LeakyReLU, forward and backward, in Triton.

out = leaky_relu(batch_norm(conv2d(R(x), weight, bias, stride, groups), training=True, gamma, beta, eps), slope)
with R the reflection pad by (k - 1) // 2, k in {1, 3, 5, 7}, stride 1 or 2, groups >= 1, any channel counts
(not only multiples of 16) and any H, W > (k - 1) // 2 (what the reflection pad allows). BatchNorm uses the
batch statistics (biased variance) per output channel, so groups stay independent networks.

Layout: the activations (x, y, the output and their gradients) NCHW or channels_last: the op computes in x's
(memory_format(x)) and returns each result in its input's layout. The kernels take every activation's strides, and
read the weight as rows, (C_out, k, k, row): a tap's input channels zero-padded to a multiple of 16 (weight_rows),
copied to it once per call.
channels_last is the fast one on a GPU: a pixel's channels, the GEMMs' reduction axis, are contiguous, so every
operand tile is loaded in 16-byte vectors by asynchronous copies that the software pipeline overlaps with the dots.
In NCHW the reflection index hides the rows' contiguity from the compiler, and each activation load is one element
(the forward's sm_90 code at 128 x 128 x 64 in bf16, by bench/sm90_codegen.py: NCHW with the weight read NCHW, as
before, 576 one-element load instructions, 255 registers, 236 bytes spilled, no cp.async; channels_last: no
one-element loads, 151 registers, no spills, both operands through 3 cp.async stages;
bench/results/2026-12-04-cpu-sm90-gemm-codegen/).
Precisions (x and weight share the compute dtype; bias, gamma and beta are that dtype or fp32):
  fp32: fp32 dots, TF32 or FP32_DOT's ('ieee' or 'tf32x3'; tl.dot's input_precision) as
    torch.backends.cudnn.allow_tf32 says when the op is called (tf32_enabled: the flag of the cuDNN conv this
    replaces; dipfast.engine.ieee_fp32 clears it).
  bf16: bf16 dot operands with fp32 accumulation; every other load is converted to fp32 at once and all
    elementwise maths and the BN statistics are fp32 (of the rounded y, as autocast's BatchNorm takes them).
    Stored in bf16: y and the output (the op returns x's dtype, as autocast's conv + BatchNorm do), dy (an operand
    of the backward dots), dx and dweight; in fp32: the statistics, and in NCHW the padded dgrad buffer the fold
    sums (channels_last's holds only the pad and the frame, in bf16, summed in fp32).
    In the interpreter, whose bf16 tl.dot is wrong, the dots get the same bf16 values as fp32 (_dot_options).
  Gradients come back in their tensors' dtypes.

Forward (two launches, no atomics, deterministic):
  1. _conv_bn_lrelu_fwd_kernel: implicit GEMM, M = N*P*Q output pixels, N = C_out / groups, groups on
     program_id(2); one K loop over (tap, BLOCK_K chunk of C_in / groups) pairs, so that the pipeliner spans the
     taps (masked chunks: 3 or 4 channels are zero-filled up to the 16 that tl.dot needs). R is folded into the
     gather index (i < 0 -> -i, i >= H -> 2H - 2 - i), bias added, y stored; the epilogue writes per-M-tile partial
     statistics (sum of y and the sum of squared deviations from the tile mean) to (tiles, C_out) buffers.
     The C-sized finalize on the host side of the op (torch) merges them with Chan's formula into mean and
     biased var (no E[y^2] - mean^2 cancellation), then rstd = 1 / sqrt(var + eps).
  2. _bn_lrelu_kernel: elementwise z = (y - mean) * rstd * gamma + beta, out = z > 0 ? z : slope * z.
  Saved for backward: x, weight, y, mean, rstd, gamma, beta (xhat and z are recomputed from y).
Backward (five launches of four kernels, no atomics, deterministic):
  3. _bn_lrelu_bwd_kernel (APPLY=False): dz = g * leaky'(z); per-tile partials of sum(dz) (= dbeta) and
     sum(dz * xhat) (= dgamma), summed on the host side.
  4. _bn_lrelu_bwd_kernel (APPLY=True): dy = gamma * rstd * (dz - dbeta / M - xhat * dgamma / M), stored, with
     per-tile partials of sum(dy) (= dbias; zero up to rounding, since the bias cancels under training BN) where the
     bias takes a gradient (BIAS_SUMS; TritonBlocks leaves such biases out).
  5. _conv_wgrad_kernel: dW[co, (i, j), ci] = sum over N*P*Q of dy * R(x) gathered with the same reflect index,
     each program one tap and BLOCK_N input channels; with split_k > 1 (configs.py: on a GPU by default as many as
     give every SM two programs) each output tile's sum is split into that many programs writing fp32 partials,
     summed in torch in a fixed order (sum_splits).
  6. _conv_dgrad_kernel: the gradient of the padded input, a gather over taps in one (tap, chunk) loop as the
     forward's, written to an (N, C_in, H + 2 pad, W + 2 pad) buffer in x's layout. At stride 2 each program takes
     the padded pixels of one phase (row and column parity), which only that phase's taps reach: 9 tap products
     per 4 pixels at k = 3, where gathering every tap and masking by divisibility computed 36. In channels_last
     the pixels more than pad + 1 from every edge (off the frame, frame_bounds), which no pad mirrors, go
     straight into dx: the buffer, in x's dtype, gets only the pad and the frame (at 256 x 256 and k = 3, 3% of
     the pixels).
  7. _reflect_fold_kernel: the adjoint of R on the frame (channels_last) or on every pixel (NCHW). Each pixel sums
     its <= 3 pre-images per axis (itself and its mirrors in the top/left and bottom/right pads) in fp32, 9 masked
     loads, no atomics. Skipped for k = 1. In bf16 at 256 x 256 this moves 2 bytes an element of dx where the
     fp32 buffer folded whole moved 10.
Every launch's programs write disjoint elements and read only what earlier launches wrote (checked under the
interpreter with its programs reordered and every access recorded: tests/parity/test_program_order.py).
See ../shared/notes/kernels.md, sections 1.3 and 1.4. Tiles come from configs.py per kernel family and precision
(interpreter tiles there; on a GPU a recorded autotune's entry for the GPU and shape, else the Hopper starting
points; never autotuned at run time). The block's output is materialised: normalise + LeakyReLU is a pass of its
own, not folded into the next conv's load. Under
torch.func.vmap a rule folds the vmapped networks into groups: one launch for all of them (vmap_fold.py).

Ops: dipfast::conv_bn_lrelu_fwd, dipfast::conv_bn_lrelu_bwd, and dipfast::conv_bn_lrelu_bwd_params, the backward
of a conv whose input needs no gradient (the net's input z), without steps 6 and 7 (torch.library.custom_op with
register_fake and register_autograd, so torch.compile(fullgraph=True) traces through; no double backward).
Reference twin: dipfast.reference.conv_bn_lrelu. Without CUDA (and without TRITON_INTERPRET=1 when this module was
imported), without triton, or for dtypes other than fp32 and bf16, the public function calls the twin;
conv_bn_lrelu_path(x) says which path a tensor takes. On the Triton path every part (conv, statistics, normalise,
BN/LeakyReLU backward, wgrad, dgrad, pad adjoint) is a Triton kernel; only the C-sized statistic merges run in torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch

from dipfast import reference
from dipfast.kernels.channel_sums import chan_finalize, column_sums
from dipfast.kernels.configs import (
    HOPPER_SMS,
    GemmTiles,
    fitted,
    gemm_tiles,
    pass_tiles,
    precision_of,
    shape_key,
    wgrad_splits,
)
from dipfast.kernels.vmap_fold import batch_first, fold_into_channels, fold_into_rows, unfold_channels, unfold_rows

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # the package always works: the public function falls back to dipfast.reference
    _HAS_TRITON = False

# Kernels are built for the interpreter or for the GPU when this module is imported (triton.jit reads
# TRITON_INTERPRET then), so the dispatch keys on the value seen at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
KERNEL_SIZES = (1, 3, 5, 7)
STRIDES = (1, 2)
OP = "conv_bn_lrelu"  # configs.TileKey's op field
# fp32 dots with TF32 off: "ieee" (FMAs on CUDA cores: Hopper's tensor cores take no IEEE fp32) or "tf32x3" (three
# TF32 tensor-core products per product, a_hi b_lo + a_lo b_hi + a_hi b_hi, dropping a_lo b_lo: emulated on a CPU,
# the block's errors against float64 are IEEE's within 1.3x, bench/results/2026-12-02-cpu-epyc-4c8fb3fa7b/).
# tests/parity/test_cuda_shapes.py holds both to the fp32 bar on a GPU; the interpreter computes both alike.
FP32_DOT = "ieee"
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False


if _HAS_TRITON:

    @triton.jit
    def _reflect(i, size):
        i = tl.where(i < 0, -i, i)
        return tl.where(i >= size, 2 * size - 2 - i, i)

    @triton.jit
    def _split_range(split, n, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """[lo, hi) of split `split` of a reduction over n: whole BLOCK_K chunks, the last split's share may be short
        or empty."""
        share = tl.cdiv(tl.cdiv(n, BLOCK_K), SPLIT_K) * BLOCK_K
        lo = split * share
        return lo, tl.minimum(lo + share, n)

    @triton.jit
    def _conv_epilogue(
        acc,
        b_ptr,
        y_ptr,
        y_offs,
        psum_ptr,
        pm2_ptr,
        co,
        mask_m,
        mask_n,
        pid_m,
        n_pix,
        c_out,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Add the bias, store y (in y's dtype), and write this M-tile's BN partials of the y stored: sum(y),
        sum((y - tile mean)^2), in fp32. Of the y stored, not the fp32 accumulator: the normalisation reads the stored
        y, and autocast's BatchNorm takes its statistics from the conv's rounded output too. (From the accumulator, a
        bf16 level of a few pixels per channel normalised its rounded y by another mean: 2x eager bf16's error at
        2 x 2, in the interpreter rounding as the GPU.)"""
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + y_offs, y, mask=mask)
        acc = y.to(tl.float32)
        count = tl.minimum(n_pix - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tsum = tl.sum(tl.where(mask, acc, 0.0), axis=0)
        dev = tl.where(mask, acc - (tsum / count)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * c_out + co, tsum, mask=mask_n)
        tl.store(pm2_ptr + pid_m * c_out + co, tl.sum(dev * dev, axis=0), mask=mask_n)

    @triton.jit
    def _conv_bn_lrelu_fwd_kernel(
        x_ptr,  # (N, C_in, H, W) compute dtype, strides sx_*: NCHW or channels_last
        w_ptr,  # (C_out, K, K, w_row) compute dtype: the weight's rows (weight_rows)
        b_ptr,  # (C_out,) compute dtype or fp32, read only when HAS_BIAS
        y_ptr,  # (N, C_out, P, Q) compute dtype, strides sy_*: the conv output
        psum_ptr,  # (tiles_m, C_out) fp32: per-tile sum of y
        pm2_ptr,  # (tiles_m, C_out) fp32: per-tile sum of (y - tile mean)^2
        n_pix,  # N * P * Q
        c_out,
        in_h,
        in_w,
        p_out,
        q_out,
        cin_g,
        cout_g,
        w_row,  # >= cin_g: the weight rows' length
        sx_n,
        sx_c,
        sx_h,
        sx_w,
        sy_n,
        sy_c,
        sy_h,
        sy_w,
        STRIDE: tl.constexpr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr,  # tl.dot's operands: fp32, or bf16 on a GPU for bf16 inputs (_dot_options)
        PRECISION: tl.constexpr,  # fp32 operands: "ieee", "tf32" or "tf32x3"
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < n_pix
        mask_n = offs_n < cout_g
        pq = p_out * q_out
        nb = offs_m // pq
        s = offs_m % pq
        op = s // q_out
        oq = s % q_out
        co = g * cout_g + offs_n
        x_base = nb * sx_n + g * cin_g * sx_c
        chunks = tl.cdiv(cin_g, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # One loop over (tap, channel chunk), not a loop per tap: the software pipeliner overlaps a step's loads
        # with the previous step's dot only within one loop, and a tap has one or two chunks at DIP's widths.
        for t in range(K * K * chunks):
            tap = t // chunks
            offs_k = (t % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < cin_g
            ih = _reflect(op * STRIDE + tap // K - PAD, in_h)  # reflection pad folded into the index
            iw = _reflect(oq * STRIDE + tap % K - PAD, in_w)
            a = tl.load(
                x_ptr + (x_base + ih * sx_h + iw * sx_w)[:, None] + offs_k[None, :] * sx_c,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + co[None, :] * (K * K * w_row) + tap * w_row + offs_k[:, None],
                mask=(offs_k < w_row)[:, None] & mask_n[None, :],  # the rows' zero padding: a mask Triton can vector
                other=0.0,
            )
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        y_offs = (nb * sy_n + op * sy_h + oq * sy_w)[:, None] + co[None, :] * sy_c
        _conv_epilogue(
            acc, b_ptr, y_ptr, y_offs, psum_ptr, pm2_ptr, co, mask_m, mask_n, pid_m, n_pix, c_out, HAS_BIAS, BLOCK_M
        )

    @triton.jit
    def _bn_lrelu_kernel(
        y_ptr,  # (N, C, P, Q) compute dtype: the conv output, dense (NCHW or channels_last)
        mean_ptr,  # (C,) fp32
        rstd_ptr,  # (C,) fp32
        gamma_ptr,  # (C,) compute dtype or fp32
        beta_ptr,  # (C,) compute dtype or fp32
        out_ptr,  # (N, C, P, Q) compute dtype, y's layout
        total,  # N * C * P * Q
        channels,
        c_step,  # the channel stride: P * Q in NCHW, 1 in channels_last
        slope,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        c = (offs // c_step) % channels
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + c, mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + c, mask=mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=mask, other=0.0).to(tl.float32)
        z = (y - mean) * rstd * gamma + beta
        tl.store(out_ptr + offs, tl.where(z > 0, z, z * slope), mask=mask)

    @triton.jit
    def _bn_lrelu_bwd_kernel(
        g_ptr,  # (N, C, P, Q) compute dtype: incoming gradient; it, y and dy share one dense layout
        y_ptr,  # (N, C, P, Q) compute dtype: the conv output
        mean_ptr,  # (C,) fp32
        rstd_ptr,  # (C,) fp32
        gamma_ptr,  # (C,) compute dtype or fp32
        beta_ptr,  # (C,) compute dtype or fp32
        dbeta_ptr,  # (C,) fp32 sum(dz), read only when APPLY
        dgamma_ptr,  # (C,) fp32 sum(dz * xhat), read only when APPLY
        dy_ptr,  # (N, C, P, Q) compute dtype: gradient of the conv output, written only when APPLY
        p1_ptr,  # (tiles, C) fp32: partial sum(dz), or sum(dy) when APPLY and BIAS_SUMS
        p2_ptr,  # (tiles, C) fp32: partial sum(dz * xhat), written only when not APPLY
        n_pix,  # N * P * Q, the BN reduction size
        inv_m,  # 1 / n_pix
        channels,
        pq,
        s_n,  # the layout's strides: image, channel and pixel (P and Q flattened): C P Q, P Q, 1 in NCHW;
        s_c,  # C P Q, 1, C in channels_last
        s_pix,
        slope,
        APPLY: tl.constexpr,
        BIAS_SUMS: tl.constexpr,  # with APPLY: sum(dy), the conv bias's gradient (zero up to rounding)
        BLOCK_C: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """A (BLOCK_C channels) x (BLOCK pixels) tile; the partial sums reduce over its pixels."""
        pid = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = c < channels
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = mask_c[:, None] & (offs < n_pix)[None, :]
        idx = ((offs // pq) * s_n + (offs % pq) * s_pix)[None, :] + (c * s_c)[:, None]
        mean = tl.load(mean_ptr + c, mask=mask_c, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + c, mask=mask_c, other=0.0)[:, None]
        gamma = tl.load(gamma_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        xhat = (tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        z = xhat * gamma + tl.load(beta_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(z > 0, g, g * slope)  # leaky_relu_backward: self > 0
        if APPLY:
            dbeta = tl.load(dbeta_ptr + c, mask=mask_c, other=0.0)[:, None]
            dgamma = tl.load(dgamma_ptr + c, mask=mask_c, other=0.0)[:, None]
            dy = gamma * rstd * (dz - dbeta * inv_m - xhat * (dgamma * inv_m))
            tl.store(dy_ptr + idx, dy, mask=mask)
            if BIAS_SUMS:
                tl.store(p1_ptr + pid * channels + c, tl.sum(tl.where(mask, dy, 0.0), axis=1), mask=mask_c)
        else:
            tl.store(p1_ptr + pid * channels + c, tl.sum(tl.where(mask, dz, 0.0), axis=1), mask=mask_c)
            tl.store(p2_ptr + pid * channels + c, tl.sum(tl.where(mask, dz * xhat, 0.0), axis=1), mask=mask_c)

    @triton.jit
    def _conv_wgrad_kernel(
        dy_ptr,  # (N, C_out, P, Q) compute dtype, strides sd_*
        x_ptr,  # (N, C_in, H, W) compute dtype, strides sx_*
        dw_ptr,  # (SPLIT_K, C_out, K, K, C_in / groups): compute dtype if SPLIT_K = 1, else fp32 partials
        n_pix,  # N * P * Q, the GEMM reduction
        c_out,
        in_h,
        in_w,
        p_out,
        q_out,
        cin_g,
        cout_g,
        sd_n,
        sd_c,
        sd_h,
        sd_w,
        sx_n,
        sx_c,
        sx_h,
        sx_w,
        STRIDE: tl.constexpr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,  # programs per output tile, each reducing one contiguous share of the pixels
        DOT_DTYPE: tl.constexpr,  # tl.dot's operands: fp32, or bf16 on a GPU for bf16 inputs (_dot_options)
        PRECISION: tl.constexpr,  # fp32 operands: "ieee", "tf32" or "tf32x3"
    ):
        """dW[co, tap, ci]: program_id(1) picks one tap and BLOCK_N input channels, so the gathered x tile runs along
        the channels (contiguous in channels_last) and its row index is one reflect per pixel."""
        g = tl.program_id(2) // SPLIT_K
        k_lo, k_hi = _split_range(tl.program_id(2) % SPLIT_K, n_pix, SPLIT_K, BLOCK_K)
        ci_blocks = tl.cdiv(cin_g, BLOCK_N)
        tap = tl.program_id(1) // ci_blocks
        offs_co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_ci = (tl.program_id(1) % ci_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_co = offs_co < cout_g
        mask_ci = offs_ci < cin_g
        pq = p_out * q_out
        co = g * cout_g + offs_co
        ci = g * cin_g + offs_ci
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = m0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_pix
            nb = offs_k // pq
            s = offs_k % pq
            op = s // q_out
            oq = s % q_out
            a = tl.load(
                dy_ptr + (nb * sd_n + op * sd_h + oq * sd_w)[None, :] + co[:, None] * sd_c,
                mask=mask_co[:, None] & mask_k[None, :],
                other=0.0,
            )
            ih = _reflect(op * STRIDE + tap // K - PAD, in_h)
            iw = _reflect(oq * STRIDE + tap % K - PAD, in_w)
            b = tl.load(
                x_ptr + (nb * sx_n + ih * sx_h + iw * sx_w)[:, None] + ci[None, :] * sx_c,
                mask=mask_k[:, None] & mask_ci[None, :],
                other=0.0,
            )
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        dw_offs = (tl.program_id(2) % SPLIT_K) * c_out * K * K * cin_g + co[:, None] * (K * K * cin_g) + tap * cin_g
        tl.store(dw_ptr + dw_offs + offs_ci[None, :], acc, mask=mask_co[:, None] & mask_ci[None, :])

    @triton.jit
    def _conv_dgrad_kernel(
        dy_ptr,  # (N, C_out, P, Q) compute dtype, strides sd_*
        w_ptr,  # (C_out, K, K, w_row) compute dtype: the weight's rows (weight_rows)
        dxp_ptr,  # (N, C_in, H + 2 PAD, W + 2 PAD), strides so_*: d(padded input), on the pad and frame if DIRECT
        dx_ptr,  # (N, C_in, H, W), strides sx_*: d(input) off the frame, where it is d(padded input) (DIRECT)
        n_class,  # N * cdiv(H + 2 PAD, STRIDE) * cdiv(W + 2 PAD, STRIDE): the pixels of one phase class, at most
        pad_h,  # H + 2 PAD
        pad_w,
        p_out,
        q_out,
        cin_g,
        cout_g,
        w_row,  # >= cin_g: the weight rows' length
        sd_n,
        sd_c,
        sd_h,
        sd_w,
        so_n,
        so_c,
        so_h,
        so_w,
        so_g,  # dxp's offset between groups' channels (group_stride: 0 for one group)
        sx_n,
        sx_c,
        sx_h,
        sx_w,
        sx_g,  # dx's
        STRIDE: tl.constexpr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        DIRECT: tl.constexpr,  # the pixels off the frame into dx (dx and dxp of one dtype), else every pixel into dxp
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr,  # tl.dot's operands: fp32, or bf16 on a GPU for bf16 inputs (_dot_options)
        PRECISION: tl.constexpr,  # fp32 operands: "ieee", "tf32" or "tf32x3"
    ):
        """d(padded input) at (hh, ww) = sum over taps (kh, kw) and output pixels with hh = STRIDE oh + kh, ww =
        STRIDE ow + kw of dy[oh, ow] W[kh, kw]. A padded pixel's phase (hh % STRIDE, ww % STRIDE) fixes which taps
        reach it (kh = hh mod STRIDE, + STRIDE, ...), so each program takes pixels of one phase and loops only over
        that phase's taps: at stride 2 and k = 3, 4, 2, 2 and 1 taps instead of all 9 masked (a quarter of the
        work). Stride 1 has the one phase, every tap.
        DIRECT: a pixel of the input off the frame (frame_bounds: more than PAD + 1 from every edge, so no pad
        mirrors it) has the one pre-image, its padded gradient is its gradient: stored straight into dx. The pad and
        the frame go to dxp, for reflect_fold to sum."""
        pid_m = tl.program_id(0)
        ry = 0  # the phase
        rx = 0
        if STRIDE > 1:  # program_id(0) = phase * tiles + tile
            tiles = tl.cdiv(n_class, BLOCK_M)
            ry = (pid_m // tiles) // STRIDE
            rx = (pid_m // tiles) % STRIDE
            pid_m = pid_m % tiles
        rows = tl.cdiv(pad_h, STRIDE)  # a phase's rows and columns of dxp, at most (the last may fall outside)
        cols = tl.cdiv(pad_w, STRIDE)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nb = offs_m // (rows * cols)
        i = (offs_m % (rows * cols)) // cols
        j = offs_m % cols
        hh = ry + STRIDE * i
        ww = rx + STRIDE * j
        mask_m = (offs_m < n_class) & (hh < pad_h) & (ww < pad_w)
        mask_n = offs_n < cin_g
        taps_w = tl.cdiv(K - rx, STRIDE)  # this phase's taps along each axis: kw = rx, rx + STRIDE, ... < K
        chunks = tl.cdiv(cout_g, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(tl.cdiv(K - ry, STRIDE) * taps_w * chunks):  # one loop over (tap, chunk), as the forward's
            th = (t // chunks) // taps_w
            tw = (t // chunks) % taps_w
            oh = i - th  # hh - kh = STRIDE (i - th)
            ow = j - tw
            valid = mask_m & (oh >= 0) & (oh < p_out) & (ow >= 0) & (ow < q_out)
            row = nb * sd_n + oh * sd_h + ow * sd_w
            offs_k = (t % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < cout_g
            co = g * cout_g + offs_k
            a = tl.load(dy_ptr + row[:, None] + co[None, :] * sd_c, mask=valid[:, None] & mask_k[None, :], other=0.0)
            tap = (ry + STRIDE * th) * K + rx + STRIDE * tw
            b = tl.load(
                w_ptr + co[:, None] * (K * K * w_row) + tap * w_row + offs_n[None, :],
                mask=mask_k[:, None] & (offs_n < w_row)[None, :],  # the rows' zero padding, as the forward's
                other=0.0,
            )
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        to = dxp_ptr + (nb * so_n + hh * so_h + ww * so_w + g * so_g)[:, None] + offs_n[None, :] * so_c
        if DIRECT:  # one store through either pointer: two masked stores took 255 registers in bf16, this 103
            h = hh - PAD
            w = ww - PAD
            # off the frame (frame_bounds' rule): more than PAD + 1 from every edge of the H x W input
            inner = (h > PAD) & (h < pad_h - 3 * PAD - 1) & (w > PAD) & (w < pad_w - 3 * PAD - 1)
            to_dx = dx_ptr + (nb * sx_n + h * sx_h + w * sx_w + g * sx_g)[:, None] + offs_n[None, :] * sx_c
            to = tl.where(inner[:, None], to_dx, to)
        tl.store(to, acc, mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _reflect_fold_kernel(
        dxp_ptr,  # (N, C_in, H + 2 PAD, W + 2 PAD) fp32 or dx's dtype, strides sp_*: summed in fp32
        dx_ptr,  # (N, C_in, H, W) any dtype, strides sx_*: the frame (top, bottom, left, right) written here
        total,  # N * C_in * the frame's pixels
        channels,
        in_h,
        in_w,
        top,  # the frame: rows [0, top) and [bottom, H) whole, the rows between at columns [0, left) and [right, W)
        bottom,
        left,
        right,
        sp_n,
        sp_c,
        sp_h,
        sp_w,
        sx_n,
        sx_c,
        sx_h,
        sx_w,
        PAD: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,  # dx's layout
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # the frame's elements in dx's layout's order
        mask = offs < total
        edge_rows = (top + in_h - bottom) * in_w  # the frame's pixels in whole rows, then the sides'
        sides = left + in_w - right  # pixels a row between
        frame = edge_rows + (bottom - top) * sides
        if CHANNELS_LAST:
            c = offs % channels
            f = (offs // channels) % frame
        else:
            f = offs % frame
            c = (offs // frame) % channels
        nb = offs // (frame * channels)
        in_rows = f < edge_rows
        r = f // in_w
        side = tl.maximum(f - edge_rows, 0)
        col = side % tl.maximum(sides, 1)  # no rows between when the frame is the whole image (sides 0)
        h = tl.where(in_rows, tl.where(r < top, r, bottom + r - top), top + side // tl.maximum(sides, 1))
        w = tl.where(in_rows, f % in_w, tl.where(col < left, col, right + col - left))
        base = nb * sp_n + c * sp_c
        step = sp_w
        # pre-images of h in the padded axis: h + PAD itself, PAD - h (top mirror), 2H - 2 - h + PAD (bottom)
        r0 = h + PAD
        r1 = PAD - h
        r2 = 2 * in_h - 2 - h + PAD
        v1 = (h >= 1) & (h <= PAD)
        v2 = (h >= in_h - 1 - PAD) & (h <= in_h - 2)
        c0 = (w + PAD) * step
        c1 = (PAD - w) * step
        c2 = (2 * in_w - 2 - w + PAD) * step
        u1 = (w >= 1) & (w <= PAD)
        u2 = (w >= in_w - 1 - PAD) & (w <= in_w - 2)
        row0 = base + r0 * sp_h
        row1 = base + r1 * sp_h
        row2 = base + r2 * sp_h
        m1 = mask & v1
        m2 = mask & v2
        acc = tl.load(dxp_ptr + row0 + c0, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row0 + c1, mask=mask & u1, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row0 + c2, mask=mask & u2, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row1 + c0, mask=m1, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row1 + c1, mask=m1 & u1, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row1 + c2, mask=m1 & u2, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row2 + c0, mask=m2, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row2 + c1, mask=m2 & u1, other=0.0).to(tl.float32)
        acc += tl.load(dxp_ptr + row2 + c2, mask=m2 & u2, other=0.0).to(tl.float32)
        tl.store(dx_ptr + nb * sx_n + c * sx_c + h * sx_h + w * sx_w, acc, mask=mask)


def _alloc(shape, device, dtype=torch.float32, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def weight_rows(weight: torch.Tensor, multiple: int = 16) -> tuple[torch.Tensor, int]:
    """(rows, row): the weight as the GEMM kernels read it, (C_out, k, k, row) contiguous, each row a tap's input
    channels, zero-padded to `row`, a multiple of `multiple` channels, so every row starts where Triton can prove
    a vector aligned (a 132-channel merge's rows would not)."""
    c_out, c_in, k, _ = weight.shape
    row = -(-c_in // multiple) * multiple
    taps = weight.permute(0, 2, 3, 1)
    if row == c_in:
        return taps.contiguous(), row
    rows = weight.new_zeros(c_out, k, k, row)
    rows[..., :c_in] = taps
    return rows, row


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the ops compute in for a 4-d activation t and return their results in: channels_last where t is
    channels_last and not also NCHW-contiguous (as a tensor with one channel or one pixel is), else NCHW (t copied
    to it where it is neither). On a GPU channels_last is the fast one: each pixel's channels are contiguous, so the
    GEMM kernels load 16-byte vectors asynchronously into the software pipeline; along NCHW's rows the reflection
    index hides the contiguity, and every load is one element (bench/results/2026-12-04-cpu-sm90-gemm-codegen/)."""
    if t.is_contiguous() or not t.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _dot_options(dtype: torch.dtype, tf32: bool) -> dict:
    """The GEMM kernels' DOT_DTYPE and PRECISION for inputs of `dtype`.

    bf16 inputs feed tl.dot bf16 operands (fp32 accumulation) on a GPU; the interpreter's bf16 tl.dot is wrong
    (../shared/notes/kernels.md, section 3), so there the bf16 values, exact in fp32, are fed as fp32. fp32 inputs
    use TF32 products, or FP32_DOT's where TF32 is off; the interpreter computes all of them in IEEE fp32.
    """
    dot_dtype = tl.bfloat16 if dtype == torch.bfloat16 and not _INTERPRET else tl.float32
    if dtype != torch.float32:
        return dict(DOT_DTYPE=dot_dtype, PRECISION="ieee")
    return dict(DOT_DTYPE=dot_dtype, PRECISION="tf32" if tf32 else FP32_DOT)


def gemm_launch(
    op: str, family: str, x: torch.Tensor, tf32: bool, m: int, n: int, k: int, shape: str
) -> tuple[GemmTiles, dict]:
    """A GEMM kernel's tiles (configs.gemm_tiles for op, family and shape on x's device, fitted to its m x n x k)
    and its launch keywords: blocks, warps, stages and the dot options for x's dtype (a wgrad's SPLIT_K: wgrad_grid)."""
    precision = precision_of(x.dtype == torch.bfloat16, tf32)
    config = fitted(gemm_tiles(op, family, precision, shape, x.device), m, n, k)
    launch = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    launch.update(num_warps=config.num_warps, num_stages=config.num_stages, **_dot_options(x.dtype, tf32))
    return config, launch


def wgrad_grid(
    config: GemmTiles, launch: dict, tiles_m: int, tiles_n: int, groups: int, n_pix: int, device: torch.device
) -> tuple[GemmTiles, tuple[int, int, int]]:
    """A wgrad launch's split_k (configs.wgrad_splits for its tiles_m x tiles_n x groups output tiles on `device`),
    set in config and in launch's SPLIT_K, and its grid: (tiles_m, tiles_n, groups * split_k)."""
    split_k = wgrad_splits(config, tiles_m * tiles_n * groups, n_pix, sm_count(device))
    launch["SPLIT_K"] = split_k
    return replace(config, split_k=split_k), (tiles_m, tiles_n, groups * split_k)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """device's SMs; off a GPU (the interpreter running the GPU's tiles, as bench/sm90_codegen.py does) an H100's."""
    return _cuda_sms(device.index or 0) if device.type == "cuda" else HOPPER_SMS


def wgrad_output(shape: tuple[int, ...], weight: torch.Tensor, split_k: int) -> torch.Tensor:
    """A wgrad kernel's output buffer for a dW of `shape`: dW itself in weight's dtype, or (split_k, *shape) fp32
    partials for sum_splits."""
    if split_k == 1:
        return _alloc(shape, weight.device, weight.dtype)
    return _alloc((split_k, *shape), weight.device)


def sum_splits(dw: torch.Tensor, weight: torch.Tensor, split_k: int) -> torch.Tensor:
    """dW from wgrad_output's buffer: the split partials added in order (deterministic), in weight's dtype."""
    return dw if split_k == 1 else dw.sum(0).to(weight.dtype)


def conv_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> str:
    """The op's shape as configs.TileKey's shape field."""
    n, c_in, h, w = x.shape
    return shape_key(n=n, c_in=c_in, h=h, w=w, c_out=weight.shape[0], k=weight.shape[-1], stride=stride, groups=groups)


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # odd k, pad (k - 1) // 2: (size + 2 pad - k) // stride + 1


@torch.library.custom_op("dipfast::conv_bn_lrelu_fwd", mutates_args=())
def _conv_bn_lrelu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    groups: int,
    eps: float,
    slope: float,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, y, mean, rstd): the block's output and the conv output in x's dtype, the fp32 BN batch statistics."""
    layout = memory_format(x)
    x = x.contiguous(memory_format=layout)
    n, _, h, w = x.shape
    c_out, cin_g, k = weight.shape[:3]
    p, q = _out_size(h, stride), _out_size(w, stride)
    n_pix = n * p * q
    cout_g = c_out // groups
    config, launch = gemm_launch(OP, "conv", x, tf32, n_pix, cout_g, cin_g, conv_shape(x, weight, stride, groups))
    tiles_m = triton.cdiv(n_pix, config.block_m)
    y = _alloc((n, c_out, p, q), x.device, x.dtype, layout)
    psum = _alloc((tiles_m, c_out), x.device)
    pm2 = _alloc((tiles_m, c_out), x.device)
    rows, w_row = weight_rows(weight)
    _conv_bn_lrelu_fwd_kernel[(tiles_m, triton.cdiv(cout_g, config.block_n), groups)](
        x,
        rows,
        bias.contiguous() if bias is not None else weight,
        y,
        psum,
        pm2,
        n_pix,
        c_out,
        h,
        w,
        p,
        q,
        cin_g,
        cout_g,
        w_row,
        *x.stride(),
        *y.stride(),
        STRIDE=stride,
        K=k,
        PAD=(k - 1) // 2,
        HAS_BIAS=bias is not None,
        **launch,
    )
    mean, rstd = chan_finalize(psum, pm2, n_pix, config.block_m, eps)
    out = _alloc((n, c_out, p, q), x.device, x.dtype, layout)
    tile = pass_tiles(x.dtype)
    _bn_lrelu_kernel[(triton.cdiv(out.numel(), tile.block),)](
        y, mean, rstd, gamma.contiguous(), beta.contiguous(), out, out.numel(), c_out, y.stride(1), slope,
        BLOCK=tile.block, num_warps=tile.num_warps,
    )  # fmt: skip
    return out, y, mean, rstd


@_conv_bn_lrelu_fwd.register_fake
def _(x, weight, bias, gamma, beta, stride, groups, eps, slope, tf32):
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    shape = (n, c_out, _out_size(h, stride), _out_size(w, stride))
    stat = x.new_empty((c_out,), dtype=torch.float32)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return out, torch.empty_like(out), stat, stat.clone()


@torch.library.custom_op("dipfast::conv_bn_lrelu_bwd", mutates_args=())
def _conv_bn_lrelu_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    groups: int,
    slope: float,
    tf32: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight, dbias, dgamma, dbeta), each in its tensor's dtype (dbias fp32; empty unless bias_grad), for
    the incoming gradient."""
    args = (grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad)
    return _backward(*args, input_grad=True)


# An op of its own, whose outputs hold no dx. (It began so, not as a flag, because Inductor's caches had served a
# changed schema a stale backward; dipfast's compiled calls now tag the key with the ops' sources: compile_cache.)
@torch.library.custom_op("dipfast::conv_bn_lrelu_bwd_params", mutates_args=())
def _conv_bn_lrelu_bwd_params(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    groups: int,
    slope: float,
    tf32: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dweight, dbias, dgamma, dbeta) as conv_bn_lrelu_bwd's, for an x that needs no gradient (a conv reading
    the net's input z): no dgrad, no fold."""
    args = (grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad)
    return _backward(*args, input_grad=False)


def _backward(grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad, input_grad):
    """conv_bn_lrelu_bwd's results, dx first where input_grad."""
    layout = memory_format(x)
    grad, x, y = (t.contiguous(memory_format=layout) for t in (grad, x, y))
    gamma, beta = gamma.contiguous(), beta.contiguous()
    n, c_in, h, w = x.shape
    c_out, cin_g, k = weight.shape[:3]
    cout_g = c_out // groups
    p, q = y.shape[-2:]
    n_pix = n * p * q
    dev = x.device
    dy, dbias, dgamma, dbeta = bn_lrelu_backward(grad, y, mean, rstd, gamma, beta, slope, bias_grad)
    pad = (k - 1) // 2
    shape = conv_shape(x, weight, stride, groups)
    config, launch = gemm_launch(OP, "wgrad", x, tf32, cout_g, cin_g, n_pix, shape)
    tiles_n = k * k * triton.cdiv(cin_g, config.block_n)  # a tap and BLOCK_N input channels per program
    config, grid = wgrad_grid(config, launch, triton.cdiv(cout_g, config.block_m), tiles_n, groups, n_pix, dev)
    dw = wgrad_output((c_out, k, k, cin_g), weight, config.split_k)
    _conv_wgrad_kernel[grid](
        dy, x, dw, n_pix, c_out, h, w, p, q, cin_g, cout_g, *dy.stride(), *x.stride(), STRIDE=stride, K=k, PAD=pad,
        **launch,
    )  # fmt: skip
    # dW[co, tap, ci] is the weight's channels_last layout; handed back in the weight's own
    dw = sum_splits(dw, weight, config.split_k).permute(0, 3, 1, 2).contiguous(memory_format=memory_format(weight))
    dparams = dw, dbias, dgamma.to(gamma.dtype), dbeta.to(beta.dtype)
    if not input_grad:
        return dparams
    if pad == 0:
        dx = padded_gradient(x.shape, dev, x.dtype, layout)
        dgrad(dy, weight, dx, groups, cin_g, stride, OP, shape, tf32)
        return dx.contiguous(memory_format=layout), *dparams
    # In channels_last the pixels off the frame go straight to dx: the padded gradient, in x's dtype, holds the pad
    # and the frame alone, and the fold sums only those (8 bytes an element fewer in bf16 than an fp32 padded
    # gradient folded whole). NCHW keeps the whole fp32 fold: its dgrad spills 316-1200 bytes with the choice of
    # pointer, against 196-264 without (bench/sm90_codegen.py).
    direct = layout == torch.channels_last
    dxp = padded_gradient((n, c_in, h + 2 * pad, w + 2 * pad), dev, x.dtype if direct else torch.float32, layout)
    dx = _alloc(x.shape, dev, x.dtype, layout)
    dgrad(dy, weight, dxp, groups, cin_g, stride, OP, shape, tf32, dx=dx if direct else None)
    reflect_fold(dxp, dx, pad, frame_only=direct)
    return dx, *dparams


def dgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    dxp: torch.Tensor,
    groups: int,
    group_channels: int,
    stride: int,
    op: str,
    shape: str,
    tf32: bool,
    dx: torch.Tensor | None = None,
) -> None:
    """dxp = the gradient of the padded input of the conv of weight (C_out, C_in / groups, k, k) at stride, for its
    output gradient dy; dxp (N, groups * group_channels, H + 2 pad, W + 2 pad) in any strides, its first C_in /
    groups channels of each group written (the merge fills its sources' channels one launch each). With dx (N,
    groups * group_channels, H, W), of dxp's dtype, any strides, and pad > 0: the pixels off dx's frame
    (frame_bounds) go straight into dx, and dxp gets only the pad and the frame, for reflect_fold(frame_only=True).
    Tiles: op's dgrad config for shape."""
    rows, w_row = weight_rows(weight)
    n, _, hp, wp = dxp.shape
    cin_g, k = weight.shape[1], weight.shape[-1]
    pad = (k - 1) // 2
    if dx is not None and (pad == 0 or dx.dtype != dxp.dtype or dx.shape[-2:] != (hp - 2 * pad, wp - 2 * pad)):
        raise ValueError(f"dgrad: dx {tuple(dx.shape)} {dx.dtype} does not fit dxp {tuple(dxp.shape)} {dxp.dtype}")
    cout_g = dy.shape[1] // groups
    n_class = n * triton.cdiv(hp, stride) * triton.cdiv(wp, stride)  # a phase's pixels (_conv_dgrad_kernel)
    config, launch = gemm_launch(op, "dgrad", dy, tf32, n_class, cin_g, cout_g, shape)
    grid = (stride * stride * triton.cdiv(n_class, config.block_m), triton.cdiv(cin_g, config.block_n), groups)
    dx_arg = dxp if dx is None else dx  # without dx, a placeholder the kernel never touches (DIRECT off)
    _conv_dgrad_kernel[grid](
        dy, rows, dxp, dx_arg, n_class, hp, wp, *dy.shape[-2:], cin_g, cout_g, w_row, *dy.stride(), *dxp.stride(),
        group_stride(groups, group_channels, dxp), *dx_arg.stride(), group_stride(groups, group_channels, dx_arg),
        STRIDE=stride, K=k, PAD=pad, DIRECT=dx is not None, **launch,
    )  # fmt: skip


def bn_lrelu_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    slope: float,
    bias_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of out = leaky_relu(batch_norm(y)) for grad and y of one dense layout: (dy in y's layout and
    dtype, dbias = sum(dy) in fp32 (zero up to rounding; an empty tensor unless bias_grad), dgamma and dbeta in
    fp32). Two passes of _bn_lrelu_bwd_kernel, its tiles along the layout's contiguous axis (configs.pass_tiles)."""
    n, c, p, q = y.shape
    n_pix, dev = n * p * q, y.device
    layout = memory_format(y)
    tile = pass_tiles(y.dtype, channels_last=layout == torch.channels_last)
    passes = dict(BLOCK_C=tile.block_c, BLOCK=tile.block, num_warps=tile.num_warps)
    tiles_p = triton.cdiv(n_pix, tile.block)
    grid = (tiles_p, triton.cdiv(c, tile.block_c))
    args = (grad, y, mean, rstd, gamma, beta)
    sizes = (n_pix, 1.0 / n_pix, c, p * q, *plane_strides(y), slope)
    p1, p2 = _alloc((tiles_p, c), dev), _alloc((tiles_p, c), dev)
    _bn_lrelu_bwd_kernel[grid](*args, y, y, y, p1, p2, *sizes, APPLY=False, BIAS_SUMS=False, **passes)
    dbeta, dgamma = column_sums(p1, p2)
    dy = _alloc(y.shape, dev, y.dtype, layout)  # an operand of the GEMMs
    pb = _alloc((tiles_p, c) if bias_grad else (0,), dev)
    _bn_lrelu_bwd_kernel[grid](*args, dbeta, dgamma, dy, pb, pb, *sizes, APPLY=True, BIAS_SUMS=bias_grad, **passes)
    return dy, pb.sum(0) if bias_grad else pb, dgamma, dbeta


def frame_bounds(height: int, width: int, pad: int) -> tuple[int, int, int, int]:
    """The frame of an input reflection-padded by pad > 0: its pixels within pad + 1 of an edge, which hold every
    pixel that a pad mirrors (h in [1, pad] or [H - 1 - pad, H - 2]). As (top, bottom, left, right): rows [0, top)
    and [bottom, H) whole, the rows between at columns [0, left) and [right, W)."""
    frame = pad + 1
    top, left = min(frame, height), min(frame, width)
    return top, max(height - frame, top), left, max(width - frame, left)


def reflect_fold(dxp: torch.Tensor, dx: torch.Tensor, pad: int, frame_only: bool = False) -> None:
    """The adjoint of the reflection pad by pad > 0: each pixel of dx (any strides, dtype and layout) gets the sum of
    its pre-images in the padded gradient dxp (any strides), or only those of dx's frame (frame_bounds), where dgrad
    wrote the rest of dx directly."""
    n, c, h, w = dx.shape
    top, bottom, left, right = frame_bounds(h, w, pad) if frame_only else (h, h, 0, w)
    total = n * c * ((top + h - bottom) * w + (bottom - top) * (left + w - right))
    tile = pass_tiles(dx.dtype)
    _reflect_fold_kernel[(triton.cdiv(total, tile.block),)](
        dxp, dx, total, c, h, w, top, bottom, left, right, *dxp.stride(), *dx.stride(), PAD=pad,
        CHANNELS_LAST=dx.stride(1) == 1, BLOCK=tile.block, num_warps=tile.num_warps,
    )  # fmt: skip


def plane_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """A dense (N, C, H, W) t's strides of an image, a channel and a pixel (H and W flattened), in either layout."""
    return t.stride(0), t.stride(1), t.stride(3)


def group_stride(groups: int, channels: int, t: torch.Tensor) -> int:
    """The offset between groups of `channels` channels of t; 0 for one group, whose multiple of 16 lets Triton prove
    the stores aligned (132 * the channel stride would not, though group 0 never adds it)."""
    return 0 if groups == 1 else channels * t.stride(1)


def padded_gradient(shape: tuple[int, int, int, int], device, dtype, layout: torch.memory_format) -> torch.Tensor:
    """The dgrad's output buffer of `shape` in `layout`; in channels_last a view into one with its channels padded to
    a multiple of 16, so each pixel's channels start aligned and the dgrad's stores are vectors (132 channels of
    fp32 spilled 212 bytes of registers in the merge's dgrad, bench/sm90_codegen.py)."""
    if layout != torch.channels_last or shape[1] % 16 == 0:
        return _alloc(shape, device, dtype, layout)
    n, c, h, w = shape
    return _alloc((n, -(-c // 16) * 16, h, w), device, dtype, layout)[:, :c]


@_conv_bn_lrelu_bwd_params.register_fake
def _params_fake(grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad):
    return (
        torch.empty_like(weight, memory_format=memory_format(weight)),
        gamma.new_empty(gamma.shape if bias_grad else (0,), dtype=torch.float32),
        gamma.new_empty(gamma.shape),
        beta.new_empty(beta.shape),
    )


@_conv_bn_lrelu_bwd.register_fake
def _(grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad):
    dparams = _params_fake(grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad)
    return torch.empty_like(x, memory_format=memory_format(x)), *dparams


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, gamma, beta, stride, groups, eps, slope, tf32 = inputs
    _, y, mean, rstd = output
    ctx.save_for_backward(x, weight, y, mean, rstd, gamma, beta)
    ctx.stride, ctx.groups, ctx.slope, ctx.tf32 = stride, groups, slope, tf32
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(y, mean, rstd)  # internals saved for the backward, not part of the block
    # else autograd hands the backward zero-filled gradients for them, y's the size of the conv output
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad, _grad_y, _grad_mean, _grad_rstd):
    bias_grad = ctx.needs_input_grad[2]  # no sum of dy for a bias left out (TritonBlocks) or frozen
    args = (grad, *ctx.saved_tensors, ctx.stride, ctx.groups, ctx.slope, ctx.tf32, bias_grad)
    if ctx.needs_input_grad[0]:
        dx, dw, db, dgamma, dbeta = _conv_bn_lrelu_bwd(*args)
    else:  # x is a constant: the net's input z
        dx, (dw, db, dgamma, dbeta) = None, _conv_bn_lrelu_bwd_params(*args)
    db = db.to(ctx.bias_dtype) if bias_grad else None
    return dx, dw, db, dgamma, dbeta, None, None, None, None, None


_conv_bn_lrelu_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@_conv_bn_lrelu_fwd.register_vmap
def _(info, in_dims, x, weight, bias, gamma, beta, stride, groups, eps, slope, tf32):
    """B networks as B * groups groups (vmap_fold.py): one launch, per-network statistics."""
    b = info.batch_size
    x = fold_into_channels(batch_first(x, in_dims[0], b))
    weight, bias, gamma, beta = (
        fold_into_rows(batch_first(t, d, b)) for t, d in zip((weight, bias, gamma, beta), in_dims[1:5], strict=True)
    )
    out, y, mean, rstd = _conv_bn_lrelu_fwd(x, weight, bias, gamma, beta, stride, b * groups, eps, slope, tf32)
    return (unfold_channels(out, b), unfold_channels(y, b), unfold_rows(mean, b), unfold_rows(rstd, b)), (1, 1, 0, 0)


def _folded_backward(
    op, info, in_dims, grad, x, weight, y, mean, rstd, gamma, beta, stride, groups, slope, tf32, bias_grad
):
    """A backward op's vmap rule: the B networks as B * groups groups, one launch; dx (if op returns one) then the
    parameters' gradients."""
    b = info.batch_size
    grad, x, y = (fold_into_channels(batch_first(t, in_dims[i], b)) for i, t in ((0, grad), (1, x), (3, y)))
    weight, mean, rstd, gamma, beta = (
        fold_into_rows(batch_first(t, in_dims[i], b))
        for i, t in ((2, weight), (4, mean), (5, rstd), (6, gamma), (7, beta))
    )
    args = (grad, x, weight, y, mean, rstd, gamma, beta, stride, b * groups, slope, tf32, bias_grad)
    *dx, dw, db, dgamma, dbeta = op(*args)
    dparams = tuple(unfold_rows(t, b) for t in (dw, db, dgamma, dbeta))
    return (*(unfold_channels(t, b) for t in dx), *dparams), (1,) * len(dx) + (0, 0, 0, 0)


_conv_bn_lrelu_bwd.register_vmap(functools.partial(_folded_backward, _conv_bn_lrelu_bwd))
_conv_bn_lrelu_bwd_params.register_vmap(functools.partial(_folded_backward, _conv_bn_lrelu_bwd_params))


def conv_bn_lrelu_path(x: torch.Tensor) -> str:
    """'triton' or 'reference': the path conv_bn_lrelu takes for x.

    Triton runs for fp32 and bf16 inputs on CUDA, or on CPU when TRITON_INTERPRET=1 was set before this module
    was imported; otherwise (no triton, CPU without the interpreter, float64, float16) the twin.
    """
    return "triton" if kernels_take(x.dtype, x.device) else "reference"


def kernels_take(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors of `dtype` on `device` here (conv_bn_lrelu_path's rule)."""
    if not _HAS_TRITON or dtype not in _KERNEL_DTYPES:
        return False
    return device.type == "cpu" if _INTERPRET else device.type == "cuda"


def tf32_enabled() -> bool:
    """Whether fp32 inputs may use TF32 dots: torch.backends.cudnn.allow_tf32, the flag of the cuDNN convolution
    these kernels replace (Inductor's Triton conv template reads it too). PyTorch's default is True; the engine's
    IEEE contexts (dipfast.engine.ieee_fp32) turn it off. torch.compile guards on it."""
    return torch.backends.cudnn.allow_tf32


def _check(x, weight, bias, gamma, beta, stride, groups) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C_in, H, W); got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] not in KERNEL_SIZES:
        raise ValueError(
            f"weight must be (C_out, C_in / groups, k, k) with k in {KERNEL_SIZES}; got {tuple(weight.shape)}"
        )
    if stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}; got {stride!r}")
    c_out = weight.shape[0]
    if groups < 1 or c_out % groups or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"groups={groups!r} does not fit x of {tuple(x.shape)} and weight of {tuple(weight.shape)}: "
            "C_in must be weight.shape[1] * groups and C_out a multiple of groups"
        )
    for name, t in (("bias", bias), ("gamma", gamma), ("beta", beta)):
        if t is not None and tuple(t.shape) != (c_out,):
            raise ValueError(f"{name} must be ({c_out},); got {tuple(t.shape)}")
    check_dtypes((x, weight), (bias, gamma, beta))
    pad = (weight.shape[-1] - 1) // 2
    if pad >= min(x.shape[-2:]):
        raise ValueError(f"reflection pad {pad} needs H and W > {pad}; got {tuple(x.shape[-2:])}")


def check_dtypes(operands, params) -> None:
    """The ops' dtype rule: the conv operands share one dtype; each affine parameter has it or is fp32."""
    dtype = operands[0].dtype
    if any(t.dtype != dtype for t in operands):
        raise ValueError(f"the conv inputs and the weight must share one dtype; got {[str(t.dtype) for t in operands]}")
    if any(t is not None and t.dtype not in (dtype, torch.float32) for t in params):
        raise ValueError(f"bias and the BatchNorm parameters must be {dtype} or float32")


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
    """x: (N, C_in, H, W) fp32 or bf16 -> (N, C_out, P, Q) in x's dtype, P = (H - 1) // stride + 1 (Q likewise).

    weight: (C_out, C_in / groups, k, k) in x's dtype, k in {1, 3, 5, 7}; bias: (C_out,) or None; gamma, beta:
    (C_out,); each of these three in x's dtype or fp32. out = leaky_relu(batch_norm(conv2d(R(x), weight, bias,
    stride, groups), training=True), slope), R the reflection pad by (k - 1) // 2, batch statistics with the
    biased variance. fp32 accumulation and BN statistics for either dtype; fp32 inputs use TF32 products when
    tf32_enabled(). Differentiable in x, weight, bias, gamma and beta (gradients in their dtypes). Same maths as
    dipfast.reference.conv_bn_lrelu, which runs instead off the Triton path (conv_bn_lrelu_path).
    """
    _check(x, weight, bias, gamma, beta, stride, groups)
    if conv_bn_lrelu_path(x) == "triton":
        return _conv_bn_lrelu_fwd(x, weight, bias, gamma, beta, stride, groups, eps, slope, tf32_enabled())[0]
    bias = bias.to(x.dtype) if bias is not None else None  # F.conv2d takes no fp32 bias for bf16 inputs
    return reference.conv_bn_lrelu(x, weight, bias, gamma, beta, stride=stride, groups=groups, eps=eps, slope=slope)
