"""dipfast.images: every accepted form round-trips exactly; every bad input is a one-line InputError."""

import io

import numpy as np
import pytest
import torch
from _helpers import random_image
from PIL import Image

from dipfast import images
from dipfast.errors import InputError, InputTypeError
from dipfast.images import from_tensor, load_image, resize_alpha, to_tensor


def _np_image(rng, shape, dtype):
    gen = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))
    if dtype == np.uint8:
        return gen.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return gen.integers(0, 65536, shape, dtype=np.uint16)
    return gen.random(shape).astype(dtype)


# --- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize(
    "shape", [(13, 17), (13, 17, 1), (13, 17, 2), (13, 17, 3), (13, 17, 4)], ids=["HW", "HWC1", "HWC2", "HWC3", "HWC4"]
)
def test_numpy_round_trip(shape, dtype, rng):
    arr = _np_image(rng, shape, dtype)
    x, alpha, form = to_tensor(arr)
    channels = 1 if len(shape) == 2 else shape[2]
    assert x.dtype == torch.float32 and x.shape == ((channels - 1 if channels in (2, 4) else channels), 13, 17)
    assert (alpha is None) == (channels in (1, 3))
    assert 0 <= x.min() and x.max() <= 1
    out = from_tensor(x, alpha, form)
    assert isinstance(out, np.ndarray) and out.dtype == arr.dtype and out.shape == arr.shape
    if dtype == np.float64:  # the working copy is float32: a float64 image comes back within fp32 rounding
        np.testing.assert_allclose(out, arr, rtol=0, atol=6e-8)
    else:
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 255), (np.uint16, 65535)])
def test_integer_scaling(dtype, scale, rng):
    arr = _np_image(rng, (6, 7, 3), dtype)
    x, _, _ = to_tensor(arr)
    torch.testing.assert_close(x, torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float64) / scale).float())


@pytest.mark.parametrize("layout", ["CHW", "NCHW"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_tensor_round_trip(layout, dtype, channels, rng):
    if dtype == torch.uint8:
        t = torch.randint(0, 256, (channels, 11, 9), generator=rng, dtype=torch.uint8)
    elif dtype == torch.uint16:
        t = torch.from_numpy(_np_image(rng, (channels, 11, 9), np.uint16))
    else:
        t = torch.rand(channels, 11, 9, generator=rng).to(dtype)
    t = t[None] if layout == "NCHW" else t
    x, alpha, form = to_tensor(t)
    assert x.shape[-2:] == (11, 9) and x.dtype == torch.float32
    out = from_tensor(x, alpha, form)
    assert isinstance(out, torch.Tensor) and out.dtype == t.dtype and out.shape == t.shape
    assert out.device == t.device
    if dtype == torch.float64:
        torch.testing.assert_close(out, t, rtol=0, atol=6e-8)  # through the float32 working copy
    else:
        assert torch.equal(out, t)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16", "P"])
def test_pil_files_round_trip(mode, tmp_path, rng):
    if mode == "I;16":
        img = Image.fromarray(_np_image(rng, (19, 23), np.uint16))
        assert img.mode == "I;16"
    elif mode == "P":
        img = Image.fromarray(_np_image(rng, (19, 23, 3), np.uint8)).quantize(37)
    else:
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        arr = _np_image(rng, (19, 23, channels), np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=None)
        assert img.mode == mode
    path = tmp_path / f"in_{mode.replace(';', '')}.png"
    img.save(path)
    x, alpha, form = to_tensor(path)  # a pathlib path ...
    assert to_tensor(str(path))[0].equal(x)  # ... and a str give the same
    out = from_tensor(x, alpha, form)
    assert isinstance(out, Image.Image) and out.size == img.size
    expected = img.convert("RGB") if mode == "P" else img
    assert out.mode == expected.mode or (mode == "I;16" and out.mode.startswith("I"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    out.save(tmp_path / "out.png")  # a PIL image the caller can save as it came
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))


def test_pil_object_round_trip(rng):
    img = Image.fromarray(_np_image(rng, (8, 10, 3), np.uint8))
    x, alpha, form = to_tensor(img)
    assert form.kind == "pil" and alpha is None
    np.testing.assert_array_equal(np.asarray(from_tensor(x, alpha, form)), np.asarray(img))


def test_palette_with_transparency_keeps_alpha(tmp_path, rng):
    img = Image.fromarray(_np_image(rng, (9, 12, 3), np.uint8)).quantize(16)
    img.info["transparency"] = 3
    img.save(tmp_path / "p.png", transparency=3)
    x, alpha, form = to_tensor(tmp_path / "p.png")
    assert alpha is not None
    expected = Image.open(tmp_path / "p.png").convert("RGBA")
    np.testing.assert_array_equal(np.asarray(from_tensor(x, alpha, form)), np.asarray(expected))


# --- alpha --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_passes_through(channels, rng):
    arr = _np_image(rng, (15, 12, channels), np.uint8)
    x, alpha, form = to_tensor(arr)
    assert x.shape[0] == channels - 1 and alpha.shape == (1, 15, 12)
    out = from_tensor(1 - x, alpha, form)  # a "restored" colour part
    np.testing.assert_array_equal(out[..., -1], arr[..., -1])  # alpha untouched
    np.testing.assert_array_equal(out[..., :-1], 255 - arr[..., :-1])


def test_alpha_passes_through_tensor(rng):
    t = torch.rand(1, 4, 10, 10, generator=rng)
    x, alpha, form = to_tensor(t)
    out = from_tensor(x.flip(-1), alpha, form)
    assert torch.equal(out[:, 3], t[:, 3])
    assert torch.equal(out[:, :3], t[:, :3].flip(-1))


def test_alpha_resized_for_super_resolution(rng):
    alpha = torch.rand(1, 6, 5, generator=rng)
    big = resize_alpha(alpha, 24, 20)
    assert big.shape == (1, 24, 20) and 0 <= big.min() and big.max() <= 1
    constant = torch.full((1, 6, 5), 0.6)
    torch.testing.assert_close(resize_alpha(constant, 24, 20), torch.full((1, 24, 20), 0.6))
    assert resize_alpha(alpha, 6, 5) is alpha
    _x, a, form = to_tensor(torch.rand(4, 6, 5, generator=rng))
    out = from_tensor(torch.rand(3, 24, 20, generator=rng), a, form)
    assert out.shape == (4, 24, 20)


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        to_tensor(tmp_path / "nope.png")


def test_folder(tmp_path):
    with pytest.raises(InputError, match="folder"):
        to_tensor(tmp_path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all\n" * 20)
    with pytest.raises(InputError, match="not an image"):
        to_tensor(path)


def test_truncated_png(tmp_path, rng):
    path = tmp_path / "t.png"
    Image.fromarray(_np_image(rng, (64, 64, 3), np.uint8)).save(path)  # noise: it cannot compress away
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(path)
    with pytest.raises(InputError, match="truncated or corrupt"):
        to_tensor(path)


@pytest.mark.parametrize(
    "image",
    [
        np.empty((0, 5), np.uint8),
        np.empty((4, 0, 3), np.float32),
        torch.empty(3, 0, 4),
        torch.empty(1, 1, 5, 0, dtype=torch.uint8),
    ],
    ids=["np 0xW", "np Hx0xC", "torch 0 rows", "torch NCHW 0 cols"],
)
def test_zero_pixels(image):
    with pytest.raises(InputError, match="empty"):
        to_tensor(image)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, np.int8, np.uint32])
def test_wrong_numpy_dtypes(dtype, rng):
    arr = (_np_image(rng, (5, 6, 3), np.uint8) > 100).astype(dtype)
    arr.flat[0] = 1  # not all zeros
    with pytest.raises(InputError, match="dtype"):
        to_tensor(arr)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.int64])
