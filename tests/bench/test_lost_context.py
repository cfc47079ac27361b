"""dipfast.bench.lost_context: after a CUDA error that poisons a process, the run goes on in a fresh one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dipfast.bench import lost_context, profile, throughput
from dipfast.bench.throughput import run_throughput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [("native", "fp32"), ("original-loop", "fp32"), ("native", "bf16")]
TINY = dict(net="tiny", iters=1, repeats=2, warmup=1, device="cpu", progress=False)


def _broken_first(monkeypatch):
    """The first configuration fails with a sticky CUDA error (as the device would report it); the configurations
    this process measures are recorded."""
    measured_here = []
    measure = throughput.measure

    def failing(config, *args, **kwargs):
        measured_here.append((config.method, config.precision))
        if (config.method, config.precision) == PAIRS[0]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")
        return measure(config, *args, **kwargs)

    monkeypatch.setattr(throughput, "measure", failing)
    monkeypatch.setattr(lost_context, "context_lost", lambda device: True)
    return measured_here


def test_after_a_lost_context_the_rest_run_in_a_fresh_process(monkeypatch):
    measured_here = _broken_first(monkeypatch)
    partials = []
    rep = run_throughput([], [], [1], [16], pairs=PAIRS, on_partial=partials.append, **TINY)

    assert measured_here == [PAIRS[0]]  # nothing after the error ran in this process
    rows = rep["rows"]
    assert [r["status"] for r in rows] == ["error", "ok", "ok"]
    assert rows[0]["reason"].startswith("RuntimeError: CUDA error: an illegal memory access was encountered (")
    assert lost_context.NOTE in rows[0]["reason"]
    for r in rows[1:]:  # measured there as here: the repeats' samples, the memory of its fit
        assert len(r["its_samples"]) == 2 and r["its_median"] > 0 and r["peak_memory_mib"] > 0
    assert rows[1]["ratio_vs_original_loop"] == 1.0 and rows[2]["ratio_vs_original_loop"] > 0
    # the partial reports kept up with the fresh process: the error's row at once, then more rows finished each time
    statuses = [[r["status"] for r in p["rows"]] for p in partials]
    assert statuses[0] == ["error", "pending", "pending"] and partials[-1]["rows"] == rows
    finished = [sum(s != "pending" for s in row) for row in statuses]
    assert finished == sorted(set(finished))


def test_a_fresh_process_that_dies_leaves_rows_that_say_so(monkeypatch):
    _broken_first(monkeypatch)
    monkeypatch.setattr(lost_context, "_command", lambda module, job: [sys.executable, "-c", "import sys; sys.exit(3)"])
    rep = run_throughput([], [], [1], [16], pairs=PAIRS, **TINY)
    assert [r["status"] for r in rep["rows"]] == ["error"] * 3
    for r in rep["rows"][1:]:
        assert "fresh process after a lost CUDA context ended (exit 3)" in r["reason"]


def test_a_cpu_run_never_hands_over():
    assert not lost_context.context_lost("cpu") and not lost_context.context_lost(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: a real sticky error, in a process of its own")
def test_an_illegal_address_is_a_lost_context_and_out_of_memory_is_not():
    script = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from dipfast.bench.lost_context import context_lost

        @triton.jit
        def store_far_away(ptr):
            tl.store(ptr + (1 << 40), 1.0)

        try:
            torch.empty(1 << 50, device="cuda")
        except torch.OutOfMemoryError:
            pass
        assert not context_lost("cuda"), "out of memory lost the context"
        x = torch.zeros(1, device="cuda")
        store_far_away[(1,)](x)
        assert context_lost("cuda"), "an illegal address left the context usable"
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_an_xdist_worker_whose_cuda_context_is_lost_is_replaced(tmp_path):
    """tests/_cuda_worker.py under pytest-xdist, with the CUDA context's state stood in for (no GPU needed): the
    worker ends after the test that lost it, and the tests after it run in a fresh worker."""
    pytest.importorskip("xdist")
    (tmp_path / "test_sticky.py").write_text(
        textwrap.dedent(
            """
            import torch
            from dipfast.bench import lost_context

            def test_breaks_the_context():
                torch.cuda.is_initialized = lambda: True
                lost_context.context_lost = lambda device: True

            def test_after_it():  # in a fresh worker: the stand-ins are gone
                assert not torch.cuda.is_initialized()
            """
        )
    )
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "_cuda_worker", "-n", "1", "-p", "no:cacheprovider", "-rA", "-q",
         "-p", "no:randomly", str(tmp_path / "test_sticky.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "worker 'gw0' crashed while running 'test_sticky.py::test_breaks_the_context'" in out, out[-3000:]
    assert "PASSED test_sticky.py::test_after_it" in out, out[-3000:]


def test_profile_after_a_lost_context_profiles_the_rest_in_a_fresh_process(monkeypatch):
    profiled_here = []
    profile_one = profile.profile_one

    def failing(method, precision, **kwargs):
        profiled_here.append((method, precision))
        if (method, precision) == ("native", "fp32"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return profile_one(method, precision, **kwargs)

    monkeypatch.setattr(profile, "profile_one", failing)
    monkeypatch.setattr(lost_context, "context_lost", lambda device: True)
    seen = []
    pairs = [("native", "fp32"), ("reference", "fp32"), ("native", "bf16")]
    rep = profile.run_profile([], [], pairs=pairs, size=16, net="tiny", iters=2, warmup=1, device="cpu",
                              progress=False, on_entry=lambda entries: seen.append(len(entries)))  # fmt: skip
    assert profiled_here == [("native", "fp32")]
    assert [(e["method"], e["precision"]) for e in rep["entries"]] == pairs
    assert [e["status"] for e in rep["entries"]] == ["error", "ok", "ok"]
    assert lost_context.NOTE in rep["entries"][0]["reason"]
    assert all(e["ops"] and e["total_ms_per_iter"] > 0 for e in rep["entries"][1:])
    assert seen[0] == 1 and seen[-1] == 3 and seen == sorted(seen)


def test_profile_whose_fresh_process_dies_says_so(monkeypatch):
    def failing(method, precision, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(profile, "profile_one", failing)
    monkeypatch.setattr(lost_context, "context_lost", lambda device: True)
    monkeypatch.setattr(lost_context, "_command", lambda module, job: [sys.executable, "-c", "import sys; sys.exit(4)"])
    rep = profile.run_profile([], [], pairs=[("native", "fp32"), ("reference", "fp32")], size=16, net="tiny",
                              iters=2, warmup=1, device="cpu", progress=False)  # fmt: skip
    assert [e["status"] for e in rep["entries"]] == ["error", "error"]
    assert "fresh process after a lost CUDA context ended (exit 4)" in rep["entries"][1]["reason"]
