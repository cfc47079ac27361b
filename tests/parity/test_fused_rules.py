"""dipfast.kernels.fused_rules (the fast step's rules after the backward in a few Triton launches) against step_rules'
and early_stop's torch ops (on the CPU in Triton's interpreter, on CUDA compiled).

Tolerances: the output's copy, the EMA, the backtracking decision and its state, early stopping's state (its bf16
window, float64 sums, criterion, decisions and kept output), the row copies, and the metrics row's loss, fell_back,
criterion and stopped columns bit for bit; the two PSNRs (float64, summed in another order) to 1e-13 relative. Inputs
are fresh random draws: odd sizes, one network and several (more than one tile of networks), the first iteration and
a later one, with and without a target, exact ties of backtracking's bar, networks that stop at different iterations
(or not) with and without a noise gate and a tolerance, and whole steps against the torch rules.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _helpers import TINY_PRESET

from dipfast import backends, engine, fast_step, step_rules
from dipfast.early_stop import EarlyStop, EarlyStopSpec
from dipfast.kernels import fused_rules
from dipfast.presets import Backtracking

CPU = torch.device("cpu")
pytestmark = pytest.mark.parity
PSNR_RTOL = 1e-13


def _outputs(rng, n, shape, dtype, device):
    out = torch.rand((n, *shape), generator=rng).to(device, dtype)
    ema = torch.rand((n, *shape), generator=rng).to(device)
    target = torch.rand((n, *shape), generator=rng, dtype=torch.float64).to(device)
    return out, ema, target


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("iteration", [0, 7])
def test_outputs_copy_and_ema_bit_for_bit(rng, device, n, dtype, iteration):
    out, ema, target = _outputs(rng, n, (3, 17, 13), dtype, device)
    step = torch.tensor(iteration, device=device)
    expected_copy, expected_ema = out.float(), ema.clone()
    step_rules.ema_update(expected_ema, expected_copy, step == 0, 0.99)

    rules = fused_rules.FusedRules(n, out[0].numel(), torch.device(device))
    copy = torch.full_like(ema, math.nan)
    rules.outputs(out, copy, ema, target, step, 0.99)
    assert torch.equal(copy, expected_copy)
    assert torch.equal(ema, expected_ema)
    assert step.item() == iteration  # the pixel pass reads the count; the scalar program advances it


def _state(last_loss, accepted):
    return step_rules.BacktrackingState(last_loss.clone(), torch.tensor(accepted, dtype=torch.int64,
                                        device=last_loss.device))  # fmt: skip


@pytest.mark.parametrize("n", [1, 4, 130], ids=["one", "four", "two-tiles-of-networks"])
@pytest.mark.parametrize("on_period", [False, True])
@pytest.mark.parametrize("has_target", [True, False], ids=["target", "no-target"])
def test_record_decides_and_writes_the_metrics_row_as_step_rules(rng, device, n, on_period, has_target):
    shape = (3, 9, 7) if n > 100 else (3, 40, 30)  # 3600 elements: several programs of partial sums
    out, ema, target = _outputs(rng, n, shape, torch.float32, device)
    target = target if has_target else None
    rule = Backtracking(period=4, on_period=on_period)
    step = torch.tensor(5, device=device)
    # every other network's loss above factor x its last accepted one, the others exactly at it (not above: a tie)
    last_loss = (torch.rand(n, generator=rng) + 0.01).to(device)
    at_the_bar = rule.factor * last_loss  # the fp32 product the rule compares with
    losses = torch.where((torch.arange(n) % 2 == 0).to(device), at_the_bar * 2, at_the_bar)
    # checked and unchecked networks (accepted a multiple of the period or not), above the bar and below, in each group
    accepted = [(0, 4, 1, 2)[k % 4] + 8 * (k // 4) for k in range(n)]
    criterion = torch.where(torch.rand(n, generator=rng) < 0.5, torch.rand(n, generator=rng), math.nan).to(device)
    stopped = (torch.rand(n, generator=rng) < 0.5).to(device)
    rows = 6
    dev = torch.device(device)

    expected_state = _state(last_loss, accepted)
    keep, bad = expected_state.decide(losses, rule)
    expected_copy, expected_ema = out.clone(), ema.clone()
    step_rules.ema_update(expected_ema, expected_copy, step == 0, 0.99)
    expected = step_rules.metrics_buffer(rows, n, dev)
    row = step_rules.metrics_row(losses, expected_copy, expected_ema, target, bad, criterion, stopped)
    expected.index_copy_(0, (step % rows).view(1), row[None])

    rules = fused_rules.FusedRules(n, out[0].numel(), dev)
    state = _state(last_loss, accepted)
    metrics = step_rules.metrics_buffer(rows, n, dev)
    rules.outputs(out, torch.empty_like(ema), ema, target, step, 0.99)
    decision = rules.record(losses, has_target, state, rule, criterion, stopped, metrics, step)
    assert n == 1 or (bad.any() and keep.any() and (~bad & ~keep).any())  # every outcome
    assert torch.equal(decision[0], keep) and torch.equal(decision[1], bad)
    assert torch.equal(state.last_loss, expected_state.last_loss)
    assert torch.equal(state.accepted, expected_state.accepted)
    assert step.item() == 6
    exact = [step_rules.COLUMN[c] for c in ("loss", "fell_back", "criterion", "stopped")]
    torch.testing.assert_close(metrics[..., exact], expected[..., exact], rtol=0, atol=0, equal_nan=True)
    psnrs = [step_rules.COLUMN[c] for c in ("psnr", "ema_psnr")]
    torch.testing.assert_close(metrics[..., psnrs], expected[..., psnrs], rtol=PSNR_RTOL, atol=0, equal_nan=True)
    assert metrics[:5].isnan().all()  # only row 5 % 6 written


def test_record_without_backtracking_writes_no_fallback(rng, device, monkeypatch):
    """No backtracking: no decision, a zero fell_back column. The pixel pass in programs of 64 elements, summed by a
    scalar program that loads 4 partials at a time: its loop over them runs many times."""
    monkeypatch.setattr(fused_rules, "_BLOCK", 64)
    monkeypatch.setattr(fused_rules, "_BLOCK_P", 1)
    dev = torch.device(device)
    out, ema, target = _outputs(rng, 3, (3, 19, 11), torch.float32, device)
    rules = fused_rules.FusedRules(3, out[0].numel(), dev)
    assert rules.programs == 10
    step, metrics = torch.tensor(0, device=device), step_rules.metrics_buffer(2, 3, dev)
    rules.outputs(out, torch.empty_like(ema), ema, target, step, 0.9)
    losses = torch.rand(3, generator=rng).to(device)
    assert rules.record(losses, True, None, None, *step_rules.no_criterion(3, dev), metrics, step) is None
    expected = step_rules.metrics_row(losses, out, ema, target, torch.zeros(3, dtype=torch.bool, device=device),
                                      *step_rules.no_criterion(3, dev))  # fmt: skip
    torch.testing.assert_close(metrics[0], expected, rtol=PSNR_RTOL, atol=0, equal_nan=True)
    assert (metrics[0, :, step_rules.COLUMN["fell_back"]] == 0).all()


# ---------------------------------------------------------------------------------------------
# the step, on the CPU (on CUDA its convs are not bit for bit reproducible)

on_the_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="bit for bit: the CPU step (tests/test_cuda_restore)")
PRESET = TINY_PRESET


def _fit(rng_seed: int, fused: bool, graph_safe: bool, precision: str, iters: int = 6, target: bool = True,
         preset=PRESET, early_stop=None):  # fmt: skip
    rng = torch.Generator().manual_seed(rng_seed)
    problems = []
    for _ in range(2):
        y, t = torch.rand(1, 3, 15, 13, generator=rng), torch.rand(1, 3, 15, 13, generator=rng)
        problems.append(engine.Problem(input_shape=(4, 15, 13), z=None, out_size=(15, 13), n_channels=3, y=y,
                                       target=t if target else None))  # fmt: skip
    built, zs = fast_step.build_nets(problems, preset, [1, 2])
    plan = backends.resolve("native", precision, CPU)
    step = fast_step.FastStep(built, zs, problems, preset, CPU, [1, 2], 4, plan, graph_safe=graph_safe,
                              fused_rules=fused, early_stop=early_stop)  # fmt: skip
    assert (step.fused is not None) == fused
    for _ in range(iters):
        step()
    return step


@on_the_cpu
@pytest.mark.parametrize("graph_safe", [False, True], ids=["cpu-branch", "graph-branch"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("target", [True, False], ids=["target", "no-target"])
def test_a_fused_step_fits_as_the_torch_rules_do(graph_safe, precision, target):
    """Six iterations of two networks (backtracking checks on): parameters, Adam's state, outputs, EMA and the
    iteration count bit for bit; the metrics as above."""
    plain, fused = (_fit(11, f, graph_safe, precision, target=target) for f in (False, True))
    for a, b in zip(plain.flat.buffers, fused.flat.buffers):
        assert torch.equal(a, b)
    for a, b in zip(step_rules.adam_moments(plain.optimizer, plain.flat.buffers),
                    step_rules.adam_moments(fused.optimizer, fused.flat.buffers)):  # fmt: skip
        assert torch.equal(a, b)
    assert torch.equal(plain.out, fused.out) and torch.equal(plain.ema, fused.ema)
    assert plain.iteration.item() == fused.iteration.item() == 6
    assert torch.equal(plain.backtracking_state.accepted, fused.backtracking_state.accepted)
    torch.testing.assert_close(fused.metrics, plain.metrics, rtol=PSNR_RTOL, atol=0, equal_nan=True)
    assert fused.metrics[..., step_rules.COLUMN["psnr"]].isfinite().all() == target


@on_the_cpu
def test_a_fused_step_falls_back_as_the_torch_rules_do():
    """A rule that falls back whenever a checked loss rises at all: the networks restore their saved parameters on
    some iterations and save new ones on others, each on its own; the fused step's copies do the same."""
    strict = dataclasses.replace(PRESET, backtracking=Backtracking(period=3, on_period=False, factor=1.0))
    plain, fused = (_fit(3, f, True, "fp32", iters=12, preset=strict) for f in (False, True))
    fell_back = plain.metrics[..., step_rules.COLUMN["fell_back"]]
    assert fell_back.sum() >= 2 and (fell_back == 0).any()  # the run fell back, and not every iteration
    for a, b in zip(plain.flat.buffers + plain.saved, fused.flat.buffers + fused.saved):
        assert torch.equal(a, b)
    torch.testing.assert_close(fused.metrics, plain.metrics, rtol=PSNR_RTOL, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [1, 3])
