"""dipfast.bench.throughput: the throughput suite's report, its refusals, --configs and partial reports."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from dipfast import memory
from dipfast.bench import runs
from dipfast.bench.cli import main
from dipfast.bench.throughput import run_throughput

from ._suites import METHODS, PRECISIONS, TINY, check_header, is_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def throughput_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    rc = main(
        ["throughput", *TINY, "--batch", "1", "2", "--iters", "2", "--repeats", "3", "--warmup", "2", "--out", str(out)]
    )
    assert rc == 0
    return out, json.loads((out / "throughput.json").read_text())


def test_throughput_json_schema_markdown_and_plot(throughput_report):
    out, rep = throughput_report
    check_header(rep, "throughput")
    s = rep["settings"]
    assert s["sizes"] == [32] and s["batches"] == [1, 2] and s["iters_per_repeat"] == 2 and s["repeats"] == 3
    assert set(s["methods"]) == set(METHODS) and set(s["precisions"]) == set(PRECISIONS)
    rows = rep["rows"]
    assert len(rows) == len(METHODS) * len(PRECISIONS) * 2
    refused = [r for r in rows if r["status"] != "ok"]  # the oracle and the notebook loop are fp32 only
    assert {(r["method"], r["precision"], r["status"]) for r in refused} == {
        ("reference", "bf16", "unsupported"),
        ("original-loop", "bf16", "unsupported"),
    }
    for r in rows:
        if r in refused:
            continue
        assert isinstance(r["its_median"], float) and r["its_median"] > 0
        assert len(r["its_samples"]) == 3
        assert r["its_median"] == pytest.approx(statistics.median(r["its_samples"]))
        assert r["its_min"] <= r["its_median"] <= r["its_max"]
        assert r["ms_per_iter"] == pytest.approx(1000 / r["its_median"])
        assert isinstance(r["peak_memory_mib"], float) and r["peak_memory_mib"] > 0
        assert isinstance(r["memory_kind"], str) and r["memory_kind"].startswith("cpu")
        batched = runs.backend_of(r["method"]) in runs.api.BATCHED_BACKENDS  # native-eager: native's step
        mode = "single" if r["batch"] == 1 else "batched" if batched else "sequential"
        assert r["batch_mode"] == mode
        # the peak after the warm-up where one fit runs, within the fit's; restore()'s estimate beside it
        if mode == "sequential":
            assert r["steady_peak_memory_mib"] is None
        else:
            assert 0 < r["steady_peak_memory_mib"] <= r["peak_memory_mib"]
        if r["method"] in runs.ORIGINAL_LOOPS:
            assert r["memory_estimate_mib"] is None
        else:
            networks = r["batch"] if mode == "batched" else 1
            assert r["memory_estimate_mib"] == pytest.approx(
                memory.estimate_bytes(runs.TINY_NET, 4, 3, (32, 32), networks, r["precision"]) / memory.MIB
            )
        base = next(
            b for b in rows if b["method"] == "original-loop" and b["batch"] == r["batch"] and b["status"] == "ok"
        )
        assert r["ratio_vs_original_loop"] == pytest.approx(r["its_median"] / base["its_median"])
    md = (out / "throughput.md").read_text()
    assert "2 sequential fits" in md and "| 32 | 1 | original-loop | fp32 |" in md and "1.00x" in md
    assert is_png(out / "throughput.png")


def test_throughput_reports_a_refused_precision_in_its_row():
    rep = run_throughput(
        ["reference", "original-loop"],
        ["fp32", "fp5"],
        [1],
        [16],
        net="tiny",
        iters=1,
        repeats=1,
        warmup=1,
        device="cpu",
        progress=False,
    )
    refused = [r for r in rep["rows"] if r["precision"] == "fp5"]
    assert len(refused) == 2 and all(r["status"] == "unsupported" and "fp5" in r["reason"] for r in refused)
    assert all(r["ratio_vs_original_loop"] is None and "its_median" not in r for r in refused)
    from dipfast.bench.report import finish, throughput_markdown

    assert "UNSUPPORTED" in throughput_markdown(finish(rep, "cpu"))


def test_throughput_configs_run_exactly_the_pairs_given_against_both_original_loops(tmp_path, capsys):
    """--configs puts exactly the named paths side by side (a GPU window's table), each row with its ratio to the
    original loop as the paper ran it and as today's PyTorch runs it; each partial report on the way is on disk."""
    args = ["throughput", "--net", "tiny", "--size", "16", "--quiet", "--device", "cpu", "--iters", "1"]
    args += ["--repeats", "1", "--warmup", "1", "--out", str(tmp_path)]
    pairs = ["native-nchw:bf16", "original-loop:fp32", "original-loop-tf32:tf32"]
    assert main([*args, "--configs", *pairs]) == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert [f"{r['method']}:{r['precision']}" for r in rows] == pairs and all(r["status"] == "ok" for r in rows)
    loop, loop_tf32 = rows[1]["its_median"], rows[2]["its_median"]
    for r in rows:
        assert r["ratio_vs_original_loop"] == pytest.approx(r["its_median"] / loop)
        assert r["ratio_vs_original_loop_tf32"] == pytest.approx(r["its_median"] / loop_tf32)
    for bad, message in (
        (["--configs", "native"], "METHOD:PRECISION"),
        (["--configs", "original-loop:bf16"], "original-loop runs precision 'fp32' only"),
        (["--configs", "native:fp5"], "unknown precision 'fp5'"),
        (["--configs", "native:fp32", "--backend", "native"], "either --configs or --backend"),
    ):
        capsys.readouterr()
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err


def test_throughput_hands_over_each_partial_report():
    """A run cut short leaves the figures of every configuration it finished: the rest say 'pending'."""
    partials = []
    pairs = [("native", "fp32"), ("original-loop", "fp32")]
    rep = run_throughput([], [], [1], [16], pairs=pairs, net="tiny", iters=1, repeats=1, warmup=1, device="cpu",
                         progress=False, on_partial=partials.append)  # fmt: skip
    assert [[r["status"] for r in p["rows"]] for p in partials] == [["ok", "pending"], ["ok", "ok"]]
    assert partials[0]["rows"][0]["its_median"] == rep["rows"][0]["its_median"]
    assert partials[-1]["rows"] == rep["rows"] and rep["settings"]["pairs"] == [list(p) for p in pairs]


def test_a_configuration_that_fails_is_a_row_and_the_next_one_runs(monkeypatch):
    """A Triton kernel that fails to compile raises no RuntimeError (triton.CompilationError, OutOfResources): it
    ended the whole run, every later configuration left 'pending'."""
    from dipfast.bench import throughput

    class KernelError(Exception):  # as triton.errors.TritonError: an Exception, not a RuntimeError
        pass

    measure = throughput.measure

    def failing(config, *args, **kwargs):
        if config.method == "native":
            raise KernelError("out of resources: shared memory, required: 262144, hardware limit: 232448")
        return measure(config, *args, **kwargs)

    monkeypatch.setattr(throughput, "measure", failing)
    pairs = [("native", "fp32"), ("original-loop", "fp32")]
    rep = run_throughput([], [], [1], [16], pairs=pairs, net="tiny", iters=1, repeats=1, warmup=1, device="cpu",
                         progress=False)  # fmt: skip
    assert [(r["method"], r["status"]) for r in rep["rows"]] == [("native", "error"), ("original-loop", "ok")]
    assert rep["rows"][0]["reason"].startswith("KernelError: out of resources")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the harness's CUDA clock and memory path")
def test_throughput_on_cuda_reads_cuda_memory_and_names_the_gpu(tmp_path):
    # named configurations: without them the harness runs every method and precision it has, compiled ones included
    configs = ["--configs", "native:bf16", "native:fp32", "original-loop:fp32"]
    args = ["--net", "tiny", "--size", "32", "--quiet", "--device", "cuda", "--batch", "1", "2", *configs]
    assert main(["throughput", *args, "--iters", "2", "--repeats", "2", "--warmup", "2", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "throughput.json").read_text())
    assert rep["machine"]["device"].startswith("cuda") and rep["machine"]["gpu"]
    for r in rep["rows"]:
        assert r["status"] == "ok" and r["its_median"] > 0
        assert r["memory_kind"] == "cuda max_memory_allocated" and r["peak_memory_mib"] > 0
        if r["batch_mode"] != "sequential":  # one fit: its peak after the warm-up
            assert 0 < r["steady_peak_memory_mib"] <= r["peak_memory_mib"]
        assert (r["memory_estimate_mib"] is None) == (r["method"] == "original-loop")
