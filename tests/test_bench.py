"""The benchmark harness (dipfast/bench, bench/) on tiny sizes: report schemas, PSNRs against
independent computations, time-to-PSNR's definition, every baseline, the original loop's
parity with the reference engine and the op micro-benchmarks' collection (bench/gpu_quick.sh's CPU
mode: tests/bench/test_gpu_quick.py).

Timings are never asserted (a shared 2-core machine makes them noise); what is asserted is
what the figures mean. One torch thread keeps the CI machine from oversubscribing its cores.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio

from dipfast import nvtx_ranges
from dipfast.bench import baselines, data, quality, runs, time_to_psnr
from dipfast.bench.cli import main
from dipfast.bench.memory import PeakMemory
from dipfast.bench.original_loop import OriginalLoop
from dipfast.bench.throughput import run_throughput
from dipfast.bench.worker import run_cold
from dipfast.operators import lanczos_kernel
from dipfast.presets import Backtracking, apply_overrides
from dipfast.tasks import preset_for

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def throughput_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    rc = main(
        ["throughput", *TINY, "--batch", "1", "2", "--iters", "2", "--repeats", "3", "--warmup", "2", "--out", str(out)]
    )
    assert rc == 0
    return out, json.loads((out / "throughput.json").read_text())


@pytest.fixture(scope="module")
def ttp_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ttp")
    rc = main(
        [
            "time-to-psnr",
            *TINY,
            "--iters",
            "24",
            "--report-every",
            "4",
            "--no-cold",
            "--targets",
            "10",
            "12",
            "14",
            "16",
            "18",
            "20",
            "40",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out, json.loads((out / "time_to_psnr.json").read_text())


@pytest.fixture(scope="module")
def quality_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    rc = main(["quality", *TINY, "--iters", "3", "--tasks", "all", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "quality.json").read_text())


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_header(rep: dict, suite: str) -> None:
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


# ---------------------------------------------------------------- throughput


def test_throughput_json_schema_markdown_and_plot(throughput_report):
    out, rep = throughput_report
    _check_header(rep, "throughput")
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
        base = next(
            b for b in rows if b["method"] == "original-loop" and b["batch"] == r["batch"] and b["status"] == "ok"
        )
        assert r["ratio_vs_original_loop"] == pytest.approx(r["its_median"] / base["its_median"])
    md = (out / "throughput.md").read_text()
    assert "2 sequential fits" in md and "| 32 | 1 | original-loop | fp32 |" in md and "1.00x" in md
    assert _is_png(out / "throughput.png")


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


def test_native_nchw_runs_the_bf16_step_without_channels_last(monkeypatch, np_rng):
    """The layout switch reaches the fast step (bf16 runs channels_last by default) and is undone afterwards."""
    from dipfast import backends, fast_step

    cpu = torch.device("cpu")
    layouts = []
    init = fast_step.FastStep.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        layouts.append(self.runner.channels_last)

    monkeypatch.setattr(fast_step.FastStep, "__init__", recording_init)
    image = np_rng.random((16, 16, 3), dtype=np.float32)
    for method in ("native", "native-nchw"):
        with runs.method_context(method):
            runs.api.restore(image, iters=1, backend=runs.backend_of(method), precision="bf16", device="cpu",
                            progress=False, **runs.net_overrides("tiny", "denoise"))  # fmt: skip
    assert layouts == [True, False]
    assert backends.resolve("native", "bf16", cpu).channels_last


def test_original_loop_tf32_sets_todays_default_and_is_ieee_on_a_cpu():
    """original-loop-tf32 runs the notebooks' code with TF32 convolutions and cudnn.benchmark on; a CPU has no TF32,
    so there it follows the paper's loop bit for bit."""
    case = data.throughput_case(16, 0)
    preset = apply_overrides(preset_for("denoise", "denoise"), runs.net_overrides("tiny", "denoise"))
    trajectories, flags = [], []
    for tf32 in (False, True):
        loop = OriginalLoop("denoise", preset, case.observed, case.target, seed=0, tf32=tf32)
        loop.run(4, lambda done: flags.append((tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)))
        trajectories.append([r.psnr for r in loop.rows])
        loop.close()
    assert trajectories[0] == trajectories[1] and len(trajectories[0]) == 4
    assert set(flags) == {(False, False, True), (True, True, True)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the harness's CUDA clock and memory path")
def test_throughput_on_cuda_reads_cuda_memory_and_names_the_gpu(tmp_path):
    args = ["--net", "tiny", "--size", "32", "--quiet", "--device", "cuda", "--batch", "1", "2"]
    assert main(["throughput", *args, "--iters", "2", "--repeats", "2", "--warmup", "2", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "throughput.json").read_text())
    assert rep["machine"]["device"].startswith("cuda") and rep["machine"]["gpu"]
    for r in rep["rows"]:
        assert r["status"] == "ok" and r["its_median"] > 0
        assert r["memory_kind"] == "cuda max_memory_allocated" and r["peak_memory_mib"] > 0


# ---------------------------------------------------------------- profile


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


# ---------------------------------------------------------------- time to PSNR


def test_time_to_psnr_json_schema_markdown_and_plots(ttp_report):
    out, rep = ttp_report
    _check_header(rep, "time-to-psnr")
    assert rep["settings"]["modes"] == ["warm"] and rep["settings"]["report_every"] == 4
    assert [c["case"] for c in rep["cases"]] == ["denoise/astronaut", "denoise/coffee"]
    for c in rep["cases"]:
        assert c["targets"] == [10, 12, 14, 16, 18, 20, 40] and isinstance(c["input_psnr"], float)
        methods = {r["method"] for r in c["runs"]}
        assert methods == {*METHODS, "nlm"} | ({"bm3d"} if baselines.unavailable("bm3d") is None else set())
        for r in c["runs"]:
            assert len(r["time_to_target"]) == 7
            traj = r["trajectory"]
            assert set(traj) == {"iteration", "seconds", "psnr", "ema_psnr", "fell_back"}
            if r["method"] in METHODS:
                assert r["iterations"] == 24 and traj["iteration"] == list(range(1, 25))
                assert r["resolution_iters"] == (1 if r["method"] == "original-loop" else 4)
                assert all(isinstance(x, float) for x in traj["psnr"] + traj["ema_psnr"])
                # the reference's read-back resolution: one time stamp per 4 iterations
                stamps = len(set(traj["seconds"]))
                assert stamps == (24 if r["method"] == "original-loop" else 6)
        assert _is_png(out / f"psnr_vs_time_{c['case'].replace('/', '_')}.png")
    md = (out / "time_to_psnr.md").read_text()
    assert "### denoise/astronaut" in md and "to 40.00 dB" in md and "not reached" in md


def test_time_to_psnr_is_the_first_crossing_and_monotone_in_the_target(ttp_report):
    _, rep = ttp_report
    reached_some = False
    for c in rep["cases"]:
        for r in c["runs"]:
            assert time_to_psnr.is_monotone(r)
            traj = r["trajectory"]
            for key, sec_key, it_key in (
                ("psnr", "psnr_seconds", "psnr_iteration"),
                ("ema_psnr", "ema_seconds", "ema_iteration"),
            ):
                values = traj[key]
                for row in r["time_to_target"]:
                    hits = [k for k, v in enumerate(values) if v is not None and v >= row["target"]]
                    if not hits:
                        assert row[sec_key] is None and row[it_key] is None
                        continue
                    reached_some = True
                    assert row[it_key] == traj["iteration"][hits[0]] and row[sec_key] == traj["seconds"][hits[0]]
                finite = [v for v in values if v is not None]
                if finite:  # a dense grid of targets over the whole trajectory: never earlier for higher
                    grid = np.linspace(min(finite) - 0.1, max(finite) + 0.1, 50)
                    times = [time_to_psnr.first_reach(traj, key, t)[0] for t in grid]
                    done = [t for t in times if t is not None]
                    assert done == sorted(done) and times[len(done) :] == [None] * (len(times) - len(done))
            best = r["best_psnr"]
            assert best["psnr"] == max(v for v in traj["psnr"] if v is not None)
            assert traj["psnr"][traj["iteration"].index(best["iteration"])] == best["psnr"]
    assert reached_some  # the targets straddle the tiny runs' trajectories


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 50), min_size=1, max_size=30), st.floats(0, 50), st.floats(0, 50))
def test_first_reach_never_earlier_for_a_higher_target(values, a, b):
    traj = {
        "iteration": list(range(1, len(values) + 1)),
        "seconds": [0.5 * k for k in range(len(values))],
        "psnr": values,
    }
    low, high = sorted((a, b))
    t_low, _ = time_to_psnr.first_reach(traj, "psnr", low)
    t_high, _ = time_to_psnr.first_reach(traj, "psnr", high)
    assert t_high is None or (t_low is not None and t_low <= t_high)


