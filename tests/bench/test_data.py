"""dipfast.bench.data: the paper's folder layout and the notebooks' corruptions; the bundled images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from dipfast.bench import data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
