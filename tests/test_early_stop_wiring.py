"""restore(stop='auto'): the early-stop criterion inside both steps, the freeze of stopped networks,
the engine's early end, the Result, and the errors of stop= and early_stop=.

The rule here is a short window and patience (EarlyStopSpec(window=4, patience=4)), so a tiny net on
a 16 x 16 image stops within a few dozen iterations; the calibrated rules are early_stop.py's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _helpers import (
    DETERMINISTIC_NET,
    FAST,
    TINY_PRESET,
    deterministic_algorithms,
    random_image,
    random_problem,
    smooth_image,
)

import dipfast
from dipfast import api, backends, engine, fast_step, memory, step_rules
from dipfast.early_stop import CALIBRATED, CALIBRATED_RULE, EarlyStopSpec
from dipfast.errors import InputError, InputTypeError
from dipfast.operators import Identity

CPU = torch.device("cpu")
PRESET = TINY_PRESET
SPEC = EarlyStopSpec("wmv", window=4, patience=4)
BOUND = 300  # the upper bound of iterations: far above where SPEC stops on these images

pytestmark = pytest.mark.usefixtures("one_torch_thread", "auto_device_is_the_cpu")


def _noisy(np_rng, h=16, w=16):
    clean = smooth_image(np_rng, h, w)
    noisy = np.clip(clean + np_rng.normal(scale=0.1, size=clean.shape), 0, 1).astype(np.float32)
    return noisy, clean


def _plan(backend: str):
    return backends.resolve(backend, "fp32", CPU)


# ---------------------------------------------------------------------------------------------
# one fit


def test_auto_stops_early_and_returns_the_output_of_its_detected_point(np_rng):
    """Stops at detected + patience with 'early-stop'; the image is the raw output of the detected iteration
    (returns='output'); the criterion in the history and the callback is the window's variance of the
    outputs the step saw (bf16 buffer), computed here from the callback's images."""
    noisy, clean = _noisy(np_rng)
    outputs, seen = [], []

    def callback(p: engine.Progress) -> None:
        outputs.append(p.image[0].clone())
        seen.append(p.criterion)

    r = dipfast.restore(
        noisy, iters=BOUND, stop="auto", early_stop=SPEC, target=clean, backend="reference", report_every=1,
        callback=callback, **FAST,
    )  # fmt: skip
    assert r.stop_reason == "early-stop" and r.stop_iteration is not None
    assert r.iterations == r.stop_iteration + SPEC.patience < BOUND
    assert [h.iteration for h in r.history] == list(range(1, r.iterations + 1))
    kept = outputs[r.stop_iteration - 1].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(r.image, kept)
    assert r.psnr == pytest.approx(float(dipfast.metrics.psnr(torch.from_numpy(kept), torch.from_numpy(clean))))

    history = [h.criterion for h in r.history]
    assert history == seen
    assert all(c is None for c in history[: SPEC.window - 1])
    x = torch.stack(outputs).bfloat16().double()  # what the ring buffer holds
    for t in range(SPEC.window, r.iterations + 1):
        window = x[t - SPEC.window : t]
        expected = (window - window.mean(0)).square().mean(0).mean().item()
        assert history[t - 1] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    detected = min(range(SPEC.window, r.iterations + 1), key=lambda t: history[t - 1])
    assert detected == r.stop_iteration  # the criterion's minimum


def test_reference_and_fast_step_stop_at_the_same_iteration_with_the_same_bits(rng):
    """FastStep with the reference blocks, eager, N = 1, and the reference's Adam: bit for bit the
    reference (test_backends' parity rule), early stopping included."""
    problem = random_problem(rng)
    preset = dataclasses.replace(PRESET, iterations=BOUND)
    ref = engine.fit(problem, preset, device=CPU, seed=3, progress=False, report_every=5, early_stop=SPEC)
    plain = dataclasses.replace(_plan("compile"), compile=False, fused_adam=False)
    (fast,) = engine.fit_many(
        [problem], preset, device=CPU, seeds=[3], progress=False, report_every=5, plan=plain, early_stop=SPEC
    )
    assert ref.stop_reason == fast.stop_reason == "early-stop"
    assert (fast.stop_iteration, fast.iterations) == (ref.stop_iteration, ref.iterations)
    assert ref.iterations < BOUND
    assert [h.criterion for h in fast.history] == [h.criterion for h in ref.history]
    assert torch.equal(fast.image, ref.image) and torch.equal(fast.ema_image, ref.ema_image)