def test_cold_run_is_a_fresh_process_with_the_same_trajectory():
    case = data.load_cases(None, ["denoise"], size=32)[0]
    kwargs = {"iters": 8, "report_every": 4, "net": "tiny", "device": "cpu"}
    cold = run_cold(case, "reference", "fp32", **kwargs)
    warm = runs.run_dip(case, "reference", "fp32", **kwargs)
    assert cold.mode == "cold" and warm.mode == "warm" and cold.image is None
    np.testing.assert_allclose(cold.trajectory["psnr"], warm.trajectory["psnr"], rtol=0, atol=1e-9)
    assert cold.psnr == pytest.approx(warm.psnr, abs=1e-9)
    with pytest.raises(data.InputError, match="fp5"):
        run_cold(case, "reference", "fp5", **kwargs)


# ---------------------------------------------------------------- PSNRs against independent computations


@pytest.mark.parametrize("method", ["reference", "original-loop"])
def test_reported_final_psnrs_equal_skimage(method):
    case = data.load_cases(None, ["denoise"], size=32)[0]
    run = runs.run_dip(case, method, iters=5, net="tiny", report_every=5, device="cpu")
    assert run.image.shape == case.target.shape and run.image.dtype == np.float32
    assert run.psnr == pytest.approx(skimage_psnr(case.target, run.image), abs=1e-4)
    assert run.ema_psnr == pytest.approx(skimage_psnr(case.target, run.ema_image), abs=1e-4)


