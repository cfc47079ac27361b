"""dipfast.early_stop: the criterion against a plain numpy model of the rule, per network, without a host
sync, under torch.compile, and its bad-input errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dipfast.early_stop import EarlyStop, EarlyStopSpec
from dipfast.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (3, 6, 10)  # (C, H, W): odd channel count, H != W


def _sequence(np_rng, t: int, n: int, shape=SHAPE) -> np.ndarray:
    """(T, N, C, H, W) outputs in [0, 1] that settle, then wander: each network's variance dips at its own time."""
    base = np_rng.random((n, *shape))
    dips = np_rng.integers(t // 5, t // 2, size=n)
    steps = np.arange(t)[:, None]
    amplitude = 0.02 + 0.3 * np.abs(steps - dips[None]) / t  # (T, N)
    noise = np_rng.standard_normal((t, n, *shape))
    return np.clip(base[None] + amplitude[..., None, None, None] * noise, 0, 1)


def _pool(x: np.ndarray, r: int) -> np.ndarray:
    c, h, w = x.shape
    return x[:, : h // r * r, : w // r * r].reshape(c, h // r, r, w // r, r).mean(axis=(2, 4))


def _model(xs: np.ndarray, spec: EarlyStopSpec, buffer_dtype=torch.float32) -> dict:
    """The rule of dipfast.early_stop's docstring, one network and one iteration at a time, in float64."""
    t_max, n = xs.shape[:2]
    out = {"criterion": np.full((t_max, n), np.nan), "best_iteration": [], "stop_iteration": [], "best_output": []}
    for k in range(n):
        minimum, minimum_it, best_it, stop_it, best = np.float32(np.inf), 0, 0, 0, np.zeros(xs.shape[2:])
        ema, emv, crit = None, 0.0, np.nan
        small = [_pool(xs[s, k], spec.downsample) for s in range(t_max)]
        stored = [torch.from_numpy(s).to(torch.float32).to(buffer_dtype).double().numpy() for s in small]
        for t in range(1, t_max + 1):
            if stop_it:
                out["criterion"][t - 1, k] = crit
                continue
            x = xs[t - 1, k]
            if spec.method == "wmv":
                window = np.stack(stored[max(t - spec.window, 0) : t])
                var, kept = ((window - window.mean(0)) ** 2).mean(), window.mean(0)
            else:
                s = small[t - 1]
                delta = np.zeros_like(s) if ema is None else s - ema
                ema = s if ema is None else np.clip(ema + spec.alpha * delta, 0, 1)
                emv = (1 - spec.alpha) * (emv + spec.alpha * (delta**2).mean())
                var = emv
            if spec.returns == "output":
                kept = x
            valid = t >= spec.first_valid()
            crit = np.float32(var) if valid else np.nan
            out["criterion"][t - 1, k] = crit
            new = crit < minimum * np.float32(1 - spec.threshold)
            if new or (spec.tolerance > 0 and crit <= minimum * np.float32(1 + spec.tolerance)):
                best_it, best = t, kept
            if new:
                minimum, minimum_it = crit, t
            if valid and minimum_it and t - minimum_it >= spec.patience:
                stop_it = t
        out["best_iteration"].append(best_it)
        out["stop_iteration"].append(stop_it)
        out["best_output"].append(best)
    return out


def _run(xs: np.ndarray, spec: EarlyStopSpec, dtype=torch.float32, update=None) -> tuple[EarlyStop, np.ndarray]:
    es = EarlyStop(spec, xs.shape[1], xs.shape[2:], "cpu", dtype)
    update = update or es.update
    crits = []
    for t in range(xs.shape[0]):
        update(torch.from_numpy(xs[t]).float(), torch.tensor(t))
        crits.append(es.criterion.clone())
    return es, torch.stack(crits).double().numpy()


SPECS = [
    EarlyStopSpec("wmv", window=5, patience=7),  # the notebook's rule, small
    EarlyStopSpec("wmv", window=12, patience=15, threshold=0.02, start=20),
    EarlyStopSpec("wmv", window=4, patience=10, downsample=2),  # reduced resolution; H, W even
    EarlyStopSpec("wmv", window=6, patience=9, returns="window-mean"),
    EarlyStopSpec("emv", alpha=0.2, patience=8, start=6),
    EarlyStopSpec("emv", alpha=0.05, patience=20, threshold=0.01, start=15),
    EarlyStopSpec("wmv", window=6, patience=12, returns="window-mean", tolerance=0.3),
    EarlyStopSpec("wmv", window=5, patience=10, threshold=0.02, tolerance=0.1),
    EarlyStopSpec("emv", alpha=0.2, patience=8, start=6, tolerance=0.5),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.method}-W{s.window}-P{s.patience}-r{s.downsample}-tol{s.tolerance}"
)
def test_matches_the_model_of_the_rule(np_rng, spec):
    xs = _sequence(np_rng, 90, 4)
    ref = _model(xs, spec)
    es, crits = _run(xs, spec)
    np.testing.assert_allclose(crits, ref["criterion"], rtol=2e-6, atol=1e-12, equal_nan=True)
    assert es.best_iteration.tolist() == ref["best_iteration"]
    assert es.stop_iteration.tolist() == ref["stop_iteration"]
    assert es.stopped.tolist() == [s > 0 for s in ref["stop_iteration"]]
    assert all(s > 0 for s in ref["stop_iteration"]), "the sequences are built to stop: a test that never stops"
    np.testing.assert_allclose(es.best_output.double().numpy(), np.stack(ref["best_output"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-W{s.window}-thr{s.threshold}-tol{s.tolerance}")
def test_the_replays_decision_is_the_updates(np_rng, spec):
    """dipfast.bench.early_stop.decide (the calibration's rule on a VAR curve) against EarlyStop.update on the
    same outputs: the kept iteration, the stop and whether it stopped, per network."""
    from dipfast.bench.early_stop import decide

    for t_max in (40, 90):
        xs = _sequence(np_rng, t_max, 4)
        es, crits = _run(xs, spec)
        never = EarlyStop(dataclasses.replace(spec, patience=t_max + 1), 4, SHAPE, "cpu", torch.float32)
        full = []
        for t in range(t_max):
            never.update(torch.from_numpy(xs[t]).float(), torch.tensor(t))
            full.append(never.criterion.clone())
        curve = torch.stack(full).numpy()  # (T, N): VAR without a stop, as calibrate() replays it
        for k in range(4):
            best, stop, stopped = decide(curve[:, k], spec.patience, spec.threshold, spec.first_valid(), spec.tolerance)
            assert (best, stop if stopped else 0, stopped) == (
                int(es.best_iteration[k]),
                int(es.stop_iteration[k]),
                bool(es.stopped[k]),
            )


def test_a_tolerance_keeps_a_later_output_and_stops_at_the_same_iteration(np_rng):
    """The tolerance moves only the kept output, within the minimum's basin; the patience still counts from
    the minimum itself, so every network stops where it did without one."""
    base = EarlyStopSpec("wmv", window=6, patience=15, returns="window-mean")
    xs = _sequence(np_rng, 120, 6)
    plain, crits = _run(xs, base)
    tolerant, _ = _run(xs, dataclasses.replace(base, tolerance=0.5))
    assert tolerant.stop_iteration.tolist() == plain.stop_iteration.tolist()
    assert tolerant.minimum_iteration.tolist() == plain.best_iteration.tolist()
    assert (tolerant.best_iteration >= plain.best_iteration).all()
    assert (tolerant.best_iteration > plain.best_iteration).any(), "no basin wider than its minimum: a vacuous test"
    for k in range(6):
        t, minimum = int(tolerant.best_iteration[k]), crits[int(plain.best_iteration[k]) - 1, k]
        assert crits[t - 1, k] <= minimum * 1.5 * (1 + 1e-6)
        later = crits[t : int(plain.stop_iteration[k]), k]
        assert (later > minimum * 1.5 * (1 - 1e-6)).all()  # nothing later in the basin was left out


def _losses(np_rng, t: int, n: int) -> np.ndarray:
    """(T, N) float32 losses that fall towards 1 (the noise variance below), each network at its own rate, with
    iteration-to-iteration noise: the gate opens mid-run, at a different iteration for each."""
    rates = np_rng.uniform(5, 25, size=n)
    steps = np.arange(1, t + 1)[:, None]
    return (0.8 + 1.5 * np.exp(-steps / rates) + 0.05 * np_rng.standard_normal((t, n))).astype(np.float32)


def _run_gated(xs, losses, variance, spec) -> EarlyStop:
    es = EarlyStop(spec, xs.shape[1], xs.shape[2:], "cpu", torch.float32, noise_variance=torch.tensor(variance))
    for t in range(xs.shape[0]):
        es.update(torch.from_numpy(xs[t]).float(), torch.tensor(t), torch.from_numpy(losses[t]))
    return es


@pytest.mark.parametrize("spec", SPECS[:2] + SPECS[4:5] + SPECS[6:7], ids=lambda s: f"{s.method}-tol{s.tolerance}")
def test_the_noise_gate_is_a_start_at_the_iteration_it_opens(np_rng, spec):
    """No minimum counts before the loss's moving average reaches gate x sigma^2: per network, the gated rule
    decides exactly as the plain rule started at the iteration its gate opened (bench.early_stop.gate_opening,
    the calibration's numpy model of the gate); a network whose sigma^2 is inf is not gated at all."""
    from dipfast.bench.early_stop import gate_opening

    t_max, n = 90, 4
    xs, losses = _sequence(np_rng, t_max, n), _losses(np_rng, t_max, n)
    variance = [1.0, 1.0, 1.0, np.inf]
    gated = dataclasses.replace(spec, noise_gate=1.1)
    es = _run_gated(xs, losses, variance, gated)
    opened = [gate_opening(losses[:, k], variance[k], gated.noise_gate) for k in range(n)]
    assert opened[3] == 1 and all(spec.first_valid() < g <= 2 * t_max // 3 for g in opened[:3]), opened
    assert es.gate_open.all()
    for k in range(n):
        plain, _ = _run(xs[:, k : k + 1], dataclasses.replace(spec, start=max(spec.start, opened[k])))
        for name in ("best_iteration", "minimum_iteration", "stop_iteration", "stopped", "best_output"):
            torch.testing.assert_close(getattr(es, name)[k : k + 1], getattr(plain, name), rtol=0, atol=0)
    ungated, _ = _run(xs, spec)
    assert (es.minimum_iteration[:3] != ungated.minimum_iteration[:3]).any(), "the gate changed nothing: vacuous"


def test_a_gate_that_never_opens_never_stops(np_rng):
    spec = EarlyStopSpec("wmv", window=5, patience=7, noise_gate=0.5)  # the losses stay above 0.5 x 1.0
    xs, losses = _sequence(np_rng, 60, 2), _losses(np_rng, 60, 2)
    es = _run_gated(xs, losses, [1.0, 1.0], spec)
    assert not es.gate_open.any() and not es.stopped.any()
    assert es.best_iteration.tolist() == [0, 0] and torch.isnan(es.criterion).all()


def test_the_noise_gate_needs_its_inputs(np_rng):
    spec = EarlyStopSpec(noise_gate=1.2)
    with pytest.raises(ValueError, match=r"needs noise_variance of shape \(2,\)"):
        EarlyStop(spec, 2, SHAPE, "cpu")
    es = EarlyStop(spec, 2, SHAPE, "cpu", noise_variance=torch.ones(2))
    with pytest.raises(ValueError, match="reads each network's loss"):
        es.update(torch.rand(2, *SHAPE), torch.tensor(0))


def test_gate_variance_is_the_observations_noise_where_the_data_term_is_the_output_itself(np_rng):
    from dipfast import engine
    from dipfast.early_stop import gate_variance
    from dipfast.noise_level import estimate_sigma
    from dipfast.operators import Identity, Mask

    y = torch.from_numpy(np_rng.random((1, 3, 12, 10))).float()
    kw = {"input_shape": (4, 12, 10), "z": None, "out_size": (12, 10), "n_channels": 3, "y": y}
    mask = torch.ones(1, 1, 12, 10)
    problems = [
        engine.Problem(**kw, operator=Identity().A),  # denoise, jpeg: the gate reads the noise
        engine.Problem(**kw, operator=Mask(mask).A),  # inpaint: its data term is not ||x - y||^2
        engine.Problem(**kw, operator=Identity().A, loss=lambda x: x.mean()),  # a custom loss
        engine.Problem(**kw),  # a bare callable: nothing says it is the identity
        dataclasses.replace(problem := engine.Problem(**kw, operator=Identity().A), y=y[..., :1, :]),  # one row
    ]
    got = gate_variance(problems, "cpu")
    assert problem.observes_output and got[0] == estimate_sigma(y)[0] ** 2 and torch.isinf(got[1:]).all()


def test_a_bf16_buffer_is_the_rule_on_bf16_rounded_outputs(np_rng):
    spec = EarlyStopSpec("wmv", window=6, patience=8)
    xs = _sequence(np_rng, 60, 3)
    ref = _model(xs, spec, buffer_dtype=torch.bfloat16)
    es, crits = _run(xs, spec, torch.bfloat16)
    np.testing.assert_allclose(crits, ref["criterion"], rtol=2e-6, atol=1e-12, equal_nan=True)
    assert es.best_iteration.tolist() == ref["best_iteration"]
    assert es.stop_iteration.tolist() == ref["stop_iteration"]
    np.testing.assert_array_equal(es.best_output.numpy(), np.stack(ref["best_output"]).astype(np.float32))


def test_variance_keeps_its_precision_over_many_iterations(np_rng):
    """The window's float64 sums: after 3000 iterations the variance is the one computed afresh."""
    spec = EarlyStopSpec("wmv", window=50, patience=10**6)
    xs = np.clip(0.5 + 1e-3 * np_rng.standard_normal((3000, 1, 1, 4, 4)), 0, 1)
    _, crits = _run(xs, spec)
    fresh = xs[-50:].astype(np.float32).astype(np.float64).var(axis=0).mean()
    assert crits[-1, 0] == pytest.approx(fresh, rel=1e-5)


@pytest.mark.parametrize("method", ["wmv", "emv"])
def test_networks_are_independent(np_rng, method):
    spec = EarlyStopSpec(method, window=5, patience=6, start=4)
    xs = _sequence(np_rng, 70, 3)
    together, crits = _run(xs, spec)
    for k in range(3):
        alone, crit = _run(xs[:, k : k + 1], spec)
        np.testing.assert_array_equal(crits[:, k], crit[:, 0])
        for name in ("best_iteration", "stop_iteration", "stopped", "best_output", "minimum"):
            torch.testing.assert_close(getattr(together, name)[k : k + 1], getattr(alone, name), rtol=0, atol=0)


def test_a_stopped_network_changes_no_more(np_rng):
    spec = EarlyStopSpec("wmv", window=4, patience=5)
    xs = _sequence(np_rng, 60, 2)
    es, _ = _run(xs, spec)
    assert es.stopped.all()
    before = {k: v.clone() for k, v in vars(es).items() if isinstance(v, torch.Tensor) and k not in _MOVING}
    for t in range(60, 80):
        es.update(torch.from_numpy(np_rng.random((2, *SHAPE))).float(), torch.tensor(t))
    for k, v in before.items():
        torch.testing.assert_close(getattr(es, k), v, rtol=0, atol=0, msg=f"{k} changed after the stop")


_MOVING = {"buffer", "sum", "sum_squares", "ema", "emv"}  # the window moves on; nothing read from it does


class _FailOnHostSync(TorchDispatchMode):
    """Fails on every op that reads a value back to the host or makes a shape from data."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "equal"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.SYNCING:
            raise AssertionError(f"host sync in the criterion: {func}")
        return func(*args, **(kwargs or {}))


def test_the_dispatch_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"), _FailOnHostSync():
        torch.ones(2).sum().item()


GATED = dataclasses.replace(SPECS[6], noise_gate=1.1)


@pytest.mark.parametrize(
    "spec", SPECS[:1] + SPECS[2:5] + SPECS[6:7] + [GATED], ids=lambda s: f"{s.method}-r{s.downsample}-g{s.noise_gate}"
)
def test_update_makes_no_host_sync(np_rng, spec):
    xs = torch.from_numpy(_sequence(np_rng, 80, 2)).float()
    losses = torch.from_numpy(_losses(np_rng, 80, 2))
    es = EarlyStop(spec, 2, SHAPE, "cpu", noise_variance=torch.ones(2))
    iteration = torch.zeros((), dtype=torch.int64)
    with _FailOnHostSync():
        for t in range(80):
            es.update(xs[t], iteration, losses[t])
            iteration += 1
    assert es.stopped.any()  # the stop decision itself was taken on the device


def test_update_under_torch_compile(np_rng):
    """ES-WMV (the ring buffer's index ops); ES-EMV is elementwise ops and a mean (a minute of compile each)."""
    spec = EarlyStopSpec("wmv", window=4, patience=6, start=3)
    xs = _sequence(np_rng, 40, 2)
    eager, crits = _run(xs, spec)
    es = EarlyStop(spec, 2, SHAPE, "cpu", torch.float32)
    compiled = torch.compile(es.update, fullgraph=True, dynamic=False)
    crits_c = []
    for t in range(xs.shape[0]):
        compiled(torch.from_numpy(xs[t]).float(), torch.tensor(t))
        crits_c.append(es.criterion.clone())
    np.testing.assert_allclose(torch.stack(crits_c).double().numpy(), crits, rtol=1e-6, equal_nan=True)
    for name in ("best_iteration", "stop_iteration", "stopped"):
        torch.testing.assert_close(getattr(es, name), getattr(eager, name), rtol=0, atol=0)
    torch.testing.assert_close(es.best_output, eager.best_output, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["wmv", "emv"])
@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("noise_gate", [0.0, 1.2])
def test_bytes_is_what_the_estimate_says(method, downsample, noise_gate):
    spec = EarlyStopSpec(method, window=7, downsample=downsample, noise_gate=noise_gate)
    for dtype in (torch.bfloat16, torch.float32):
        es = EarlyStop(spec, 3, (3, 8, 12), "cpu", dtype, noise_variance=torch.ones(3))
        assert es.bytes() <= EarlyStop.estimate_bytes(spec, 3, (3, 8, 12), dtype) <= es.bytes() + 64 * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "wmw"}, "unknown early-stop method 'wmw'"),
        ({"window": 0}, "window must be a positive integer"),
        ({"patience": -3}, "patience must be a positive integer"),
        ({"patience": 2.5}, "patience must be a positive integer"),
        ({"window": True}, "window must be a positive integer"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"threshold": -0.1}, "threshold must be in"),
        ({"start": -1}, "start must be a non-negative integer"),
        ({"downsample": 0}, "downsample must be a positive integer"),
        ({"tolerance": -0.1}, r"tolerance must be a finite number >= 0 \(0: off\); got -0.1"),
        ({"tolerance": math.nan}, "tolerance must be a finite number"),
        ({"tolerance": math.inf}, "tolerance must be a finite number"),
        ({"tolerance": True}, "tolerance must be a finite number"),
        ({"tolerance": "0.4"}, "tolerance must be a finite number"),
        ({"noise_gate": -1.0}, r"noise_gate must be a finite number >= 0 \(0: off\); got -1.0"),
        ({"noise_gate": math.nan}, "noise_gate must be a finite number"),
        ({"noise_gate": True}, "noise_gate must be a finite number"),
        ({"returns": "mean"}, "unknown early-stop returns"),
        ({"method": "emv", "returns": "window-mean"}, "needs method='wmv'"),
        ({"returns": "window-mean", "downsample": 2}, "needs downsample=1"),
    ],
)
def test_bad_settings_name_the_problem(kwargs, message):
    with pytest.raises(InputError, match=message):
        EarlyStopSpec(**kwargs)


def test_validate_against_the_run():
    with pytest.raises(InputError, match=r"window \(100\) is larger than iters \(50\)"):
        EarlyStopSpec(window=100).validate(50)
    with pytest.raises(InputError, match=r"start \(50\) is not below iters \(50\)"):
        EarlyStopSpec("emv", start=50).validate(50)
    with pytest.raises(InputError, match="downsample factor 4 exceeds"):
        EarlyStopSpec(downsample=4).validate(100, (3, 40))
    EarlyStopSpec(window=50).validate(50, (64, 64))  # the edge: a full window at the last iteration
    assert math.isfinite(EarlyStopSpec().first_valid())


def test_the_memory_estimate_counts_the_criterion():
    from dipfast import memory
    from dipfast.nets import SkipSpec

    net = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
    spec = EarlyStopSpec(window=30)
    without = memory.estimate_bytes(net, 4, 3, (64, 48), 2, "fp32")
    with_criterion = memory.estimate_bytes(net, 4, 3, (64, 48), 2, "fp32", early_stop=spec)
    param_bytes = memory._activation_and_param_bytes(net, 4, 3, 64, 48).params
    freeze = 3 * param_bytes * 2  # step_rules.Freeze: each network's parameters and both Adam moments
    assert EarlyStop.estimate_bytes(spec, 2, (3, 64, 48)) > 30 * 2 * 3 * 64 * 48 * 2
    assert with_criterion - without == EarlyStop.estimate_bytes(spec, 2, (3, 64, 48)) + freeze
