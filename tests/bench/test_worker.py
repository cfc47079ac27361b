"""dipfast.bench.worker: a cold run is a fresh process with the warm run's trajectory."""

from __future__ import annotations

import numpy as np
import pytest

from dipfast.bench import data, runs
from dipfast.bench.worker import run_cold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
