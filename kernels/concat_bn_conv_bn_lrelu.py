"""The merge of a skip level, concat + BatchNorm + (reflect-pad + conv + BatchNorm + LeakyReLU), in Triton.

out = conv_bn_lrelu(batch_norm(cat([skip, deeper], 1), training=True, merge_gamma, merge_beta, eps),
                    weight, bias, gamma, beta, stride=1, eps=eps, slope=slope)
(dipfast.nets.skip.SkipLevel: merge_bn then up; ../shared/notes/reference_dip.md, section 2). skip: (N, Cs, H, W)
and deeper: (N, Cd, H, W) are already cropped to one size (the caller runs concat_cropped's crop); Cs >= 1 and
Cd >= 1: a level without a skip branch (Cs = 0) has no concat, and its merge BN is a plain BN that the caller
runs with dipfast.kernels.conv_bn_lrelu on a normalised tensor, or the twins. weight: (C_out, Cs + Cd, k, k), k in
{1, 3, 5, 7}, stride 1, groups 1 (the skip level's conv_fu); the merge BN and the output BN use the batch statistics
with the biased variance. Layout, dtypes and dispatch as in conv_bn_lrelu: NCHW contiguous fp32, outputs and
gradients fp32; float64, bf16, CPU without the interpreter or no triton take the twin
dipfast.reference.concat_bn_conv_bn_lrelu (concat_bn_conv_bn_lrelu_path says which).

The op boundary, and what is fused:
  The concatenated tensor and its normalised copy are never written. The backward writes one merge-sized tensor,
  d(merged), the gradient of the normalised merge (steps 7-8); d(skip) and d(deeper) are written directly.
  Forward (four launches, no atomics, deterministic):
    1. _merge_stats_kernel, once over skip and once over deeper (channel offsets 0 and Cs into one buffer):
       per-tile partials sum(v) and sum((v - tile mean)^2) per merged channel; the C-sized finalize in torch
       merges them with Chan's formula into the merge BN's mean and rstd (the same merge as conv_bn_lrelu).
    2. _merge_conv_fwd_kernel: conv_bn_lrelu's implicit GEMM whose input load gathers from the two sources
       (merged channel c < Cs reads skip[c], else deeper[c - Cs]) at the reflect-folded index and applies
       (v - mean) * rstd * merge_gamma + merge_beta on the fly (exact under reflection padding: the pad copies
       normalised values); epilogue: bias, store y, per-tile statistics of y.
    3. conv_bn_lrelu's _bn_lrelu_kernel after the same Chan finalize. Materialised: y and out, as in
       conv_bn_lrelu (the block's own output is the next op's input).
  Backward (ten launches, nine for k = 1; no atomics, deterministic):
    4-5. conv_bn_lrelu's _bn_lrelu_bwd_kernel (APPLY False, True): dbeta, dgamma, dy, dbias.
    6. _merge_wgrad_kernel: conv_bn_lrelu's wgrad with the same two-source normalise-on-load gather.
    7-8. conv_bn_lrelu's _conv_dgrad_kernel and _reflect_fold_kernel (k > 1): d(merged) = the gradient of the
       normalised merge, (N, Cs + Cd, H, W). Materialised: the merge BN's backward needs two per-channel sums of
       it before any d(skip) element can be formed, so it is written once and read twice.
    9-10. _merge_bn_bwd_kernel, launched once per source for each step. 9 (APPLY False): partial sums of
       d(merged) and d(merged) * xhat, i.e. d(merge_beta) and d(merge_gamma). 10 (APPLY True): d(source) =
       merge_gamma * rstd * (g - dbeta / M - xhat * dgamma / M), written straight into d(skip) and d(deeper), so
       their concatenation is never formed either.
  Saved for backward: skip, deeper, merge_gamma, merge_beta, weight, y, the two BNs' mean and rstd, gamma, beta.
Tiles are conv_bn_lrelu's (fixed, chosen for the interpreter, Hopper tiles still to tune); verified only under the
CPU interpreter so far.

Ops: dipfast::concat_bn_conv_bn_lrelu_fwd and dipfast::concat_bn_conv_bn_lrelu_bwd (custom_op with register_fake
and register_autograd; torch.compile(fullgraph=True) traces through; no double backward).
"""

from __future__ import annotations

import importlib

import torch

from dipfast import reference

