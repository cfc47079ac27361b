"""The generator's input z: the original's get_noise() ('noise' and 'meshgrid')."""

from __future__ import annotations

import torch

INPUT_KINDS = ("noise", "meshgrid", "guide")


def noise_input(
    depth: int, h: int, w: int, generator: torch.Generator | None = None, scale: float = 0.1
) -> torch.Tensor:
    """z ~ U[0, scale): the original's zeros().uniform_() * 0.1, drawn on the CPU. (1, depth, h, w)."""
    return torch.rand(1, depth, h, w, generator=generator) * scale


def meshgrid_input(h: int, w: int) -> torch.Tensor:
    """The 2-channel [X, Y] grid in [0, 1] of the large-hole inpainting preset. (1, 2, h, w)."""
    x = torch.arange(w, dtype=torch.float64) / max(w - 1, 1)  # float64 then cast, as the original's numpy
    y = torch.arange(h, dtype=torch.float64) / max(h - 1, 1)
    return torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)])[None].float()
