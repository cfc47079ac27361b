"""Image I/O and normalisation: every accepted input becomes a float32 (C, H, W) tensor in [0, 1],
and every output goes back to the type, layout, dtype and size of the input.

Accepted: a path, a PIL image, a numpy array (H, W) or (H, W, C), uint8, uint16 or float in
[0, 1], or a torch tensor (C, H, W) or (1, C, H, W); grayscale, gray + alpha, RGB, RGBA. The
alpha channel is kept apart and passed through (resized for super-resolution).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from dipfast.errors import InputError, InputTypeError

INTEGER_RANGES = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
TORCH_INTEGER_RANGES = {torch.uint8: 255, torch.uint16: 65535}
TEMP_MARK = "dipfast-tmp-"  # write_atomic's temporary names: .<name>.dipfast-tmp-<pid>


@dataclass(frozen=True)
class ImageForm:
    """How an input image was given, so that outputs can be handed back the same way."""

    kind: str  # 'pil' (paths too), 'numpy' or 'tensor'
    layout: str  # numpy: 'HW' or 'HWC'; tensor: 'CHW' or 'NCHW'
    dtype: object  # numpy or torch dtype; PIL: the mode
    device: torch.device | None = None


def load_image(path, name: str = "image") -> Image.Image:
    """Open and fully decode an image file, with a one-line error for each way it can fail."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{name} file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{name} {str(path)!r} is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name} file {str(path)!r} is not readable; check its permissions")
    return _decode(path, f"{name} file {str(path)!r}")


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """An image file's bytes, fully decoded (what load_image does to a file): for bytes read elsewhere."""
    return _decode(io.BytesIO(data), name)


def _decode(source, what: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image Pillow can read (PNG, JPEG, TIFF, ...)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} could not be decoded (truncated or corrupt?): {e}") from None


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode == "F":
        raise InputError("float ('F' mode) image files are not supported; save the image as 8- or 16-bit")
    if img.mode.startswith("I"):  # 16-bit grayscale: 'I;16', 'I;16B', or 'I' holding 0..65535
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise InputError(f"integer image with values outside 0..65535 is not supported (mode {img.mode})")
        return arr.astype(np.uint16)
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):  # palette, CMYK, YCbCr, ...
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    return np.asarray(img)


