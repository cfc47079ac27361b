"""dipfast.restore(): every task, every input form, the Result fields, seeds, callbacks, overrides
and every documented bad input. Tiny nets (tests/_helpers.py) and a handful of iterations."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import FAST, TINY, TINY_NET, random_image, random_mask, smooth_image
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import dipfast
from dipfast import memory
from dipfast.backends import AUTO
from dipfast.cuda_graph import first_cause
from dipfast.errors import GraphCaptureError
from dipfast.operators import Lanczos2Decimation, bernoulli_mask
from dipfast.presets import PRESETS

# Tiny nets on a shared 2-core machine: one torch thread is 10-20x faster than two competing.
pytestmark = pytest.mark.usefixtures("one_torch_thread", "auto_device_is_the_cpu")


def _steps(image, task="denoise", **kwargs):
    """Run restore() with report_every=1 and return (result, [(loss, out (1, C, H, W))] per iteration)."""
    seen = []

    def cb(p):
        seen.append((p.loss, p.image.clone()))

    kwargs.setdefault("iters", 3)
    result = dipfast.restore(image, task, callback=cb, report_every=1, **{"progress": False, **kwargs})
    return result, seen


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()[None]


# ---------------------------------------------------------------------------------------------
# tasks


def test_denoise_returns_the_input_form_and_fills_the_result(np_rng):
    noisy = random_image(np_rng, 16, 12, 3)
    r = dipfast.restore(noisy, iters=4, **FAST)
    assert isinstance(r, dipfast.Result)
    for img in (r.image, r.ema_image):
        assert isinstance(img, np.ndarray) and img.shape == (16, 12, 3) and img.dtype == np.float32
        assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert r.task == "denoise" and r.iterations == 4 and r.stop_reason == "iterations"
    assert r.its > 0 and r.seconds > 0
    assert r.psnr is None and r.ema_psnr is None and r.ssim is None
    assert r.settings.iterations == 4 and r.settings.net == TINY_NET and r.settings.input_depth == 4
    assert r.settings.backtracking == PRESETS["denoise"].backtracking
    device = dipfast.api.resolve_device("auto")
    plan = dipfast.backends.resolve("auto", "auto", device)  # what 'auto' means here (tests/test_backends.py)
    assert (r.backend, r.device, r.precision, r.seed) == (plan.backend, str(device), plan.precision, 0)
    assert "iterations=4" in repr(r)


def test_jpeg_uses_its_preset_net(np_rng):
    x = random_image(np_rng, 16, 16, 3, np.uint8)
    r = dipfast.restore(x, "jpeg", iters=2, progress=False)
    assert r.image.shape == x.shape and r.image.dtype == np.uint8
    assert r.settings.net == PRESETS["jpeg"].net and r.settings.input_depth == 3
    assert r.iterations == 2


@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("lr_size", [(1, 1), (2, 3), (5, 4)])
def test_sr_output_is_scale_times_the_input(np_rng, scale, lr_size):
    h, w = lr_size
    lr = random_image(np_rng, h, w, 3)
    hr = random_image(np_rng, h * scale, w * scale, 3)
    r = dipfast.restore(lr, "sr", scale=scale, target=hr, iters=2, **FAST)
    assert r.image.shape == r.ema_image.shape == (h * scale, w * scale, 3)
    assert r.settings.scale == scale and r.settings.reg_noise_std == PRESETS[f"sr{scale}"].reg_noise_std
    assert r.psnr is not None and math.isfinite(r.psnr)


def test_sr_loss_is_lanczos_decimation_of_the_output(np_rng):
    lr = random_image(np_rng, 5, 6, 3)
    r, seen = _steps(lr, "sr", scale=2, **TINY)
    A = Lanczos2Decimation(2)
    for (loss, out), row in zip(seen, r.history, strict=True):
        assert out.shape == (1, 3, 10, 12)
        expected = F.mse_loss(A.A(out), _chw(lr)).item()
        assert loss == row.loss == pytest.approx(expected, rel=1e-5)


def test_sr_with_pil_and_rgba(np_rng):
    rgba = random_image(np_rng, 3, 4, 4, np.uint8)
    rgba[..., 3] = 200
    r = dipfast.restore(Image.fromarray(rgba), "sr", scale=4, iters=1, **FAST)
    assert isinstance(r.image, Image.Image) and r.image.mode == "RGBA" and r.image.size == (16, 12)
    alpha = np.asarray(r.image)[..., 3]
    assert (alpha == 200).all()  # a constant alpha stays constant when resized


@pytest.mark.parametrize(
    "preset, z_input",
    [(None, "noise"), ("inpaint-meshgrid", "meshgrid"), ("inpaint-deep", "noise")],
)
def test_inpaint_presets_fit_the_known_pixels_only(np_rng, preset, z_input):
    x = random_image(np_rng, 16, 16, 3)
    m = random_mask(np_rng, 16, 16)
    r, seen = _steps(x, "inpaint", mask=m, preset=preset, iters=2)
    name = preset or "inpaint"
    assert r.settings == dataclasses.replace(PRESETS[name], iterations=2)
    assert r.settings.input == z_input
    assert r.image.shape == x.shape and r.backend == AUTO["cpu"]
    mt = torch.from_numpy(m).float()
    for loss, out in seen:  # the notebooks' MSE(out * m, img * m)
        assert loss == pytest.approx(F.mse_loss(out * mt, _chw(x) * mt).item(), rel=1e-5)


def test_inpaint_mask_forms_agree(np_rng):
    x = random_image(np_rng, 9, 11, 3)
    m = random_mask(np_rng, 9, 11)
    base = dipfast.restore(x, "inpaint", mask=m, iters=2, **FAST).image
    for form in (
        m.astype(np.uint8) * 255,
        m.astype(np.uint8),
        m.astype(np.float32),
        torch.from_numpy(m),
        torch.from_numpy(m).float()[None],
        Image.fromarray(m.astype(np.uint8) * 255),
    ):
        np.testing.assert_array_equal(dipfast.restore(x, "inpaint", mask=form, iters=2, **FAST).image, base)


@pytest.mark.parametrize("preset", [None, "restore-sparse"])
def test_restore_with_a_bernoulli_mask(np_rng, preset):
    gray = random_image(np_rng, 16, 16, None)  # barbara is gray
    mask = bernoulli_mask((16, 16), 0.5, generator=torch.Generator().manual_seed(int(np_rng.integers(1 << 30))))
    assert 0 < mask.mean() < 1
    r, seen = _steps(gray, "restore", mask=mask, preset=preset, iters=2)
    assert r.image.shape == (16, 16) and r.image.dtype == np.float32
    assert r.settings.lr == PRESETS[preset or "restore"].lr
    assert r.settings.backtracking == PRESETS[preset or "restore"].backtracking
    for loss, out in seen:
        expected = F.mse_loss(out * mask, torch.from_numpy(gray)[None, None] * mask).item()
        assert loss == pytest.approx(expected, rel=1e-5)


def test_enhance_is_twice_the_image_minus_the_coarse_fit(np_rng):
    x0 = random_image(np_rng, 12, 10, 3)
    r = dipfast.restore(x0, "enhance", iters=3, **FAST)
    coarse = r.extras["coarse"]
    assert coarse.shape == x0.shape and coarse.dtype == np.float32
    np.testing.assert_allclose(r.image, np.clip(2 * x0 - coarse, 0, 1), rtol=0, atol=1e-6)
    assert not np.allclose(r.image, coarse, atol=1e-3)


def test_enhance_uint8(np_rng):
    x0 = random_image(np_rng, 12, 10, 3, np.uint8)
    r = dipfast.restore(x0, "enhance", iters=2, **FAST)
    coarse = r.extras["coarse"]
    assert coarse.dtype == np.uint8 and r.image.dtype == np.uint8
    expected = np.clip(2 * x0.astype(int) - coarse.astype(int), 0, 255)
    assert np.abs(r.image.astype(int) - expected).max() <= 1  # two roundings of half a level


def test_flash_uses_the_guide_as_input(np_rng):
    noflash = random_image(np_rng, 16, 14, 3)
    g1, g2 = random_image(np_rng, 16, 14, 3), random_image(np_rng, 16, 14, 3)
    r1 = dipfast.restore(noflash, "flash", guide=g1, iters=2, net=TINY_NET, progress=False)
    r2 = dipfast.restore(noflash, "flash", guide=g2, iters=2, net=TINY_NET, progress=False)
    r1b = dipfast.restore(noflash, "flash", guide=g1, iters=2, net=TINY_NET, progress=False)
    assert r1.settings.input == "guide" and r1.settings.reg_noise_std == 0 and r1.settings.lr == 0.1
    assert r1.image.shape == noflash.shape
    assert not np.array_equal(r1.image, r2.image)
    np.testing.assert_array_equal(r1.image, r1b.image)


def test_custom_operator_blur(np_rng):
    x = random_image(np_rng, 12, 12, 3)
    k = torch.full((3, 1, 3, 3), 1 / 9)

    def blur(t):
        return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), k, groups=3)

    r, seen = _steps(x, "custom", operator=blur, **TINY)
    assert r.image.shape == x.shape
    for loss, out in seen:
        assert loss == pytest.approx(F.mse_loss(blur(out), _chw(x)).item(), rel=1e-5)


def test_custom_operator_with_scale(np_rng):
    y = random_image(np_rng, 6, 5, 3)

    def pool(t):
        return F.avg_pool2d(t, 2)

    r, seen = _steps(y, "custom", operator=pool, scale=2, **TINY)
    assert r.image.shape == (12, 10, 3)
    for loss, out in seen:
        assert out.shape == (1, 3, 12, 10)
        assert loss == pytest.approx(F.mse_loss(pool(out), _chw(y)).item(), rel=1e-5)


def test_custom_loss_replaces_the_data_term(np_rng):
    x = random_image(np_rng, 10, 10, 3)
    values, shapes = [], []

    def loss(out):
        shapes.append(tuple(out.shape))
        v = ((out - 0.25) ** 2).mean()
        values.append(v.item())
        return v

    r = dipfast.restore(x, "custom", loss=loss, iters=5, **FAST)
    assert shapes == [(1, 3, 10, 10)] * 5
    assert [row.loss for row in r.history] == pytest.approx(values, rel=1e-7)
    assert r.image.shape == x.shape


CAPTURE_FAILED = RuntimeError(  # what torch raised on an H200 for a loss calling .item() inside the capture
    "CUDA error: operation not permitted when stream is capturing\nSearch for `cudaErrorStreamCaptureUnsupported'"
)


@pytest.mark.parametrize("custom", [{"loss": lambda out: out.mean()}, {"operator": lambda out: out}, {}])
def test_a_step_the_cuda_graph_cannot_capture_is_one_line(np_rng, monkeypatch, custom):
    """A user's operator= or loss= that syncs (.item()) is the user's to fix: an InputError saying what a captured
    step needs; without one, the capture error names its cause and the backend that runs without a graph. The
    capture itself needs CUDA (tests/test_cuda_restore.py): here the engine raises what the capture raises."""

    def fit_many(*args, **kwargs):
        raise GraphCaptureError(CAPTURE_FAILED)

    monkeypatch.setattr(dipfast.engine, "fit_many", fit_many)
    expected = dipfast.InputError if custom else GraphCaptureError
    with pytest.raises(expected) as info:
        dipfast.restore(random_image(np_rng, 8, 8, 3), "custom" if custom else "denoise", iters=2, **custom, **FAST)
    message = str(info.value)
    assert "\n" not in message and "operation not permitted when stream is capturing" in message
    assert "backend='reference'" in message
    assert ("pure tensor function" in message) == bool(custom)


OUT_OF_MEMORY = torch.OutOfMemoryError(  # the first line of CUDA's message, as torch raises it
    "CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is "
    "free. Of the allocated memory 74.1 GiB is allocated by PyTorch\nIf reserved but unallocated memory is large ..."
)


@pytest.mark.parametrize("tile", [None, 16], ids=["whole", "tiles"])
def test_running_out_of_device_memory_is_one_line_with_the_options(np_rng, monkeypatch, tile):
    """The estimate let the fit start and the device ran out (cuDNN's search takes what it can): one line naming the
    allocation, the estimate and what to change, still a torch.OutOfMemoryError. The engine raises what CUDA raises,
    eagerly or inside the capture (tests/test_cuda_graph.py)."""

    def fit_many(*args, **kwargs):
        raise OUT_OF_MEMORY

    monkeypatch.setattr(dipfast.engine, "fit_many", fit_many)
    with pytest.raises(dipfast.InputError) as info:
        dipfast.restore(random_image(np_rng, 24, 24, 3), "denoise", iters=2, precision="fp32", tile=tile, **FAST)
    message = str(info.value)
    assert isinstance(info.value, torch.OutOfMemoryError) and "\n" not in message
    assert message.startswith("this fit ran out of memory on cpu (Tried to allocate 2.25 GiB) though the estimate, ")
    assert "precision='bf16'" in message
    assert ("a smaller tile= (this fit's: 16)" in message) == (tile is not None)
    assert ("tiles (a tile= smaller than the image)" in message) == (tile is None)


def test_a_capture_error_keeps_the_first_error_raised_inside_the_capture():
    """torch.cuda.graph's exit raises its own error over the one raised inside (the first is its context)."""
    assert first_cause(CAPTURE_FAILED) is CAPTURE_FAILED
    try:
        try:
            raise CAPTURE_FAILED
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as error:
        assert first_cause(error) is CAPTURE_FAILED


# ---------------------------------------------------------------------------------------------
# input and output forms


def _np(shape, dtype):
    def make(np_rng):
        c = shape[2] if len(shape) == 3 else None
        return random_image(np_rng, shape[0], shape[1], c, dtype)

    return make


def _torch(shape, dtype):
    def make(np_rng):
        if dtype == torch.uint8:
            return torch.from_numpy(np_rng.integers(0, 256, size=shape, dtype=np.uint8))
        return torch.from_numpy(np_rng.random(shape)).to(dtype)

    return make


FORMS = {
    "np HW uint8": _np((9, 7), np.uint8),
    "np HWC uint8": _np((9, 7, 3), np.uint8),
    "np HWC uint16": _np((9, 7, 3), np.uint16),
    "np HW uint16": _np((9, 7), np.uint16),
    "np HW float32": _np((9, 7), np.float32),
    "np HWC float32": _np((9, 7, 3), np.float32),
    "np HWC1 float64": _np((9, 7, 1), np.float64),
    "torch CHW float32": _torch((3, 9, 7), torch.float32),
    "torch NCHW float32": _torch((1, 3, 9, 7), torch.float32),
    "torch CHW float64": _torch((1, 9, 7), torch.float64),
    "torch CHW uint8": _torch((3, 9, 7), torch.uint8),
    "torch NCHW uint8": _torch((1, 3, 9, 7), torch.uint8),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_output_form_equals_input_form(np_rng, form):
    x = FORMS[form](np_rng)
    r = dipfast.restore(x, iters=2, **FAST)
    for img in (r.image, r.ema_image):
        assert type(img) is type(x)
        assert tuple(img.shape) == tuple(x.shape) and img.dtype == x.dtype
        if isinstance(img, torch.Tensor):
            assert img.device == x.device
    assert not np.array_equal(np.asarray(r.image), np.asarray(x))


@pytest.mark.parametrize(
    "mode, channels, dtype",
    [
        ("L", None, np.uint8),
        ("LA", 2, np.uint8),
        ("RGB", 3, np.uint8),
        ("RGBA", 4, np.uint8),
        ("I;16", None, np.uint16),
    ],
)
def test_pil_in_pil_out(np_rng, mode, channels, dtype):
    img = Image.fromarray(random_image(np_rng, 9, 7, channels, dtype))
    assert img.mode == mode
    r = dipfast.restore(img, iters=2, **FAST)
    for out in (r.image, r.ema_image):
        assert isinstance(out, Image.Image) and out.mode == mode and out.size == img.size


@pytest.mark.parametrize("as_str", [True, False])
def test_path_in_pil_out(np_rng, tmp_path, as_str):
    path = tmp_path / "in.png"
    Image.fromarray(random_image(np_rng, 11, 13, 3, np.uint8)).save(path)
    before = path.read_bytes()
    r = dipfast.restore(str(path) if as_str else Path(path), iters=2, **FAST)
    assert isinstance(r.image, Image.Image) and r.image.mode == "RGB" and r.image.size == (13, 11)
    assert path.read_bytes() == before


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_alpha_passes_through_numpy(np_rng, dtype):
    x = random_image(np_rng, 10, 8, 4, dtype)
    r = dipfast.restore(x, iters=2, **FAST)
    assert r.image.shape == x.shape and r.image.dtype == x.dtype
    np.testing.assert_array_equal(r.image[..., 3], x[..., 3])
    np.testing.assert_array_equal(r.ema_image[..., 3], x[..., 3])
    gray_alpha = random_image(np_rng, 10, 8, 2, dtype)
    np.testing.assert_array_equal(dipfast.restore(gray_alpha, iters=1, **FAST).image[..., 1], gray_alpha[..., 1])


def test_alpha_passes_through_pil_and_torch(np_rng):
    rgba = random_image(np_rng, 10, 8, 4, np.uint8)
    out = dipfast.restore(Image.fromarray(rgba), iters=2, **FAST).image
    np.testing.assert_array_equal(np.asarray(out)[..., 3], rgba[..., 3])
    t = torch.from_numpy(np_rng.random((4, 10, 8))).float()
    out_t = dipfast.restore(t, iters=2, **FAST).image
    assert out_t.shape == (4, 10, 8) and out_t.dtype == torch.float32
    assert torch.equal(out_t[3], t[3])


# ---------------------------------------------------------------------------------------------
# Result fields


def test_metrics_equal_an_independent_skimage_computation(np_rng):
    clean = smooth_image(np_rng, 16, 16)
    noisy = np.clip(clean + np_rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    r = dipfast.restore(noisy, target=clean, iters=5, **FAST)
    ref = clean.astype(np.float64)
    assert r.psnr == pytest.approx(peak_signal_noise_ratio(ref, r.image.astype(np.float64), data_range=1), abs=1e-9)
    assert r.ema_psnr == pytest.approx(
        peak_signal_noise_ratio(ref, r.ema_image.astype(np.float64), data_range=1), abs=1e-9
    )
    ssim = structural_similarity(ref, r.image.astype(np.float64), data_range=1, channel_axis=2)
    assert r.ssim == pytest.approx(ssim, abs=1e-9)
    assert r.psnr != r.ema_psnr
    # the history's PSNRs are those of each iteration's output; the last EMA row is the returned EMA
    assert all(row.psnr is not None and row.ema_psnr is not None for row in r.history)
    assert r.history[-1].ema_psnr == pytest.approx(r.ema_psnr, abs=1e-9)
    assert f"psnr={r.psnr:.2f}" in repr(r)


def test_sr_psnr_is_against_the_hr_target(np_rng):
    lr = random_image(np_rng, 4, 4, 3)
    hr = smooth_image(np_rng, 16, 16)
    r = dipfast.restore(lr, "sr", scale=4, target=hr, iters=2, **FAST)
    assert r.psnr == pytest.approx(
        peak_signal_noise_ratio(hr.astype(np.float64), r.image.astype(np.float64), data_range=1), abs=1e-9
    )
    assert r.ssim is not None


def test_no_ssim_below_three_pixels(np_rng):
    x = random_image(np_rng, 2, 2, 3)
    r = dipfast.restore(x, target=random_image(np_rng, 2, 2, 3), iters=1, **FAST)
    assert r.psnr is not None and r.ssim is None


def test_history_has_a_row_per_iteration(np_rng):
    x = random_image(np_rng, 8, 8, 3)
    r = dipfast.restore(x, iters=7, report_every=3, **FAST)
    assert [row.iteration for row in r.history] == list(range(1, 8))
    assert all(math.isfinite(row.loss) and row.loss > 0 for row in r.history)
    assert all(row.psnr is None and row.ema_psnr is None for row in r.history)
    assert all(isinstance(row.fell_back, bool) for row in r.history)
    seconds = [row.seconds for row in r.history]
    assert seconds == sorted(seconds) and seconds[-1] <= r.seconds
    assert r.iterations == 7 and r.its > 0


def test_same_seed_same_bits_other_seed_differs(np_rng):
    # bit-for-bit on CPU, the promise; on CUDA, bilinear-upsample and cuDNN backward use atomics
    x = random_image(np_rng, 12, 12, 3)
    a = dipfast.restore(x, iters=4, seed=3, device="cpu", **FAST)
    b = dipfast.restore(x, iters=4, seed=3, device="cpu", **FAST)
    c = dipfast.restore(x, iters=4, seed=4, device="cpu", **FAST)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.ema_image, b.ema_image)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert not np.array_equal(a.image, c.image)
    assert a.seed == 3 and c.seed == 4


def test_global_rng_untouched_and_ignored(np_rng):
    x = random_image(np_rng, 8, 8, 3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = dipfast.restore(x, iters=3, device="cpu", **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    b = dipfast.restore(x, iters=3, device="cpu", **FAST)
    np.testing.assert_array_equal(a.image, b.image)


# ---------------------------------------------------------------------------------------------
# callbacks and interruption


def test_callback_every_report_every_iterations(np_rng):
    x = random_image(np_rng, 8, 8, 3)
    calls = []
    r = dipfast.restore(x, iters=10, report_every=3, callback=lambda p: calls.append(p), **FAST)
    assert [p.iteration for p in calls] == [3, 6, 9, 10]
    by_iteration = {row.iteration: row for row in r.history}
    for p in calls:
        assert p.loss == by_iteration[p.iteration].loss
        assert p.image.shape == p.ema_image.shape == (1, 3, 8, 8)
        assert p.psnr is None and p.seconds >= 0


def test_callback_returning_true_stops(np_rng):
    x = random_image(np_rng, 8, 8, 3)
    r = dipfast.restore(x, iters=50, report_every=4, callback=lambda p: p.iteration >= 8, **FAST)
    assert r.stop_reason == "callback" and r.iterations == 8 and len(r.history) == 8
    assert r.image.shape == x.shape


def test_keyboard_interrupt_in_callback_returns_the_result_so_far(np_rng):
    x = random_image(np_rng, 8, 8, 3)

    def cb(p):
        if p.iteration == 6:
            raise KeyboardInterrupt

    r = dipfast.restore(x, iters=50, report_every=3, callback=cb, **FAST)
    assert r.stop_reason == "interrupted" and r.iterations == 6
    assert [row.iteration for row in r.history] == list(range(1, 7))
    assert r.image.shape == r.ema_image.shape == x.shape


def test_keyboard_interrupt_mid_iteration(np_rng):
    x = random_image(np_rng, 8, 8, 3)
    calls = [0]

    def op(t):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return t

    r = dipfast.restore(x, operator=op, iters=50, report_every=3, **FAST)
    assert r.stop_reason == "interrupted" and r.iterations == 4
    assert [row.iteration for row in r.history] == [1, 2, 3, 4]
    assert r.image.shape == x.shape


def test_keyboard_interrupt_before_any_step_propagates(np_rng):
    def op(t):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dipfast.restore(random_image(np_rng, 8, 8, 3), operator=op, iters=5, **FAST)


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_reach_the_settings_and_the_run(np_rng):
    x = random_image(np_rng, 10, 10, 3)
    base = dipfast.restore(x, iters=3, **FAST)
    slow = dipfast.restore(x, iters=3, lr=0.001, **FAST)
    still = dipfast.restore(x, iters=3, reg_noise_std=0, **FAST)
    more = dipfast.restore(x, iterations=5, **FAST)
    assert slow.settings.lr == 0.001 and base.settings.lr == PRESETS["denoise"].lr
    assert still.settings.reg_noise_std == 0 and base.settings.reg_noise_std == PRESETS["denoise"].reg_noise_std
    assert more.iterations == 5 and more.settings.iterations == 5
    assert not np.array_equal(base.image, slow.image)
    assert not np.array_equal(base.image, still.image)
    bigger = dipfast.nets.SkipSpec(channels_down=(4, 4, 4), channels_up=(4, 4, 4), channels_skip=(0, 0, 0))
    assert dipfast.restore(x, iters=1, net=bigger, input_depth=4, progress=False).settings.net == bigger


def test_unknown_override_is_named(np_rng):
    with pytest.raises(ValueError, match="iterashuns"):
        dipfast.restore(random_image(np_rng, 8, 8, 3), iterashuns=3, **FAST)


# ---------------------------------------------------------------------------------------------
# bad input: dipfast.InputError (a ValueError) naming the problem

BAD = {
    "task sr5": ({"task": "sr5"}, "unknown task 'sr5'"),
    "unknown task": ({"task": "deblur"}, "unknown task"),
    "unknown preset": ({"preset": "nope"}, "unknown preset 'nope'"),
    "preset of another task": ({"preset": "sr4"}, "is for task 'sr'"),
    "sr without scale": ({"task": "sr"}, "needs scale"),
    "sr scale 3": ({"task": "sr", "scale": 3}, "scale must be one of"),
    "sr scale 16": ({"task": "sr", "scale": 16}, "scale must be one of"),
    "sr preset of another scale": ({"task": "sr", "scale": 2, "preset": "sr4"}, "is for scale 4"),
    "scale for denoise": ({"scale": 2}, "scale= applies"),
    "inpaint without mask": ({"task": "inpaint"}, "needs mask="),
    "restore without mask": ({"task": "restore"}, "needs mask="),
    "mask of another size": ({"task": "inpaint", "mask": np.ones((8, 9), bool)}, "mask is 8 x 9"),
    "mask for denoise": ({"mask": np.ones((16, 16), bool)}, "mask= applies"),
    "mask with no known pixel": ({"task": "inpaint", "mask": np.zeros((16, 16), bool)}, "no known pixel"),
    "flash without guide": ({"task": "flash", "input_depth": 3}, "needs guide="),
    "guide of another size": (
        {"task": "flash", "input_depth": 3, "guide": np.zeros((8, 8, 3), np.float32)},
        "guide is",
    ),
    "gray guide": (
        {"task": "flash", "input_depth": 3, "guide": np.zeros((16, 16), np.float32)},
        "guide has 1 channels",
    ),
    "target of another size": ({"target": np.zeros((8, 8, 3), np.float32)}, "target is"),
    "target with other channels": ({"target": np.zeros((16, 16), np.float32)}, "target is"),
    "sr target at LR size": ({"task": "sr", "scale": 2, "target": np.zeros((16, 16, 3), np.float32)}, "target is"),
    "unknown device": ({"device": "tpu"}, "unknown device 'tpu'"),
    "unsupported device": ({"device": "mps"}, "unsupported device 'mps'"),
    "unknown backend": ({"backend": "nope"}, "unknown backend 'nope'"),
    "unknown precision": ({"precision": "fp8"}, "unknown precision 'fp8'"),
    "iters 0": ({"iters": 0}, "iterations must be a positive integer; got 0"),
    "iters negative": ({"iters": -5}, "iterations must be a positive integer; got -5"),
    "iters float": ({"iters": 2.5}, "iterations must be a positive integer"),
    "iterations 0": ({"iterations": 0}, "iterations must be a positive integer"),
    "iters and iterations": ({"iters": 2, "iterations": 3}, "not both"),
    "negative seed": ({"seed": -1}, "seed"),
    "report_every 0": ({"report_every": 0}, "report_every"),
    "negative lr": ({"lr": -0.1}, "lr must be positive"),
    "custom without operator": ({"task": "custom"}, "needs operator= or loss="),
    "operator and loss": ({"operator": lambda x: x, "loss": lambda x: x.mean()}, "not both"),
    "operator of wrong shape": ({"operator": lambda x: x[:, :, :4]}, "operator maps"),
    "loss not a scalar": ({"task": "custom", "loss": lambda x: x}, "scalar"),
    "meshgrid with depth 4": (
        {"task": "inpaint", "preset": "inpaint-meshgrid", "mask": np.ones((16, 16), bool)},
        "meshgrid input has 2 channels",
    ),
    "callback not callable": ({"callback": 3}, "callback must be callable"),
    "float image above 1": ({"image": np.full((16, 16, 3), 2.0, np.float32)}, "must lie in \\[0, 1\\]"),
    "NaN image": ({"image": np.full((16, 16), np.nan, np.float32)}, "NaN"),
    "empty image": ({"image": np.zeros((0, 16, 3), np.float32)}, "empty"),
    "5 channels": ({"image": np.zeros((16, 16, 5), np.float32)}, "5 channels"),
    "int32 image": ({"image": np.zeros((16, 16), np.int32)}, "dtype int32"),
    "batch of two": ({"image": torch.zeros(2, 3, 16, 16)}, "batch size 2"),
    "list image": ({"image": [[0.5]]}, "must be a path"),
    "missing path": ({"image": "/nonexistent/dir/x.png"}, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_input_error(np_rng, case):
    kwargs, match = BAD[case]
    kwargs = {**FAST, **kwargs}
    image = kwargs.pop("image", None)
    image = random_image(np_rng, 16, 16, 3) if image is None else image
    if "iterations" not in kwargs:
        kwargs.setdefault("iters", 1)
    with pytest.raises(dipfast.InputError, match=match) as info:
        dipfast.restore(image, **kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_cuda_without_a_gpu_is_an_input_error(np_rng, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(dipfast.InputError, match="no CUDA GPU"):
            dipfast.restore(random_image(np_rng, 8, 8, 3), device=device, iters=1, **FAST)
    r = dipfast.restore(random_image(np_rng, 8, 8, 3), device="auto", iters=1, **FAST)
    assert r.device == "cpu"


def test_a_bad_input_leaves_the_rng_alone(np_rng):
    state = torch.get_rng_state()
    with pytest.raises(dipfast.InputError):
        dipfast.restore(random_image(np_rng, 8, 8, 3), "inpaint", mask=np.ones((3, 3), bool), iters=1, **FAST)
    assert torch.equal(torch.get_rng_state(), state)


def test_each_result_names_the_memory_estimate_of_the_step_that_fitted_it(np_rng):
    """Two same-size images and one of another size: two steps, the first of two networks (beside the peak that
    dipfast bench throughput measures)."""
    images = [random_image(np_rng, 16, 16), random_image(np_rng, 16, 16), random_image(np_rng, 24, 16)]
    results = dipfast.restore(images, iters=1, backend="native", precision="fp32", **FAST)
    pair, single = (memory.estimate_bytes(TINY_NET, 4, 3, size, n, "fp32") / memory.MIB for size, n in
                    (((16, 16), 2), ((24, 16), 1)))  # fmt: skip
    assert [r.extras["memory_estimate_mib"] for r in results] == [pair, pair, single]
    assert pair > single
