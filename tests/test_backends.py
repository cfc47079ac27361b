"""The fast backends against the reference: plans, one step, short runs, batches, restarts, the NaN guard, memory.

Tolerances (fp32 IEEE on the CPU):
- the fast step with the reference blocks, N = 1, eager: bit for bit (same ops, same order).
- native: the csrc BatchNorm + LeakyReLU sums in another order than ATen's: a few ulps per step,
  then the fit's chaos (below); 50 steps are held to 2e-2 per loss and 0.05 dB.
- compile: Inductor fuses and reorders the elementwise work, so a step differs by float rounding
  (a few fp32 ulps per op); after one step the outputs agree to 1e-5, and a 20-iteration run's
  PSNR to 0.01 dB (Adam amplifies rounding: measured 1e-4 dB).
- a batch of N under vmap runs grouped convolutions, whose sums run in another order than the
  single network's: losses agree to ~1e-7 relative per iteration for the first twenty or so, then
  the fit's chaos takes over (a LeakyReLU kink or a near-zero gradient's sign, amplified by Adam:
  measured 1.4e-3 relative by iteration 27 on one of three networks). So 12 iterations, losses to
  1e-5 relative and images to 1e-4.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import math
import time
import weakref

import numpy as np
import pytest
import torch
from _helpers import FAST, TINY_NET, TINY_PRESET, random_image, random_problem

import dipfast
from dipfast import backends, engine, fast_step, memory, nets
from dipfast.backends import Plan
from dipfast.errors import InputError, NumericalError
from dipfast.presets import PRESETS

CPU = torch.device("cpu")
PRESET = TINY_PRESET


def _plan(backend: str, precision: str = "fp32") -> Plan:
    return backends.resolve(backend, precision, CPU)


# ---------------------------------------------------------------------------------------------
# plans


def test_resolve_auto_picks_the_recorded_choice_and_native_bf16():
    plan = backends.resolve("auto", "auto", CPU)
    assert plan.backend == backends.AUTO["cpu"] and plan.fast
    assert plan.precision == ("bf16" if backends.bf16_native(CPU) else "fp32")
    assert not plan.cuda_graph and not plan.compile
    assert backends.resolve("compile", "fp32", CPU).compile and backends.resolve("triton", "tf32", CPU).compile


@pytest.mark.parametrize("in_hardware", [True, False])
def test_auto_on_cuda_is_the_measured_native_bf16_in_nchw(monkeypatch, in_hardware):
    """The H200 ran the native step in bf16 with NCHW activations 1.78x faster than in fp32 and 2.74x faster
    than bf16 channels_last (bench/results/2026-12-04-h200-504226cc86/); a GPU without bf16 hardware gets fp32.
    The CPU keeps channels_last under bf16. Resolving needs no GPU."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "bf16_native", lambda device: in_hardware)
    plan = backends.resolve("auto", "auto", cuda)
    assert plan.backend == "native" and plan.cuda_graph
    assert plan.precision == ("bf16" if in_hardware else "fp32")
    bf16 = dataclasses.replace(plan, precision="bf16")
    assert not bf16.channels_last(cuda) and bf16.channels_last(CPU)


@pytest.mark.parametrize(
    "backend, precision, message",
    [
        ("reference", "bf16", "reference backend is the IEEE fp32 oracle"),
        ("fast", "fp32", "unknown backend 'fast'"),
        ("native", "fp16", "unknown precision 'fp16'"),
    ],
)
def test_resolve_refuses_with_one_line(backend, precision, message):
    with pytest.raises(InputError, match=message) as e:
        backends.resolve(backend, precision, CPU)
    assert "\n" not in str(e.value) and ("valid" in str(e.value) or "use backend=" in str(e.value))


def test_triton_is_refused_where_its_kernels_would_not_run(monkeypatch):
    """On a CPU the kernels run only in the interpreter (this suite's, conftest.py); without it backend='triton' would
    be the compile backend on torch's ops, minutes of compiling for nothing it names: refused in one line, as on a GPU
    without the triton package."""
    conv_bn_lrelu = importlib.import_module("dipfast.kernels.conv_bn_lrelu")  # the module; the package exports the op

    assert backends.resolve("triton", "fp32", CPU).backend == "triton"  # the interpreter's
    monkeypatch.setattr(conv_bn_lrelu, "_INTERPRET", False)
    with pytest.raises(InputError, match=r"^backend='triton' runs its kernels on a CUDA GPU, not on device 'cpu' .*"
                       r"use backend='native'$"):  # fmt: skip
        backends.resolve("triton", "auto", CPU)
    assert backends.resolve("compile", "auto", CPU).backend == "compile"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(InputError, match=r"^backend='triton' needs the triton package \(pip install triton\)"):
        backends.resolve("triton", "bf16", torch.device("cuda", 0))


