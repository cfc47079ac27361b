"""The native CUDA step's Triton kernels touch no memory outside their tensors (tests/parity/_memory_bounds.py).

A whole step as CUDA runs it (the padded BatchNorm kernels, the upsample's gathers, the fused rules with early
stopping, two networks vmapped into groups), in Triton's interpreter with every access checked against the launch's
tensors, at odd sizes, so that the reductions' last programs have rows to spare. Reads past a tensor's end compute
nothing wrong (a mask discards them), so parity tests cannot see them; on a GPU they fault where they reach unmapped
memory, and compute-sanitizer flags each. The same runs, and those of the triton backend's step, hold every launch to
no conflict between its programs (_program_order.memory_conflicts: the interpreter runs them one after another, the
GPU concurrently), but where the finalize is folded into the last program, which reads what the others wrote by
design (an arrival count orders it: tests/parity/test_folded_finalize.py).
"""

import contextlib
import dataclasses
import functools

import pytest
import torch
from _cuda_step import CPU, gpu_tiles, native_cuda_steps, problems_at_odd_sizes
from _helpers import TINY_PRESET
from _memory_bounds import memory_bounds
from _program_order import memory_conflicts

from dipfast import backends, fast_step
from dipfast.kernels import lanczos2 as lanczos2_module

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(torch.cuda.is_available(), reason="an instrument of Triton's interpreter: the CPU"),
]


@functools.cache
def _past_the_end():
    """A kernel whose unmasked load reads BLOCK elements of an x that may be shorter (built on first use, when the
    parity conftest has TRITON_INTERPRET set)."""
    import triton
    import triton.language as tl

    @triton.jit
    def past_the_end(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs), mask=offs < n)

    return past_the_end


def test_the_instrument_flags_an_access_past_a_tensor(monkeypatch):
    x, out = torch.rand(5), torch.zeros(5)
    with memory_bounds(monkeypatch):
        with pytest.raises(AssertionError, match=r"past_the_end: accesses outside its tensors: \[\('load', 3, "):
            _past_the_end()[(1,)](x, out, 5, BLOCK=8)
        longer = torch.rand(8)
        _past_the_end()[(1,)](longer, out, 5, BLOCK=8)  # inside: an x of 8 elements
        assert torch.equal(out, longer[:5])
        # past x into the launch's other tensor: x and out are views of one storage, so every lane is inside it
        buffer = torch.rand(10)
        with pytest.raises(
            AssertionError, match=r"past_the_end: accesses outside its tensors: \[\('load across tensors', 8, "
        ):
            _past_the_end()[(1,)](buffer[:5], buffer[5:], 5, BLOCK=8)


@pytest.mark.parametrize(
    "folded, as_captured", [(False, False), (True, False), (False, True)],
    ids=["finalize-launch", "folded-finalize", "gpu-tiles-captured"],
)  # fmt: skip
def test_the_cuda_steps_kernels_stay_inside_their_tensors(monkeypatch, folded, as_captured):
    """gpu-tiles-captured: the tiles a GPU runs (configs.HOPPER: planes of BLOCK_W 256 x BLOCK_C 4, not the
    interpreter's 8 x 16: other last programs, other masked tails), the captured step's graph-safe branches, three
    networks, and the final forward after the loop."""
    conflicts = contextlib.nullcontext([]) if folded else memory_conflicts(monkeypatch)
    with native_cuda_steps(3 if as_captured else 2, folded=folded, as_captured=as_captured) as make:
        step = make()
        with memory_bounds(monkeypatch), conflicts as launches:
            step()
            step()  # the window's second slot, the EMA past its first iteration
            if as_captured:
                assert torch.isfinite(step.final_output()).all()
    assert folded or len({launch.kernel for launch in launches}) >= 8  # BatchNorm passes, upsample, fused rules


@pytest.mark.parametrize(
    "precision, as_captured, sr", [("bf16", False, False), ("bf16", True, False), ("tf32", True, False),
                                   ("bf16", True, True)],
    ids=["bf16-channels-last", "bf16-gpu-tiles-captured", "tf32-gpu-tiles-captured", "sr-bf16-gpu-tiles-captured"],
)  # fmt: skip
def test_the_triton_backends_kernels_stay_inside_their_tensors(monkeypatch, precision, as_captured, sr):
    """The triton backend's eager step as CUDA runs it: the fused conv blocks' GEMMs, the merges, the folds of the
    input gradients. bf16-channels-last: one network at a time, channels_last. *-gpu-tiles-captured: the tiles a GPU
    runs (configs.HOPPER: 128 x 128 GEMM tiles, not the interpreter's 64 x 16), two networks vmapped (NCHW, as
    grouped convolutions stay), the captured step's graph-safe branches and the final forward; sr-*: with
    super-resolution's fused Lanczos2 decimation + MSE loss, which no GPU has run. (Measured too, not kept, for the
    time it takes in the interpreter: fp32, inside.)"""
    problems = problems_at_odd_sizes(sr=sr)
    vectorised = frozenset({"cpu", "cuda"} if as_captured else ())
    choices = dict(channels_last_bf16=frozenset({"cpu", "cuda"}), vectorised=vectorised)
    with gpu_tiles(as_captured), backends.variant("triton", **choices):
        plan = dataclasses.replace(backends.resolve("triton", precision, CPU), compile=False)
        built, zs = fast_step.build_nets(problems, TINY_PRESET, [1, 2])
        step = fast_step.FastStep(built, zs, problems, TINY_PRESET, CPU, [1, 2], 2, plan, graph_safe=as_captured)
        assert step.runner.vectorised == as_captured and step.runner.channels_last == (not as_captured)
        fused_losses = []
        real = lanczos2_module._lanczos2_mse_fwd
        monkeypatch.setattr(lanczos2_module, "_lanczos2_mse_fwd", lambda *a: fused_losses.append(1) or real(*a))
        with memory_bounds(monkeypatch), memory_conflicts(monkeypatch) as launches:
            step()
            step()
            if as_captured:
                assert torch.isfinite(step.final_output()).all()
        assert bool(fused_losses) == sr
    assert {"_conv_dgrad_kernel", "_bn_lrelu_bwd_kernel"} <= {launch.kernel for launch in launches}
