"""dipfast.noise_level: the noise sigma of each image, from the observation alone (Chen et al.'s patch eigenvalues)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import smooth_image

from dipfast import noise_level
from dipfast.noise_level import estimate_sigma, patch_size


@pytest.mark.parametrize(("h", "w", "c"), [(65, 48, 3), (40, 81, 1), (96, 96, 4)])
def test_the_sigma_of_gaussian_noise_on_a_smooth_image(np_rng, h, w, c):
    """Each image of a batch, its own sigma, within 6% (a covariance over a few thousand patches), odd sizes."""
    sigmas = np.array([0.02, 0.05, 25 / 255, 0.2])
    clean = np.stack([smooth_image(np_rng, h, w, c) for _ in sigmas])  # (N, H, W, C)
    noisy = clean + sigmas[:, None, None, None] * np_rng.standard_normal(clean.shape)
    y = torch.from_numpy(noisy.transpose(0, 3, 1, 2)).float()
    got = estimate_sigma(y)
    assert got.shape == (len(sigmas),) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), sigmas, rtol=0.06)
    np.testing.assert_array_equal(estimate_sigma(y[1:2]).numpy(), got[1:2].numpy())  # images are independent


def test_noise_clipped_at_black_carries_less_sigma(np_rng):
    """The estimate is of what the pixels carry: noise clipped at 0 on a dark image is below the sigma drawn,
    as it is below it in the data term the gate compares against."""
    dark = 0.05 * smooth_image(np_rng, 64, 64)
    drawn = 25 / 255
    noisy = np.clip(dark + drawn * np_rng.standard_normal(dark.shape), 0, 1)
    got = float(estimate_sigma(torch.from_numpy(noisy.transpose(2, 0, 1)).float()[None])[0])
    carried = float(np.std(noisy - dark))
    assert got < 0.8 * drawn
    assert got == pytest.approx(carried, rel=0.25)


def test_a_clean_image_has_almost_no_noise(np_rng):
    clean = smooth_image(np_rng, 64, 64)
    assert float(estimate_sigma(torch.from_numpy(clean.transpose(2, 0, 1))[None])[0]) < 2e-3


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fine stripes in three directions, periods of 2.2-3.5 pixels, as on barbara's cloth: (H, W, 3) in [0, 1]."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    clean = np.full((h, w, 3), 0.5)
    for _ in range(3):
        theta, period, phase = rng.uniform(0, np.pi), rng.uniform(2.2, 3.5), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        clean += 0.12 * wave[..., None] * rng.uniform(0.5, 1, 3)
    return clean


def test_fine_texture_is_not_read_as_noise(np_rng):
    """Why the estimate is the patches' eigenvalues: stripes this fine fill the finest wavelet band too (Donoho's
    MAD of it reads sigma ~1.2x here), but they span few directions of patch space."""
    sigma = 25 / 255
    clean = _stripes(np_rng, 67, 90)
    noisy = clean + sigma * np_rng.standard_normal(clean.shape)
    got = float(estimate_sigma(torch.from_numpy(noisy.transpose(2, 0, 1)).float()[None])[0])
    assert got == pytest.approx(sigma, rel=0.05)


def test_a_large_image_is_read_on_a_coarser_grid_of_patches(np_rng, monkeypatch):
    """Past MAX_PATCHES the patches are taken with a stride (the memory stays bounded): the estimate holds."""
    sigma = 0.05
    clean = smooth_image(np_rng, 90, 70)
    y = torch.from_numpy((clean + sigma * np_rng.standard_normal(clean.shape)).transpose(2, 0, 1)).float()[None]
    full = float(estimate_sigma(y)[0])
    monkeypatch.setattr(noise_level, "MAX_PATCHES", 1000)  # 87 x 67 patches of 4 -> a stride of 3
    coarse = float(estimate_sigma(y)[0])
    assert coarse != full
    assert coarse == pytest.approx(sigma, rel=0.1) and full == pytest.approx(sigma, rel=0.06)


@pytest.mark.parametrize(
    ("c", "h", "w", "r"), [(3, 64, 64, 4), (3, 22, 22, 3), (3, 12, 10, 2), (3, 10, 10, None), (1, 7, 7, 2)]
)
def test_small_images_take_smaller_patches_down_to_a_minimum(np_rng, c, h, w, r):
    """Patches of 4, 3 or 2: the largest with 8 patches per dimension of patch space; below that, none."""
    assert patch_size(c, h, w) == r
    y = torch.from_numpy(np_rng.random((1, c, h, w))).float()
    if r is None:
        with pytest.raises(ValueError, match=r"enough pixels to estimate noise from \(RGB: at least 11 x 11\)"):
            estimate_sigma(y)
    else:
        assert torch.isfinite(estimate_sigma(y)).all()


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 3, 1, 8)])
def test_bad_shapes_name_the_problem(shape):
    with pytest.raises(ValueError, match=r"takes \(N, C, H, W\) images with enough pixels"):
        estimate_sigma(torch.rand(shape))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the estimate on the device, at set-up")
def test_the_estimate_on_cuda_is_the_cpus(np_rng):
    """gate_variance estimates on the fit's device (eigvalsh in float64 there): the same sigma as on the CPU."""
    clean = np.stack([_stripes(np_rng, 67, 90), smooth_image(np_rng, 67, 90)])
    noisy = clean + 25 / 255 * np_rng.standard_normal(clean.shape)
    y = torch.from_numpy(noisy.transpose(0, 3, 1, 2)).float()
    got = estimate_sigma(y.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), estimate_sigma(y), rtol=1e-5, atol=0)