def test_wrong_tensor_dtypes(dtype, rng):
    t = (torch.rand(3, 5, 6, generator=rng) > 0.5).to(dtype)
    with pytest.raises(InputError, match="dtype"):
        to_tensor(t)


@pytest.mark.parametrize("offset", [1.0, -0.5])
def test_float_out_of_range(offset, rng):
    arr = _np_image(rng, (5, 6), np.float32) + offset
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        to_tensor(arr)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        to_tensor(torch.from_numpy(arr)[None])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf(bad, rng):
    arr = _np_image(rng, (5, 6, 3), np.float32)
    arr[2, 3, 1] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        to_tensor(arr)
    with pytest.raises(InputError, match="NaN or infinite"):
        to_tensor(torch.from_numpy(arr).permute(2, 0, 1))


def test_five_channels(rng):
    with pytest.raises(InputError, match="5 channels"):
        to_tensor(_np_image(rng, (5, 6, 5), np.uint8))
    with pytest.raises(InputError, match="5 channels"):
        to_tensor(torch.rand(5, 6, 7, generator=rng))


def test_batch_of_two(rng):
    with pytest.raises(InputError, match="batch size 2"):
        to_tensor(torch.rand(2, 3, 6, 7, generator=rng))
    with pytest.raises(InputError, match=r"\(H, W\) or \(H, W, C\)"):
        to_tensor(_np_image(rng, (2, 6, 7, 3), np.uint8))


def test_wrong_rank_and_type(rng):
    with pytest.raises(InputError, match=r"\(C, H, W\)"):
        to_tensor(torch.rand(6, 7, generator=rng))
    with pytest.raises(InputTypeError, match="list"):
        to_tensor([[0.5, 0.5]])
    assert issubclass(InputError, ValueError) and issubclass(InputTypeError, TypeError)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_encode_then_decode_is_lossless_for_lossless_formats(np_rng, suffix):
    arr = random_image(np_rng, 7, 5, 3, np.uint8)
    data = images.encode_image(Image.fromarray(arr), suffix)
    np.testing.assert_array_equal(np.asarray(images.decode_image(data)), arr)


def test_encode_refuses_a_suffix_pillow_cannot_write():
    with pytest.raises(InputError, match=r"Pillow cannot write '\.xyz' files"):
        images.encode_image(Image.new("RGB", (2, 2)), ".xyz")


def test_decode_of_cut_bytes_is_one_line():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="PNG")
    with pytest.raises(InputError, match="could not be decoded") as e:
        images.decode_image(buffer.getvalue()[:60], "input 'x.png'")
    assert "\n" not in str(e.value)


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    images.write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(InputError, match="could not write") as e:
        images.write_atomic(tmp_path / "missing" / "out.png", b"x")
    assert "\n" not in str(e.value) and not (tmp_path / "missing").exists()
