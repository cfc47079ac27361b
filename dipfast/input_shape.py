"""An input image's (C, H, W) read without converting it: the header of a file, a PIL image's size
and mode, an array's or tensor's shape. It lets the memory check refuse a fit that cannot fit
before anything of the image's size is allocated.

C counts the colour channels (an alpha channel is passed through, not fitted). None where the
shape cannot be read cheaply or is not one images.to_tensor accepts: the conversion then
raises its own one-line error.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "La": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1}


def _colour_channels(c: int) -> int:
    return c - 1 if c in (2, 4) else c


def _pil_channels(img: Image.Image) -> int:
    return MODE_CHANNELS.get(img.mode, 3)  # RGB, RGBA, palette, CMYK, YCbCr: 3 colour channels


def peek(image) -> tuple[int, int, int] | None:
    """(C, H, W) of an image-like, without decoding or converting it."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as img:  # reads the header only
                return _pil_channels(img), img.height, img.width
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return None
    if isinstance(image, Image.Image):
        return _pil_channels(image), image.height, image.width
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return 1, *image.shape
        if image.ndim == 3:
            return _colour_channels(image.shape[2]), image.shape[0], image.shape[1]
        return None
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if len(shape) == 4 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) == 3:
            return _colour_channels(shape[0]), shape[1], shape[2]
    return None
