"""The step a CUDA graph captures reads nothing back to the host and makes no tensor from host data.

A host read inside a capture (.item(), bool(tensor), nonzero, a boolean-mask index) fails it with "operation not
permitted when stream is capturing", and a tensor made from Python data inside it (torch.tensor: a host-to-device
copy) too: the first H200 window lost triton x restore (backtracking) at its capture. Only a GPU captures, but every
op the step dispatches can be watched on the CPU: here the step's graph-safe branches (FastStep(graph_safe=True), as
CUDA runs them) on the CUDA choices of each backend, its Triton kernels in the interpreter, under a dispatch mode that
fails on those ops. Adam's step is left out: its capturable form, which the CUDA step uses, runs on CUDA only, and the
CPU's reads its step count back.
"""

import dataclasses
import traceback
from pathlib import Path

import pytest
import torch
from _cuda_step import CPU, problems_at_odd_sizes
from _helpers import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from dipfast import backends, fast_step
from dipfast.early_stop import EarlyStopSpec
from dipfast.presets import PRESETS

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA captures the step itself (tests/test_cuda_restore.py)"),
]

# ops that read a tensor's value on the host, or make a shape from data, or lift host data into a new tensor
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}


class _HostReads(TorchDispatchMode):
    """Records every op of HOST_READS and HOST_DATA, with the package's source lines that called it."""

    def __init__(self):
        super().__init__()
        self.found, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if not self.paused and name in HOST_READS | HOST_DATA:
            ours = [f for f in traceback.extract_stack() if "/dipfast/" in f.filename or "/kernels/" in f.filename]
            self.found.append((name, [f"{Path(f.filename).name}:{f.lineno}" for f in ours][-4:]))
        return func(*args, **(kwargs or {}))


CASES = {
    # backend, precision, preset (denoise's and restore's backtrack), super-resolution, early stopping, networks
    # (vmapped where 2), fields changed from CUDA's (backends.cuda_choices_on_cpu)
    "native-denoise-early-stop": ("native", "bf16", "denoise", False, True, 2, {}),
    "native-unfused-rules-restore": ("native", "tf32", "restore", False, True, 1, dict(fused_rules=frozenset())),
    "native-sr4": ("native", "bf16", "sr4", True, False, 1, {}),
    "triton-restore": ("triton", "bf16", "restore", False, False, 1, {}),
    "triton-sr4-early-stop": ("triton", "bf16", "sr4", True, True, 2, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_captured_step_reads_nothing_back(case):
    backend, precision, preset_name, sr, early_stop, n, changed = CASES[case]
    preset = dataclasses.replace(PRESETS[preset_name], **TINY, iterations=4)
    with backends.variant(backend, **{**backends.cuda_choices_on_cpu(backend), **changed}):
        plan = dataclasses.replace(backends.resolve(backend, precision, CPU), compile=False)  # triton-eager
        problems, seeds = problems_at_odd_sizes(n, sr=sr), list(range(1, n + 1))
        built, zs = fast_step.build_nets(problems, preset, seeds)
        spec = EarlyStopSpec(window=2, patience=2) if early_stop else None
        step = fast_step.FastStep(built, zs, problems, preset, CPU, seeds, 2, plan, graph_safe=True, early_stop=spec)
        assert step.runner.vectorised == (n > 1) and (step.early_stop is not None) == early_stop
        watch = _HostReads()
        optimizer_step = step.optimizer.step

        def unwatched(*args, **kwargs):
            watch.paused = True
            try:
                return optimizer_step(*args, **kwargs)
            finally:
                watch.paused = False

        step.optimizer.step = unwatched
        with watch:
            for _ in range(2 if early_stop else 1):  # early stopping: its window's second slot too
                step._step()
    assert not watch.found, f"the captured step reads the host: {watch.found[:4]}"
