"""dipfast.kernels.parallel_compile and the fast step's pass that uses it (Backend.parallel_compile).

On the CPU: the context turns each @triton.jit launch into a compile on the pool and puts the launch back after; a
compile that failed leaves the kernel's cache for the real launch to compile again; the step's pass leaves nothing
behind (parameters, Adam's state, buffers, gradients, the fit's every value). On CUDA, in a fresh process with an
empty Triton cache: after the pass, the first step compiles none of the generator's kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future

import pytest
import torch
import triton
from _helpers import FAST, TINY_PRESET, random_problem
from triton.runtime import _async_compile
from triton.runtime.jit import JITFunction

import dipfast
from dipfast import backends, fast_step
from dipfast.kernels import parallel_compile

CPU = torch.device("cpu")
PRESET = TINY_PRESET
needs_async_compile = pytest.mark.skipif(not parallel_compile.available(), reason="Triton without AsyncCompileMode")


@needs_async_compile
def test_inside_a_launch_compiles_on_the_pool_instead_of_running(monkeypatch):
    """From any thread: autograd runs a CUDA backward's launches on a thread of its own, which does not inherit the
    caller's context variables (where Triton looks for the async mode)."""
    calls = []

    def run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, warmup, kwargs, _async_compile.active_mode.get()))

    monkeypatch.setattr(JITFunction, "run", run)
    kernel = type("Kernel", (), {"device_caches": {}})()  # what the context reads of a launched kernel
    with parallel_compile.compiling_in_parallel(workers=2):
        mode = _async_compile.active_mode.get()
        assert mode is not None
        JITFunction.run(kernel, 7, grid=(1,), warmup=False, num_warps=4)
        elsewhere = threading.Thread(target=lambda: JITFunction.run(kernel, 8, grid=(1,), warmup=False))
        elsewhere.start()
        elsewhere.join()
    assert calls == [(kernel, (7,), True, {"num_warps": 4}, mode), (kernel, (8,), True, {}, mode)]
    assert _async_compile.active_mode.get() is None
    JITFunction.run(kernel, 7, grid=(1,), warmup=False)  # the launch is the launch again
    assert calls[-1][2] is False and calls[-1][4] is None


def _future(result=None, error=None) -> Future:
    future = Future()
    future.set_exception(error) if error else future.set_result(result)
    return future


@needs_async_compile
def test_a_failed_compile_leaves_the_cache_for_the_launch_to_compile_again():
    """A FutureKernel whose compile raised is taken out of its kernel's cache (else the launch would re-raise the
    stored error instead of compiling); a finished one and a compiled kernel stay."""
    failed = triton.FutureKernel(lambda kernel: None, _future(error=RuntimeError("ptxas died")))
    failed.result(ignore_errors=True)
    done = triton.FutureKernel(lambda kernel: None, _future(result="binary"))
    done.result()
    compiled = object()
    cache = {"failed": failed, "done": done, "compiled": compiled}
    kernel = type("Kernel", (), {"device_caches": {0: (cache, {}, None, None, None)}})()
    parallel_compile._drop_failed([kernel])
    assert cache == {"done": done, "compiled": compiled}


def _step(precision: str, reference_blocks: bool) -> fast_step.FastStep:
    rng = torch.Generator().manual_seed(0)
    problems = [random_problem(rng) for _ in range(2)]
    # the reference blocks: torch's BatchNorm, whose running statistics each forward moves
    blocks = {"cpu": "reference", "cuda": "reference"} if reference_blocks else backends.BACKEND_TABLE["native"].blocks
    with backends.variant("native", blocks=blocks):
        plan = backends.resolve("native", precision, CPU)
        built, zs = fast_step.build_nets(problems, PRESET, [3, 4])
        return fast_step.FastStep(built, zs, problems, PRESET, CPU, [3, 4], 5, plan)


