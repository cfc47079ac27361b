"""`dipfast bench early-stop` on tiny synthetic images: the record, the replayed decision, the figures and
the files. Timings are never asserted; what the figures mean is."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _helpers import smooth_image

from dipfast.bench import data, early_stop
from dipfast.bench.cli import main
from dipfast.early_stop import CALIBRATED, EarlyStopSpec
from dipfast.errors import InputError
from dipfast.metrics import psnr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITERS = 40
SPEC = EarlyStopSpec("wmv", window=4, patience=6)


def _cases(np_rng, n: int = 2, size: int = 16) -> list[data.Case]:
    cases = []
    for k in range(n):
        clean = smooth_image(np_rng, size, size)
        case = data.Case(f"img{k}", "denoise", data.noisy(clean, np_rng), clean, preset="denoise")
        case.extras["es_task"] = "denoise"
        cases.append(case)
    return cases


@pytest.fixture(scope="module")
def recorded():
    cases = _cases(np.random.default_rng(14))
    records = early_stop.record_cached(cases, ITERS, None, device="cpu", net="tiny")
    return cases, records


def test_the_record_holds_every_iterations_output_and_its_psnr(recorded):
    cases, records = recorded
    for case in cases:
        rec = records[early_stop.key_of(case)]
        assert rec.outputs.shape == (ITERS, 3, 16, 16) and rec.psnr.shape == (ITERS,)
        target = torch.from_numpy(case.target.transpose(2, 0, 1).copy())[None]
        again = psnr(torch.from_numpy(rec.outputs).float(), target, dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(rec.psnr, again, atol=0.02)  # the record's outputs are float16
        assert np.ptp(rec.psnr) > 0.5  # the fit moved: a record of a frozen net would pass the rest
        assert np.all(np.diff(rec.seconds) >= 0)


def test_the_replayed_decision_is_the_rule_on_the_criterion_curve(recorded):
    """detect() (EarlyStop replayed) against decide() (the rule as a plain loop on the curve)."""
    cases, records = recorded
    recs = [records[early_stop.key_of(c)] for c in cases]
    emv, never = EarlyStopSpec("emv", alpha=0.2, patience=5, start=5), EarlyStopSpec(window=3, patience=200)
    specs = (SPEC, emv, never, EarlyStopSpec("wmv", window=4, patience=6, tolerance=0.5))
    for spec in specs:
        crit = early_stop.curves(recs, spec.method, spec.window, spec.alpha)
        for k, (case, rec) in enumerate(zip(cases, recs)):
            det = early_stop.detect(rec, case.target, spec)
            args = (crit[:, k], spec.patience, spec.threshold, spec.first_valid(), spec.tolerance)
            best, stop, stopped = early_stop.decide(*args)
            assert (det.best_iteration, det.stop_iteration, det.stopped) == (best, stop, stopped)
            assert det.psnr == rec.psnr[best - 1]
            if stopped and not spec.tolerance:
                assert stop == best + spec.patience
            elif stopped:  # the kept output is at or after the minimum; the stop is the minimum's + patience
                minimum_at = early_stop.decide(crit[:, k], spec.patience, spec.threshold, spec.first_valid())[0]
                assert minimum_at <= best <= stop == minimum_at + spec.patience
            else:
                assert stop == ITERS


def test_the_replayed_noise_gate_is_a_start_where_the_losses_reach_the_noise(recorded):
    """detect() with a gated rule (EarlyStop's gate on the record's losses) against decide() started at
    gate_opening() (the calibration's model of the gate); an observation is needed to replay one."""
    cases, records = recorded
    moved = 0
    for gate in (0.9, 1.0, 1.5):
        spec = EarlyStopSpec("wmv", window=4, patience=6, tolerance=0.4, noise_gate=gate)
        crit = early_stop.curves([records[early_stop.key_of(c)] for c in cases], "wmv", 4)
        for k, case in enumerate(cases):
            rec = records[early_stop.key_of(case)]
            det = early_stop.detect(rec, case.target, spec, observed=case.observed)
            losses = early_stop.observation_losses(rec, case.observed)
            opens = early_stop.gate_opening(losses, early_stop.noise_variance(case.observed), gate)
            moved += opens > spec.first_valid()
            best, stop, stopped = early_stop.decide(crit[:, k], 6, 0.0, max(spec.first_valid(), opens), 0.4)
            assert (det.best_iteration, det.stop_iteration, det.stopped) == (best, stop, stopped)
            assert det.best_iteration >= opens or det.best_iteration == 0
    assert moved, "no gate opened after the window filled: a vacuous test"
    with pytest.raises(InputError, match=r"replays only on \['denoise', 'jpeg'\]"):
        early_stop.detect(rec, case.target, spec)


def test_the_replay_takes_another_noise_variance_and_returns_its_output(recorded):
    """detect(gate_variance=): the gate read against that sigma^2, not the step's estimate (how a results
    script compares estimates); Detection.output is the output whose PSNR it reports."""
    cases, records = recorded
    spec = EarlyStopSpec("wmv", window=4, patience=6, returns="window-mean", tolerance=0.4, noise_gate=1.0)
    crit = early_stop.curves([records[early_stop.key_of(c)] for c in cases], "wmv", 4)
    opened = set()
    for k, case in enumerate(cases):
        rec = records[early_stop.key_of(case)]
        losses = early_stop.observation_losses(rec, case.observed)
        target = torch.from_numpy(case.target.transpose(2, 0, 1).copy())
        for variance in (float(np.quantile(losses, q)) for q in (0.2, 0.8)):
            det = early_stop.detect(rec, case.target, spec, observed=case.observed, gate_variance=variance)
            opens = early_stop.gate_opening(losses, variance, 1.0)
            opened.add(opens)
            best, stop, stopped = early_stop.decide(crit[:, k], 6, 0.0, max(spec.first_valid(), opens), 0.4)
            assert (det.best_iteration, det.stop_iteration, det.stopped) == (best, stop, stopped)
            assert det.output.shape == target.shape
            if best:  # the kept window mean, whose PSNR is reported
                assert float(psnr(det.output, target)) == pytest.approx(det.psnr, rel=1e-6)
            else:  # nothing kept: the record's last output (float16; the PSNR reported is of the fp32 one)
                torch.testing.assert_close(det.output, torch.from_numpy(rec.outputs[-1]).float())
                assert float(psnr(det.output, target)) == pytest.approx(det.psnr, abs=0.02)
    assert len(opened) > 1, "every variance opened the gate at the same iteration: a vacuous test"


def test_window_mean_psnr_is_the_psnr_of_the_mean_of_the_last_outputs(recorded):
    cases, records = recorded
    rec, case = records[early_stop.key_of(cases[0])], cases[0]
    curve = early_stop.window_mean_psnr(rec, case.target, 5)
    assert np.isnan(curve[:4]).all()
    mean = rec.outputs[10:15].astype(np.float64).mean(0).transpose(1, 2, 0)
    assert curve[14] == pytest.approx(data.numpy_psnr(mean, case.target), abs=1e-4)


def test_the_suite_figures(recorded):
    cases, records = recorded
    rep = early_stop.run_early_stop(cases, iters=ITERS, specs={"denoise": SPEC}, records=records)
    assert [r["key"] for r in rep["images"]] == ["denoise/img0", "denoise/img1"]
    for row in rep["images"]:
        curve = records[row["key"]].psnr
        assert row["oracle_psnr"] == curve.max() and curve[row["oracle_iteration"] - 1] == curve.max()
        assert row["fixed_iteration"] == ITERS  # the preset's 3000 > the record: its last iteration
        assert row["fixed_psnr"] == curve[-1]
        assert row["auto_psnr"] == curve[row["detected_iteration"] - 1]
        np.testing.assert_allclose(row["psnr_curve"], curve, atol=1e-4)
        assert row["gap_to_oracle_db"] == pytest.approx(row["oracle_psnr"] - row["auto_psnr"])
        assert row["iterations_saved"] == ITERS - row["stop_iteration"]
        assert row["preset_iterations"] == 3000
    s = rep["tasks"]["denoise"]["summary"]
    gaps = [r["gap_to_oracle_db"] for r in rep["images"]]
    assert s["median_gap_db"] == pytest.approx(float(np.median(gaps))) and s["max_gap_db"] == max(gaps)
    assert rep["tasks"]["denoise"]["targets"]["2x_fewer_than_preset"]  # 40 iterations against 3000


def test_calibrate_ranks_rules_that_meet_the_targets_first(recorded):
    cases, records = recorded
    ranked = early_stop.calibrate(cases, records, 3000)
    assert len(ranked) > 100
    assert {e["spec"]["noise_gate"] for e in ranked} == set(early_stop.NOISE_GATES)  # denoising: gates tried
    flags = [e["meets_quality"] for e in ranked]
    assert flags == sorted(flags, reverse=True)
    met = [e for e in ranked if e["meets_quality"]]
    its = [e["summary"]["mean_stop_iteration"] for e in met]
    assert its == sorted(its)
    for e in met:
        assert e["summary"]["median_gap_db"] <= 0.5 and e["summary"]["max_gap_db"] <= 1.5


def test_the_command_writes_json_markdown_plots_and_reads_its_cache(tmp_path, capsys, monkeypatch):
    from skimage import data as skdata

    folder = tmp_path / "dip"
    (folder / "denoising").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(skdata.astronaut()).save(folder / "denoising" / "F16_GT.png")
    args = ["early-stop", "--data", str(folder), "--size", "32", "--iters", "20", "--net", "tiny", "--quiet"]
    args += ["--device", "cpu", "--window", "4", "--patience", "5", "--cache", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "early_stop.json").read_text())
    assert rep["suite"] == "early-stop" and [r["key"] for r in rep["images"]] == ["denoise/F16"]
    assert rep["tasks"]["denoise"]["spec"]["window"] == 4 and rep["tasks"]["denoise"]["spec"]["patience"] == 5
    assert "| denoise/F16 |" in (tmp_path / "a" / "early_stop.md").read_text()
    assert (tmp_path / "a" / "early_stop_denoise_F16.png").stat().st_size > 1000

    def no_fit(*a, **k):
        raise AssertionError("the cache was not read")

    monkeypatch.setattr(early_stop, "record", no_fit)
    assert main([*args, "--out", str(tmp_path / "b"), "--patience", "7", "--noise-gate", "1.3"]) == 0
    again = json.loads((tmp_path / "b" / "early_stop.json").read_text())
    assert again["images"][0]["psnr_curve"] == rep["images"][0]["psnr_curve"]
    assert again["tasks"]["denoise"]["spec"]["patience"] == 7
    assert rep["tasks"]["denoise"]["spec"]["noise_gate"] == CALIBRATED["denoise"].noise_gate > 0
    assert again["tasks"]["denoise"]["spec"]["noise_gate"] == 1.3
    assert "gate=1.3" in (tmp_path / "b" / "early_stop.md").read_text()


