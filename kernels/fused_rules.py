"""The step's rules after the backward (dipfast.step_rules) in two Triton launches: the fast step's epilogue on CUDA.

Written as torch ops, the rules that follow each backward (the output's copy, the EMA, the backtracking decision,
the metrics row with its two PSNRs in float64, the iteration count) are some 45 small kernels an iteration, each
holding a CUDA graph's stream a few microseconds, and the PSNRs' float64 casts and squares move about 14 full-size
float64 tensors (bench/step_launches.py's census: 129 ATen ops an iteration besides the 199 Triton launches). Here:

    _rules_pixels_kernel   one pass over the N outputs: out's copy (cast to fp32), the EMA
                           (ema <- out at the first iteration, else ema * w + out * (1 - w); networks `frozen`
                           keep theirs), and per program the float64 sums of (out - target)^2 and (ema - target)^2
    _rules_scalars_kernel  one program: the PSNRs from those sums, the backtracking decision (keep, bad) with its
                           state advanced, the metrics row written at iteration % K, iteration += 1

Same values as step_rules: the EMA bit for bit (the launch turns off Triton's fusion of a multiply and an add
into an FMA, so each product rounds as torch's separate kernels round it), the decision exactly (the same fp32
product and comparison), the PSNRs to float64 rounding (a fixed summation order of their own). The metrics row
is written before the optimizer step: it reads nothing the step changes. Deterministic: no atomics.

Without triton, or for CPU tensors outside Triton's interpreter, `available` is False and the step runs
step_rules' torch ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as the other kernels: read when they are built
_BLOCK = 1024  # output elements per program of the pixel pass
_BLOCK_P = 128  # partial sums per load of the scalar program
_NO_FMA = {"enable_fp_fusion": False}  # each product rounded as torch rounds it (the EMA bit for bit)

if _HAS_TRITON:
    # per_network specialised: its divisibility by 16 lets the loads and stores move 16-byte vectors (one value a run)
    @triton.jit(do_not_specialize=["programs"])
    def _rules_pixels_kernel(
        out_ptr,  # (N, C, H, W) contiguous, the step's output in its dtype
        copy_ptr,  # (N, C, H, W) fp32: the step's copy of it
        ema_ptr,  # (N, C, H, W) fp32, updated in place
        target_ptr,  # (N, C, H, W) fp64 (out_ptr when there is none)
        frozen_ptr,  # (N,) bool: the networks whose EMA keeps its value (out_ptr when there is none)
        iteration_ptr,  # 0-dim int64: the steps done before this one
        partials_ptr,  # (N, programs, 2) fp64: each program's sums of (out - target)^2 and (ema - target)^2
        per_network,  # C * H * W
        programs,
        weight,
        one_minus_weight,
        HAS_TARGET: tl.constexpr,
        HAS_FROZEN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        net = tl.program_id(1)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < per_network
        at = net.to(tl.int64) * per_network + offsets
        out = tl.load(out_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(copy_ptr + at, out, mask=mask)
        ema = tl.load(ema_ptr + at, mask=mask, other=0.0)
        first = tl.load(iteration_ptr) == 0
        new = tl.where(first, out, ema * weight + out * one_minus_weight)
        if HAS_FROZEN:
            new = tl.where(tl.load(frozen_ptr + net) != 0, ema, new)
        tl.store(ema_ptr + at, new, mask=mask)
        if HAS_TARGET:
            target = tl.load(target_ptr + at, mask=mask, other=0.0)
            d_out = tl.where(mask, out.to(tl.float64) - target, 0.0)
            d_ema = tl.where(mask, new.to(tl.float64) - target, 0.0)
            row = partials_ptr + (net * programs + pid) * 2
            tl.store(row, tl.sum(d_out * d_out, axis=0))
            tl.store(row + 1, tl.sum(d_ema * d_ema, axis=0))

    @triton.jit(do_not_specialize=["n", "per_network", "programs", "rows", "period"])
    def _rules_scalars_kernel(
        losses_ptr,  # (N,) fp32
        partials_ptr,  # (N, programs, 2) fp64 (losses_ptr when there is no target)
        last_loss_ptr,  # (N,) fp32, backtracking's last accepted loss, updated (losses_ptr without backtracking)
        accepted_ptr,  # (N,) int64, its accepted iterations, updated (losses_ptr without backtracking)
        keep_ptr,  # (N,) bool out: a checked iteration's accepted loss (save the parameters)
        bad_ptr,  # (N,) bool out: a checked iteration's loss above factor x the last accepted one (restore them)
        criterion_ptr,  # (N,) fp32: the early-stop criterion (NaN: none)
        stopped_ptr,  # (N,) bool
        metrics_ptr,  # (rows, N, 6) fp64: the ring buffer, step_rules.METRICS' columns
        iteration_ptr,  # 0-dim int64, incremented
        n,
        per_network,
        programs,
        rows,
        period,
        factor,
        ON_PERIOD: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        HAS_BACKTRACKING: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        iteration = tl.load(iteration_ptr)
        row = metrics_ptr + (iteration % rows) * n * 6
        for n0 in range(0, n, BLOCK_N):
            net = n0 + tl.arange(0, BLOCK_N)
            mask = net < n
            losses = tl.load(losses_ptr + net, mask=mask, other=0.0)
            if HAS_TARGET:
                sums_out = tl.zeros([BLOCK_N], dtype=tl.float64)
                sums_ema = tl.zeros([BLOCK_N], dtype=tl.float64)
                for p0 in range(0, programs, BLOCK_P):
                    p = p0 + tl.arange(0, BLOCK_P)
                    at = partials_ptr + (net[:, None] * programs + p[None, :]) * 2
                    both = mask[:, None] & (p < programs)[None, :]
                    sums_out += tl.sum(tl.load(at, mask=both, other=0.0), axis=1)
                    sums_ema += tl.sum(tl.load(at + 1, mask=both, other=0.0), axis=1)
                count = per_network.to(tl.float64)
                # 10 log10(1 / mse), data range 1, as -10 ln(mse) / ln(10) in float64 (a Python float in a kernel
                # is an fp32 constant; the interpreter has no log10)
                ln10 = tl.log(tl.full([BLOCK_N], 10.0, tl.float64))
                psnr = -10.0 * tl.log(tl.where(mask, sums_out / count, 1.0)) / ln10
                ema_psnr = -10.0 * tl.log(tl.where(mask, sums_ema / count, 1.0)) / ln10
            else:
                psnr = tl.full([BLOCK_N], float("nan"), tl.float64)
                ema_psnr = psnr
            if HAS_BACKTRACKING:
                last_loss = tl.load(last_loss_ptr + net, mask=mask, other=0.0)
                accepted = tl.load(accepted_ptr + net, mask=mask, other=0)
                checked = ((accepted % period) == 0) == ON_PERIOD
                bad = checked & (losses > factor * last_loss)
                keep = checked & (bad == 0)
                tl.store(last_loss_ptr + net, tl.where(keep, losses, last_loss), mask=mask)
                tl.store(accepted_ptr + net, accepted + tl.where(bad, 0, 1), mask=mask)
                tl.store(keep_ptr + net, keep, mask=mask)
                tl.store(bad_ptr + net, bad, mask=mask)
                fell_back = tl.where(bad, 1.0, 0.0).to(tl.float64)
            else:
                fell_back = tl.zeros([BLOCK_N], dtype=tl.float64)
            criterion = tl.load(criterion_ptr + net, mask=mask, other=0.0).to(tl.float64)
            stopped = tl.where(tl.load(stopped_ptr + net, mask=mask, other=0) != 0, 1.0, 0.0).to(tl.float64)
            at = row + net * 6
            tl.store(at, losses.to(tl.float64), mask=mask)
            tl.store(at + 1, psnr, mask=mask)
            tl.store(at + 2, ema_psnr, mask=mask)
            tl.store(at + 3, fell_back, mask=mask)
            tl.store(at + 4, criterion, mask=mask)
            tl.store(at + 5, stopped, mask=mask)
        tl.store(iteration_ptr, iteration + 1)


def available(device: torch.device) -> bool:
    """Whether the rules run fused on `device`: CUDA with triton, or the CPU under Triton's interpreter (tests)."""
    return _HAS_TRITON and (device.type == "cuda" or _INTERPRET)