@pytest.mark.parametrize("capability, refused", [((9, 0), True), ((8, 0), False)], ids=["hopper", "ampere"])
def test_triton_fp32_is_refused_where_its_parity_is_unverified(monkeypatch, capability, refused):
    """On Hopper (dipfast.kernels.hardware) backend='triton' refuses fp32 with one line naming what works, and its
    'auto' precision is bf16; other backends, other precisions and other GPUs are untouched. No CUDA is touched."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda", 0)
    if refused:
        message = (
            r"^backend='triton' with precision='fp32' has not passed parity on Hopper \(sm_90\) yet; "
            r"use precision='tf32' or 'bf16', or backend='native'$"
        )
        with pytest.raises(InputError, match=message):
            backends.resolve("triton", "fp32", cuda)
        assert backends.resolve("triton", "auto", cuda).precision == "bf16"
    else:
        assert backends.resolve("triton", "fp32", cuda).precision == "fp32"
        assert backends.resolve("triton", "auto", cuda).precision == "bf16"  # a GPU with bf16 hardware
    assert backends.resolve("triton", "tf32", cuda).precision == "tf32"
    assert backends.resolve("native", "fp32", cuda).precision == "fp32"
    assert backends.resolve("triton", "fp32", CPU).precision == "fp32"


def test_a_variant_changes_a_backend_inside_its_block_only():
    """backends.variant, the harness's side-by-side switch: plans resolved inside see the changed entry (here the
    reference blocks on CUDA, where native runs the padded BatchNorm kernels), and the table is restored after,
    also when the block raises."""
    cuda = torch.device("cuda", 0)
    with pytest.raises(RuntimeError), backends.variant("native", blocks={"cpu": "native", "cuda": "reference"}):
        assert backends.resolve("native", "fp32", cuda).block_ops(cuda) is backends.REFERENCE
        raise RuntimeError
    assert type(backends.resolve("native", "fp32", cuda).block_ops(cuda)).__name__ == "PaddedBlocks"


@pytest.mark.parametrize("name", list(backends.BACKEND_TABLE))
def test_cuda_choices_on_cpu_make_the_cpu_plan_choose_what_cuda_runs(name):
    """The CPU's stand-in for the CUDA step (the interpreter's instruments, the launch census): inside the variant a
    CPU plan decides every per-device question as the CUDA plan does outside it, whichever choices the table holds."""
    cuda = torch.device("cuda", 0)
    decisions = ("channels_last", "channel_multiple", "aligned_parameters", "noise", "fused_loss", "folded_finalize",
                 "vectorised")  # fmt: skip
    # the choices themselves, not whether this machine could run them (fused_rules.available and the like)
    switches = ("fused_rules", "dependent_launch", "parallel_compile")

    def asked(device: torch.device, plan: Plan) -> tuple:
        return (type(plan.block_ops(device)).__name__, *(getattr(plan, d)(device) for d in decisions),
                *(device.type in getattr(plan.spec, s) for s in switches))  # fmt: skip

    for precision in ("fp32", "tf32", "bf16"):  # the plan as resolve() would make it on either device
        plan = dataclasses.replace(backends.resolve(name, "fp32", CPU), precision=precision)
        on_cuda = asked(cuda, plan)
        with backends.variant(name, **backends.cuda_choices_on_cpu(name)):
            assert asked(CPU, plan) == on_cuda, precision
            assert asked(cuda, plan) == on_cuda, precision
    table = {"cpu": "native", "cuda": "padded"}
    with backends.variant(name, blocks=table, vectorised=frozenset({"cpu"}), noise={"cpu": "philox"}):
        assert backends.cuda_choices_on_cpu(name)["blocks"] == {"cpu": "padded", "cuda": "padded"}
        assert backends.cuda_choices_on_cpu(name)["vectorised"] == frozenset()
        assert backends.cuda_choices_on_cpu(name)["noise"] == {}


def test_dependent_launches_are_off_by_default_and_never_on_a_cpu():
    """Programmatic dependent launch (dipfast.kernels.dependent_launch) waits for the measurement that would make it
    native's choice (the harness's native-pdl); where asked for, a CPU launch (Triton's interpreter, which cannot run
    the wait) still goes without it, and the switch is restored after its block, also when the block raises."""
    from dipfast.kernels import dependent_launch

    cuda, x = torch.device("cuda"), torch.ones(3)
    assert not backends.resolve("native", "fp32", cuda).dependent_launch(cuda)
    with backends.variant("native", dependent_launch=frozenset({"cpu", "cuda"})):
        assert not backends.resolve("native", "bf16", CPU).dependent_launch(CPU)
    off = {"PDL": False, "launch_pdl": False}
    assert dependent_launch.launch_options(x) == off
    with dependent_launch.dependent_launches(True):
        assert dependent_launch.launch_options(x) == off
        with pytest.raises(RuntimeError), dependent_launch.dependent_launches(False):
            raise RuntimeError
        assert dependent_launch._enabled
    assert not dependent_launch._enabled


def test_restore_reports_the_plan_it_ran(np_rng):
    r = dipfast.restore(random_image(np_rng, 12, 12), iters=2, backend="native", precision="bf16", **FAST)
    assert (r.backend, r.precision) == ("native", "bf16")
    assert np.isfinite(r.image).all()


# ---------------------------------------------------------------------------------------------
# one step and short runs against the reference


def _fits(plan: Plan, problems, seeds, iterations=20, report_every=7):
    preset = dataclasses.replace(PRESET, iterations=iterations)
    return engine.fit_many(
        problems, preset, device=CPU, seeds=seeds, progress=False, report_every=report_every, plan=plan
    )


def test_fast_step_with_the_reference_blocks_is_the_reference_bit_for_bit(rng):
    """The fast step's machinery (stacked parameters, device-side EMA, backtracking and metrics, foreach
    Adam) changes no bit: with the reference blocks and no compile it is the reference."""
    problem = random_problem(rng)
    ref = engine.fit(problem, dataclasses.replace(PRESET, iterations=20), device=CPU, seed=3, progress=False)
    # FastStep with the reference blocks, eager, and the reference's Adam arithmetic
    plain = dataclasses.replace(_plan("compile"), compile=False, fused_adam=False)
    (fast,) = _fits(plain, [problem], [3])
    assert [h.loss for h in fast.history] == [h.loss for h in ref.history]
    assert torch.equal(fast.image, ref.image) and torch.equal(fast.ema_image, ref.ema_image)


def _relative_errors(fit: engine.Fit, oracle: engine.Fit) -> list[float]:
    return [abs(h.loss - o.loss) / o.loss for h, o in zip(fit.history, oracle.history, strict=True)]


def test_native_fp32_follows_the_reference_for_50_steps_with_input_noise(rng, monkeypatch):
    """Loss per step and final PSNR of the native backend against the reference, the input noise on. The
    native step's own Philox stream is swapped for the reference's generator here, so both draw the same
    noise and the whole path (draw, z + noise, forward, backward, rules, Adam) meets the oracle. The csrc
    BatchNorm sums in another order, so losses agree to 1e-6 relative at first; the fit's chaos lets them
    drift to a few 1e-3 by step 50 (measured 8e-3 without noise), held to 2e-2, the final PSNR to 0.05 dB."""
    native = backends.BACKEND_TABLE["native"]
    monkeypatch.setitem(backends.BACKEND_TABLE, "native", dataclasses.replace(native, noise={}))
    problem = random_problem(rng)
    preset = dataclasses.replace(PRESET, iterations=50)
    assert preset.reg_noise_std > 0
    ref = engine.fit(problem, preset, device=CPU, seed=3, progress=False)
    (fast,) = _fits(_plan("native", "fp32"), [problem], [3], iterations=50)
    assert fast.history[0].loss == pytest.approx(ref.history[0].loss, rel=1e-6)
    assert max(_relative_errors(fast, ref)) < 2e-2
    assert fast.history[-1].psnr == pytest.approx(ref.history[-1].psnr, abs=0.05)
    assert fast.history[-1].ema_psnr == pytest.approx(ref.history[-1].ema_psnr, abs=0.05)


def test_native_bf16_is_within_twice_the_eager_bf16_error_for_50_steps(rng):
    """The project's bf16 rule: against the fp32 oracle, the native bf16 step's error is at most 2x that of
    eager bf16 (the same step with the reference blocks under autocast): per-step losses (the worst step)
    and the final PSNRs. No input noise: channels_last draws fill another element order than the
    oracle's contiguous draw. The PSNR bound has a 0.02 dB floor: the eager gap can be ~0 by chance."""
    problem = random_problem(rng)
    quiet = dataclasses.replace(PRESET, iterations=50, reg_noise_std=0.0)
    ref = engine.fit(problem, quiet, device=CPU, seed=3, progress=False)
    (native,) = _fits(_plan("native", "bf16"), [problem], [3], iterations=50)
    (eager,) = _fits(dataclasses.replace(_plan("compile", "bf16"), compile=False), [problem], [3], iterations=50)
    assert max(_relative_errors(native, ref)) <= 2 * max(_relative_errors(eager, ref))
    for name in ("psnr", "ema_psnr"):
        native_gap = abs(getattr(native.history[-1], name) - getattr(ref.history[-1], name))
        eager_gap = abs(getattr(eager.history[-1], name) - getattr(ref.history[-1], name))
        assert native_gap <= max(2 * eager_gap, 0.02), (name, native_gap, eager_gap)


