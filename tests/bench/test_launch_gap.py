"""bench/launch_gap.py: chains of dependent launches, each of which must count (on CUDA: what a launch costs in a
CUDA graph, with and without programmatic dependent launch)."""

from __future__ import annotations

import json

import pytest

from dipfast.kernels.batch_norm_act import _HAS_TRITON, _INTERPRET

from ._suites import bench_script

pytestmark = pytest.mark.skipif(not (_HAS_TRITON and _INTERPRET), reason="runs the chains in Triton's interpreter")


@pytest.fixture(scope="module")
def tool():
    return bench_script("launch_gap")


def test_every_chain_counts_each_of_its_launches(tool, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tool.main(["--device", "cpu", "--launches", "3", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "launch_gap.json").read_text())
    rows = report["rows"]
    assert [(r["kind"], r["programs"], r["pdl"]) for r in rows] == [("triton", 1, False), ("triton", 4, False),
                                                                     ("aten", 4, False)]  # fmt: skip
    assert all(r["every_launch_counted"] and r["us_per_launch"] > 0 for r in rows)
    assert "| triton | 4 | no |" in (tmp_path / "launch_gap.md").read_text()


def test_a_lost_launch_fails_the_run(tool, tmp_path, monkeypatch):
    """A chain whose last launch never lands (as a dependent launch that read its buffer too early would lose it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chain = tool._chain
    monkeypatch.setattr(tool, "_chain", lambda kind, x, launches, pdl: chain(kind, x, launches - 1, pdl))
    assert tool.main(["--device", "cpu", "--launches", "3", "--repeats", "1", "--out", str(tmp_path)]) == 1
    assert "**no**" in (tmp_path / "launch_gap.md").read_text()


def test_a_chain_that_fails_is_a_row_and_the_others_still_run(tool, tmp_path, monkeypatch):
    """A GPU whose driver cannot capture a dependent launch must not cost the other rows of the window's step."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    measure = tool.measure

    def aten_fails(kind, *args):
        if kind == "aten":
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return measure(kind, *args)

    monkeypatch.setattr(tool, "measure", aten_fails)
    assert tool.main(["--device", "cpu", "--launches", "2", "--repeats", "1", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "launch_gap.json").read_text())["rows"]
    assert [r.get("every_launch_counted") for r in rows] == [True, True, None]
    assert rows[-1]["error"] == "operation not permitted when stream is capturing"
    assert "| aten | 4 | no | failed: operation not permitted" in (tmp_path / "launch_gap.md").read_text()