def test_the_criterion_changes_nothing_of_a_fit_that_has_not_stopped(np_rng):
    """A rule whose patience outlasts the run: the same losses, PSNRs and EMA bit for bit as stop='iterations';
    only the returned image is the criterion's (the output at its minimum)."""
    noisy, clean = _noisy(np_rng)
    never = dataclasses.replace(SPEC, patience=1000)
    for backend in ("reference", "native"):
        kw = dict(iters=30, target=clean, backend=backend, precision="fp32", report_every=7, **FAST)
        fixed = dipfast.restore(noisy, stop="iterations", **kw)
        auto = dipfast.restore(noisy, stop="auto", early_stop=never, **kw)
        assert fixed.stop_iteration is None and fixed.stop_reason == auto.stop_reason == "iterations"
        row = lambda h: (h.loss, h.psnr, h.ema_psnr)  # noqa: E731
        assert list(map(row, auto.history)) == list(map(row, fixed.history))
        np.testing.assert_array_equal(auto.ema_image, fixed.ema_image)
        assert SPEC.window <= auto.stop_iteration <= 30
        assert all(h.criterion is None for h in fixed.history)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_the_noise_gate_in_the_step_holds_the_rule_until_the_loss_reaches_the_noise(np_rng, backend):
    """A gated rule inside restore() is the plain rule started where its gate opens: the gate's moving average
    of the history's losses against the noise estimated from the noisy image (bench.early_stop.gate_opening, the
    calibration's model of it); the gate opens after the plain rule's minimum, so it moves the stop."""
    from dipfast.bench.early_stop import gate_opening, noise_variance

    noisy, clean = _noisy(np_rng)
    kw = dict(iters=BOUND, target=clean, backend=backend, precision="fp32", report_every=1, **FAST)
    gated = dataclasses.replace(SPEC, noise_gate=1.0)
    fixed = dipfast.restore(noisy, stop="iterations", **kw)
    losses = np.array([h.loss for h in fixed.history], dtype=np.float32)
    opens = gate_opening(losses, noise_variance(noisy), gated.noise_gate)
    plain = dipfast.restore(noisy, stop="auto", early_stop=SPEC, **kw)
    assert plain.stop_iteration < opens < BOUND - 2 * SPEC.patience, (plain.stop_iteration, opens)
    auto = dipfast.restore(noisy, stop="auto", early_stop=gated, **kw)
    started = dipfast.restore(noisy, stop="auto", early_stop=dataclasses.replace(SPEC, start=opens), **kw)
    assert auto.stop_reason == started.stop_reason == "early-stop"
    assert (auto.stop_iteration, auto.iterations) == (started.stop_iteration, started.iterations)
    assert auto.stop_iteration >= opens
    np.testing.assert_array_equal(auto.image, started.image)
    assert [h.criterion for h in auto.history] == [h.criterion for h in started.history]


def test_the_result_says_what_the_noise_gate_saw(np_rng):
    """extras['noise_sigma'] is the estimate from the noisy image; a noise-free image never opens the gate, and
    its fit runs to the bound; without a gate (or with stop='iterations') neither key is there."""
    gated = dataclasses.replace(SPEC, noise_gate=1.0)
    noisy, clean = _noisy(np_rng)
    r = dipfast.restore(noisy, iters=BOUND, stop="auto", early_stop=gated, **FAST)
    assert r.stop_reason == "early-stop" and r.extras["noise_gate_opened"] is True
    assert r.extras["noise_sigma"] == pytest.approx(0.1, rel=0.3)  # drawn: 0.1, a 16 x 16 image's estimate
    flat = dipfast.restore(clean, iters=60, stop="auto", early_stop=gated, **FAST)
    assert flat.stop_reason == "iterations" and flat.extras["noise_gate_opened"] is False
    assert flat.extras["noise_sigma"] < 0.01
    for kwargs in ({"stop": "auto", "early_stop": SPEC}, {"stop": "iterations"}):
        plain = dipfast.restore(noisy, iters=10, **kwargs, **FAST)
        assert "noise_sigma" not in plain.extras and "noise_gate_opened" not in plain.extras