def test_another_noise_level_is_its_own_case_and_its_own_record(tmp_path):
    """--sigma: the denoise cases carry that noise, and their records are cached apart from the paper's 25."""
    from PIL import Image
    from skimage import data as skdata

    (tmp_path / "dip/denoising").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).save(tmp_path / "dip/denoising/F16_GT.png")
    paper, strong = (early_stop.load_cases(tmp_path / "dip", ["denoise"], 32, sigma=s)[0] for s in (None, 50 / 255))
    assert np.array_equal(paper.target, strong.target)
    for case, sigma in ((paper, 25 / 255), (strong, 50 / 255)):
        inner = (case.observed - case.target)[case.target.min(-1) > 0.3]  # away from the clip at 0 and 1
        inner = inner[(case.target[case.target.min(-1) > 0.3] < 0.7).all(-1)]
        assert np.std(inner) == pytest.approx(sigma, rel=0.1)
    for case in (paper, strong):
        early_stop.record_cached([case], 3, tmp_path / "cache", device="cpu", net="tiny")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "denoise_F16_32x32_3_nettiny.npz",
        "denoise_F16_32x32_3_nettiny_sigma50.npz",
    ]
    with pytest.raises(InputError, match=r"sigma must be in \(0, 255\) 8-bit units; got 300"):
        early_stop.load_cases(tmp_path / "dip", ["denoise"], 32, sigma=300 / 255)