def test_compile_step_and_short_run_match_the_reference(rng):
    problem = random_problem(rng)
    plan = _plan("compile")
    one_ref = engine.fit(problem, dataclasses.replace(PRESET, iterations=1), device=CPU, seed=5, progress=False)
    (one,) = _fits(plan, [problem], [5], iterations=1)
    torch.testing.assert_close(one.image, one_ref.image, rtol=1e-5, atol=1e-5)
    assert one.history[0].loss == pytest.approx(one_ref.history[0].loss, rel=1e-6)

    ref = engine.fit(problem, dataclasses.replace(PRESET, iterations=20), device=CPU, seed=5, progress=False)
    (run,) = _fits(plan, [problem], [5])
    assert run.history[-1].psnr == pytest.approx(ref.history[-1].psnr, abs=0.01)
    assert run.history[-1].ema_psnr == pytest.approx(ref.history[-1].ema_psnr, abs=0.01)


# ---------------------------------------------------------------------------------------------
# batches and restarts


def test_a_batch_equals_separate_runs_with_the_same_seeds(rng):
    problems = [random_problem(rng) for _ in range(3)]
    plan = _plan("native")
    batch = _fits(plan, problems, [3, 4, 5], iterations=12)
    for problem, seed, together in zip(problems, [3, 4, 5], batch):
        (alone,) = _fits(plan, [problem], [seed], iterations=12)
        torch.testing.assert_close(together.image, alone.image, rtol=0, atol=1e-4)
        torch.testing.assert_close(together.ema_image, alone.ema_image, rtol=0, atol=1e-4)
        assert [h.loss for h in together.history] == pytest.approx([h.loss for h in alone.history], rel=1e-5)
    # the networks really are independent: different data, different results
    assert not torch.allclose(batch[0].image, batch[1].image, atol=1e-2)