# ---------------------------------------------------------------------------------------------
# N networks: each stops on its own


@pytest.mark.parametrize("graph_safe", [False, True], ids=["cpu-branch", "graph-branch"])
def test_a_stopped_network_stays_frozen_while_the_other_runs(rng, graph_safe):
    """Two networks in one step stop at different iterations; from its stop on, the first one's parameters,
    Adam moments, EMA and kept output do not change by a bit while the other's still do."""
    problems = [random_problem(rng), random_problem(rng)]
    seeds = [1, 2]
    built, zs = fast_step.build_nets(problems, PRESET, seeds)
    step = fast_step.FastStep(
        built, zs, problems, PRESET, CPU, seeds, 4, _plan("native"), graph_safe=graph_safe, early_stop=SPEC
    )

    def state(k: int) -> list[torch.Tensor]:
        moments = step_rules.adam_moments(step.optimizer, step.flat.buffers)
        es = step.early_stop
        return [t[k].clone() for t in (*step.flat.buffers, *moments, step.ema, es.best_output, es.best_iteration)]

    at_stop: dict[int, list[torch.Tensor]] = {}  # network k's state at the iteration it stopped
    others: dict[int, list[torch.Tensor]] = {}  # the other network's state then
    for _ in range(BOUND):
        step()
        for k in range(2):
            if k not in at_stop and bool(step.early_stop.stopped[k]):
                at_stop[k], others[k] = state(k), state(1 - k)
        if len(at_stop) == 2:
            break
    stops = step.early_stop.stop_iteration.tolist()
    assert len(at_stop) == 2 and stops[0] != stops[1] and min(stops) > 0, stops
    first = int(np.argmin(stops))
    second = 1 - first
    for after, then in zip(state(first), at_stop[first], strict=True):
        assert torch.equal(after, then)
    # the other one trained on after the first stopped: its parameters and moments moved
    moved = [not torch.equal(now, then) for now, then in zip(state(second), others[first], strict=True)]
    n_tensors = len(step.flat.buffers) * 3  # parameters, exp_avg, exp_avg_sq
    assert all(moved[:n_tensors]), moved


def test_a_list_of_images_stops_each_on_its_own(np_rng):
    """restore() of two images in one step (native): each Result has its own detected point, iterations and
    history, ending at its own stop."""
    images = [_noisy(np_rng)[0], random_image(np_rng, 16, 16)]
    rs = dipfast.restore(images, iters=BOUND, stop="auto", early_stop=SPEC, backend="native", report_every=5, **FAST)
    for r in rs:
        assert r.stop_reason == "early-stop"
        assert r.iterations == r.stop_iteration + SPEC.patience == r.history[-1].iteration
        assert r.extras.get("restarts") is None
    assert rs[0].stop_iteration != rs[1].stop_iteration


# ---------------------------------------------------------------------------------------------
# the freeze rule and the EMA's mask, both branches


@pytest.mark.parametrize("graph_safe", [False, True], ids=["cpu-branch", "graph-branch"])
def test_freeze_restores_the_stopped_rows_only(graph_safe):
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(3, 5, generator=gen), torch.randn(3, 2, 4, generator=gen)]
    stopped = torch.tensor([True, False, True])
    freeze = step_rules.Freeze(graph_safe)
    freeze.save(tensors, stopped)
    before = [t.clone() for t in tensors]
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=gen))  # an optimizer step, for every network
    moved = [t.clone() for t in tensors]
    freeze.restore(tensors, stopped)
    for t, b, m in zip(tensors, before, moved):
        assert torch.equal(t[[0, 2]], b[[0, 2]]) and torch.equal(t[1], m[1])
    # a tensor that appears later (Adam's moments after its first step) joins the held ones
    tensors.append(torch.randn(3, 6, generator=gen))
    freeze.save(tensors, stopped)
    before = tensors[2].clone()
    tensors[2].mul_(2)
    freeze.restore(tensors, stopped)
    assert torch.equal(tensors[2][[0, 2]], before[[0, 2]]) and torch.equal(tensors[2][1], 2 * before[1])


