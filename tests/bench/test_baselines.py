"""dipfast.bench.baselines: bicubic is PIL's, NLM denoises, BM3D runs or says why not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dipfast.bench import baselines, data

from ._suites import skimage_psnr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