def _state(step: fast_step.FastStep) -> list[torch.Tensor]:
    adam = [t for s in step.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    values = (*step.flat.buffers, *step.runner.buffers.values(), *adam, step.net_input, step.out, step.ema)
    return [t.clone() for t in (*values, step.metrics, step.iteration)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("reference_blocks", [False, True], ids=["native-blocks", "reference-blocks"])
def test_the_steps_compile_pass_leaves_nothing_behind(precision, reference_blocks):
    step = _step(precision, reference_blocks)
    start = [b.clone() for b in step.runner.buffers.values()]
    for _ in range(2):
        step()
    moved = any(not torch.equal(a, b) for a, b in zip(start, step.runner.buffers.values()))
    assert moved == reference_blocks  # a forward moves them there: the pass must put them back
    before = _state(step)
    step._compile_kernels()
    after = _state(step)
    assert all(p.grad is None for p in step.flat.buffers)
    assert len(after) == len(before)
    for a, b in zip(after, before):  # the metrics rows not yet written hold NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_async_compile
def test_a_fit_with_the_compile_pass_is_the_same_fit(monkeypatch):
    """restore() with the pass (native-parallel-compile's field on the CPU too) against without: the same values, bit
    for bit, and the pass ran once, before the first step."""
    passes = []
    original = fast_step.FastStep._compile_kernels
    monkeypatch.setattr(fast_step.FastStep, "_compile_kernels", lambda self: passes.append(1) or original(self))
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(task="denoise", iters=8, seed=2, device="cpu", backend="native", stop="iterations", **FAST)
    plain = dipfast.restore(image, **kwargs)
    with backends.variant("native", parallel_compile=frozenset({"cpu"})):
        passed = dipfast.restore(image, **kwargs)
    assert passes == [1]
    assert torch.equal(torch.as_tensor(passed.image), torch.as_tensor(plain.image))
    assert [h.loss for h in passed.history] == [h.loss for h in plain.history]


_CUDA_SCRIPT = textwrap.dedent(
    """
    import collections, json, dipfast, torch
    from triton.runtime.jit import JITFunction
    from dipfast import backends, fast_step

    compiled, phase = collections.defaultdict(list), ["before"]
    do_compile = JITFunction._do_compile

    def counted(self, *args, **kwargs):
        kernel = do_compile(self, *args, **kwargs)
        compiled[phase[0]].append((self.fn.__module__ + "." + self.fn.__name__, type(kernel).__name__))
        return kernel

    JITFunction._do_compile = counted
    compile_kernels = fast_step.FastStep._compile_kernels

    def marked(self):
        phase[0] = "pass"
        compile_kernels(self)
        phase[0] = "after"

    fast_step.FastStep._compile_kernels = marked
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with backends.variant("native", parallel_compile=frozenset({"cuda"})):
        r = dipfast.restore(image, task="denoise", iters=6, device="cuda", precision="bf16", progress=False,
                            stop="iterations")
    assert torch.isfinite(torch.as_tensor(r.image)).all()
    print(json.dumps(compiled))
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@needs_async_compile
def test_on_cuda_the_first_step_finds_the_generators_kernels_compiled(tmp_path):
    """A fresh process with an empty Triton cache: the pass compiles the generator's kernels (the padded BatchNorm
    passes, the pads, the upsample), and the step's launches compile only the rules after the backward (the pass
    runs the forward and backward alone)."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    done = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    # each compile of the pass went to the pool (a FutureKernel), the backward's too (autograd's own thread)
    assert compiled["pass"] and all(kind == "FutureKernel" for _, kind in compiled["pass"]), compiled
    passed = [name for name, _ in compiled["pass"]]
    assert any("_bwd_" in name for name in passed) and any("batch_norm_act" in name for name in passed), passed
    after = [name for name, _ in compiled.get("after", [])]
    assert not set(after) & set(passed), compiled  # a kernel compiled again: another specialization
    assert not any("batch_norm_act" in name or "reflection_pad" in name or "bilinear" in name for name in after)
