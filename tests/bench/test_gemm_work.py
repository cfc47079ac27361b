"""bench/gemm_work.py: the tensor-core work the GEMM kernels execute, counted per tl.dot under the interpreter, stays
within a quarter of what the convolutions need at 48 px with Hopper's 128-wide tiles (the rest: the dgrad's padded
border and tiles past the edge). Before the stride-2 dgrad looped over one phase's taps it executed 4.4x its need;
before the merge took its 4 skip channels as flattened (tap, channel) columns, its forward and weight gradient 1.45x
(bench/results/2026-12-05-cpu-gemm-work/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dipfast.kernels.conv_bn_lrelu import _HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not _HAS_TRITON, reason="counts the Triton interpreter's dots")


def test_every_gemm_kernel_executes_at_most_a_quarter_more_than_its_convolution_needs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench/gemm_work.py"), "--size", "48", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gemm_work.json").read_text())["rows"]
    kernels = {(r["op"].split(",")[0].split()[0], r["direction"]) for r in rows}
    directions = {"forward", "input gradient", "weight gradient"}
    assert kernels == {(op, d) for op in ("conv", "merge") for d in directions}, kernels
    assert len(rows) == 9, rows
    for r in rows:
        assert 1.0 <= r["ratio"] <= 1.25, r  # a tile's FLOPs are never fewer than the products it must compute