def to_tensor(image, name: str = "image") -> tuple[torch.Tensor, torch.Tensor | None, ImageForm]:
    """Normalise `image` to (x: (C, H, W) float32 in [0, 1], alpha: (1, H, W) or None, form)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, name)
    if isinstance(image, Image.Image):
        arr = _pil_to_array(image)
        x, alpha, _ = to_tensor(arr, name)
        return x, alpha, ImageForm("pil", "HWC", image.mode)
    if isinstance(image, np.ndarray):
        return _from_numpy(image, name)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image, name)
    raise InputTypeError(f"{name} must be a path, PIL image, numpy array or torch tensor; got {type(image).__name__}")


def _scale_to_unit(values: torch.Tensor, integer_range: int | None, name: str) -> torch.Tensor:
    """Integers by their full range, floats as they are (checked to lie in [0, 1])."""
    if integer_range is not None:
        return values.float() / integer_range
    x = values.float()
    if x.numel() and not torch.isfinite(values).all():
        raise InputError(f"{name} contains NaN or infinite values")
    if x.numel() and (values.min() < 0 or values.max() > 1):
        raise InputError(
            f"{name} is float with values in [{values.min().item():.4g}, {values.max().item():.4g}]; "
            "float images must lie in [0, 1] (divide 8-bit data by 255)"
        )
    return x


def _split_alpha(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = x.shape[0]
    if c in (1, 3):
        return x, None
    if c in (2, 4):
        return x[:-1], x[-1:]
    raise InputError(f"{name} has {c} channels; use 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)")


def _check_size(x: torch.Tensor, name: str) -> None:
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise InputError(f"{name} is empty ({x.shape[-2]} x {x.shape[-1]} pixels)")


def _from_numpy(arr: np.ndarray, name: str):
    integer_range = INTEGER_RANGES.get(np.dtype(arr.dtype))
    if integer_range is None and arr.dtype.kind != "f":
        raise InputError(f"{name} has dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if arr.ndim == 2:
        layout, chw = "HW", arr[None]
    elif arr.ndim == 3:
        layout, chw = "HWC", arr.transpose(2, 0, 1)
    else:
        raise InputError(f"{name} array must be (H, W) or (H, W, C); got shape {arr.shape}")
    values = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float64 if integer_range is None else np.int64))
    _check_size(values, name)
    x, alpha = _split_alpha(_scale_to_unit(values, integer_range, name), name)
    return x, alpha, ImageForm("numpy", layout, arr.dtype)


def _from_tensor(t: torch.Tensor, name: str):
    integer_range = TORCH_INTEGER_RANGES.get(t.dtype)
    if integer_range is None and not t.is_floating_point():
        raise InputError(f"{name} tensor has dtype {t.dtype}; use uint8, uint16 or a float dtype in [0, 1]")
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise InputError(f"{name} tensor has batch size {t.shape[0]}; pass one image, (1, C, H, W) or (C, H, W)")
        layout, chw = "NCHW", t[0]
    elif t.dim() == 3:
        layout, chw = "CHW", t
    else:
        raise InputError(f"{name} tensor must be (C, H, W) or (1, C, H, W); got shape {tuple(t.shape)}")
    values = chw.detach().cpu()
    values = values.to(torch.int64) if integer_range is not None else values.double()
    _check_size(values, name)
    x, alpha = _split_alpha(_scale_to_unit(values, integer_range, name), name)
    return x, alpha, ImageForm("tensor", layout, t.dtype, t.device)


def resize_alpha(alpha: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Alpha for a super-resolved image: bicubic, clipped to [0, 1]."""
    if alpha.shape[-2:] == (h, w):
        return alpha
    return F.interpolate(alpha[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def from_tensor(x: torch.Tensor, alpha: torch.Tensor | None, form: ImageForm):
    """Hand back x: (C, H, W) float in [0, 1] (alpha re-attached) in the input's own form.

    Integer outputs round to the nearest level (the original truncates; rounding makes a
    uint8 or uint16 image survive a float round trip unchanged).
    """
    x = x.detach().float().cpu().clamp(0, 1)
    if alpha is not None:
        x = torch.cat([x, resize_alpha(alpha.float(), *x.shape[-2:])])
    if form.kind == "tensor":
        if form.dtype in TORCH_INTEGER_RANGES:
            out = (x.double() * TORCH_INTEGER_RANGES[form.dtype]).round().to(torch.int64).to(form.dtype)
        else:
            out = x.to(form.dtype)
        out = out[None] if form.layout == "NCHW" else out
        return out.to(form.device)
    arr = _to_numpy(
        x,
        np.dtype(np.uint16)
        if form.kind == "pil" and str(form.dtype).startswith("I")
        else np.dtype(np.uint8)
        if form.kind == "pil"
        else np.dtype(form.dtype),
    )
    if form.kind == "numpy":
        return arr[..., 0] if form.layout == "HW" else arr
    return _array_to_pil(arr)


def _to_numpy(x: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    hwc = x.permute(1, 2, 0).double().numpy()
    if dtype in INTEGER_RANGES:
        return np.round(hwc * INTEGER_RANGES[dtype]).astype(dtype)
    return hwc.astype(dtype)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 or uint16 -> PIL (L, LA, RGB, RGBA or I;16)."""
    if arr.dtype == np.uint16 and arr.shape[2] > 1:
        arr = (arr.astype(np.float64) / 257).round().astype(np.uint8)  # Pillow has no 16-bit colour modes
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def save_image(image: Image.Image, path) -> None:
    """Save a PIL image; the format comes from the file name's extension."""
    image.save(path)


def encode_image(image: Image.Image, suffix: str) -> bytes:
    """The file bytes of `image` in the format of the file name suffix `suffix` ('.png', '.jpg', ...)."""
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"Pillow cannot write {suffix!r} files; use .png, .tif or .jpg")
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"could not encode a {image.mode} image as {fmt}: {e}") from None
    return buffer.getvalue()


def write_atomic(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, renamed when complete:
    a partial file never has the final name, whatever stops the process."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"could not write {str(path)!r}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
