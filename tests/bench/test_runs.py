"""dipfast.bench.runs: one fit of a method, its PSNRs against skimage's, the native variants, NVTX phases."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from dipfast import nvtx_ranges
from dipfast.bench import data, runs

from ._suites import skimage_psnr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_native_nchw_runs_the_bf16_step_without_channels_last(monkeypatch, np_rng):
    """The layout switch reaches the fast step (bf16 runs channels_last by default) and is undone afterwards."""
    from dipfast import backends, generator_runner

    cpu = torch.device("cpu")
    layouts = []
    init = generator_runner.GeneratorRunner.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        layouts.append(self.channels_last)

    monkeypatch.setattr(generator_runner.GeneratorRunner, "__init__", recording_init)
    image = np_rng.random((16, 16, 3), dtype=np.float32)
    for method in ("native", "native-nchw"):
        with runs.method_context(method):
            runs.api.restore(image, iters=1, backend=runs.backend_of(method), precision="bf16", device="cpu",
                            progress=False, **runs.net_overrides("tiny", "denoise"))  # fmt: skip
    assert layouts == [True, False]
    assert backends.resolve("native", "bf16", cpu).channels_last(cpu)


def test_native_cl_runs_channels_last_under_bf16_on_cuda_too():
    """CUDA's layout before the H200 run, kept as a variant; resolving needs no GPU, and the table is restored."""
    from dipfast import backends

    cuda = torch.device("cuda")
    plan = backends.Plan("native", "bf16", compile=False, cuda_graph=True)
    assert not plan.channels_last(cuda)
    with runs.method_context("native-cl"):
        assert plan.channels_last(cuda) and runs.backend_of("native-cl") == "native"
    assert not plan.channels_last(cuda)


@pytest.mark.parametrize("method", sorted(runs.FIELD_VARIANTS))
def test_each_field_variant_changes_its_backend_inside_and_restores_it(method):
    from dipfast import backends

    backend = runs.backend_of(method)
    before = backends.BACKEND_TABLE[backend]
    with runs.method_context(method):
        inside = backends.BACKEND_TABLE[backend]
        assert inside != before and inside.name == backend
    assert backends.BACKEND_TABLE[backend] is before


@pytest.mark.parametrize("method", sorted(runs.FIELD_VARIANTS))
def test_a_variants_fields_are_those_it_runs_that_differ_from_its_backend(method):
    """What adopting a variant would set (gpu_quick's headline names it): each field as the variant runs it, none
    that its backend already has."""
    from dipfast import backends

    fields = runs.variant_fields(method)
    backend = runs.backend_of(method)
    before = backends.BACKEND_TABLE[backend]
    assert fields and all(getattr(before, name) != value for name, value in fields.items())
    with runs.method_context(method):
        assert all(getattr(backends.BACKEND_TABLE[backend], name) == value for name, value in fields.items())
    assert runs.variant_fields("native") == runs.variant_fields("native-eager") == {}
    if method == "native-pdl":
        assert fields == {"dependent_launch": frozenset({"cuda"})}


def test_native_runs_the_padded_blocks_on_cuda_and_its_variants_the_rest():
    """The H200 run's choices: native on CUDA runs the padded BatchNorm kernels, NCHW under bf16, unaligned
    channels; the variants time each choice's alternative (resolving needs no GPU)."""
    from dipfast import backends

    cuda = torch.device("cuda")
    plan = backends.Plan("native", "bf16", compile=False, cuda_graph=True)
    assert plan.spec.blocks["cuda"] == "padded" and not plan.channels_last(cuda) and plan.channel_multiple(cuda) == 1
    with runs.method_context("native-reference-blocks"):
        assert plan.spec.blocks == {"cpu": "native", "cuda": "reference"}
    with runs.method_context("native-aligned"):
        assert plan.channel_multiple(cuda) == 8 and plan.spec.blocks["cuda"] == "padded"
    assert plan.spec.blocks["cuda"] == "padded"


@pytest.mark.parametrize("method", ["reference", "original-loop"])
def test_reported_final_psnrs_equal_skimage(method):
    case = data.load_cases(None, ["denoise"], size=32)[0]
    run = runs.run_dip(case, method, iters=5, net="tiny", report_every=5, device="cpu")
    assert run.image.shape == case.target.shape and run.image.dtype == np.float32
    assert run.psnr == pytest.approx(skimage_psnr(case.target, run.image), abs=1e-4)
    assert run.ema_psnr == pytest.approx(skimage_psnr(case.target, run.ema_image), abs=1e-4)


@pytest.mark.parametrize("method, eager", [("native", False), ("native-eager", True)])
def test_native_eager_is_the_native_step_with_the_eager_twins(monkeypatch, method, eager):
    """native-eager runs restore(backend='native') with the C++ ops switched off: the blocks go to
    the eager twins (counted here), and the ops come back on afterwards."""
    from dipfast import native

    batch_norm = importlib.import_module("dipfast.native.batch_norm")  # the module (the package exports a function)
    calls = []
    twin = batch_norm._eager_batch_norm_act
    monkeypatch.setattr(batch_norm, "_eager_batch_norm_act", lambda *a: calls.append(1) or twin(*a))
    case = data.load_cases(None, ["denoise"], size=32)[0]
    run = runs.run_dip(case, method, "bf16", iters=3, net="tiny", report_every=3, device="cpu")
    assert run.method == method and run.extras["backend"] == "native" and run.iterations == 3
    assert bool(calls) == (eager or not native.AVAILABLE)
    assert native.enabled() == native.AVAILABLE


class _Recorder:
    def __init__(self):
        self.events = []

    def annotate(self, name, color=None, domain=None):
        events = self.events

        class _Range:
            def __enter__(self):
                events.append(("push", name, domain))

            def __exit__(self, *exc):
                events.append(("pop", name, domain))

        return _Range()


def test_nvtx_phases_of_both_loops_and_a_no_op_without_nvtx(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(nvtx_ranges, "_lib", rec)
    assert nvtx_ranges.enable()
    try:
        case = data.load_cases(None, ["denoise"], size=32)[0]
        runs.run_dip(case, "reference", iters=2, net="tiny", report_every=2, device="cpu")
        pushed = [name for kind, name, _ in rec.events if kind == "push"]
        one_step = ["noise", "forward", "loss", "backward", "backtracking", "optimizer"]
        assert pushed == one_step * 2 + ["read-back"]
        popped = [name for kind, name, _ in rec.events if kind == "pop"]
        assert popped == pushed  # every range closed, in order
        rec.events.clear()
        runs.run_dip(case, "original-loop", iters=1, net="tiny", device="cpu")
        pushed = [name for kind, name, _ in rec.events if kind == "push"]
        assert pushed == ["noise", "forward", "loss", "backward", "read-back", "optimizer"]
        assert {d for _, _, d in rec.events if d} == {"dipfast"}
    finally:
        nvtx_ranges.enable(False)
    rec.events.clear()
    with nvtx_ranges.phase("forward"):
        pass
    assert rec.events == []
    monkeypatch.setattr(nvtx_ranges, "_lib", None)
    monkeypatch.setitem(sys.modules, "nvtx", None)  # the package missing: import fails
    assert nvtx_ranges.enable() is False
    assert nvtx_ranges.phase("forward") is nvtx_ranges.phase("loss")  # the shared null context