def test_a_set_recorded_in_parts_replays_whole_with_the_records_of_one_step(tmp_path, monkeypatch):
    """--images: each part records only its images; the whole set then reads every record from the cache,
    and each record is the one a step of the whole set writes (each image's fit starts from the seed)."""
    from PIL import Image
    from skimage import data as skdata

    for rel, img in (("denoising/F16_GT.png", skdata.astronaut()), ("inpainting/kate.png", skdata.coffee())):
        (tmp_path / "dip" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "dip" / rel)

    def load(images=None):
        return early_stop.load_cases(tmp_path / "dip", ["denoise"], 32, images=images)

    assert [c.name for c in load(["kate"])] == ["kate"]
    for part in (["kate"], ["F16"]):
        early_stop.record_cached(load(part), 4, tmp_path / "parts", device="cpu", net="tiny")
    whole = early_stop.record_cached(load(), 4, tmp_path / "whole", device="cpu", net="tiny")
    monkeypatch.setattr(early_stop, "record", lambda *a, **k: pytest.fail("the cached set was recorded again"))
    replayed = early_stop.record_cached(load(), 4, tmp_path / "parts", device="cpu", net="tiny")
    assert sorted(replayed) == ["denoise/F16", "denoise/kate"]
    for key, rec in whole.items():
        np.testing.assert_array_equal(replayed[key].outputs, rec.outputs)
    with pytest.raises(InputError, match=r"unknown image 'lena' for --images; valid: \['F16', 'kate', "):
        load(["kate", "lena"])


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["early-stop", "--data", str(tmp_path / "none"), "--quiet"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["early-stop", "--window", "50", "--iters", "20", "--quiet", "--data", str(tmp_path)]) == 2
    assert "window (50) is larger than iters (20)" in capsys.readouterr().err
    assert main(["early-stop", "--images", "F16", "lena", "--quiet", "--data", str(tmp_path)]) == 2
    assert "unknown image 'lena' for --images" in capsys.readouterr().err