def test_the_vectorised_batch_equals_separate_runs(rng):
    """The CUDA batch path (vmap over the stacked networks: grouped convs), run on the CPU with the
    reference blocks: the same 12 iterations as separate runs, to the tolerance above."""
    problems = [random_problem(rng) for _ in range(3)]
    plan = dataclasses.replace(_plan("compile"), compile=False)  # FastStep with the reference blocks, eager
    preset = dataclasses.replace(PRESET, iterations=12)
    built, zs = fast_step.build_nets(problems, preset, [3, 4, 5])
    step = fast_step.FastStep(built, zs, problems, preset, CPU, [3, 4, 5], 12, plan, vectorised=True)
    with engine.ieee_fp32():
        for _ in range(12):
            step()
    for k, (problem, seed) in enumerate(zip(problems, [3, 4, 5])):
        (alone,) = _fits(plan, [problem], [seed], iterations=12, report_every=12)
        losses = [h.loss for h in alone.history]
        assert step.metrics[:, k, 0].tolist() == pytest.approx(losses, rel=1e-5)
        torch.testing.assert_close(step.ema[k : k + 1], alone.ema_image, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("query", "method", "devices"),
    [
        ("vectorised", "native", {"cuda"}),  # native vmaps a step of N > 1 networks on CUDA alone
        ("vectorised", "native-per-network", set()),  # one network after another: what vmapping a batch is worth
        ("folded_finalize", "native", set()),  # off in native until a GPU measures it
        ("folded_finalize", "native-folded-finalize", {"cuda"}),
        ("parallel_compile", "native", set()),  # off in native until a cold start measures it
        ("parallel_compile", "native-parallel-compile", {"cuda"}),
    ],
)
def test_the_plan_says_where_a_launch_choice_holds(query, method, devices):
    """Backend.vectorised, folded_finalize and parallel_compile, as native and the harness's variants set them."""
    from dipfast.bench import runs

    with runs.method_context(method):
        plan = backends.Plan("native", "bf16", compile=False, cuda_graph=False)
        for device in ("cpu", "cuda"):
            assert getattr(plan, query)(torch.device(device)) == (device in devices)


@pytest.mark.parametrize("where", [frozenset(), frozenset({"cpu"})], ids=["cuda", "cpu-too"])
def test_the_fast_step_vmaps_a_batch_where_the_plan_says(rng, where):
    problems = [random_problem(rng) for _ in range(2)]
    with backends.variant("native", vectorised=where):
        plan = _plan("native")
        for n in (2, 1):  # one network is never vmapped
            built, zs = fast_step.build_nets(problems[:n], PRESET, [3, 4][:n])
            step = fast_step.FastStep(built, zs, problems[:n], PRESET, CPU, [3, 4][:n], 5, plan)
            assert step.runner.vectorised == (n > 1 and "cpu" in where)


