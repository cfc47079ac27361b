"""channel_sums: the one-launch finalize of the BatchNorm kernels' per-program partials, against the float64
torch expressions it replaced (Chan's merge of per-tile (sum, M2); column sums), on fresh random partials of
several tile and channel counts, the last tile short. Every partial is an fp32 sum, so the finalize adds at most
a few hundred fp32 terms per channel: held to TOL[fp32] relative to the largest magnitude."""

from __future__ import annotations

import pytest
import torch

from dipfast.kernels import channel_sums
from dipfast.kernels.channel_sums import chan_finalize, column_sums

pytestmark = pytest.mark.parity


def _tiles(rng, n_tiles: int, channels: int, block: int, short: int, device: str):
    """Per-tile (sum, M2) of real data: block elements a tile, the last `short` fewer."""
    n = n_tiles * block - short
    x = torch.randn(n, channels, generator=rng, dtype=torch.float64) * 3 + torch.rand(channels, generator=rng) * 5
    psum = torch.zeros(n_tiles, channels, dtype=torch.float64)
    pm2 = torch.zeros_like(psum)
    for t in range(n_tiles):
        tile = x[t * block : (t + 1) * block]
        psum[t] = tile.sum(0)
        pm2[t] = ((tile - tile.mean(0)) ** 2).sum(0)
    return x, n, psum.float().to(device), pm2.float().to(device)


@pytest.mark.parametrize(("n_tiles", "channels", "block", "short"), [(1, 5, 17, 0), (7, 33, 40, 13), (70, 130, 9, 8),
                                                                     (33, 1, 64, 63)])  # fmt: skip
def test_finalize_gives_the_batch_statistics(rng, device, assert_parity, n_tiles, channels, block, short):
    x, n, psum, pm2 = _tiles(rng, n_tiles, channels, block, short, device)
    eps = 1e-5
    assert channel_sums._in_triton(psum)  # the kernel, on CUDA or in the interpreter: not the torch fallback
    mean, rstd = chan_finalize(psum, pm2, n, block, eps)
    assert mean.shape == rstd.shape == (channels,) and mean.dtype == rstd.dtype == torch.float32
    assert_parity(mean, x.mean(0))
    assert_parity(rstd, torch.rsqrt(x.var(0, unbiased=False) + eps))
    again = chan_finalize(psum, pm2, n, block, eps)
    assert torch.equal(again[0], mean) and torch.equal(again[1], rstd)  # a fixed order: deterministic


@pytest.mark.parametrize(("n_tiles", "channels"), [(1, 1), (5, 7), (70, 130), (200, 36)])
def test_column_sums_sum_each_channel(rng, device, assert_parity, n_tiles, channels):
    a = torch.randn(n_tiles, channels, generator=rng, dtype=torch.float64)
    b = torch.randn(n_tiles, channels, generator=rng, dtype=torch.float64) * 1e-3
    sum_a, sum_b = column_sums(a.float().to(device), b.float().to(device))
    assert sum_a.shape == sum_b.shape == (channels,)
    assert_parity(sum_a, a.float().double().sum(0))
    assert_parity(sum_b, b.float().double().sum(0))


def test_bad_partials_raise(device):
    with pytest.raises(ValueError, match="contiguous"):
        column_sums(torch.ones(3, 4, device=device), torch.ones(3, 5, device=device))
    with pytest.raises(ValueError, match="fp32"):
        chan_finalize(torch.ones(3, 4, device=device).double(), torch.ones(3, 4, device=device).double(), 12, 4, 1e-5)
