"""bench/ops: the op micro-benchmarks are left out of the default test run, and each of them runs.

What `python -m pytest bench/ops --benchmark-disable` does, done here directly: every case a benchmark file
parametrizes (less those its skip marks skip on this machine) runs once, through a stand-in for
pytest-benchmark's `benchmark` fixture that calls the timed function one time.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "bench" / "ops"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path: Path):
    if str(OPS) not in sys.path:  # as pytest's rootdir-less import puts it, for their shared cuda_timing
        sys.path.insert(0, str(OPS))
    spec = importlib.util.spec_from_file_location(f"bench_ops_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Once:
    """pytest-benchmark's fixture under --benchmark-disable: the function runs once, nothing is timed."""

    stats = None

    def __init__(self):
        self.extra_info, self.group = {}, None

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _marks(obj) -> list:
    marks = getattr(obj, "pytestmark", [])
    return list(marks) if isinstance(marks, (list, tuple)) else [marks]


def _cases(module, fn) -> list[dict]:
    """The keyword arguments of each case fn's parametrize marks make; [] where a skip mark applies here."""
    if any(m.name == "skipif" and m.args[0] for m in _marks(module) + _marks(fn)):
        return []
    axes = []
    for m in _marks(fn):
        if m.name == "parametrize":
            names = m.args[0] if isinstance(m.args[0], (list, tuple)) else [n.strip() for n in m.args[0].split(",")]
            axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in m.args[1]])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def test_the_default_run_leaves_the_op_benchmarks_out_and_their_folder_collects_them(monkeypatch, pytestconfig):
    assert pytestconfig.getini("testpaths") == ["tests"]  # pyproject's: bench/ops is outside, collected when named
    conftest = _load(OPS / "conftest.py")
    monkeypatch.setattr(pytest.Module, "from_parent", classmethod(lambda cls, parent, path: path))
    parent = SimpleNamespace(session=SimpleNamespace(isinitpath=lambda path: False))
    collected = {p.name for p in OPS.iterdir() if conftest.pytest_collect_file(p, parent) is not None}
    assert {"bench_conv_bn_lrelu.py", "bench_lanczos2.py", "bench_adam.py", "bench_native_ops.py"} <= collected
    assert "conftest.py" not in collected and "tune_conv_bn_lrelu.py" not in collected


def test_every_op_benchmark_runs_once_on_this_machine():
    ran = {}
    for path in sorted(OPS.glob("bench_*.py")):
        module = _load(path)
        tests = [fn for name, fn in vars(module).items() if name.startswith("test_") and inspect.isfunction(fn)]
        assert tests, path.name
        for fn in tests:
            wanted = inspect.signature(fn).parameters
            for case in _cases(module, fn):
                torch.manual_seed(0)
                fixtures = {"benchmark": _Once(), "rng": torch.Generator().manual_seed(0)}
                fn(**{k: v for k, v in fixtures.items() if k in wanted}, **case)
                ran[path.name] = ran.get(path.name, 0) + 1
        sys.modules.pop(f"bench_ops_{path.stem}", None)
    # the CPU cases of each file ran (CUDA-only ones skip here), and the native ops' where the extension is built
    assert {"bench_adam.py", "bench_batch_norm_act.py", "bench_conv_bn_lrelu.py", "bench_lanczos2.py"} <= set(ran)
