"""Forward operators A of the DIP data term ||A(f(z)) - y||^2.

Each operator is a small object with ``A`` and ``A_adjoint`` (deepinv's naming). Buffers are built
once in ``__init__``; ``A`` writes to the object at most a copy of a buffer on a device it meets.
The adjoint of a linear operator is exact up to float rounding: ``<A x, y> == <x, A_adjoint y>``
(tests/test_operators.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LANCZOS_FACTORS = (2, 4, 8)


def lanczos_kernel(factor: int, support: int = 2) -> np.ndarray:
    """The original Downsampler's 2-D Lanczos kernel, phase 0.5, float64, summing to 1.

    K = 2 * support * factor taps per axis; tap i (1-based) sits at distance
    d_i = |i + 0.5 - c| / factor from the centre c = (2 * support * factor + 2) / 2, and
    L(d) = support * sin(pi d) * sin(pi d / support) / (pi^2 d^2). The kernel is L(d_i) L(d_j)
    divided by its sum: exactly the original's double loop, in the same order of
    operations (a literal port of the loop) so that the fp32 copy is bit-identical.
    """
    kernel_width = 2 * support * factor + 1
    size = kernel_width - 1
    center = (kernel_width + 1.0) / 2.0
    kernel = np.zeros((size, size), dtype=np.float64)
    for i in range(1, size + 1):
        for j in range(1, size + 1):
            di = abs(i + 0.5 - center) / factor
            dj = abs(j + 0.5 - center) / factor
            val = 1.0
            if di != 0:
                val = val * support * np.sin(np.pi * di) * np.sin(np.pi * di / support)
                val = val / (np.pi * np.pi * di * di)
            if dj != 0:
                val = val * support * np.sin(np.pi * dj) * np.sin(np.pi * dj / support)
                val = val / (np.pi * np.pi * dj * dj)
            kernel[i - 1][j - 1] = val
    return kernel / kernel.sum()


def lanczos2_taps(factor: int) -> np.ndarray:
    """Sum-normalised 1-D Lanczos2 taps (4 * factor of them); their outer product is lanczos_kernel."""
    d = np.abs(np.arange(1, 4 * factor + 1) - (4 * factor + 1) / 2) / factor
    taps = 2 * np.sin(np.pi * d) * np.sin(np.pi * d / 2) / (np.pi**2 * d**2)
    return taps / taps.sum()


class Identity:
    """A(x) = x: denoising, JPEG-artifact removal, enhancement, flash/no-flash."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def __repr__(self) -> str:
        return "Identity()"


class Mask:
    """A(x) = m * x with m in {0, 1} (1 = known pixel): inpainting and sparse-pixel restoration.

    mask: (H, W), (1, H, W) or (C, H, W), broadcast over the channels of x (N, C, H, W).
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask.to(y.dtype)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def __repr__(self) -> str:
        return f"Mask(known={self.mask.float().mean().item():.3f})"


class Lanczos2Decimation:
    """A(x) = S_f(h * R(x)): the SR loss operator of the original (Downsampler 'lanczos2', phase 0.5).

    R is replication padding by (K - f) / 2 on each side (K = 4f taps), h the Lanczos2 kernel,
    S_f keeps every f-th sample from the first: an (H, W) image becomes (H / f, W / f) with
    output pixel o centred on input coordinate o*f + (f - 1)/2. The original runs a dense
    C -> C conv with zeros off the diagonal; a depthwise conv computes the same sums.

    Calling the operator is A. Its kernel lives on each device (and dtype) from A's first call there on,
    so a CUDA graph captured after a warm-up call replays no host-to-device copy.
    """

    def __init__(self, factor: int):
        if factor not in LANCZOS_FACTORS:
            raise ValueError(f"Lanczos2 decimation factor must be one of {LANCZOS_FACTORS}; got {factor!r}")
        self.factor = factor
        self.kernel = torch.from_numpy(lanczos_kernel(factor).astype(np.float32))  # (K, K)
        self.pad = (self.kernel.shape[0] - factor) // 2
        self._on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        key = (x.device, x.dtype)
        if key not in self._on_device:
            self._on_device[key] = self.kernel.to(x.device, x.dtype)
        weight = self._on_device[key].expand(c, 1, -1, -1)
        padded = F.pad(x, (self.pad,) * 4, mode="replicate")
        return F.conv2d(padded, weight, stride=self.factor, groups=c)

    def A_adjoint(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The exact adjoint, by autograd: the vector-Jacobian product of the linear map A."""
        h, w = size if size is not None else (y.shape[-2] * self.factor, y.shape[-1] * self.factor)
        x = torch.zeros(*y.shape[:-2], h, w, dtype=y.dtype, device=y.device, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.A(x), x, y)
        return grad

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return h // self.factor, w // self.factor

    def __repr__(self) -> str:
        return f"Lanczos2Decimation(factor={self.factor})"


def bernoulli_mask(shape, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A float {0, 1} mask keeping about `keep` of the entries, as the original's get_bernoulli_mask.

    The original draws U[0, 1) and keeps entries above the zero fraction (1 - keep).
    """
    if not 0.0 <= keep <= 1.0 or math.isnan(keep):
        raise ValueError(f"keep must be a fraction in [0, 1]; got {keep!r}")
    return (torch.rand(shape, generator=generator) > 1.0 - keep).float()