@pytest.mark.parametrize("vectorised", [False, True], ids=["each", "vectorised"])
def test_a_bf16_step_feeds_its_net_input_in_bf16_with_the_same_results(rng, monkeypatch, vectorised):
    """Under bf16 the net's input is z + noise rounded to bf16 once (its convs read it in bf16 anyway: autocast cast it
    for each of them): five iterations of two networks bit for bit as with the fp32 input; fp32 keeps fp32."""
    problems = [random_problem(rng) for _ in range(2)]
    steps = []
    for cast in (True, False):
        monkeypatch.setattr(nets, "input_only_convolved", lambda spec, cast=cast: cast)
        built, zs = fast_step.build_nets(problems, PRESET, [3, 4])
        step = fast_step.FastStep(built, zs, problems, PRESET, CPU, [3, 4], 5, _plan("native", "bf16"),
                                  vectorised=vectorised)  # fmt: skip
        assert step.net_input.dtype == (torch.bfloat16 if cast else torch.float32)
        for _ in range(5):
            step()
        steps.append(step)
    assert torch.equal(steps[0].out, steps[1].out) and torch.equal(steps[0].ema, steps[1].ema)
    for a, b in zip(steps[0].flat.buffers, steps[1].flat.buffers):
        assert torch.equal(a, b)
    monkeypatch.undo()
    assert nets.input_only_convolved(PRESET.net)  # the Skip net's input reaches its skip and down convs alone
    built, zs = fast_step.build_nets(problems, PRESET, [3, 4])
    fp32 = fast_step.FastStep(built, zs, problems, PRESET, CPU, [3, 4], 5, _plan("native", "fp32"))
    assert fp32.net_input.dtype == torch.float32


@pytest.mark.parametrize("graph_safe", [False, True], ids=["cpu-branch", "graph-branch"])
def test_batch_backtracking_falls_back_per_network(rng, graph_safe):
    """Network 0's loss jumps past sqrt(10) x its last accepted loss, network 1's does not: only
    network 0's parameters return to its saved point, and only network 1 saves new ones. Both ways of
    copying (host-read masks on the CPU, masked where in a CUDA graph) run here."""
    problems = [random_problem(rng) for _ in range(2)]
    built, zs = fast_step.build_nets(problems, PRESET, [1, 2])
    step = fast_step.FastStep(built, zs, problems, PRESET, CPU, [1, 2], 4, _plan("native"), graph_safe=graph_safe)
    params = step.flat.params
    with torch.no_grad():  # as in the step
        # the denoising rule checks every step but each 100th: the first is not checked, the second saves
        assert [step._backtrack(torch.tensor([1.0, 1.0])).tolist() for _ in range(2)] == [[False, False]] * 2
        before = {k: v.detach().clone() for k, v in params.items()}
        for p in params.values():
            p.add_(1.0)  # an Adam step's worth of change, for both networks
        assert step._backtrack(torch.tensor([100.0, 1.0])).tolist() == [True, False]
        for p in params.values():
            p.add_(1.0)
        # network 1 saved its +1 point at the last check; a jump now brings it back there
        assert step._backtrack(torch.tensor([1.0, 100.0])).tolist() == [False, True]
    for name, p in params.items():
        torch.testing.assert_close(p[0], before[name][0] + 1, rtol=0, atol=0)  # network 0 restored, then stepped
        torch.testing.assert_close(p[1], before[name][1] + 1, rtol=0, atol=0)  # network 1 back to its saved point
    state = step.backtracking_state
    assert state.last_loss.tolist() == [1.0, 1.0] and state.accepted.tolist() == [3, 3]


def test_restore_of_a_list_buckets_sizes_and_keeps_the_order(np_rng):
    xs = [random_image(np_rng, 12, 12), random_image(np_rng, 10, 14), random_image(np_rng, 12, 12)]
    rs = dipfast.restore(xs, iters=3, backend="native", precision="fp32", **FAST)
    assert isinstance(rs, list) and [r.image.shape for r in rs] == [x.shape for x in xs]
    alone = dipfast.restore(xs[2], iters=3, backend="native", precision="fp32", **FAST)
    np.testing.assert_allclose(rs[2].image, alone.image, atol=1e-4)


