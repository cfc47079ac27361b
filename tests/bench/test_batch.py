"""dipfast.bench.batch: the batch suite end to end at toy sizes."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
