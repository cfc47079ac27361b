"""What the suites' tests share: the methods they run on the CPU, tiny arguments, and report checks.

Timings are never asserted (a shared 2-core machine makes them noise); what is asserted is what the
figures mean.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

ROOT = Path(__file__).resolve().parents[2]


def bench_script(name: str) -> ModuleType:
    """bench/<name>.py as a module, loaded with bench/ on sys.path as running the script puts it (its neighbours:
    conv_layouts, step_convs)."""
    folder = str(ROOT / "bench")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


# compile and triton compile the net (tens of seconds on this CPU): tests/test_backends.py covers them
METHODS = ["reference", "native", "native-eager", "original-loop"]
PRECISIONS = ["fp32", "bf16"]
# the harness's meaning, on the CPU
TINY = [
    "--net",
    "tiny",
    "--size",
    "32",
    "--quiet",
    "--device",
    "cpu",
    "--backend",
    *METHODS,
    "--precision",
    *PRECISIONS,
]


def skimage_psnr(ref: np.ndarray, x: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(ref, x, data_range=1))


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_header(rep: dict, suite: str) -> None:
    """The machine and version header every report carries, as on the CPU with one torch thread."""
    assert rep["schema"] == "dipfast-bench/1" and rep["suite"] == suite
    assert isinstance(rep["created"], str) and rep["created"].endswith("+00:00")
    m = rep["machine"]
    for key, kind in (
        ("cpu", str),
        ("torch", str),
        ("python", str),
        ("device", str),
        ("torch_threads", int),
        ("dipfast", str),
    ):
        assert isinstance(m[key], kind), key
    for key in ("triton", "cuda", "gpu", "commit"):
        assert key in m and (m[key] is None or isinstance(m[key], str)), key
    assert m["device"] == "cpu" and m["gpu"] is None
    assert m["torch_threads"] == 1
