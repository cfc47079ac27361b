"""The per-iteration input perturbation of N fits: noise_n <- std * N(0, 1), each network its own stream.

Two kinds, chosen by the backend table (backends.BACKEND_TABLE):
- 'generator': torch's normal_ with one seeded torch.Generator per network on the device (registered
  with a CUDA graph, so each replay draws fresh numbers);
- 'philox': the counter-based draw of dipfast.native.philox, keyed by (seed, iteration): no generator
  state, and it spreads over torch's threads. Where the C++ extension is absent its eager twin draws
  the same stream.
"""

from __future__ import annotations

import torch

from dipfast.native import philox


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor viewed with its dimensions in memory order: a contiguous view of its storage."""
    return t.permute(*sorted(range(t.dim()), key=lambda d: -t.stride(d)))


class InputNoise:
    KINDS = ("generator", "philox")

    def __init__(self, kind: str, seeds: list[int], device: torch.device):
        if kind not in self.KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; valid: {list(self.KINDS)}")
        self.kind, self.seeds = kind, list(seeds)
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds] if kind == "generator" else []

    def draw_(self, noise: torch.Tensor, iteration: torch.Tensor, std: float) -> None:
        """noise: (N, ...), network n's draw in noise[n]; iteration: the 0-dim step counter."""
        if self.kind == "philox":
            for one, seed in zip(noise, self.seeds):
                # drawn in memory order (i.i.d. values in any order), so Philox fills the buffer in place
                philox.normal_(memory_order(one), seed, iteration, std=std)  # 0 + std * n rounds as n * std
            return
        for one, generator in zip(noise, self.generators):
            one.normal_(generator=generator).mul_(std)
