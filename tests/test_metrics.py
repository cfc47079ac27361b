"""dipfast.metrics against scikit-image and hand computations (notes/reference_dip.md, "PSNR protocol")."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dipfast.metrics import psnr, psnr_y, ssim


def _pair(rng, shape, noise=0.05, dtype=torch.float64):
    ref = torch.rand(shape, generator=rng, dtype=torch.float64)
    x = (ref + noise * torch.randn(shape, generator=rng, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), ref.to(dtype)


def _levels(rng, shape):
    """An 8-bit image as floats k / 255."""
    return torch.randint(0, 256, shape, generator=rng).double() / 255


# --- psnr -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 48), (1, 17, 23), (1, 3, 20, 20)])
def test_psnr_equals_skimage(shape, rng):
    x, ref = _pair(rng, shape)
    ours = psnr(x, ref)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    theirs = peak_signal_noise_ratio(ref.numpy(), x.numpy(), data_range=1)
    assert abs(ours.item() - theirs) < 1e-10


def test_psnr_float32_inputs(rng):
    x, ref = _pair(rng, (3, 64, 64), dtype=torch.float32)
    theirs = peak_signal_noise_ratio(ref.numpy(), x.numpy(), data_range=1)
    # skimage squares float32 differences in float32; dipfast in float64: ~1e-7 relative in the MSE
    assert abs(psnr(x, ref).item() - theirs) < 1e-5
    assert (
        abs(psnr(x, ref).item() - peak_signal_noise_ratio(ref.double().numpy(), x.double().numpy(), data_range=1))
        < 1e-10
    )


def test_psnr_by_hand_and_data_range(rng):
    ref = torch.rand(2, 10, 10, generator=rng, dtype=torch.float64) * 0.5
    x = ref + 0.1
    assert psnr(x, ref).item() == pytest.approx(20.0, abs=1e-10)  # MSE 0.01
    assert psnr(x * 255, ref * 255, data_range=255).item() == pytest.approx(20.0, abs=1e-10)


# --- psnr_y -----------------------------------------------------------------------------------------------


def _matlab_y(rgb):
    """Matlab rgb2ycbcr luma for RGB in [0, 1], as a value in [0, 1]: (16 + 65.481 R + 128.553 G + 24.966 B) / 255."""
    return (16 + 65.481 * rgb[0] + 128.553 * rgb[1] + 24.966 * rgb[2]) / 255


def test_psnr_y_hand_checked():
    h, w = 20, 24
    ref = torch.tensor([100, 150, 200], dtype=torch.float64)[:, None, None].expand(3, h, w) / 255
    x = ref.clone()
    for r, c in [(10, 12), (h - 6, w - 6)]:  # inside the crop rows 4..h-6, columns 4..w-6
        x[0, r, c] = 110 / 255
    for r, c in [(3, 8), (h - 5, 8), (8, 3), (8, w - 5)]:  # shaved: 4 at the start, 5 at the end
        x[:, r, c] = torch.tensor([0.0, 1.0, 0.5])
    dy = 10 / 255 * 0.299 * 219 / 255  # a 10-level change of R moves Y by this
    n = (h - 9) * (w - 9)
    expected = 10 * math.log10(1 / (2 * dy**2 / n))
    assert psnr_y(x, ref) == pytest.approx(expected, abs=1e-10)
    # the same image as (H, W, C) arrays
    assert psnr_y(x.permute(1, 2, 0).numpy(), ref.permute(1, 2, 0).numpy()) == pytest.approx(expected, abs=1e-10)
    # one pixel further in on each side is counted
    x2 = x.clone()
    x2[0, 4, 4] = 110 / 255
    x2[0, h - 6, 4] = 110 / 255
    expected2 = 10 * math.log10(1 / (4 * dy**2 / n))
    assert psnr_y(x2, ref) == pytest.approx(expected2, abs=1e-10)


def test_psnr_y_quantises_like_saved_pngs():
    h, w = 16, 16
    ref = torch.tensor([60, 90, 120], dtype=torch.float64)[:, None, None].expand(3, h, w) / 255
    x = ref.clone()
    x[1, 8, 8] = 70 / 255
    base = psnr_y(x, ref)
    # the output is truncated (np_to_pil), the reference rounded: sub-level offsets change nothing
    assert psnr_y(x + 0.9 / 255, ref + 0.4 / 255) == pytest.approx(base, abs=1e-10)
    assert psnr_y(x, ref - 0.4 / 255) == pytest.approx(base, abs=1e-10)
    assert psnr_y(x - 0.1 / 255, ref) != pytest.approx(base, abs=1e-3)  # truncation drops a level


def test_psnr_y_random_against_independent_y(rng):
    x, ref = _levels(rng, (3, 40, 33)), _levels(rng, (3, 40, 33))
    yx, yr = _matlab_y(x.numpy()), _matlab_y(ref.numpy())
    crop = (slice(4, 40 - 5), slice(4, 33 - 5))
    expected = 10 * np.log10(1 / np.mean((yx[crop] - yr[crop]) ** 2))
    assert psnr_y(x, ref) == pytest.approx(expected, abs=1e-10)
    assert psnr_y(x[None], ref[None]) == pytest.approx(expected, abs=1e-10)  # (1, C, H, W)


def test_psnr_y_gray_has_no_y_conversion(rng):
    x, ref = _levels(rng, (1, 30, 30)), _levels(rng, (1, 30, 30))
    expected = 10 * np.log10(1 / np.mean((x[0, 4:25, 4:25] - ref[0, 4:25, 4:25]).numpy() ** 2))
    assert psnr_y(x, ref) == pytest.approx(expected, abs=1e-10)
    assert psnr_y(x[0].numpy(), ref[0].numpy()) == pytest.approx(expected, abs=1e-10)  # (H, W) arrays


def test_psnr_y_shave_argument(rng):
    x, ref = _levels(rng, (3, 30, 30)), _levels(rng, (3, 30, 30))
    yx, yr = _matlab_y(x.numpy()), _matlab_y(ref.numpy())
    expected = 10 * np.log10(1 / np.mean((yx[8:21, 8:21] - yr[8:21, 8:21]) ** 2))  # shave 8 start, 9 end
    assert psnr_y(x, ref, shave=8) == pytest.approx(expected, abs=1e-10)


def test_psnr_y_size_mismatch(rng):
    with pytest.raises(ValueError, match="one size"):
        psnr_y(torch.rand(3, 20, 20, generator=rng), torch.rand(3, 20, 21, generator=rng))


# --- ssim -------------------------------------------------------------------------------------------------


def test_ssim_rgb_equals_skimage(rng):
    x, ref = _pair(rng, (3, 48, 40), noise=0.1)
    theirs = structural_similarity(
        x.permute(1, 2, 0).numpy(), ref.permute(1, 2, 0).numpy(), data_range=1, channel_axis=2
    )
    assert ssim(x, ref) == pytest.approx(theirs, abs=1e-12)
    assert ssim(x.permute(1, 2, 0).numpy(), ref.permute(1, 2, 0).numpy()) == pytest.approx(theirs, abs=1e-12)
    assert 0 < ssim(x, ref) < 1


def test_ssim_gray_equals_skimage(rng):
    x, ref = _pair(rng, (1, 37, 29), noise=0.1)
    theirs = structural_similarity(x[0].numpy(), ref[0].numpy(), data_range=1)  # plain 2-D, no channel axis
    assert ssim(x, ref) == pytest.approx(theirs, abs=1e-12)
    assert ssim(x[0].numpy(), ref[0].numpy()) == pytest.approx(theirs, abs=1e-12)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)


def test_ssim_small_images(rng):
    x, ref = _pair(rng, (3, 5, 6), noise=0.1)
    theirs = structural_similarity(
        x.permute(1, 2, 0).numpy(), ref.permute(1, 2, 0).numpy(), data_range=1, channel_axis=2, win_size=5
    )
    assert ssim(x, ref) == pytest.approx(theirs, abs=1e-12)
    with pytest.raises(ValueError, match="3 x 3"):
        ssim(torch.rand(3, 2, 8, generator=rng), torch.rand(3, 2, 8, generator=rng))


def test_psnr_per_image_of_a_batch_is_each_image_psnr(rng):
    x, ref = torch.rand(3, 2, 5, 7, generator=rng), torch.rand(3, 2, 5, 7, generator=rng)
    per_image = psnr(x, ref, dim=(1, 2, 3))
    assert per_image.shape == (3,) and per_image.dtype == torch.float64
    assert per_image.tolist() == [psnr(x[i], ref[i]).item() for i in range(3)]
