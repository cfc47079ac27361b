"""dipfast.bench.time_to_psnr: the report, and a time to a target as the first crossing, monotone in the target."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipfast.bench import baselines, time_to_psnr
from dipfast.bench.cli import main

from ._suites import METHODS, TINY, check_header, is_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_time_to_psnr_json_schema_markdown_and_plots(ttp_report):
    out, rep = ttp_report
    check_header(rep, "time-to-psnr")
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
                # the start-up: restore() times its own first step, which its first read-back comes after; the
                # loop's is its first point
                assert 0 < r["first_step_seconds"] <= traj["seconds"][0]
                if r["method"] == "original-loop":
                    assert r["first_step_seconds"] == traj["seconds"][0]
                else:  # restore()'s start-up parts, for the table
                    assert 0 < r["extras"]["setup_seconds"] < r["first_step_seconds"]
                    assert 0 < r["extras"]["prepare_seconds"] < traj["seconds"][0]
            else:
                assert r["first_step_seconds"] is None  # a classical baseline: one point, no iterations
        assert is_png(out / f"psnr_vs_time_{c['case'].replace('/', '_')}.png")
    md = (out / "time_to_psnr.md").read_text()
    assert "### denoise/astronaut" in md and "to 40.00 dB" in md and "not reached" in md and "| first step |" in md
    assert " s (prepare " in md and " / set-up " in md  # restore()'s start-up parts beside its first step


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
