"""Where a gradient of the input is wrong: a one-paragraph description of a boolean error map of dx.

dx: (N, C_in, H, W). The fused backward computes it in two launches (kernels/conv_bn_lrelu.py): the dgrad GEMM
over the padded input's pixels, M = N * (H + 2 pad) * (W + 2 pad) in BLOCK_M tiles, C_in / groups in BLOCK_N
tiles; then the reflection pad's adjoint, which adds the mirrored pad rows and columns into the border rows and
columns h <= pad and h >= H - 1 - pad. So the description says which rows and columns hold the wrong elements and how
many of those are border ones, which channels and channel tiles, and which dgrad pixel tiles: a wrong tile or
channel block points at the GEMM, wrong border rows alone at the fold.
"""

from __future__ import annotations

import torch


def _listed(values: torch.Tensor, limit: int = 12) -> str:
    values = values.unique().tolist()
    return str(values[:limit])[:-1] + (f", ... ({len(values)} in all)]" if len(values) > limit else "]")


def _dgrad_program(nb, hh, ww, n: int, hp: int, wp: int, stride: int, block_m: int):
    """program_id(0) of the dgrad program that writes padded pixel (nb, hh, ww): the pixels of one phase (hh % stride,
    ww % stride) in row-major order, block_m a program, the phases one after another (_conv_dgrad_kernel)."""
    rows, cols = -(-hp // stride), -(-wp // stride)
    tiles = -(-n * rows * cols // block_m)
    phase = (hh % stride) * stride + ww % stride
    return phase * tiles + (nb * rows * cols + (hh // stride) * cols + ww // stride) // block_m


def describe_dx_errors(
    bad: torch.Tensor, err: torch.Tensor, pad: int, block_m: int, block_n: int, groups: int, stride: int = 1
) -> str:
    """bad: (N, C, H, W) bool, the elements over the bar; err: the same shape, each element's error (relative to
    the max). Says where the bad elements lie; '' when there are none."""
    if not bad.any():
        return ""
    n, c, h, w = bad.shape
    nb, ch, row, col = bad.nonzero(as_tuple=True)
    border_row = (row <= pad) | (row >= h - 1 - pad)
    border_col = (col <= pad) | (col >= w - 1 - pad)
    pixel_tile = _dgrad_program(nb, row + pad, col + pad, n, h + 2 * pad, w + 2 * pad, stride, block_m)
    channel_tile = (ch % (c // groups)) // block_n
    interior = int((~border_row & ~border_col).sum())
    worst = int(err.flatten().argmax())
    where = [int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)]
    return (
        f"{int(bad.sum())} of {bad.numel()} dx elements wrong (worst {err.max().item():.2e} at {where}); "
        f"rows {_listed(row)}, columns {_listed(col)}; in a border row (within pad {pad} of an edge) "
        f"{int(border_row.sum())}, border column {int(border_col.sum())}, neither {interior}; "
        f"channels {_listed(ch)} (channel tiles of {block_n}: {_listed(channel_tile)}); batch {_listed(nb)}; "
        f"dgrad pixel tiles of {block_m}: {_listed(pixel_tile)}"
    )
