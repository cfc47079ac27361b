"""Quality metrics with the paper's protocols (notes/reference_dip.md, "PSNR protocol").

- psnr: the notebooks' compare_psnr with data range 1 over all channels and pixels of the
  full image, the mean taken in float64. Works on the device, without a host sync.
- psnr_y: the super-resolution tables' protocol: 8-bit images, Y = (0.299 R + 0.587 G +
  0.114 B) * 219/255 + 16/255, 4 pixels shaved at the start and 5 at the end of each axis.
- ssim: scikit-image's structural_similarity with its defaults (7 x 7 uniform window).
"""

from __future__ import annotations

import numpy as np
import torch


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, dim=None) -> torch.Tensor:
    """10 log10(data_range^2 / mean((x - ref)^2)), a float64 0-dim tensor on x's device; with `dim`, the
    mean over those dimensions only (dim=(1, 2, 3): one PSNR per image of an (N, C, H, W) batch)."""
    diff = (x.double() - ref.double()).square()
    mse = diff.mean() if dim is None else diff.mean(dim=dim)
    return 10 * torch.log10(data_range**2 / mse)


def _to_y(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> Y in [16/255, 235/255]: OpenCV's YCrCb luma scaled as Matlab's rgb2ycbcr."""
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return (y * 219 + 16) / 255


def psnr_y(x, ref, shave: int = 4) -> float:
    """The SR evaluation protocol. x, ref: (C, H, W) tensors or (H, W[, C]) arrays in [0, 1].

    Both images are quantised to 8 bits as saved PNGs are (the output by truncation, as the
    original's np_to_pil; the reference is assumed 8-bit already, so it is rounded), converted
    to Y (gray images are used as they are) and cropped by `shave` at the start and
    `shave + 1` at the end of each axis, as the paper's evaluation script does.
    """
    x, ref = _hwc(x), _hwc(ref)
    if x.shape != ref.shape:
        raise ValueError(f"psnr_y needs images of one size; got {x.shape} and {ref.shape}")
    x = np.clip(x * 255, 0, 255).astype(np.uint8) / 255.0
    ref = np.round(np.clip(ref * 255, 0, 255)) / 255.0
    if x.shape[2] == 3:
        x, ref = _to_y(x), _to_y(ref)
    else:
        x, ref = x[..., 0], ref[..., 0]
    h, w = x.shape
    x = x[shave : h - shave - 1, shave : w - shave - 1]
    ref = ref[shave : h - shave - 1, shave : w - shave - 1]
    mse = np.mean((x - ref) ** 2)
    return float(10 * np.log10(1.0 / mse))


def ssim(x, ref) -> float:
    """SSIM over all channels, data range 1. x, ref: (C, H, W) tensors or (H, W[, C]) arrays."""
    x, ref = _hwc(x), _hwc(ref)
    small = min(x.shape[:2])
    win = min(7, small if small % 2 else small - 1)
    if win < 3:
        raise ValueError(f"ssim needs images of at least 3 x 3 pixels; got {x.shape[0]} x {x.shape[1]}")
    from skimage.metrics import structural_similarity  # scikit-image brings SciPy: 0.25 s that every start paid

    return float(structural_similarity(x, ref, data_range=1.0, channel_axis=2, win_size=win))


def _hwc(img) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().double()
        img = img[0] if img.dim() == 4 else img
        return img.permute(1, 2, 0).numpy()
    arr = np.asarray(img, dtype=np.float64)
    return arr[..., None] if arr.ndim == 2 else arr