def test_restarts_average_the_fits_of_consecutive_seeds(np_rng):
    x, t = random_image(np_rng, 12, 12), random_image(np_rng, 12, 12)
    kw = dict(iters=4, target=t, backend="native", precision="fp32", **FAST)
    both = dipfast.restore(x, restarts=2, **kw)
    runs = [dipfast.restore(x, seed=s, **kw) for s in (0, 1)]
    np.testing.assert_allclose(both.image, (runs[0].image + runs[1].image) / 2, atol=1e-4)
    assert [e["seed"] for e in both.extras["restarts"]] == [0, 1]
    assert both.extras["restarts"][1]["psnr"] == pytest.approx(runs[1].history[-1].psnr, abs=1e-3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_restarts_must_be_a_positive_integer(np_rng, bad):
    with pytest.raises(InputError, match="restarts must be a positive integer"):
        dipfast.restore(random_image(np_rng, 8, 8), iters=1, restarts=bad, **FAST)


def test_per_image_lists_must_match_the_batch(np_rng):
    xs = [random_image(np_rng, 8, 8)] * 2
    with pytest.raises(InputError, match="target is a list of 3 for 2 images"):
        dipfast.restore(xs, iters=1, target=[xs[0]] * 3, **FAST)
    with pytest.raises(InputError, match="empty list"):
        dipfast.restore([], iters=1, **FAST)


# ---------------------------------------------------------------------------------------------
# the NaN guard


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_nan_loss_stops_the_run_with_a_clear_error(np_rng, backend):
    calls = []

    def loss(x):  # finite for four iterations, then NaN (a diverging fit, as compiled bf16 once did)
        calls.append(1)
        mse = (x - 0.5).square().mean()
        return mse if len(calls) <= 4 else mse * math.nan

    # On the CPU: a CUDA graph would replay the loss's tensor ops without calling it, so `calls` would stop counting.
    with pytest.raises(NumericalError, match=f"loss became nan at iteration 5 with backend='{backend}'") as e:
        dipfast.restore(random_image(np_rng, 8, 8), "custom", loss=loss, iters=10, backend=backend,
                        precision="fp32", report_every=2, device="cpu", **FAST)  # fmt: skip
    assert "precision='fp32' or backend='reference'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_nan_from_the_loss_tensors_stops_the_run_on_any_device(np_rng, backend):
    """The same guard where the NaN comes from tensor ops (a counter the loss bumps in place), which a CUDA graph
    replays: on a GPU this is the fast backends' CUDA-graph path; on a CPU, the same as above."""
    state = {}

    def loss(x):
        count = state.setdefault("count", torch.zeros((), device=x.device))
        count.add_(1)
        return (x - 0.5).square().mean() * torch.where(count > 4, math.nan, 1.0)

    with pytest.raises(NumericalError, match=f"loss became nan at iteration 5 with backend='{backend}'"):
        dipfast.restore(random_image(np_rng, 8, 8), "custom", loss=loss, iters=10, backend=backend,
                        precision="fp32", report_every=2, **FAST)  # fmt: skip


def test_the_command_reports_a_numerical_error_in_one_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from dipfast import cli

    src = tmp_path / "in.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(src)

    def diverge(*args, **kwargs):
        raise NumericalError("the loss became nan at iteration 3 with backend='native', precision='bf16'")

    monkeypatch.setattr(dipfast, "restore", diverge)  # what the command calls
    assert cli.main(["restore", str(src), "-o", str(tmp_path / "out.png")]) == cli.EXIT_NUMERICAL
    err = capsys.readouterr().err.strip()
    assert err.startswith("dipfast: error: the loss became nan") and "\n" not in err
    assert not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------------------------------------
# the memory estimate


def test_memory_estimate_grows_with_networks_and_pixels():
    net = PRESETS["denoise"].net
    one = memory.estimate_bytes(net, 32, 3, (64, 64), 1, "fp32")
    fixed = memory.FIXED["cpu"]
    assert memory.estimate_bytes(net, 32, 3, (64, 64), 4, "fp32") - fixed == pytest.approx(4 * (one - fixed), rel=1e-6)
    big = memory.estimate_bytes(net, 32, 3, (256, 256), 1, "fp32")
    params = 2_217_831 * 4
    per_pixel = (big - fixed - 7.5 * params) / (one - fixed - 7.5 * params)
    assert one - fixed > 5 * params and 8 < per_pixel < 17  # activations grow with the pixels
    assert memory.estimate_bytes(net, 32, 3, (256, 256), 1, "bf16") < big


_MEASURE_PEAK = """
import dataclasses, torch
from dipfast import backends, engine, memory
from dipfast.bench.memory import PeakMemory
from dipfast.presets import PRESETS
cpu = torch.device("cpu")
preset = dataclasses.replace(PRESETS["denoise"], iterations=2)
problem = engine.Problem((32, 96, 96), None, (96, 96), 3, y=torch.rand(1, 3, 96, 96))
with PeakMemory(cpu) as peak:
    engine.fit(problem, preset, device=cpu, progress=False, plan=backends.resolve("native", "fp32", cpu))
print(peak.result()["growth_mib"], memory.estimate_bytes(preset.net, 32, 3, (96, 96), 1, "fp32") / 2**20)
"""


def test_memory_estimate_bounds_the_measured_peak():
    """On the CPU a fit's growth of the resident set, measured in a fresh process (in this one the
    allocator reuses what earlier tests freed), lies below the estimate and above a fifth of it.
    Measured: 313 MiB against an estimate of 437 (181 for the fit, 256 fixed)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MEASURE_PEAK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth, estimate = proc.stdout.split()[-2:]
    if growth == "None":
        pytest.skip("no per-block peak RSS on this platform (needs Linux /proc/self/clear_refs)")
    growth, estimate = float(growth), float(estimate)
    assert estimate / 5 < growth < estimate, (growth, estimate)


def test_a_fit_that_cannot_fit_is_refused_before_it_starts(np_rng, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    with pytest.raises(InputError, match=r"needs about .* GiB \(2 network\(s\) at 12 x 12, fp32\)") as e:
        dipfast.restore([random_image(np_rng, 12, 12)] * 2, iters=1, backend="native", precision="fp32", **FAST)
    assert "fewer images" in str(e.value) and "precision='bf16'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# CUDA: the captured step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the whole step as one CUDA graph")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_is_captured_once_and_replays_the_eager_step(precision):
    cuda = torch.device("cuda")
    rng = torch.Generator().manual_seed(0)
    problem = random_problem(rng, 64, 64)
    # no input noise: graph-replayed and eager draws need not be one stream (the rest must agree)
    preset = dataclasses.replace(PRESET, iterations=12, reg_noise_std=0.0)
    plan = backends.resolve("native", precision, cuda)
    built, zs = fast_step.build_nets([problem], preset, [0])
    step = fast_step.FastStep(built, zs, [problem], preset, cuda, [0], 12, plan)
    eager_plan = dataclasses.replace(plan, cuda_graph=False)
    built2, zs2 = fast_step.build_nets([problem], preset, [0])
    eager = fast_step.FastStep(built2, zs2, [problem], preset, cuda, [0], 12, eager_plan)
    with engine.ieee_fp32():
        for _ in range(12):
            step()
            eager()
    torch.cuda.synchronize()
    assert step.graphed.captures == 1 and step.graphed.graph is not None
    assert step.warmup_seconds > 0 and step.capture_seconds > 0
    # the same kernels in the same order, replayed: equal up to cuDNN's choice of algorithm
    tol = 1e-4 if precision == "fp32" else 2e-2
    torch.testing.assert_close(step.metrics[:, 0, 0], eager.metrics[:, 0, 0], rtol=tol, atol=0)
    torch.testing.assert_close(step.ema, eager.ema, rtol=0, atol=tol)


@pytest.mark.parametrize("parallel_compile", [False, True], ids=["plain", "compiling-first"])
def test_a_step_and_its_cuda_graph_go_with_the_steps_last_reference(rng, parallel_compile):
    """The graph calls back into its step through weak references: strong ones made the two a reference cycle, which
    kept a finished fit's graph, its memory pool and the step's state until a full garbage collection. Built with the
    CUDA plan on the CPU (GraphedStep's constructor touches no device), the garbage collector off."""
    problem = random_problem(rng)
    plan = dataclasses.replace(_plan("native"), cuda_graph=True)
    with backends.variant("native", parallel_compile=frozenset({"cpu"} if parallel_compile else ())):
        built, zs = fast_step.build_nets([problem], PRESET, [0])
        step = fast_step.FastStep(built, zs, [problem], PRESET, CPU, [0], 4, plan)
    assert step.graphed is not None and (step.graphed.before_first is not None) == parallel_compile
    gone = weakref.ref(step)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del step
        assert gone() is None
    finally:
        if enabled:
            gc.enable()


def test_the_final_forward_lets_the_cuda_graph_go_and_saves_nothing(rng):
    """After the loop the graph's memory pool (a whole step's activations) would sit beside the final forward's memory,
    which the estimate does not count twice: the graph goes first. An eager generator runs it under no_grad (nothing
    saved for a backward that never comes), with the same output. Built with the CUDA plan on the CPU."""
    problem = random_problem(rng)
    plan = dataclasses.replace(_plan("native"), cuda_graph=True)
    built, zs = fast_step.build_nets([problem], PRESET, [0])
    step = fast_step.FastStep(built, zs, [problem], PRESET, CPU, [0], 4, plan)
    step.graphed.graph = "captured"  # as after the capture
    runner, grad_modes = step.runner, []

    def recording(z):
        grad_modes.append(torch.is_grad_enabled())
        return runner(z)

    step.runner = recording
    out = step.final_output()
    assert step.graphed.graph is None and grad_modes == [False]
    with torch.enable_grad():
        assert torch.equal(out, runner(step.net_input).detach())


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


LAUNCH_VARIANTS = [  # (Backend field, what it needs)
    pytest.param("dependent_launch", marks=pytest.mark.skipif(not _hopper(), reason="CUDA on Hopper or later: PDL")),
    pytest.param("folded_finalize", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")),
]


@pytest.mark.parametrize("field", LAUNCH_VARIANTS)
def test_a_launch_variant_replays_in_the_cuda_graph_as_the_plain_step(field):
    """native-pdl's kernels, each waiting at its first instruction for the kernel before it, and
    native-folded-finalize's, each BatchNorm finalized by its reduction's last program (an atomic count, read and
    reset inside the graph at every replay), captured in the step's CUDA graph: the same fit as native's step."""
    cuda = torch.device("cuda")
    rng = torch.Generator().manual_seed(0)
    problem = random_problem(rng, 64, 64)
    preset = dataclasses.replace(PRESET, iterations=12, reg_noise_std=0.0)
    steps = []
    for on in (False, True):
        # the plan reads the backend's table when asked: the step is built inside the variant
        with backends.variant("native", **{field: frozenset({"cuda"} if on else ())}):
            plan = backends.resolve("native", "bf16", cuda)
            assert getattr(plan, field)(cuda) == on
            built, zs = fast_step.build_nets([problem], preset, [0])
            steps.append(fast_step.FastStep(built, zs, [problem], preset, cuda, [0], 12, plan))
    assert len(steps[1].launch_switches) == 1 and not steps[0].launch_switches
    with engine.ieee_fp32():
        for _ in range(12):
            for step in steps:
                step()
    torch.cuda.synchronize()
    plain, variant = steps
    assert variant.graphed.captures == 1 and variant.graphed.graph is not None
    # the same kernels in the same order: equal up to cuDNN's choice of algorithm (the replay test's bound)
    torch.testing.assert_close(variant.metrics[:, 0, 0], plain.metrics[:, 0, 0], rtol=2e-2, atol=0)
    torch.testing.assert_close(variant.ema, plain.ema, rtol=0, atol=2e-2)


def test_the_result_reports_the_cold_start(np_rng):
    image = random_image(np_rng, 8, 8)
    start = time.perf_counter()
    r = dipfast.restore(image, iters=3, backend="native", precision="fp32", **FAST)
    wall = time.perf_counter() - start
    # its parts in order: restore()'s preparation, then the fit's set-up, which its first step includes
    assert 0 < r.extras["setup_seconds"] < r.extras["first_step_seconds"] <= r.seconds
    assert 0 < r.extras["prepare_seconds"] and r.extras["prepare_seconds"] + r.seconds <= wall
    assert "warmup_seconds" not in r.extras and "capture_seconds" not in r.extras  # no CUDA graph on the CPU


@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_tf32_reaches_the_backward_and_keeps_the_cudnn_benchmark(monkeypatch, precision):
    """The whole fast step runs under the plan's TF32 switches, its backward too (the H200 profile showed the
    tf32 step's backward convolutions in IEEE fp32), and they leave cudnn.benchmark as the step finds it (the
    CUDA graph's warm-up turns it on). The flags are read where the backward runs; a CPU has them too."""
    seen = []
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    plan = _plan("native", precision)
    problem = engine.Problem(input_shape=(4, 12, 10), z=None, out_size=(12, 10), n_channels=3,
                             y=torch.rand(1, 3, 12, 10), target=None)  # fmt: skip
    preset = dataclasses.replace(PRESETS["denoise"], net=TINY_NET, input_depth=4)
    built, zs = fast_step.build_nets([problem], preset, [0])
    step = fast_step.FastStep(built, zs, [problem], preset, CPU, [0], 4, plan)
    losses = step._losses

    def hooked(out):
        out.register_hook(lambda grad: seen.append(_flags()))
        return losses(out)

    monkeypatch.setattr(step, "_losses", hooked)
    with engine.ieee_fp32(cudnn_benchmark=True):  # what the fit loop and the graph's warm-up set around a step
        step()
        after = _flags()
    tf32 = precision == "tf32"
    assert seen == [(tf32, tf32, True)]
    assert after == (False, False, True)


def _flags() -> tuple[bool, bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