# the module, not the function: dipfast.kernels re-exports the op under the module's own name
_cbl = importlib.import_module("dipfast.kernels.conv_bn_lrelu")

_HAS_TRITON = _cbl._HAS_TRITON
if _HAS_TRITON:
    import triton
    import triton.language as tl

    from dipfast.kernels.conv_bn_lrelu import (
        _bn_lrelu_bwd_kernel,
        _bn_lrelu_kernel,
        _conv_dgrad_kernel,
        _conv_epilogue,
        _reflect,
        _reflect_fold_kernel,
    )

# Read at import, as in conv_bn_lrelu (triton.jit reads TRITON_INTERPRET when the kernels are built).
_INTERPRET = _cbl._INTERPRET
_KERNEL_DTYPES = (torch.float32,)
KERNEL_SIZES = _cbl.KERNEL_SIZES
# Tests set this to allocate outputs filled with NaN, so an element a kernel never writes fails parity.
POISON_OUTPUTS = False
_BLOCK_M, _BLOCK_N, _BLOCK_K, _BLOCK = _cbl._BLOCK_M, _cbl._BLOCK_N, _cbl._BLOCK_K, _cbl._BLOCK


if _HAS_TRITON:

    @triton.jit
    def _merge_stats_kernel(
        x_ptr,  # (N, C_src, H, W) fp32 source (skip or deeper), contiguous
        psum_ptr,  # (tiles, C_total) fp32: per-tile sum of v
        pm2_ptr,  # (tiles, C_total) fp32: per-tile sum of (v - tile mean)^2
        n_pix,  # N * H * W, the BN reduction size
        c_src,
        c_total,
        c_off,  # merged channel of this source's channel 0
        hw,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        c = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_pix
        v = tl.load(x_ptr + (offs // hw) * c_src * hw + c * hw + offs % hw, mask=mask, other=0.0)
        count = tl.minimum(n_pix - pid * BLOCK, BLOCK).to(tl.float32)
        tsum = tl.sum(v, axis=0)
        dev = tl.where(mask, v - tsum / count, 0.0)
        tl.store(psum_ptr + pid * c_total + c_off + c, tsum)
        tl.store(pm2_ptr + pid * c_total + c_off + c, tl.sum(dev * dev, axis=0))

    @triton.jit
    def _load_merged(
        s_ptr,  # (N, Cs, H, W) skip
        d_ptr,  # (N, Cd, H, W) deeper
        mean_ptr,  # (Cs + Cd,) merge BN statistics and affine parameters
        rstd_ptr,
        mg_ptr,
        mb_ptr,
        nb,  # batch index, broadcastable against ch
        pix,  # ih * W + iw, broadcastable against ch
        ch,  # merged channel index
        mask,  # valid (pixel, channel) pairs
        c_skip,
        c_deep,
        hw,
    ):
        """The normalised merged tensor at (nb, ch, pix), gathered from its two sources; 0 where masked."""
        in_s = ch < c_skip
        v = tl.load(s_ptr + nb * c_skip * hw + tl.where(in_s, ch, 0) * hw + pix, mask=mask & in_s, other=0.0)
        v += tl.load(
            d_ptr + nb * c_deep * hw + tl.where(in_s, 0, ch - c_skip) * hw + pix, mask=mask & (ch >= c_skip), other=0.0
        )
        cmask = ch < c_skip + c_deep
        mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + ch, mask=cmask, other=0.0)
        mg = tl.load(mg_ptr + ch, mask=cmask, other=0.0)
        mb = tl.load(mb_ptr + ch, mask=cmask, other=0.0)
        return tl.where(mask, (v - mean) * rstd * mg + mb, 0.0)

    @triton.jit
    def _merge_conv_fwd_kernel(
        s_ptr,
        d_ptr,
        mean_ptr,
        rstd_ptr,
        mg_ptr,
        mb_ptr,
        w_ptr,  # (C_out, Cs + Cd, K, K) fp32, contiguous
        b_ptr,  # (C_out,) fp32, read only when HAS_BIAS
        y_ptr,  # (N, C_out, H, W) fp32: the conv output
        psum_ptr,  # (tiles_m, C_out) fp32: per-tile sum of y
        pm2_ptr,  # (tiles_m, C_out) fp32: per-tile sum of (y - tile mean)^2
        n_pix,  # N * H * W
        c_skip,
        c_deep,
        c_out,
        in_h,
        in_w,
        K: tl.constexpr,
        PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < n_pix
        mask_n = co < c_out
        hw = in_h * in_w
        c_in = c_skip + c_deep
        nb = offs_m // hw
        s = offs_m % hw
        oh = s // in_w
        ow = s % in_w
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kh in tl.static_range(K):
            ih = _reflect(oh + kh - PAD, in_h)  # reflection pad folded into the index
            for kw in tl.static_range(K):
                pix = ih * in_w + _reflect(ow + kw - PAD, in_w)
                for c0 in range(0, c_in, BLOCK_K):
                    offs_k = c0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < c_in
                    a = _load_merged(
                        s_ptr,
                        d_ptr,
                        mean_ptr,
                        rstd_ptr,
                        mg_ptr,
                        mb_ptr,
                        nb[:, None],
                        pix[:, None],
                        offs_k[None, :],
                        mask_m[:, None] & mask_k[None, :],
                        c_skip,
                        c_deep,
                        hw,
                    )
                    b = tl.load(
                        w_ptr + co[None, :] * (c_in * K * K) + offs_k[:, None] * (K * K) + (kh * K + kw),
                        mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(a, b, acc, input_precision="ieee")
        y_offs = (nb * c_out * hw + s)[:, None] + co[None, :] * hw
        _conv_epilogue(
            acc, b_ptr, y_ptr, y_offs, psum_ptr, pm2_ptr, co, mask_m, mask_n, pid_m, n_pix, c_out, HAS_BIAS, BLOCK_M
        )

    @triton.jit
    def _merge_wgrad_kernel(
        dy_ptr,  # (N, C_out, H, W) fp32, contiguous
        s_ptr,
        d_ptr,
        mean_ptr,
        rstd_ptr,
        mg_ptr,
        mb_ptr,
        dw_ptr,  # (C_out, (Cs + Cd) * K * K) fp32
        n_pix,  # N * H * W, the GEMM reduction
        c_skip,
        c_deep,
        c_out,
        in_h,
        in_w,
        K: tl.constexpr,
        PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (ci, kh, kw) flattened
        c_in = c_skip + c_deep
        mask_co = co < c_out
        mask_r = offs_r < c_in * K * K
        ci = offs_r // (K * K)
        kh = (offs_r % (K * K)) // K
        kw = offs_r % K
        hw = in_h * in_w
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m0 in range(0, n_pix, BLOCK_K):
            offs_k = m0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_pix
            nb = offs_k // hw
            s = offs_k % hw
            oh = s // in_w
            ow = s % in_w
            a = tl.load(
                dy_ptr + (nb * c_out * hw + s)[None, :] + co[:, None] * hw,
                mask=mask_co[:, None] & mask_k[None, :],
                other=0.0,
            )
            ih = _reflect(oh[:, None] + kh[None, :] - PAD, in_h)
            iw = _reflect(ow[:, None] + kw[None, :] - PAD, in_w)
            b = _load_merged(
                s_ptr,
                d_ptr,
                mean_ptr,
                rstd_ptr,
                mg_ptr,
                mb_ptr,
                nb[:, None],
                ih * in_w + iw,
                ci[None, :],
                mask_k[:, None] & mask_r[None, :],
                c_skip,
                c_deep,
                hw,
            )
            acc = tl.dot(a, b, acc, input_precision="ieee")
        tl.store(dw_ptr + co[:, None] * (c_in * K * K) + offs_r[None, :], acc, mask=mask_co[:, None] & mask_r[None, :])

    @triton.jit
    def _merge_bn_bwd_kernel(
        g_ptr,  # (N, C_total, H, W) fp32: gradient of the normalised merge
        x_ptr,  # (N, C_src, H, W) fp32 source (skip or deeper)
        mean_ptr,  # (C_total,) fp32
        rstd_ptr,  # (C_total,) fp32
        mg_ptr,  # (C_total,) fp32 merge_gamma
        dbeta_ptr,  # (C_total,) fp32 sum(g), read only when APPLY
        dgamma_ptr,  # (C_total,) fp32 sum(g * xhat), read only when APPLY
        dx_ptr,  # (N, C_src, H, W) fp32 gradient of the source, written only when APPLY
        p1_ptr,  # (tiles, C_total) fp32: partial sum(g), written only when not APPLY
        p2_ptr,  # (tiles, C_total) fp32: partial sum(g * xhat), written only when not APPLY
        n_pix,  # N * H * W
        inv_m,  # 1 / n_pix
        c_src,
        c_total,
        c_off,  # merged channel of this source's channel 0
        hw,
        APPLY: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        c = tl.program_id(1)
        cm = c_off + c
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_pix
        nb = offs // hw
        s = offs % hw
        idx = nb * c_src * hw + c * hw + s
        rstd = tl.load(rstd_ptr + cm)
        xhat = (tl.load(x_ptr + idx, mask=mask, other=0.0) - tl.load(mean_ptr + cm)) * rstd
        g = tl.load(g_ptr + nb * c_total * hw + cm * hw + s, mask=mask, other=0.0)
        if APPLY:
            db = tl.load(dbeta_ptr + cm) * inv_m
            dg = tl.load(dgamma_ptr + cm) * inv_m
            tl.store(dx_ptr + idx, tl.load(mg_ptr + cm) * rstd * (g - db - xhat * dg), mask=mask)
        else:
            tl.store(p1_ptr + pid * c_total + cm, tl.sum(g, axis=0))
            tl.store(p2_ptr + pid * c_total + cm, tl.sum(tl.where(mask, g * xhat, 0.0), axis=0))


def _alloc(shape, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


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
    eps: float,
    slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, y, mean, rstd, merge_mean, merge_rstd): the output, the conv output and both BNs' statistics."""
    skip, deeper, weight = skip.contiguous(), deeper.contiguous(), weight.contiguous()
    mg, mb = merge_gamma.contiguous(), merge_beta.contiguous()
    n, cs, h, w = skip.shape
    cd = deeper.shape[1]
    c_in, c_out, k = cs + cd, weight.shape[0], weight.shape[-1]
    n_pix, dev = n * h * w, skip.device
    # 1. merge BN statistics: per-tile partials over both sources, Chan's merge
    tiles = triton.cdiv(n_pix, _BLOCK)
    psum, pm2 = _alloc((tiles, c_in), dev), _alloc((tiles, c_in), dev)
    for src, c_src, off in ((skip, cs, 0), (deeper, cd, cs)):
        _merge_stats_kernel[(tiles, c_src)](src, psum, pm2, n_pix, c_src, c_in, off, h * w, BLOCK=_BLOCK)
    mmean, mrstd = _cbl._chan_finalize(psum, pm2, n_pix, _BLOCK, eps)
    # 2. conv with the normalise-on-load two-source gather, statistics of y in the epilogue
    tiles_m = triton.cdiv(n_pix, _BLOCK_M)
    y = _alloc((n, c_out, h, w), dev)
    ysum, ym2 = _alloc((tiles_m, c_out), dev), _alloc((tiles_m, c_out), dev)
    _merge_conv_fwd_kernel[(tiles_m, triton.cdiv(c_out, _BLOCK_N))](
        skip,
        deeper,
        mmean,
        mrstd,
        mg,
        mb,
        weight,
        bias.contiguous() if bias is not None else weight,
        y,
        ysum,
        ym2,
        n_pix,
        cs,
        cd,
        c_out,
        h,
        w,
        K=k,
        PAD=(k - 1) // 2,
        HAS_BIAS=bias is not None,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    mean, rstd = _cbl._chan_finalize(ysum, ym2, n_pix, _BLOCK_M, eps)
    # 3. normalise + LeakyReLU
    out = _alloc((n, c_out, h, w), dev)
    _bn_lrelu_kernel[(triton.cdiv(out.numel(), _BLOCK),)](
        y, mean, rstd, gamma.contiguous(), beta.contiguous(), out, out.numel(), c_out, h * w, slope, BLOCK=_BLOCK
    )
    return out, y, mean, rstd, mmean, mrstd


@_concat_bn_conv_bn_lrelu_fwd.register_fake
def _(skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, eps, slope):
    n, cs, h, w = skip.shape
    c_in, c_out = cs + deeper.shape[1], weight.shape[0]
    shape = (n, c_out, h, w)
    return (
        skip.new_empty(shape, dtype=torch.float32),
        skip.new_empty(shape, dtype=torch.float32),
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
    slope: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """-> (dskip, ddeeper, dmerge_gamma, dmerge_beta, dweight, dbias, dgamma, dbeta)."""
    grad, skip, deeper, weight, y = (t.contiguous() for t in (grad, skip, deeper, weight, y))
    mg, mb, gamma, beta = (t.contiguous() for t in (merge_gamma, merge_beta, gamma, beta))
    n, cs, h, w = skip.shape
    cd = deeper.shape[1]
    c_in, c_out, k = cs + cd, weight.shape[0], weight.shape[-1]
    pad = (k - 1) // 2
    n_pix, hw, dev = n * h * w, h * w, skip.device
    tiles = triton.cdiv(n_pix, _BLOCK)
    # 4-5. output BN + LeakyReLU backward (conv_bn_lrelu's kernel)
    p1, p2 = _alloc((tiles, c_out), dev), _alloc((tiles, c_out), dev)
    args = (grad, y, mean, rstd, gamma, beta)
    _bn_lrelu_bwd_kernel[(tiles, c_out)](
        *args, y, y, y, p1, p2, n_pix, 1.0 / n_pix, c_out, hw, slope, APPLY=False, BLOCK=_BLOCK
    )
    dbeta, dgamma = p1.sum(0), p2.sum(0)
    dy, pb = _alloc(y.shape, dev), _alloc((tiles, c_out), dev)
    _bn_lrelu_bwd_kernel[(tiles, c_out)](
        *args, dbeta, dgamma, dy, pb, pb, n_pix, 1.0 / n_pix, c_out, hw, slope, APPLY=True, BLOCK=_BLOCK
    )
    dbias = pb.sum(0)
    # 6. wgrad, normalising the merged input on load
    dw = _alloc(weight.shape, dev)
    _merge_wgrad_kernel[(triton.cdiv(c_out, _BLOCK_M), triton.cdiv(c_in * k * k, _BLOCK_N))](
        dy,
        skip,
        deeper,
        merge_mean,
        merge_rstd,
        mg,
        mb,
        dw,
        n_pix,
        cs,
        cd,
        c_out,
        h,
        w,
        K=k,
        PAD=pad,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    # 7-8. dgrad to the padded normalised merge, then the adjoint of the reflection pad (conv_bn_lrelu's kernels)
    hp, wp = h + 2 * pad, w + 2 * pad
    dxp = _alloc((n, c_in, hp, wp), dev)
    _conv_dgrad_kernel[(triton.cdiv(n * hp * wp, _BLOCK_M), triton.cdiv(c_in, _BLOCK_N), 1)](
        dy,
        weight,
        dxp,
        n * hp * wp,
        c_in,
        c_out,
        hp,
        wp,
        h,
        w,
        c_in,
        c_out,
        STRIDE=1,
        K=k,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    if pad == 0:
        dmerged = dxp
    else:
        dmerged = _alloc((n, c_in, h, w), dev)
        _reflect_fold_kernel[(triton.cdiv(dmerged.numel(), _BLOCK),)](
            dxp, dmerged, dmerged.numel(), h, w, PAD=pad, BLOCK=_BLOCK
        )
    # 9-10. merge BN backward, per source, straight into d(skip) and d(deeper)
    q1, q2 = _alloc((tiles, c_in), dev), _alloc((tiles, c_in), dev)
    sources = ((skip, cs, 0), (deeper, cd, cs))
    for src, c_src, off in sources:
        _merge_bn_bwd_kernel[(tiles, c_src)](
            dmerged, src, merge_mean, merge_rstd, mg, mg, mg, src, q1, q2,
            n_pix, 1.0 / n_pix, c_src, c_in, off, hw, APPLY=False, BLOCK=_BLOCK,
        )  # fmt: skip
    dmb, dmg = q1.sum(0), q2.sum(0)
    dsrc = []
    for src, c_src, off in sources:
        dx = _alloc(src.shape, dev)
        _merge_bn_bwd_kernel[(tiles, c_src)](
            dmerged, src, merge_mean, merge_rstd, mg, dmb, dmg, dx, q1, q2,
            n_pix, 1.0 / n_pix, c_src, c_in, off, hw, APPLY=True, BLOCK=_BLOCK,
        )  # fmt: skip
        dsrc.append(dx)
    return dsrc[0], dsrc[1], dmg, dmb, dw, dbias, dgamma, dbeta


@_concat_bn_conv_bn_lrelu_bwd.register_fake
def _(grad, skip, deeper, merge_gamma, merge_beta, weight, y, mean, rstd, gamma, beta, merge_mean, merge_rstd, slope):
    def like(t):
        return t.new_empty(t.shape, dtype=torch.float32)

    return (
        like(skip),
        like(deeper),
        like(merge_gamma),
        like(merge_beta),
        like(weight),
        like(gamma),
        like(gamma),
        like(beta),
    )


def _fwd_setup(ctx, inputs, output):
    skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, eps, slope = inputs
    _, y, mean, rstd, mmean, mrstd = output
    ctx.save_for_backward(skip, deeper, merge_gamma, merge_beta, weight, y, mean, rstd, gamma, beta, mmean, mrstd)
    ctx.slope, ctx.has_bias = slope, bias is not None
    ctx.mark_non_differentiable(y, mean, rstd, mmean, mrstd)  # internals saved for the backward


def _fwd_backward(ctx, grad, *_internal_grads):
    ds, dd, dmg, dmb, dw, db, dgamma, dbeta = _concat_bn_conv_bn_lrelu_bwd(
        grad.contiguous(), *ctx.saved_tensors, ctx.slope
    )
    return ds, dd, dmg, dmb, dw, db if ctx.has_bias else None, dgamma, dbeta, None, None


_concat_bn_conv_bn_lrelu_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def concat_bn_conv_bn_lrelu_path(skip: torch.Tensor) -> str:
    """'triton' or 'reference': the path concat_bn_conv_bn_lrelu takes for skip (the rules of conv_bn_lrelu_path)."""
    if not _HAS_TRITON or skip.dtype not in _KERNEL_DTYPES:
        return "reference"
    on_device = skip.device.type == "cpu" if _INTERPRET else skip.device.type == "cuda"
    return "triton" if on_device else "reference"


def _check(skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta) -> None:
    if skip.dim() != 4 or deeper.dim() != 4:
        raise ValueError(f"skip and deeper must be (N, C, H, W); got {tuple(skip.shape)} and {tuple(deeper.shape)}")
    if skip.shape[0] != deeper.shape[0] or skip.shape[2:] != deeper.shape[2:]:
        raise ValueError(
            "skip and deeper must share N, H and W (crop them first); "
            f"got {tuple(skip.shape)} and {tuple(deeper.shape)}"
        )
    cs, cd = skip.shape[1], deeper.shape[1]
    if cs < 1 or cd < 1:
        raise ValueError(f"skip and deeper need >= 1 channel each (no skip branch: no concat); got {cs} and {cd}")
    c_in = cs + cd
    k = weight.shape[-1]
    if weight.dim() != 4 or weight.shape[-2] != k or k not in KERNEL_SIZES or weight.shape[1] != c_in:
        raise ValueError(f"weight must be (C_out, {c_in}, k, k) with k in {KERNEL_SIZES}; got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    for name, t, size in (
        ("merge_gamma", merge_gamma, c_in),
        ("merge_beta", merge_beta, c_in),
        ("bias", bias, c_out),
        ("gamma", gamma, c_out),
        ("beta", beta, c_out),
    ):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must be ({size},); got {tuple(t.shape)}")
    dtypes = {t.dtype for t in (skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"all tensors must share one dtype; got {sorted(map(str, dtypes))}")
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
    eps: float = 1e-5,
    slope: float = 0.2,
) -> torch.Tensor:
    """skip: (N, Cs, H, W), deeper: (N, Cd, H, W) fp32, Cs, Cd >= 1 -> (N, C_out, H, W) fp32.

    conv_bn_lrelu(batch_norm(cat([skip, deeper], 1), training=True, merge_gamma, merge_beta, eps), weight, bias,
    gamma, beta, stride=1, eps=eps, slope=slope), without writing the concatenation or its normalised copy.
    merge_gamma, merge_beta: (Cs + Cd,); weight: (C_out, Cs + Cd, k, k), k in {1, 3, 5, 7}; bias: (C_out,) or
    None; gamma, beta: (C_out,). Differentiable in all eight tensors. Same maths as
    dipfast.reference.concat_bn_conv_bn_lrelu, which runs instead off the Triton path.
    """
    _check(skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta)
    if concat_bn_conv_bn_lrelu_path(skip) == "triton":
        return _concat_bn_conv_bn_lrelu_fwd(
            skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, eps, slope
        )[0]
    return reference.concat_bn_conv_bn_lrelu(
        skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta, eps=eps, slope=slope
    )