def test_copy_rows_moves_the_masked_networks_rows_only(rng, device, n):
    """Seven copies (two launches) of rows of odd widths, each with its own mask: dst = where(mask, src, dst)."""
    copies, expected = [], []
    for width in (7, 5000, 1, 33, 4097, 12, 9):
        dst = torch.randn(n, width, generator=rng).to(device)
        src = torch.randn(n, width, generator=rng).to(device)
        mask = (torch.rand(n, generator=rng) < 0.5).to(device)
        expected.append(torch.where(mask[:, None], src, dst))
        copies.append((dst, src, mask))
    fused_rules.copy_rows(copies)
    for (dst, _, _), want in zip(copies, expected):
        assert torch.equal(dst, want)


def test_copy_rows_refuses_tensors_it_cannot_copy_by_rows(device):
    a, mask = torch.zeros(2, 8, device=device), torch.ones(2, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="one shape and dtype"):
        fused_rules.copy_rows([(a, torch.zeros(2, 9, device=device), mask)])
    with pytest.raises(ValueError, match="one shape and dtype"):
        fused_rules.copy_rows([(a, torch.zeros(8, 2, device=device).t(), mask)])
    with pytest.raises(ValueError, match="one count of networks"):
        fused_rules.copy_rows([(a, a.clone(), mask), (torch.zeros(3, 8, device=device), torch.zeros(3, 8), mask)])


