"""The noise level of an observation, estimated from the observation alone.

Donoho's estimator ("De-noising by soft-thresholding", IEEE Trans. Inf. Theory 41(3), 1995): the
finest diagonal (HH) band of a Haar wavelet transform is almost all noise in a natural image, so
sigma = median(|HH|) / 0.6745, the median absolute deviation of a Gaussian. Per channel, averaged.

Early stopping's noise gate (dipfast.early_stop) compares the fit's loss ||x - y||^2 / n with sigma^2:
DIP's best output sits where the loss has come down to about the noise's variance (measured on the
paper's images: 0.81-1.12 x sigma^2 at the PSNR peak, at 32, 64 and 96 px). The estimate follows what
the data term sees, so an image whose noise is clipped at black or white (a dark photo) gets the lower
sigma its pixels actually carry, not the sigma the noise was drawn with.
"""

from __future__ import annotations

import torch

GAUSSIAN_MAD = 0.6745  # the median of |N(0, 1)|: MAD / 0.6745 = sigma for Gaussian noise


def estimate_sigma(y: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images (H, W >= 2) -> (N,) float32: each image's noise sigma, in y's units."""
    if y.dim() != 4 or min(y.shape[-2:]) < 2:
        raise ValueError(f"estimate_sigma takes (N, C, H, W) images of at least 2 x 2; got {tuple(y.shape)}")
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    x = y[..., :h, :w].float()
    # the orthonormal Haar HH coefficient of each 2 x 2 block
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    mad = hh.abs().flatten(2).median(dim=2).values  # (N, C)
    return (mad / GAUSSIAN_MAD).mean(dim=1)
