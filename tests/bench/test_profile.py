"""dipfast.bench.profile: per-iteration op counts and times per method."""

from __future__ import annotations

import json

import pytest
import torch

from dipfast.bench import runs
from dipfast.bench.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_profile_counts_each_methods_ops_per_iteration(tmp_path, capsys):
    """Per-iteration figures of exactly `iters` profiled iterations: every conv of the tiny net runs its backward
    once per iteration in both methods; the ops are ranked by time and their shares are of one total."""
    from dipfast import nets

    args = ["--net", "tiny", "--size", "16", "--quiet", "--device", "cpu", "--iters", "3", "--warmup", "2"]
    out = ["--out", str(tmp_path)]
    methods = ["--backend", "reference", "native", "--precision", "fp32", "--rows", "50"]
    assert main(["profile", *args, *methods, *out]) == 0
    rep = json.loads((tmp_path / "profile.json").read_text())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in nets.build(runs.TINY_NET, 4, 3).modules())
    assert [(e["method"], e["status"]) for e in rep["entries"]] == [("reference", "ok"), ("native", "ok")]
    for e in rep["entries"]:
        ops = {op["name"]: op for op in e["ops"]}
        assert ops["aten::convolution_backward"]["calls_per_iter"] == convs
        times = [op["ms_per_iter"] for op in e["ops"]]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert 0 < sum(op["share_pct"] for op in e["ops"]) <= 100 + 1e-6
        assert e["time_kind"] == "CPU self time" and e["wall_ms_per_iter"] > 0
    markdown = (tmp_path / "profile.md").read_text()
    assert "### native fp32" in markdown and "aten::convolution_backward" in markdown
    assert main(["profile", *args, "--backend", "original-loop", *out]) == 2
    assert "original loop" in capsys.readouterr().err