@on_the_cpu
@pytest.mark.parametrize(("spec", "fused"), [(EarlyStopSpec(window=2, patience=2), True),
                                             (EarlyStopSpec("emv", patience=2), False),
                                             (EarlyStopSpec(window=2, patience=2, downsample=2), False)],
                         ids=["wmv", "emv", "downsampled"])  # fmt: skip
def test_the_step_fuses_its_rules_where_the_plan_says_and_early_stopping_where_it_is_the_calibrated_kind(spec, fused):
    plan = backends.resolve("native", "fp32", CPU)
    assert not plan.fused_rules(CPU)  # CUDA's: the CPU runs torch's ops
    with backends.variant("native", fused_rules=frozenset({"cpu", "cuda"})):
        assert backends.resolve("native", "fp32", CPU).fused_rules(CPU)
    rng = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 12, 12, generator=rng)
    problem = engine.Problem(input_shape=(4, 12, 12), z=None, out_size=(12, 12), n_channels=3, y=y, target=None)
    built, zs = fast_step.build_nets([problem], PRESET, [0])
    step = fast_step.FastStep(built, zs, [problem], PRESET, CPU, [0], 4, plan, fused_rules=True, early_stop=spec)
    assert (step.fused is not None) == fused  # the others' rules stay early_stop's torch ops


