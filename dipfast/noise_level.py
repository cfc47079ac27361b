"""The noise level of an observation, estimated from the observation alone.

Chen, Zhu and Heng's estimator ("An Efficient Statistical Method for Image Noise Level Estimation", ICCV
2015): the r x r x C patches of a natural image vary in a few directions of patch space, white noise in all
of them equally. So the eigenvalues of the patches' covariance are sigma^2 each, plus the image's variance in
a few large ones. Drop the largest eigenvalue, one at a time, until the mean of those left is at their median
(no eigenvalue left stands out): that mean is sigma^2.

Early stopping's noise gate (dipfast.early_stop) compares the fit's loss ||x - y||^2 / n with sigma^2: DIP's
best output sits where the loss has come down to about the noise's variance. The estimate measures the
variance the pixels carry, so an image whose noise is clipped at black or white (a dark photo) gets the lower
sigma its pixels actually carry, as the data term sees it, not the sigma the noise was drawn with.

Why not Donoho's MAD of the finest Haar diagonal band, dipfast's estimate before: fine regular texture puts
image into that band too. On one 128 px tile of barbara's stripes it read the variance 1.34x the noise's, so
the gate opened at iteration 581 instead of 877 and the tile's fit returned 5.0 dB less. This estimate reads
it 1.01x. Over the paper's 9 images (32-224 px crops, sigma 15, 25 and 50) its variance is 0.78-1.06x the
noise the pixels carry (0.91-1.06x from 96 px up); Donoho's was 0.75-1.74x
(bench/results/2026-12-03-cpu-noise-estimate/).
"""

from __future__ import annotations

import math

import torch

PATCH_SIZES = (4, 3, 2)  # the largest that has PATCHES_PER_DIMENSION: fewer patches spread the noise's eigenvalues
PATCHES_PER_DIMENSION = 8  # patches per dimension of patch space (r * r * C) that the covariance is taken over
MAX_PATCHES = 1 << 18  # beyond this, patches on a coarser grid: a photo's estimate in ~100 MB of float64


def patch_size(channels: int, h: int, w: int) -> int | None:
    """The patch side the estimate uses on a (C, H, W) image, or None: too small to estimate its noise."""
    for r in PATCH_SIZES:
        if max(h - r + 1, 0) * max(w - r + 1, 0) >= PATCHES_PER_DIMENSION * channels * r * r:
            return r
    return None


def _noise_eigenvalue(image: torch.Tensor, r: int) -> torch.Tensor:
    """() float64: sigma^2 of one (C, H, W) image, from its r x r patches' covariance."""
    h, w = image.shape[-2:]
    stride = max(1, math.ceil(math.sqrt((h - r + 1) * (w - r + 1) / MAX_PATCHES)))
    patches = torch.nn.functional.unfold(image[None].double(), r, stride=stride)[0]  # (C r r, L)
    patches = patches - patches.mean(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(patches @ patches.T / patches.shape[1]).flip(0)  # largest first
    d = len(eigenvalues)
    # tail_mean[i]: the mean of eigenvalues i.. ; the first i where as many of them lie above it as below
    count = torch.arange(d, 0, -1, device=image.device, dtype=torch.float64)
    tail_mean = eigenvalues.flip(0).cumsum(0).flip(0) / count
    in_tail = torch.ones(d, d, dtype=torch.bool, device=image.device).triu()  # [i, j]: j >= i
    above = ((eigenvalues[None] > tail_mean[:, None]) & in_tail).sum(1)
    below = ((eigenvalues[None] < tail_mean[:, None]) & in_tail).sum(1)
    first = torch.argmax((above >= below).int())  # the last (a single eigenvalue) always qualifies
    return tail_mean[first].clamp_min(0)


def estimate_sigma(y: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N,) float32: each image's noise sigma, in y's units (images of at least
    patch_size(C, H, W) pixels: 11 x 11 for RGB)."""
    r = patch_size(*y.shape[1:]) if y.dim() == 4 else None
    if r is None:
        raise ValueError(
            f"estimate_sigma takes (N, C, H, W) images with enough pixels to estimate noise from "
            f"(RGB: at least 11 x 11); got {tuple(y.shape)}"
        )
    return torch.stack([_noise_eigenvalue(image, r) for image in y]).sqrt().float()