@pytest.mark.parametrize("method, eager", [("native", False), ("native-eager", True)])
def test_native_eager_is_the_native_step_with_the_eager_twins(monkeypatch, method, eager):
    """native-eager runs restore(backend='native') with the C++ ops switched off: the blocks go to
    the eager twins (counted here), and the ops come back on afterwards."""
    from dipfast import native

    batch_norm = importlib.import_module("dipfast.native.batch_norm")  # the module (the package exports a function)
    calls = []
    twin = batch_norm._eager_batch_norm_act
    monkeypatch.setattr(batch_norm, "_eager_batch_norm_act", lambda *a: calls.append(1) or twin(*a))
    case = data.load_cases(None, ["denoise"], size=32)[0]
    run = runs.run_dip(case, method, "bf16", iters=3, net="tiny", report_every=3, device="cpu")
    assert run.method == method and run.extras["backend"] == "native" and run.iterations == 3
    assert bool(calls) == (eager or not native.AVAILABLE)
    assert native.enabled() == native.AVAILABLE


def _independent_psnr_y(x: np.ndarray, ref: np.ndarray) -> float:
    """The paper's SR protocol from scratch: 8-bit (output truncated, reference rounded), skimage's
    rgb2ycbcr luma (the Matlab coefficients), 4 px shaved at the start and 5 at the end."""
    x8 = np.floor(np.clip(x, 0, 1) * 255) / 255
    r8 = np.round(np.clip(ref, 0, 1) * 255) / 255
    y, yr = rgb2ycbcr(x8)[..., 0] / 255, rgb2ycbcr(r8)[..., 0] / 255
    return skimage_psnr(yr[4:-5, 4:-5], y[4:-5, 4:-5])


