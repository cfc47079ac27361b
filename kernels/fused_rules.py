"""The step's rules after the backward (dipfast.step_rules, early_stop.EarlyStop.update) in 3 Triton launches, 7 with
early stopping: the fast step's epilogue on CUDA.

Written as torch ops, the rules that follow each backward (the output's copy, the EMA, backtracking's decision and
masked copies, the metrics row with its two PSNRs in float64, the iteration count) are some 48 small kernels an
iteration, each holding a CUDA graph's stream a few microseconds, and the PSNRs' float64 casts and squares move
about 14 full-size float64 tensors; early stopping's update (ES-WMV: the window's ring and float64 sums, the
criterion, its decisions, the kept output) is some 60 more, over full-size float64 tensors too, and the freeze of
stopped networks 12 masked copies of the whole optimizer state (bench/step_launches.py's census: 127 and 203 ATen ops
an iteration, without and with early stopping, besides 199 Triton launches; bench/results/2026-12-05-cpu-fused-rules/).
Here:

    _rules_pixels_kernel         one pass over the N outputs: out's copy (cast to fp32), per program the float64 sum
                                 of (out - target)^2, and either the EMA (ema <- out at the first iteration, else
                                 ema * w + out * (1 - w)) with the sum of (ema - target)^2, or with early stopping
                                 the window: the output enters the bf16 ring, the oldest leaves, the float64 sums
                                 follow, and per program the sum of the per-pixel variances (VAR's terms)
    _early_stop_scalars_kernel   one program, with early stopping: the noise gate, VAR, the new minimum, the output
                                 kept, the stop (EarlyStop.update's decisions, on its state)
    _early_stop_outputs_kernel   with early stopping, one pass: the kept output (the window's mean or the output)
                                 stored where kept, the EMA (the stopped networks' held), the sum of (ema - target)^2
    _rules_scalars_kernel        one program: the PSNRs from the sums, the backtracking decision (keep, bad) with its
                                 state advanced, the metrics row written at iteration % K, iteration += 1
    _copy_rows_kernel            copy_rows: up to six masked row copies, a network's rows moved only where its mask
                                 holds (backtracking's save and restore; the freeze's, before and after Adam's step)

Same values as step_rules and early_stop: the EMA, the window and the kept outputs bit for bit (the launches turn off
Triton's fusion of a multiply and an add into an FMA, so each product rounds as torch's separate kernels round it;
the bf16 ring is rounded to nearest even by hand, as torch casts, where Triton's interpreter truncates), the
decisions exactly (the same fp32 products and comparisons; tests include exact ties), the PSNRs to float64 rounding
and VAR to its float64 mean's (each a fixed summation order of its own, VAR then cast to fp32: the same fp32 value
but where the float64 mean sits within an ulp of an fp32 rounding boundary). The metrics row is written before the
optimizer step: it reads nothing the step changes. Deterministic: no atomics.

Without triton, or for CPU tensors outside Triton's interpreter, `available` is False and the step runs the torch
ops; other early-stopping rules (ES-EMV, a downsampled window: takes()) run early_stop's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dipfast.early_stop import GATE_SMOOTHING
from dipfast.kernels.dependent_launch import launch_options, wait_for_previous_kernel

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as the other kernels: read when they are built
_BLOCK = 1024  # output elements per program of the pixel pass
_BLOCK_P = 128  # partial sums per load of the scalar program
_ROW_BLOCK = 4096  # elements per program of copy_rows
_PAIRS = 6  # copies per copy_rows launch: the freeze's parameters and Adam's two moments of two flat buffers
_NO_FMA = {"enable_fp_fusion": False}  # each product rounded as torch rounds it (the EMA bit for bit)

if _HAS_TRITON:

    @triton.jit
    def _network_block(per_network, BLOCK: tl.constexpr):
        """A pixel pass's program (grid: blocks of a network's elements, networks) -> (network, block, the block's
        offsets in the (N, ...) tensors, their mask)."""
        pid = tl.program_id(0)
        net = tl.program_id(1)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        return net, pid, net.to(tl.int64) * per_network + offsets, offsets < per_network

    @triton.jit
    def _squared_errors(x, target_ptr, at, mask):
        """The float64 sum of (x - target)^2 over a block's unmasked elements (metrics.psnr's terms)."""
        d = tl.where(mask, x.to(tl.float64) - tl.load(target_ptr + at, mask=mask, other=0.0), 0.0)
        return tl.sum(d * d, axis=0)

    @triton.jit
    def _ema_update(out, ema_ptr, at, mask, first, frozen, weight, one_minus_weight):
        """step_rules.ema_update on a block: out where `first`, else ema * w + out * (1 - w), ema where `frozen`;
        stored, and returned."""
        ema = tl.load(ema_ptr + at, mask=mask, other=0.0)
        new = tl.where(first, out, ema * weight + out * one_minus_weight)
        new = tl.where(frozen, ema, new)
        tl.store(ema_ptr + at, new, mask=mask)
        return new

    @triton.jit
    def _bf16_bits(x):
        """fp32 -> bf16 rounded to nearest even, as int16 bits (torch's cast; the interpreter's .to() truncates).
        A NaN stays a NaN, as torch's 0x7FC0: the rounding carry would turn a GPU's NaN, 0x7FFFFFFF, into -0.0."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _from_bf16_bits(bits):
        return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)

    # per_network specialised: its divisibility by 16 lets the loads and stores move 16-byte vectors (one value a run)
    @triton.jit(do_not_specialize=["programs", "window"])
    def _rules_pixels_kernel(
        out_ptr,  # (N, C, H, W) contiguous, the step's output in its dtype
        copy_ptr,  # (N, C, H, W) fp32: the step's copy of it
        ema_ptr,  # (N, C, H, W) fp32, updated in place (not with WINDOW: _early_stop_outputs_kernel's then)
        target_ptr,  # (N, C, H, W) fp64 (out_ptr when there is none)
        iteration_ptr,  # 0-dim int64: the steps done before this one
        partials_ptr,  # (N, programs, 3) fp64: each program's sums of (out - target)^2, (ema - target)^2, VAR terms
        ring_ptr,  # (window, N, C, H, W) int16: the early-stop window's bf16 outputs, as bits (WINDOW)
        sum_ptr,  # (N, C, H, W) fp64: the window's sum, updated (WINDOW)
        squares_ptr,  # (N, C, H, W) fp64: the window's sum of squares, updated (WINDOW)
        per_network,  # C * H * W
        programs,
        window,
        weight,
        one_minus_weight,
        HAS_TARGET: tl.constexpr,
        WINDOW: tl.constexpr,  # early stopping's window (early_stop.EarlyStop._window) instead of the EMA
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        net, pid, at, mask = _network_block(per_network, BLOCK)
        out = tl.load(out_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(copy_ptr + at, out, mask=mask)
        row = partials_ptr + (net * programs + pid) * 3
        if HAS_TARGET:
            tl.store(row, _squared_errors(out, target_ptr, at, mask))
        iteration = tl.load(iteration_ptr)
        if WINDOW:
            # the oldest output leaves the window and this one enters, in bf16: the sums in float64 of exactly the
            # values the ring holds, so what leaves is what came in
            slot = ring_ptr + (iteration % window) * tl.num_programs(1) * per_network + at
            old = _from_bf16_bits(tl.load(slot, mask=mask, other=0)).to(tl.float64)
            bits = _bf16_bits(out)
            tl.store(slot, bits, mask=mask)
            new = _from_bf16_bits(bits).to(tl.float64)
            total = tl.load(sum_ptr + at, mask=mask, other=0.0) + (new - old)
            squares = tl.load(squares_ptr + at, mask=mask, other=0.0) + (new * new - old * old)
            tl.store(sum_ptr + at, total, mask=mask)
            tl.store(squares_ptr + at, squares, mask=mask)
            mean = total / window
            variance = squares / window - mean * mean
            # clamp_min(0) as the twin's, which keeps a NaN: a GPU's max returns the operand that is not NaN
            variance = tl.where(variance < 0.0, 0.0, variance)
            tl.store(row + 2, tl.sum(tl.where(mask, variance, 0.0), axis=0))
        else:
            ema = _ema_update(out, ema_ptr, at, mask, iteration == 0, False, weight, one_minus_weight)
            if HAS_TARGET:
                tl.store(row + 1, _squared_errors(ema, target_ptr, at, mask))

    @triton.jit(do_not_specialize=["programs", "window"])
    def _early_stop_outputs_kernel(
        copy_ptr,  # (N, C, H, W) fp32: this iteration's outputs
        ema_ptr,  # (N, C, H, W) fp32, updated in place
        target_ptr,  # (N, C, H, W) fp64 (copy_ptr when there is none)
        stopped_ptr,  # (N,) bool: the networks stopped (this iteration's decision included): their EMA is held
        keep_ptr,  # (N,) bool: the networks whose output is kept this iteration
        best_ptr,  # (N, C, H, W) fp32: the kept outputs, updated
        sum_ptr,  # (N, C, H, W) fp64: the window's sum (its mean is the output kept with WINDOW_MEAN)
        iteration_ptr,  # 0-dim int64
        partials_ptr,  # (N, programs, 3) fp64: the EMA's squared errors go to the second of each program's three
        per_network,
        programs,
        window,
        weight,
        one_minus_weight,
        HAS_TARGET: tl.constexpr,
        WINDOW_MEAN: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        net, pid, at, mask = _network_block(per_network, BLOCK)
        out = tl.load(copy_ptr + at, mask=mask, other=0.0)
        if tl.load(keep_ptr + net) != 0:
            if WINDOW_MEAN:
                kept = (tl.load(sum_ptr + at, mask=mask, other=0.0) / window).to(tl.float32)
            else:
                kept = out
            tl.store(best_ptr + at, kept, mask=mask)
        first = tl.load(iteration_ptr) == 0
        frozen = tl.load(stopped_ptr + net) != 0
        ema = _ema_update(out, ema_ptr, at, mask, first, frozen, weight, one_minus_weight)
        if HAS_TARGET:
            tl.store(partials_ptr + (net * programs + pid) * 3 + 1, _squared_errors(ema, target_ptr, at, mask))

    @triton.jit
    def _partial_sums(partials_ptr, net, mask, programs, part, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        """(BLOCK_N,) float64: networks net's partial sums number `part`, added in program order."""
        total = tl.zeros([BLOCK_N], dtype=tl.float64)
        for p0 in range(0, programs, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            both = mask[:, None] & (p < programs)[None, :]
            total += tl.sum(tl.load(partials_ptr + (net[:, None] * programs + p[None, :]) * 3 + part, mask=both,
                                    other=0.0), axis=1)  # fmt: skip
        return total

    @triton.jit(do_not_specialize=["n", "per_network", "programs", "first_valid", "patience"])
    def _early_stop_scalars_kernel(
        losses_ptr,  # (N,) fp32: the data terms (the noise gate's)
        partials_ptr,  # (N, programs, 3) fp64: the third of each program's sums, VAR's terms
        iteration_ptr,  # 0-dim int64: the steps before this one (t = iteration + 1)
        criterion_ptr,  # (N,) fp32, updated: EarlyStop's state, as early_stop.EarlyStop.update leaves it
        minimum_ptr,  # (N,) fp32
        minimum_iteration_ptr,  # (N,) int64
        best_iteration_ptr,  # (N,) int64
        stopped_ptr,  # (N,) bool
        stop_iteration_ptr,  # (N,) int64
        gate_open_ptr,  # (N,) bool
        loss_average_ptr,  # (N,) fp32 (HAS_GATE)
        gate_level_ptr,  # (N,) fp32 (HAS_GATE)
        keep_ptr,  # (N,) bool out: the networks whose output is kept this iteration
        n,
        per_network,
        programs,
        first_valid,
        patience,
        one_minus_threshold,
        one_plus_tolerance,
        smoothing,
        HAS_GATE: tl.constexpr,
        HAS_TOLERANCE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        t = tl.load(iteration_ptr) + 1
        for n0 in range(0, n, BLOCK_N):
            net = n0 + tl.arange(0, BLOCK_N)
            mask = net < n
            running = tl.load(stopped_ptr + net, mask=mask, other=1) == 0
            gate_open = tl.load(gate_open_ptr + net, mask=mask, other=0) != 0
            if HAS_GATE:  # the loss's moving average, and the gate opened for good once within the level
                loss = tl.load(losses_ptr + net, mask=mask, other=0.0)
                average = tl.load(loss_average_ptr + net, mask=mask, other=0.0)
                moved = tl.where(t == 1, loss, average + smoothing * (loss - average))
                average = tl.where(running, moved, average)
                tl.store(loss_average_ptr + net, average, mask=mask)
                gate_open = gate_open | (running & (average <= tl.load(gate_level_ptr + net, mask=mask, other=0.0)))
                tl.store(gate_open_ptr + net, gate_open, mask=mask)
            variance = _partial_sums(partials_ptr, net, mask, programs, 2, BLOCK_N, BLOCK_P)
            crit = (variance / per_network.to(tl.float64)).to(tl.float32)
            valid = (t >= first_valid) & gate_open
            crit = tl.where(valid, crit, float("nan"))
            minimum = tl.load(minimum_ptr + net, mask=mask, other=0.0)
            new_min = running & (crit < minimum * one_minus_threshold)  # NaN compares False
            keep = new_min
            if HAS_TOLERANCE:
                keep = new_min | (running & (crit <= minimum * one_plus_tolerance))
            criterion = tl.load(criterion_ptr + net, mask=mask, other=0.0)
            tl.store(criterion_ptr + net, tl.where(running, crit, criterion), mask=mask)
            tl.store(minimum_ptr + net, tl.where(new_min, crit, minimum), mask=mask)
            minimum_iteration = tl.load(minimum_iteration_ptr + net, mask=mask, other=0)
            minimum_iteration = tl.where(new_min, t, minimum_iteration)
            tl.store(minimum_iteration_ptr + net, minimum_iteration, mask=mask)
            best_iteration = tl.load(best_iteration_ptr + net, mask=mask, other=0)
            tl.store(best_iteration_ptr + net, tl.where(keep, t, best_iteration), mask=mask)
            tl.store(keep_ptr + net, keep, mask=mask)
            stop = running & valid & (minimum_iteration > 0) & (t - minimum_iteration >= patience)
            stop_iteration = tl.load(stop_iteration_ptr + net, mask=mask, other=0)
            tl.store(stop_iteration_ptr + net, tl.where(stop, t, stop_iteration), mask=mask)
            tl.store(stopped_ptr + net, (running == 0) | stop, mask=mask)

    @triton.jit(do_not_specialize=["n", "per_network", "programs", "rows", "period"])
    def _rules_scalars_kernel(
        losses_ptr,  # (N,) fp32
        partials_ptr,  # (N, programs, 3) fp64: the first two of each program's sums (losses_ptr without a target)
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
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_previous_kernel(PDL)
        iteration = tl.load(iteration_ptr)
        row = metrics_ptr + (iteration % rows) * n * 6
        for n0 in range(0, n, BLOCK_N):
            net = n0 + tl.arange(0, BLOCK_N)
            mask = net < n
            losses = tl.load(losses_ptr + net, mask=mask, other=0.0)
            if HAS_TARGET:
                sums_out = _partial_sums(partials_ptr, net, mask, programs, 0, BLOCK_N, BLOCK_P)
                sums_ema = _partial_sums(partials_ptr, net, mask, programs, 1, BLOCK_N, BLOCK_P)
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


if _HAS_TRITON:

    @triton.jit
    def _copy_row(dst_ptr, src_ptr, mask_ptr, width, BLOCK: tl.constexpr):
        net, _, at, inside = _network_block(width, BLOCK)
        if tl.load(mask_ptr + net) != 0:  # a network not in the mask moves nothing
            tl.store(dst_ptr + at, tl.load(src_ptr + at, mask=inside), mask=inside)

    @triton.jit
    def _copy_rows_kernel(
        d0, s0, m0, w0, d1, s1, m1, w1, d2, s2, m2, w2, d3, s3, m3, w3, d4, s4, m4, w4, d5, s5, m5, w5,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """Up to six (dst, src, mask, width) row copies, (N, width) each: dst[n] = src[n] where mask[n] (grid: blocks of
        the widest row, N, the pairs given; the unused ones repeat the first)."""
        wait_for_previous_kernel(PDL)
        pair = tl.program_id(2)
        if pair == 0:
            _copy_row(d0, s0, m0, w0, BLOCK)
        elif pair == 1:
            _copy_row(d1, s1, m1, w1, BLOCK)
        elif pair == 2:
            _copy_row(d2, s2, m2, w2, BLOCK)
        elif pair == 3:
            _copy_row(d3, s3, m3, w3, BLOCK)
        elif pair == 4:
            _copy_row(d4, s4, m4, w4, BLOCK)
        else:
            _copy_row(d5, s5, m5, w5, BLOCK)


def copy_rows(copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """dst[n] = src[n] for each (dst, src, mask) and each network n with mask[n]: contiguous (N, ...) tensors of one
    shape per copy, mask (N,) bool; six copies a launch. torch.where(mask, src, dst, out=dst) (step_rules' graph-safe
    branches) reads and writes every row each iteration; this moves only the rows of the networks in the mask (the
    freeze of stopped networks: none until one stops), the same values (a copy)."""
    for dst, src, mask in copies:
        if dst.shape != src.shape or dst.dtype != src.dtype or not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError(f"copy_rows needs contiguous tensors of one shape and dtype; got {dst.shape}, {src.shape}")
    if len({dst.shape[0] for dst, _, _ in copies}) > 1:
        raise ValueError("copy_rows copies rows of one count of networks")
    for first in range(0, len(copies), _PAIRS):
        group = copies[first : first + _PAIRS]
        n = group[0][0].shape[0]
        widths = [dst[0].numel() for dst, _, _ in group]
        args = [a for dst, src, mask in group for a in (dst, src, mask, dst[0].numel())]
        args += args[:4] * (_PAIRS - len(group))
        _copy_rows_kernel[(triton.cdiv(max(widths), _ROW_BLOCK), n, len(group))](
            *args, BLOCK=_ROW_BLOCK, **launch_options(group[0][0])
        )  # fmt: skip


def available(device: torch.device) -> bool:
    """Whether the rules run fused on `device`: CUDA with triton, or the CPU under Triton's interpreter (tests)."""
    return _HAS_TRITON and (device.type == "cuda" or _INTERPRET)


def takes(early_stop) -> bool:
    """Whether FusedRules runs this early_stop.EarlyStop's update: ES-WMV on the full-size outputs in a bf16 window
    (the calibrated rules'); other rules stay early_stop's torch ops."""
    spec = early_stop.spec
    return spec.method == "wmv" and spec.downsample == 1 and early_stop.dtype == torch.bfloat16


@dataclass
class FusedRules:
    """The rules after the backward for N networks with outputs of `per_network` elements each, on `device`: the
    pixel passes' partial sums live here from set-up on (a CUDA graph replays them in place)."""

    n: int
    per_network: int
    device: torch.device

    def __post_init__(self):
        self.programs = triton.cdiv(self.per_network, _BLOCK)
        self.block_n = min(triton.next_power_of_2(self.n), 128)  # the scalar programs' networks at a time
        self.block_p = max(1, _BLOCK_P * 16 // self.block_n)  # and partial sums per network: ~16 x _BLOCK_P in all
        self.partials = torch.zeros((self.n, self.programs, 3), dtype=torch.float64, device=self.device)
        self.keep = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.bad = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.kept = torch.zeros(self.n, dtype=torch.bool, device=self.device)  # early stopping's output kept

    def outputs(self, out, copy, ema, target, iteration, weight: float, early_stop=None, losses=None) -> None:
        """copy <- out (as fp32); early_stop.update(copy, iteration, losses) where an EarlyStop is given (takes());
        ema <- its update (step_rules.ema_update's, the stopped networks' held); the squared errors against target
        (float64, or None) summed per program for record()."""
        out = out.contiguous()
        for t in (copy, ema):
            if t.shape != out.shape or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"copy and ema must be contiguous fp32 of out's shape {tuple(out.shape)}")
        if target is not None and (target.shape != out.shape or target.dtype != torch.float64):
            raise ValueError(f"target must be float64 of out's shape {tuple(out.shape)}; got {tuple(target.shape)}")
        if early_stop is not None and not takes(early_stop):
            raise ValueError(f"FusedRules runs ES-WMV on full-size outputs in a bf16 window; got {early_stop.spec}")
        has_target = target is not None
        target = target.contiguous() if has_target else out
        grid = (self.programs, self.n)
        blocks = dict(HAS_TARGET=has_target, BLOCK=_BLOCK, **_NO_FMA, **launch_options(out))
        if early_stop is None:
            _rules_pixels_kernel[grid](
                out, copy, ema, target, iteration, self.partials, out, out, out, self.per_network, self.programs, 1,
                weight, 1 - weight, WINDOW=False, **blocks,
            )  # fmt: skip
            return
        es, spec = early_stop, early_stop.spec
        _rules_pixels_kernel[grid](
            out, copy, ema, target, iteration, self.partials, es.buffer.view(torch.int16), es.sum, es.sum_squares,
            self.per_network, self.programs, spec.window, weight, 1 - weight, WINDOW=True, **blocks,
        )  # fmt: skip
        gate = spec.noise_gate > 0
        _early_stop_scalars_kernel[(1,)](
            losses.float().contiguous(), self.partials, iteration, es.criterion, es.minimum, es.minimum_iteration,
            es.best_iteration, es.stopped, es.stop_iteration, es.gate_open,
            es.loss_average if gate else es.minimum, es.gate_level if gate else es.minimum, self.kept,
            self.n, self.per_network, self.programs, spec.first_valid(), spec.patience, 1 - spec.threshold,
            1 + spec.tolerance, GATE_SMOOTHING, HAS_GATE=gate, HAS_TOLERANCE=spec.tolerance > 0,
            BLOCK_N=self.block_n, BLOCK_P=self.block_p, **_NO_FMA, **launch_options(losses),
        )  # fmt: skip
        _early_stop_outputs_kernel[grid](
            copy, ema, target, es.stopped, self.kept, es.best_output, es.sum, iteration,
            self.partials, self.per_network, self.programs, spec.window, weight, 1 - weight,
            WINDOW_MEAN=spec.returns == "window-mean", **blocks,
        )  # fmt: skip

    copy_rows = staticmethod(copy_rows)

    def record(self, losses, has_target: bool, backtracking, rule, criterion, stopped, metrics, iteration):
        """The backtracking decision (keep, bad: (N,) bool, this object's; None without backtracking) with
        backtracking (a step_rules.BacktrackingState) advanced by `rule`, and the metrics row of this iteration
        (losses, the PSNRs of outputs() where has_target, fell_back, criterion, stopped) written into `metrics` at
        iteration % rows; iteration += 1."""
        losses = losses.float().contiguous()
        state = (backtracking.last_loss, backtracking.accepted) if backtracking is not None else (losses, losses)
        _rules_scalars_kernel[(1,)](
            losses, self.partials if has_target else losses, *state, self.keep, self.bad, criterion, stopped,
            metrics, iteration, self.n, self.per_network, self.programs, metrics.shape[0],
            rule.period if rule is not None else 1, rule.factor if rule is not None else 0.0,
            ON_PERIOD=bool(rule.on_period) if rule is not None else True, HAS_TARGET=has_target,
            HAS_BACKTRACKING=backtracking is not None, BLOCK_N=self.block_n, BLOCK_P=self.block_p,
            **launch_options(losses),
        )  # fmt: skip
        return (self.keep, self.bad) if backtracking is not None else None