def test_ema_update_keeps_frozen_networks():
    gen = torch.Generator().manual_seed(5)
    ema, out = torch.rand(2, 3, 4, 4, generator=gen), torch.rand(2, 3, 4, 4, generator=gen)
    plain = ema.clone()
    step_rules.ema_update(plain, out, torch.tensor(False), 0.99)
    masked = ema.clone()
    step_rules.ema_update(masked, out, torch.tensor(False), 0.99, torch.tensor([True, False]))
    assert torch.equal(masked[0], ema[0]) and torch.equal(masked[1], plain[1])


# ---------------------------------------------------------------------------------------------
# defaults, the memory check and bad input


class _Enough(Exception):
    pass


def _rule_checked(monkeypatch, image, **kwargs):
    """The early_stop= that restore() hands to the engine, after checking that its memory check of the
    fit counted the same rule (the fit itself is not run)."""
    checked, fitted = [], []
    real_check = memory.check_fits

    def check_fits(*args):
        checked.append(args[7] if len(args) > 7 else None)  # tile_choice's shape-only check, then api's
        return real_check(*args)

    def fit_many(*args, early_stop=None, **kw):
        fitted.append(early_stop)
        raise _Enough

    monkeypatch.setattr(memory, "check_fits", check_fits)
    monkeypatch.setattr(engine, "fit_many", fit_many)
    with pytest.raises(_Enough):
        dipfast.restore(image, **kwargs, **FAST)
    assert checked[-1] is fitted[0]
    return fitted[0]


def test_defaults_per_task_and_the_memory_check_counts_the_criterion(monkeypatch, np_rng):
    x = random_image(np_rng, 16, 16)
    assert _rule_checked(monkeypatch, x, iters=500) == CALIBRATED["denoise"]  # denoise: 'auto' by default
    assert _rule_checked(monkeypatch, x, iters=500, stop="iterations") is None
    assert _rule_checked(monkeypatch, x, task="sr", scale=2, iters=500) is None  # sr: the fixed count
    assert _rule_checked(monkeypatch, x, task="jpeg", iters=500) is None  # jpeg: the fixed count (64 px missed)
    assert _rule_checked(monkeypatch, x, task="jpeg", iters=500, stop="auto") == CALIBRATED["jpeg"] == CALIBRATED_RULE
    # a task without a rule of its own: the common rule, without denoising's noise gate
    assert _rule_checked(monkeypatch, x, task="sr", scale=2, iters=500, stop="auto") == CALIBRATED_RULE
    assert _rule_checked(monkeypatch, x, iters=500, early_stop=SPEC) == SPEC
    # fewer iterations than the calibrated window: the default is the fixed count, not an error
    assert _rule_checked(monkeypatch, x, iters=CALIBRATED["denoise"].window - 1) is None


def test_the_default_stop_takes_an_image_of_one_row(np_rng):
    """Denoising's noise gate has no 2 x 2 block to estimate the noise from: open from the start, no error."""
    r = dipfast.restore(random_image(np_rng, 1, 40), iters=CALIBRATED["denoise"].window + 2, **FAST)
    assert r.image.shape == (1, 40, 3) and r.stop_reason == "iterations"