def test_quality_scores_equal_independent_computations():
    rng = np.random.default_rng(3)
    den = data.load_cases(None, ["denoise"], size=32)[0]
    a, b = (np.clip(den.target + rng.normal(0, 0.05, den.target.shape), 0, 1).astype(np.float32) for _ in range(2))
    s = quality.score(den, [a, b], [b, a])
    assert s["psnr"] == pytest.approx(skimage_psnr(den.target, a), abs=1e-4)
    assert s["ema_psnr"] == pytest.approx(skimage_psnr(den.target, b), abs=1e-4)
    assert s["psnr_avg2"] == pytest.approx(skimage_psnr(den.target, (a + b) / 2), abs=1e-4)
    assert s["psnr_avg2"] > s["psnr"] + 1  # averaging two independent noisy copies helps

    sr = data.load_cases(None, ["sr4"], size=64)[0]
    out = np.clip(sr.target + rng.normal(0, 0.03, sr.target.shape), 0, 1).astype(np.float32)
    s = quality.score(sr, [out], [None])
    assert s["psnr_y"] == pytest.approx(_independent_psnr_y(out, sr.target), abs=1e-6)
    assert s["psnr_rgb"] == pytest.approx(skimage_psnr(sr.target, out), abs=1e-4)

    rs = data.load_cases(None, ["restore"], size=32)[0]
    out = np.clip(rs.target + rng.normal(0, 0.05, rs.target.shape), 0, 1).astype(np.float32)
    s = quality.score(rs, [out], [None])
    m = rs.mask[..., None]
    assert s["masked_psnr"] == pytest.approx(skimage_psnr(rs.target * m, out * m), abs=1e-4)
    assert s["psnr"] == pytest.approx(skimage_psnr(rs.target, out), abs=1e-4)


def test_quality_json_schema_markdown_and_every_baseline(quality_report):
    out, rep = quality_report
    _check_header(rep, "quality")
    tasks = {r["bench_task"] for r in rep["rows"]}
    assert tasks == set(data.TASKS)
    by = {(r["case"], r["method"]): r for r in rep["rows"]}
    for case in (
        "denoise/astronaut",
        "denoise/coffee",
        "sr4/chelsea",
        "sr8/chelsea",
        "restore/camera",
        "inpaint/astronaut",
    ):
        for method in ("input", "reference", "original-loop"):
            assert (case, method) in by, (case, method)
        assert by[(case, "reference")]["iterations"] == 3
    for case in ("denoise/astronaut", "denoise/coffee"):
        r = by[(case, "reference")]
        assert r["runs"] == 2 and r["seeds"] == [0, 1]
        assert set(r["metrics"]) == {"psnr", "ema_psnr", "psnr_avg2", "ema_psnr_avg2"}
        assert by[(case, "nlm")]["metrics"]["psnr"] > by[(case, "input")]["metrics"]["psnr"] + 3
        assert by[(case, "original-loop")]["metrics"]["psnr"] == pytest.approx(r["metrics"]["psnr"], abs=1e-4)
    assert set(by[("sr4/chelsea", "reference")]["metrics"]) == {"psnr_y", "psnr_rgb", "ema_psnr_y"}
    assert by[("sr4/chelsea", "bicubic")]["metrics"]["psnr_y"] == by[("sr4/chelsea", "input")]["metrics"]["psnr_y"]
    assert "masked_psnr" in by[("restore/camera", "reference")]["metrics"]
    bm3d_ran = ("denoise/astronaut", "bm3d") in by
    bm3d_refused = any(u["method"] == "bm3d" for u in rep["unsupported"])
    assert bm3d_ran != bm3d_refused and bm3d_ran == (baselines.unavailable("bm3d") is None)
    avg = {(a["bench_task"], a["method"]): a for a in rep["averages"]}
    pair = [by[(c, "reference")]["metrics"]["psnr"] for c in ("denoise/astronaut", "denoise/coffee")]
    assert avg[("denoise", "reference")]["images"] == 2
    assert avg[("denoise", "reference")]["metrics"]["psnr"] == pytest.approx(sum(pair) / 2)
    md = (out / "quality.md").read_text()
    assert "### Per image" in md and "### Averages over images" in md and "| chelsea | sr8 | bicubic |" in md