def test_criterion_cost_times_the_update_against_the_step():
    from _helpers import TINY

    specs = [EarlyStopSpec(window=3), EarlyStopSpec("emv")]
    cost = early_stop.criterion_cost(16, specs, device="cpu", steps=3, updates=3, **TINY)
    assert cost["step_ms"] > 0 and [r["spec"]["method"] for r in cost["criterion"]] == ["wmv", "emv"]
    for r in cost["criterion"]:
        assert r["update_ms"] > 0 and r["fraction_of_step"] == pytest.approx(r["update_ms"] / cost["step_ms"])
    assert cost["criterion"][0]["bytes"] > cost["criterion"][1]["bytes"]  # the window's buffer


def test_criterion_cost_times_the_fused_update_where_the_step_runs_it(monkeypatch):
    """Where the plan fuses the rules (CUDA; here forced, the kernels in Triton's interpreter), the calibrated kind
    of rule is timed as the step runs it, the fused pass with the update less the pass without; ES-EMV as before."""
    from _helpers import TINY

    from dipfast import backends
    from dipfast.kernels import fused_rules

    if not fused_rules.available(torch.device("cpu")):
        pytest.skip("the fused rules run on the CPU only in Triton's interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton's lazy imports read it at launch (tests/parity/conftest.py)
    specs = [EarlyStopSpec(window=3), EarlyStopSpec("emv")]
    with backends.variant("native", fused_rules=frozenset({"cpu", "cuda"})):
        cost = early_stop.criterion_cost(16, specs, device="cpu", steps=3, updates=3, **TINY)
    assert [r["fused"] for r in cost["criterion"]] == [True, False]
    assert all(math.isfinite(r["update_ms"]) for r in cost["criterion"])


@pytest.mark.parametrize("tolerance", [0.0, 0.05, 0.4])
def test_decides_vectorised_running_minimum_is_the_plain_loop(np_rng, tolerance):
    """decide() at threshold 0 (the calibration's fast path) against its loop (a threshold of 1e-30: factor 1)."""
    for _ in range(300):
        curve = np_rng.random(int(np_rng.integers(5, 80))).astype(np.float32)
        curve[: int(np_rng.integers(0, 4))] = np.nan
        curve[np_rng.random(curve.size) < 0.1] = curve[0]  # ties: a new minimum must be strictly lower
        patience, first = int(np_rng.integers(1, 20)), int(np_rng.integers(1, 6))
        fast = early_stop.decide(curve, patience, 0.0, first, tolerance)
        assert fast == early_stop.decide(curve, patience, 1e-30, first, tolerance)