# ---------------------------------------------------------------------------------------------
# early stopping (ES-WMV on full-size outputs, the calibrated rules' kind)


def _settle_then_wander(rng, shape, iters, device):
    """Three networks' outputs: two settle and then wander from iterations 3 and 6 (VAR's minimum, and the stop, at
    their own iterations), the third settles throughout (it never stops); and losses that fall, so that a noise gate
    opens on the way."""
    base = torch.rand((3, *shape), generator=rng)
    frames = []
    for t in range(iters):
        scale = torch.tensor([abs(t - 3) + 0.1, abs(t - 6) + 0.1, 3 / (t + 1)])[:, None, None, None]
        frames.append((base + 0.02 * scale * torch.randn((3, *shape), generator=rng)).clamp(0, 1).to(device))
    losses = [torch.tensor([0.05 / (t + 1) + 0.001 * k for k in range(3)], device=device) for t in range(iters)]
    return frames, losses


def _same(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


STATE = ("buffer", "sum", "sum_squares", "criterion", "minimum", "minimum_iteration", "best_iteration", "best_output",
         "stopped", "stop_iteration", "gate_open")  # fmt: skip


@pytest.mark.parametrize("returns", ["window-mean", "output"])
@pytest.mark.parametrize("tolerance", [0.0, 0.4])
@pytest.mark.parametrize("gate", [0.0, 1.05], ids=["no-gate", "gate"])
def test_early_stopping_updates_as_early_stop_does(rng, device, returns, tolerance, gate):
    """Twelve iterations of three networks through EarlyStop.update + the EMA held for stopped networks, and through
    FusedRules.outputs: every state tensor bit for bit (the window's bf16 ring and float64 sums, the criterion, the
    minimum and its iteration, the kept output, the stops, the gate; the criterion too, whose float64 mean sums in
    another order: the same fp32 value here), the EMA too; the networks stop at different
    iterations (the gate moves the second's from 10 to 12), the third not at all."""
    n, shape, iters = 3, (3, 11, 9), 12
    spec = EarlyStopSpec("wmv", window=3, patience=2, returns=returns, tolerance=tolerance, noise_gate=gate)
    dev = torch.device(device)
    noise = torch.tensor([0.05, 0.025, 0.5], device=device)  # the second network's gate opens late
    frames, losses = _settle_then_wander(rng, shape, iters, device)
    expected, fused = (EarlyStop(spec, n, shape, dev, noise_variance=noise if gate else None) for _ in range(2))
    assert fused_rules.takes(fused)
    expected_ema, ema = torch.zeros((n, *shape), device=device), torch.zeros((n, *shape), device=device)
    rules = fused_rules.FusedRules(n, frames[0][0].numel(), dev)
    copy = torch.empty_like(ema)
    step, target = torch.tensor(0, device=device), torch.rand((n, *shape), generator=rng, dtype=torch.float64)
    for t in range(iters):
        expected.update(frames[t], step, losses[t])
        step_rules.ema_update(expected_ema, frames[t], step == 0, 0.9, expected.stopped)
        rules.outputs(frames[t], copy, ema, target.to(device), step, 0.9, fused, losses[t])
        assert torch.equal(copy, frames[t])
        for name in (*STATE, "loss_average") if gate else STATE:
            _same(getattr(fused, name), getattr(expected, name), f"{name} at iteration {t + 1}")
        assert torch.equal(ema, expected_ema), t
        step += 1
    assert expected.stop_iteration.tolist() == [7, 12 if gate else 10, 0]


def test_early_stopping_holds_a_diverged_network_as_early_stop_does(rng, device):
    """A network whose outputs turn NaN, as a GPU writes one (0x7FFFFFFF, where the CPU's is 0x7FC00000): the window,
    criterion and decisions stay the twin's bit for bit. The bf16 rounding's carry made that NaN -0.0 in the window,
    and a GPU's max (the interpreter's too in the parity suite: _gpu_arithmetic.py) made the NaN variance 0, each a
    new minimum that kept the diverged output; the twin keeps the network's last output before it, and stops it after
    its patience."""
    n, shape, iters = 3, (3, 11, 9), 12
    spec = EarlyStopSpec("wmv", window=3, patience=2, returns="window-mean", tolerance=0.4)
    dev = torch.device(device)
    frames, losses = _settle_then_wander(rng, shape, iters, device)
    gpu_nan = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    for frame in frames[4:]:
        frame[1] = gpu_nan.to(device)
    expected, fused = (EarlyStop(spec, n, shape, dev) for _ in range(2))
    ema = torch.zeros((n, *shape), device=device)
    rules = fused_rules.FusedRules(n, frames[0][0].numel(), dev)
    copy, step = torch.empty_like(ema), torch.tensor(0, device=device)
    for t in range(iters):
        expected.update(frames[t], step, losses[t])
        rules.outputs(frames[t], copy, ema, None, step, 0.9, fused, losses[t])
        for name in STATE:
            _same(getattr(fused, name), getattr(expected, name), f"{name} at iteration {t + 1}")
        step += 1
    assert fused.stopped[1] and fused.best_output[1].isfinite().all()


def test_early_stopping_refuses_the_kinds_it_does_not_run(device):
    dev = torch.device(device)
    rules = fused_rules.FusedRules(1, 12, dev)
    out = torch.rand(1, 3, 2, 2, device=device)
    for spec in (EarlyStopSpec("emv"), EarlyStopSpec(downsample=2)):
        es = EarlyStop(spec, 1, (3, 2, 2), dev)
        assert not fused_rules.takes(es)
        with pytest.raises(ValueError, match="ES-WMV"):
            rules.outputs(out, out.clone(), out.clone(), None, torch.tensor(0, device=device), 0.9, es, None)


@on_the_cpu
@pytest.mark.parametrize("graph_safe", [False, True], ids=["cpu-branch", "graph-branch"])
def test_a_fused_step_stops_early_as_the_torch_rules_do(graph_safe):
    """Two networks with the calibrated kind of rule (a short window and patience, so they stop within the run): the
    parameters, Adam's state, the EMA, the early-stop state and the metrics as above; the frozen networks held."""
    spec = EarlyStopSpec("wmv", window=3, patience=3, returns="window-mean", tolerance=0.4, noise_gate=1.05)
    plain, fused = (_fit(5, f, graph_safe, "fp32", iters=14, early_stop=spec) for f in (False, True))
    for a, b in zip(plain._held(), fused._held()):
        assert torch.equal(a, b)
    assert torch.equal(plain.ema, fused.ema) and torch.equal(plain.out, fused.out)
    for name in (*STATE, "loss_average"):
        _same(getattr(fused.early_stop, name), getattr(plain.early_stop, name), name)
    torch.testing.assert_close(fused.metrics, plain.metrics, rtol=PSNR_RTOL, atol=0, equal_nan=True)
    assert plain.early_stop.stopped.any()  # the run froze a network: the freeze's branch ran