# ---------------------------------------------------------------- baselines


def test_baselines_bicubic_is_pil_and_nlm_denoises():
    sr = data.load_cases(None, ["sr4"], size=64)[0]
    lr8 = Image.fromarray(np.round(sr.observed * 255).astype(np.uint8))
    expected = np.asarray(lr8.resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_array_equal(baselines.run("bicubic", sr.observed, sr.target.shape), expected)

    den = data.load_cases(None, ["denoise"], size=64)[0]
    out = baselines.run("nlm", den.observed, den.target.shape)
    assert out.shape == den.target.shape and out.dtype == np.float32
    assert skimage_psnr(den.target, out) > skimage_psnr(den.target, den.observed) + 3

    reason = baselines.unavailable("bm3d")
    if reason is None:  # the optional package is installed: it must run and denoise
        assert skimage_psnr(den.target, baselines.run("bm3d", den.observed, den.target.shape)) > den.input_psnr() + 3
    else:
        assert "bm3d" in reason
        with pytest.raises(RuntimeError, match="unavailable"):
            baselines.run("bm3d", den.observed, den.target.shape)


# ---------------------------------------------------------------- the original loop


def _both_loops(bench_task: str, n: int, seed: int, **loop_kwargs):
    from dipfast import restore

    case = data.load_cases(None, [bench_task], size=32)[0]
    overrides = runs.net_overrides("tiny", case.preset)
    preset = preset_for(case.task, case.preset, case.scale)
    if bench_task == "denoise":  # a hair-trigger rule, so that fall-backs happen and must happen alike
        overrides["backtracking"] = Backtracking(period=100, on_period=False, factor=1.1)
    ref = restore(case.observed, **case.restore_kwargs(), iters=n, seed=seed, device="cpu", backend="reference",
                  progress=False, **overrides)  # fmt: skip
    loop = OriginalLoop(case.task, apply_overrides(preset, {**overrides, "iterations": n}), case.observed,
                        case.target, case.mask, case.scale, seed=seed, **loop_kwargs)  # fmt: skip
    loop.run(n)
    loop.close()
    return ref, loop


@pytest.mark.parametrize("bench_task", ["denoise", "restore", "inpaint", "sr4", "sr8"])
def test_original_loop_follows_the_reference_trajectory(bench_task):
    """Same seed, same network (dipfast.nets), same noise draws, same ops in the same order: the same
    PSNR at every iteration. Only the PSNR arithmetic differs (skimage's float32 difference against
    the engine's float64 one: below 2e-7 dB measured), hence 1e-5 dB. SR runs here with the
    reference's depthwise Lanczos operator (the notebook's dense conv: the next test). On CUDA the
    original loop's cudnn.benchmark may pick other convolution algorithms than the reference, so
    there the trajectories part by float rounding that Adam amplifies; this test runs on the CPU."""
    ref, loop = _both_loops(bench_task, 30, 3, sr_downsampler="depthwise")
    a = np.array([h.psnr for h in ref.history])
    b = np.array([r.psnr for r in loop.rows])
    assert len(a) == len(b) == 30
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert [h.fell_back for h in ref.history] == [r.fell_back for r in loop.rows]
    if bench_task == "denoise":
        assert sum(r.fell_back for r in loop.rows) >= 2
        np.testing.assert_allclose([r.ema_psnr for r in loop.rows], [h.ema_psnr for h in ref.history], atol=1e-5)
    final = loop.final_output()[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(final, np.asarray(ref.image).reshape(final.shape), atol=1e-6)


def test_original_loop_sr_keeps_the_notebooks_dense_trainable_downsampler():
    """The notebook's Lanczos downsampler is a dense 3 -> 3 conv with zeros off the diagonal whose
    weight and bias get gradients (accumulated, never applied). Its sums run in another order than
    the reference's depthwise conv, and Adam's nearly sign-like first steps amplify the rounding:
    the first iteration agrees exactly (no step yet), later ones part by up to 0.07 dB on this
    tiny net over 6 seeds (about 1 dB within 20 iterations on the default net), hence 1 dB."""
    ref, loop = _both_loops("sr4", 30, 4)
    a = np.array([h.psnr for h in ref.history])
    b = np.array([r.psnr for r in loop.rows])
    assert abs(a[0] - b[0]) < 1e-5
    assert np.abs(a - b).max() < 1.0
    conv = loop.downsampler.downsampler
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    kernel = torch.from_numpy(lanczos_kernel(4).astype(np.float32))
    assert torch.equal(conv.weight[0, 0], kernel) and conv.weight[0, 1].abs().max() == 0  # never trained


def test_original_loop_makes_the_notebooks_host_copies(monkeypatch):
    """Denoising: three device-to-host copies per iteration, the loss's `.item()` printed, and the
    112 per-parameter copies of the default net on checked iterations (99 of 100)."""
    import io

    case = data.load_cases(None, ["denoise"], size=32)[0]
    preset = apply_overrides(preset_for("denoise"), {"iterations": 3})
    log = io.StringIO()
    loop = OriginalLoop("denoise", preset, case.observed, case.target, seed=0, log=log)
    copies = []
    real_host = OriginalLoop._host
    monkeypatch.setattr(OriginalLoop, "_host", lambda self, t: copies.append(1) or real_host(self, t))
    loop.run(3)
    assert len(copies) == 9
    printed = [line for line in log.getvalue().split("\r") if line.strip()]
    assert len(printed) == 3 and all(
        re.match(r"Iteration 0000\d +Loss \d\.\d{6} .*PSNR_gt_sm", line) for line in printed
    )
    assert loop.last_net is not None and len(loop.last_net) == 112  # saved at i = 1 and 2, not at i = 0
    assert all(
        s.device.type == "cpu" and s.data_ptr() != p.data_ptr() for s, p in zip(loop.last_net, loop.net.parameters())
    )
    loop.close()


# ---------------------------------------------------------------- data


def test_paper_folder_layout_and_the_notebooks_corruptions(tmp_path):
    from skimage import data as skdata

    (tmp_path / "denoising").mkdir()
    (tmp_path / "sr").mkdir()
    (tmp_path / "restoration").mkdir()
    (tmp_path / "inpainting").mkdir()
    Image.fromarray(skdata.astronaut()[:70, :70]).save(tmp_path / "denoising/F16_GT.png")
    Image.fromarray(skdata.chelsea()[:70, :100]).save(tmp_path / "sr/zebra_GT.png")
    Image.fromarray(skdata.camera()[:48, :48]).save(tmp_path / "restoration/barbara.png")
    Image.fromarray(skdata.coffee()[:64, :64]).save(tmp_path / "inpainting/kate.png")
    mask = np.full((64, 64), 255, np.uint8)
    mask[10:14, 5:50] = 0
    Image.fromarray(mask).save(tmp_path / "inpainting/kate_mask.png")

    cases = {c.key: c for c in data.load_cases(tmp_path, data.TASKS)}
    assert set(cases) == {"denoise/F16", "sr4/zebra", "sr8/zebra", "restore/barbara", "inpaint/kate"}
    assert data.missing_images(tmp_path) == [("inpaint", "inpainting/vase.png"), ("inpaint", "inpainting/library.png")]

    den = cases["denoise/F16"]  # crop to a multiple of 32 (70 -> 64, offset 3), sigma 25, clipped, seeded
    np.testing.assert_array_equal(den.target, skdata.astronaut()[3:67, 3:67].astype(np.float32) / 255)
    noise = den.observed - den.target
    assert 0.8 * data.SIGMA < noise[(den.observed > 0) & (den.observed < 1)].std() < 1.05 * data.SIGMA
    assert den.observed.min() >= 0 and den.observed.max() <= 1
    np.testing.assert_array_equal(den.observed, data.load_cases(tmp_path, ["denoise"])[0].observed)

    hr = Image.fromarray(skdata.chelsea()[:70, :100]).crop((2, 3, 98, 67))  # 100 x 70 -> 96 x 64
    sr = cases["sr4/zebra"]
    np.testing.assert_array_equal(sr.target, np.asarray(hr, np.float32) / 255)
    np.testing.assert_array_equal(sr.observed, np.asarray(hr.resize((24, 16), Image.LANCZOS), np.float32) / 255)
    assert cases["sr8/zebra"].observed.shape == (8, 12, 3)

    rs = cases["restore/barbara"]  # gray, reflection-padded by 1 px, half the pixels kept
    assert rs.target.shape == (50, 50, 1) and rs.mask.shape == (50, 50)
    np.testing.assert_array_equal(rs.target[1:-1, 1:-1, 0], skdata.camera()[:48, :48].astype(np.float32) / 255)
    np.testing.assert_array_equal(rs.target[0, 1:-1, 0], rs.target[2, 1:-1, 0])
    assert 0.4 < rs.mask.mean() < 0.6
    np.testing.assert_array_equal(rs.observed, rs.target * rs.mask[..., None])

    ip = cases["inpaint/kate"]
    np.testing.assert_array_equal(ip.mask, (mask > 127).astype(np.float32))
    np.testing.assert_array_equal(ip.observed, ip.target * ip.mask[..., None])

    (tmp_path / "inpainting/kate_mask.png").unlink()
    with pytest.raises(data.InputError, match="mask"):
        data.load_cases(tmp_path, ["inpaint"])


def test_bundled_images_make_every_task_on_a_fresh_machine():
    cases = data.load_cases(None, data.TASKS, size=48)
    assert {c.bench_task for c in cases} == set(data.TASKS)
    for c in cases:
        assert c.observed.dtype == np.float32 and c.target.dtype == np.float32
        assert 0 <= c.observed.min() and c.observed.max() <= 1
        if c.scale:
            assert c.target.shape[0] == c.scale * c.observed.shape[0]
        assert math.isfinite(c.input_psnr())


# ---------------------------------------------------------------- command line


def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["throughput", "--backend", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dipfast bench: error: unknown backend 'nope'") and "original-loop" in err
    assert main(["quality", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["time-to-psnr", "--no-cold", "--no-warm", "--out", str(tmp_path)]) == 2
    assert main([]) == 2


def test_add_bench_parser_plugs_into_a_parent_command(tmp_path):
    import argparse

    from dipfast.bench.cli import add_bench_parser, run_bench

    parser = argparse.ArgumentParser(prog="dipfast")
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    args = parser.parse_args(["bench", "summary", str(tmp_path)])
    assert args.command == "bench" and args.suite == "summary"
    assert run_bench(args) == 0
    args = parser.parse_args(["bench", "throughput", "--size", "16", "--batch", "1", "4", "--precision", "fp32"])
    assert args.size == [16] and args.batch == [1, 4] and args.precision == ["fp32"]


# ---------------------------------------------------------------- NVTX, memory


class _Recorder:
    def __init__(self):
        self.events = []

    def annotate(self, name, color=None, domain=None):
        events = self.events

        class _Range:
            def __enter__(self):
                events.append(("push", name, domain))

            def __exit__(self, *exc):
                events.append(("pop", name, domain))

        return _Range()


def test_nvtx_phases_of_both_loops_and_a_no_op_without_nvtx(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(nvtx_ranges, "_lib", rec)
    assert nvtx_ranges.enable()
    try:
        case = data.load_cases(None, ["denoise"], size=32)[0]
        runs.run_dip(case, "reference", iters=2, net="tiny", report_every=2, device="cpu")
        pushed = [name for kind, name, _ in rec.events if kind == "push"]
        one_step = ["noise", "forward", "loss", "backward", "backtracking", "optimizer"]
        assert pushed == one_step * 2 + ["read-back"]
        popped = [name for kind, name, _ in rec.events if kind == "pop"]
        assert popped == pushed  # every range closed, in order
        rec.events.clear()
        runs.run_dip(case, "original-loop", iters=1, net="tiny", device="cpu")
        pushed = [name for kind, name, _ in rec.events if kind == "push"]
        assert pushed == ["noise", "forward", "loss", "backward", "read-back", "optimizer"]
        assert {d for _, _, d in rec.events if d} == {"dipfast"}
    finally:
        nvtx_ranges.enable(False)
    rec.events.clear()
    with nvtx_ranges.phase("forward"):
        pass
    assert rec.events == []
    monkeypatch.setattr(nvtx_ranges, "_lib", None)
    monkeypatch.setitem(sys.modules, "nvtx", None)  # the package missing: import fails
    assert nvtx_ranges.enable() is False
    assert nvtx_ranges.phase("forward") is nvtx_ranges.phase("loss")  # the shared null context


def test_peak_memory_sees_a_block_allocation():
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * 2**20)  # 256 MiB, above glibc's mmap threshold: fresh pages
        del block
    r = mem.result()
    assert r["peak_mib"] > 256
    if r["growth_mib"] is not None:  # Linux: VmHWM reset before the block
        assert "VmHWM" in r["kind"] and r["growth_mib"] > 200
    else:
        assert "ru_maxrss" in r["kind"]


# ---------------------------------------------------------------- bench/ops: the op micro-benchmarks


def _env(**extra) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.update(extra)
    return env


def test_op_benchmarks_are_collected_only_when_asked():
    default = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert "tests/test_bench.py::" in default.stdout and "bench/ops" not in default.stdout
    ops = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/ops", "--benchmark-disable"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert ops.returncode == 0, ops.stdout + ops.stderr
    assert " passed" in ops.stdout and "failed" not in ops.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "bench/ops"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    ).stdout
    for name in ("bench_conv_bn_lrelu.py::", "bench_lanczos2.py::", "bench_adam.py::"):
        assert name in listed


def test_batch_suite_reports_images_per_hour(tmp_path):
    """The suite end to end at toy sizes without Ray clusters (tests/test_batch_ray.py times a round trip)."""
    from dipfast.bench.batch import batch_markdown, run_batch_bench
    from dipfast.bench.report import finish

    rep = run_batch_bench(images=2, size=16, iters=2, net="tiny", workers=[], batch=2, ref_size=16, ref_iters=1,
                          round_trips=3, device=torch.device("cpu"), seed=0, progress=False)  # fmt: skip
    assert [(r["mode"], r["workers"], r["batch"]) for r in rep["rows"]] == [("local", 1, 1), ("local", 1, 2)]
    assert all(r["images"] == 2 and r["images_per_hour"] > 0 and r["fit_s_mean"] > 0 for r in rep["rows"])
    assert rep["rows"][0]["speedup_vs_local"] == 1.0 and rep["settings"]["ref_seconds_per_iteration"] > 0
    text = batch_markdown(finish(rep, torch.device("cpu")))
    assert "| local | 1 | 2 |" in text and "Ray round trip" not in text
