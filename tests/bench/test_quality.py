"""dipfast.bench.quality: the paper's protocols' scores against independent computations, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.color import rgb2ycbcr

from dipfast.bench import baselines, data, quality
from dipfast.bench.cli import main

from ._suites import TINY, check_header, skimage_psnr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quality_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    rc = main(["quality", *TINY, "--iters", "3", "--tasks", "all", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "quality.json").read_text())


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
    check_header(rep, "quality")
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
