"""The tile grid of an image, the blending window, and each tile's seed.

A grid covers an (H, W) image with tiles of one size (T_h, T_w) (the tile side, or the image's
side where the image is smaller): one size for all is what lets the tiles share one
multi-network step. Along each axis the n tiles are spread evenly from the first border to the
last, n the fewest whose neighbours overlap by at least `overlap` pixels, so edge tiles sit
inward rather than hang over the border and every overlap is about the same.

Blending: along each axis a tile's window rises as a raised cosine over its overlap with the
previous tile and falls over its overlap with the next one (flat at an image border, so border
pixels keep full weight); the windows of an axis are divided by their sum, so they sum to one at
every pixel, and the 2-D weight of a tile is the product of its two axes' windows, which then
sums to one everywhere too (corners included). Where only neighbours overlap and by the same
width, the raised cosines already sum to one and the division changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SEED_STRIDE = 2**32  # tile k of a fit seeded s uses s + k * SEED_STRIDE: restarts (s + r) never collide
SEED_LIMIT = 2**63  # the counter-based noise draw takes seeds below this


def tile_seed(seed: int, index: int) -> int:
    """The seed of tile `index` of a fit seeded `seed`: independent of how tiles are grouped in steps.
    Tile 0 keeps `seed`, so a one-tile grid is the untiled fit."""
    return (seed + index * SEED_STRIDE) % SEED_LIMIT


def axis_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Start of each tile along one axis of `size` pixels: evenly spread, first 0, last size - tile."""
    if tile >= size:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(width: int) -> np.ndarray:
    """Raised cosine rising over `width` pixels, sampled at pixel centres: r + reversed(r) = 1."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)


def axis_weights(size: int, tile: int, positions: list[int]) -> list[np.ndarray]:
    """(tile,) float64 window of each tile along one axis, the windows summing to one at every pixel."""
    windows = []
    for i, p in enumerate(positions):
        w = np.ones(tile)
        if i > 0:
            rise = positions[i - 1] + tile - p  # overlap with the previous tile
            w[:rise] *= _ramp(rise)
        if i + 1 < len(positions):
            fall = p + tile - positions[i + 1]
            w[tile - fall :] *= _ramp(fall)[::-1]
        windows.append(w)
    total = np.zeros(size)
    for p, w in zip(positions, windows):
        total[p : p + tile] += w
    return [w / total[p : p + tile] for p, w in zip(positions, windows)]


@dataclass(frozen=True)
class Box:
    """One tile: rows y:y+h, columns x:x+w."""

    y: int
    x: int
    h: int
    w: int

    def scaled(self, factor: int) -> Box:
        return Box(self.y * factor, self.x * factor, self.h * factor, self.w * factor)

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """The tile of a (..., H, W) tensor."""
        return t[..., self.y : self.y + self.h, self.x : self.x + self.w]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one size covering an (H, W) image, row-major, and their blending weights."""

    height: int
    width: int
    rows: tuple[int, ...]  # start row of each tile row
    cols: tuple[int, ...]
    tile_h: int
    tile_w: int

    @classmethod
    def cover(cls, height: int, width: int, tile: int, overlap: int) -> TileGrid:
        """Square tiles of side `tile` (clipped to the image) overlapping by at least `overlap` pixels."""
        th, tw = min(tile, height), min(tile, width)
        rows = axis_positions(height, th, overlap)
        cols = axis_positions(width, tw, overlap)
        return cls(height, width, tuple(rows), tuple(cols), th, tw)

    def scaled(self, factor: int) -> TileGrid:
        """The same grid on an image `factor` times larger (super-resolution's output)."""
        rows = tuple(r * factor for r in self.rows)
        cols = tuple(c * factor for c in self.cols)
        return TileGrid(
            self.height * factor, self.width * factor, rows, cols, self.tile_h * factor, self.tile_w * factor
        )

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def boxes(self) -> list[Box]:
        return [Box(y, x, self.tile_h, self.tile_w) for y in self.rows for x in self.cols]

    def weights(self) -> list[torch.Tensor]:
        """(tile_h, tile_w) float32 weight of each tile; placed at their boxes they sum to one."""
        wy = axis_weights(self.height, self.tile_h, list(self.rows))
        wx = axis_weights(self.width, self.tile_w, list(self.cols))
        return [torch.from_numpy(np.outer(a, b).astype(np.float32)) for a in wy for b in wx]


class Blend:
    """Accumulates weighted tiles into one (C, H, W) image; tiles may come in any order."""

    def __init__(self, grid: TileGrid, channels: int):
        self.grid = grid
        self.boxes = grid.boxes
        self.weights = grid.weights()
        self.image = torch.zeros(channels, grid.height, grid.width)

    def add(self, index: int, tile: torch.Tensor) -> None:
        """tile: (C, tile_h, tile_w), the output of tile `index`."""
        self.boxes[index].crop(self.image).add_(tile.float().cpu() * self.weights[index])


def largest_empty_square(known: np.ndarray) -> int:
    """Side of the largest square of an (H, W) bool map with no True in it (a hole of the mask)."""
    counts = np.zeros((known.shape[0] + 1, known.shape[1] + 1), dtype=np.int64)
    counts[1:, 1:] = known.astype(np.int64).cumsum(0).cumsum(1)

    def has_empty(s: int) -> bool:
        boxes = counts[s:, s:] - counts[:-s, s:] - counts[s:, :-s] + counts[:-s, :-s]
        return bool((boxes == 0).any())

    lo, hi = 0, min(known.shape)  # has_empty(lo) holds (trivially for 0); find the largest such side
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if has_empty(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