def test_default_with_too_few_iterations_is_the_fixed_count_bit_for_bit(np_rng):
    x = random_image(np_rng, 12, 12)
    default = dipfast.restore(x, iters=5, backend="native", **FAST)
    fixed = dipfast.restore(x, iters=5, backend="native", stop="iterations", **FAST)
    assert default.stop_iteration is None and default.stop_reason == "iterations"
    np.testing.assert_array_equal(default.image, fixed.image)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"stop": "fast"}, InputError, r"unknown stop 'fast'; valid: \['auto', 'iterations'\]"),
        ({"stop": True}, InputError, r"unknown stop True; valid"),
        ({"stop": "auto", "iters": 50}, InputError, r"early-stop window \(100\) is larger than iters \(50\)"),
        ({"early_stop": dataclasses.replace(SPEC, window=20), "iters": 10}, InputError, r"window \(20\) is larger"),
        ({"early_stop": "wmv"}, InputTypeError, "early_stop must be a dipfast.early_stop.EarlyStopSpec; got str"),
        ({"early_stop": SPEC, "stop": "iterations"}, InputError, "early_stop= is the rule of stop='auto'"),
        ({"early_stop": dataclasses.replace(SPEC, downsample=16), "tile": 12}, InputError, "exceeds the output's 12"),
        ({"early_stop": dataclasses.replace(SPEC, downsample=64)}, InputError, "downsample factor 64 exceeds"),
    ],
    ids=["unknown", "bool", "window>iters", "spec window>iters", "spec type", "spec+iterations", "tiled", "downsample"],
)
def test_bad_stop_input_is_one_line(np_rng, kwargs, error, message):
    x = random_image(np_rng, 32, 32)
    kwargs = {"iters": 20, **kwargs}
    with pytest.raises(error, match=message) as e:
        dipfast.restore(x, **kwargs, **FAST)
    assert "\n" not in str(e.value)


def test_stop_rule_of_is_what_restore_and_batch_share():
    task = api.task_named("denoise")
    assert api.stop_rule_of(task, None, None, 3000) == CALIBRATED["denoise"]
    assert api.stop_rule_of(task, "iterations", None, 3000) is None
    assert api.stop_rule_of(api.task_named("inpaint"), None, None, 3000) is None


# ---------------------------------------------------------------------------------------------
# CUDA: the criterion and the freeze inside the captured step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: early stopping inside the CUDA graph")
@pytest.mark.parametrize(
    "spec",
    [
        SPEC,
        dataclasses.replace(SPEC, returns="window-mean", tolerance=0.4),  # the calibrated rule's branches
        dataclasses.replace(SPEC, returns="window-mean", tolerance=0.4, noise_gate=CALIBRATED["denoise"].noise_gate),
    ],
    ids=["output", "window-mean+tolerance", "noise-gate"],
)
def test_auto_runs_inside_the_cuda_graph_as_the_eager_step(spec):
    """Two networks, the step captured once and replayed: the criterion, the stops and the frozen network
    match the same step run eagerly (no input noise: replayed and eager draws need not be one stream). With
    deterministic kernels (_helpers.DETERMINISTIC_NET): the atomics of the default net's backward made the
    two runs part in their last bits and stop at 26 and 24 (H200)."""
    cuda = torch.device("cuda")
    rng = torch.Generator().manual_seed(0)
    problems = [random_problem(rng, 64, 64), random_problem(rng, 64, 64)]
    problems = [dataclasses.replace(p, operator=Identity().A) for p in problems]  # the gate reads their noise
    preset = dataclasses.replace(PRESET, reg_noise_std=0.0, net=DETERMINISTIC_NET)
    plan = backends.resolve("native", "fp32", cuda)
    steps = []
    for p in (plan, dataclasses.replace(plan, cuda_graph=False)):
        built, zs = fast_step.build_nets(problems, preset, [0, 1])
        steps.append(fast_step.FastStep(built, zs, problems, preset, cuda, [0, 1], 8, p, early_stop=spec))
    graphed, eager = steps
    assert graphed.graph_safe and graphed.graphed is not None
    # cudnn.benchmark for the eager step too: the graph's warm-up benchmarks, and both then read one algorithm cache
    with engine.ieee_fp32(cudnn_benchmark=True), deterministic_algorithms():
        for _ in range(BOUND):
            graphed()
            eager()
            if bool(eager.early_stop.stopped.all()) and bool(graphed.early_stop.stopped.all()):
                break
    torch.cuda.synchronize()
    assert graphed.graphed.captures == 1
    stops = graphed.early_stop.stop_iteration.tolist()
    assert min(stops) > 0 and stops == eager.early_stop.stop_iteration.tolist()
    assert graphed.early_stop.best_iteration.tolist() == eager.early_stop.best_iteration.tolist()
    torch.testing.assert_close(graphed.early_stop.best_output, eager.early_stop.best_output, rtol=0, atol=1e-4)