@dataclass
class FusedRules:
    """The rules after the backward for N networks with outputs of `per_network` elements each, on `device`: the
    pixel pass's partial sums live here from set-up on (a CUDA graph replays them in place)."""

    n: int
    per_network: int
    device: torch.device

    def __post_init__(self):
        self.programs = triton.cdiv(self.per_network, _BLOCK)
        self.partials = torch.empty((self.n, self.programs, 2), dtype=torch.float64, device=self.device)
        self.keep = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.bad = torch.zeros(self.n, dtype=torch.bool, device=self.device)

    def outputs(self, out, copy, ema, target, iteration, weight: float, frozen=None) -> None:
        """copy <- out (as fp32); ema <- its update (step_rules.ema_update's); the squared errors against target
        (float64, or None) summed per program for record()."""
        out = out.contiguous()
        for t in (copy, ema):
            if t.shape != out.shape or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"copy and ema must be contiguous fp32 of out's shape {tuple(out.shape)}")
        if target is not None and (target.shape != out.shape or target.dtype != torch.float64):
            raise ValueError(f"target must be float64 of out's shape {tuple(out.shape)}; got {tuple(target.shape)}")
        _rules_pixels_kernel[(self.programs, self.n)](
            out, copy, ema, target.contiguous() if target is not None else out, frozen if frozen is not None else out,
            iteration, self.partials, self.per_network, self.programs, weight, 1 - weight,
            HAS_TARGET=target is not None, HAS_FROZEN=frozen is not None, BLOCK=_BLOCK, **_NO_FMA,
        )  # fmt: skip

    def record(self, losses, has_target: bool, backtracking, rule, criterion, stopped, metrics, iteration):
        """The backtracking decision (keep, bad: (N,) bool, this object's; None without backtracking) with
        backtracking (a step_rules.BacktrackingState) advanced by `rule`, and the metrics row of this iteration
        (losses, the PSNRs of outputs() where has_target, fell_back, criterion, stopped) written into `metrics` at
        iteration % rows; iteration += 1."""
        losses = losses.float().contiguous()
        state = (backtracking.last_loss, backtracking.accepted) if backtracking is not None else (losses, losses)
        block_n = min(triton.next_power_of_2(self.n), 128)
        _rules_scalars_kernel[(1,)](
            losses, self.partials if has_target else losses, *state, self.keep, self.bad, criterion, stopped,
            metrics, iteration, self.n, self.per_network, self.programs, metrics.shape[0],
            rule.period if rule is not None else 1, rule.factor if rule is not None else 0.0,
            ON_PERIOD=bool(rule.on_period) if rule is not None else True, HAS_TARGET=has_target,
            HAS_BACKTRACKING=backtracking is not None, BLOCK_N=block_n, BLOCK_P=max(1, _BLOCK_P * 16 // block_n),
        )  # fmt: skip
        return (self.keep, self.bad) if backtracking is not None else None
