"""Shared fixtures: every test starts from the same seeds, and randomness comes from `rng`.

Without CUDA the Triton kernels can run only in Triton's interpreter, and triton.jit reads TRITON_INTERPRET
when a kernel module is imported: so they are imported here, before any test module (a test module that
imports triton first, even through torch.utils.flop_counter, would build them for a GPU), under
TRITON_INTERPRET=1, and the environment is restored, so that no other test sees the variable.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
from _cuda_worker import pytest_runtest_teardown  # noqa: F401  (a hook: see _cuda_worker.py)
from _helpers import make_rng, torch_threads

# `make test` runs the suite in one process per core (pytest-xdist): each takes its share of the cores, not all
# of them, so that torch's threads do not contend (tests that need more threads set them themselves)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# cuBLAS needs a fixed workspace for the CUDA tests under deterministic_algorithms() (_helpers.py)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _interpreter_skips_unchecked_overflow_tests():
    """The interpreter builds an int64 overflow test beside every int32 add, sub and mul, and then drops it:
    tl.device_assert checks only under debug, which its options never turn on (a compiled kernel's are dead
    code, removed). Building them took half of the interpreter's time (two iterations of the triton backend on
    the tiny net, profiled: 54 s -> 29 s without them); the kernels compute the same either way."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow") and not options.debug:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import dipfast.kernels  # noqa: F401
    finally:
        if _saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _saved
    _interpreter_skips_unchecked_overflow_tests()


@pytest.fixture
def auto_device_is_the_cpu(monkeypatch):
    """restore()'s device='auto' is the CPU, on a GPU machine too: for the suites whose expectations are CPU
    tensors, the CPU's bit-for-bit reruns and operators with Python-side state, none of which holds for a fit
    on CUDA (its captured step does not re-run Python, and its atomics change the last bits between runs).
    Their CUDA counterparts name device='cuda' (tests/test_cuda_restore.py and the CUDA-only tests)."""
    from dipfast import api

    resolve = api.resolve_device
    monkeypatch.setattr(api, "resolve_device", lambda device: resolve("cpu" if device == "auto" else device))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def np_rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test id."""
    return make_rng(request.node.nodeid)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module (restored afterwards)."""
    with torch_threads(1):
        yield
