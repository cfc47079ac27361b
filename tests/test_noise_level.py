"""dipfast.noise_level: Donoho's MAD estimate of the noise sigma, per image, from the observation alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import smooth_image

from dipfast.noise_level import estimate_sigma


@pytest.mark.parametrize(("h", "w", "c"), [(65, 48, 3), (40, 81, 1), (96, 96, 4)])
def test_the_sigma_of_gaussian_noise_on_a_smooth_image(np_rng, h, w, c):
    """Each image of a batch, its own sigma, within 6% (the median of a few thousand coefficients), odd sizes."""
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


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 3, 1, 8)])
def test_bad_shapes_name_the_problem(shape):
    with pytest.raises(ValueError, match=r"takes \(N, C, H, W\) images of at least 2 x 2"):
        estimate_sigma(torch.rand(shape))
