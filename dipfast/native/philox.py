"""A counter-based Gaussian draw: normal_(out, seed, offset) fills out with N(mean, std^2) values
that depend only on (seed, offset, element index) (CPU, C++: csrc/native/philox_normal.cpp).

Philox4x32-10 (Salmon et al., SC 2011; cuRAND's and PyTorch's CUDA generator) keyed by the seed,
its counter (group, offset), and Box-Muller on each pair of its 32-bit words. Same seed and offset:
the same numbers, with any number of threads. Each offset is an independent stream, so the
per-iteration input noise of DIP can use the step counter as its offset: the run reproduces and
needs no generator state. Unlike torch's normal_ (one sequential generator) it spreads over torch's
threads; bench/ops/bench_native_ops.py times the two (figures: the README, "Native CPU ops").

Element e of out (in row-major order) takes word j = (e mod 64) div 16 of the Philox output for
group g = 16 (e div 64) + e mod 16; words (0, 1) and (2, 3) are Box-Muller pairs, the even word
giving the radius, u1 = w 2^-32 + 2^-33 rounded to fp32, and the odd one the angle, u2 = (w >> 8) 2^-24:
    z_even = sqrt(-2 ln u1) cos(2 pi u2),   z_odd = sqrt(-2 ln u1) sin(2 pi u2)
philox_normal_eager computes exactly this in plain torch (exact ln, cos, sin in float64): the
fallback where the extension is absent, and the tests' oracle. The two agree to ~1e-6.
"""

from __future__ import annotations

import math

import torch

from dipfast.native._tensors import kernels_take

_ops = torch.ops.dipfast_native

_MUL = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 round multipliers
_WEYL = (0x9E3779B9, 0xBB67AE85)  # key schedule increments
_WORD = 0xFFFFFFFF
_LANES = 16  # groups per block: one AVX-512 vector of 32-bit counters


def normal_(
    out: torch.Tensor, seed: int, offset: int | torch.Tensor, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Fill out (any shape; fp32, bf16 or float64) with N(mean, std^2) values drawn from (seed, offset).

    seed: int in [0, 2^63); offset: int in [0, 2^63) or a one-element int64 CPU tensor (a step
    counter kept in a tensor, so a compiled caller does not specialise on its value). Returns out.
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63); got {seed!r}")
    if not isinstance(offset, torch.Tensor):
        if not isinstance(offset, int) or not 0 <= offset < 2**63:
            raise ValueError(f"offset must be an int in [0, 2**63) or an int64 tensor; got {offset!r}")
        offset = torch.tensor(offset, dtype=torch.int64)
    if not kernels_take(out, dim=None) or offset.device.type != "cpu":
        with torch.no_grad():
            return out.copy_(philox_normal_eager(out.shape, seed, int(offset), mean, std, device=out.device))
    if out.is_contiguous():
        _ops.philox_normal_(out, seed, offset, float(mean), float(std))
        return out
    staged = torch.empty(out.shape, dtype=out.dtype)  # the element order is row-major whatever out's strides
    _ops.philox_normal_(staged, seed, offset, float(mean), float(std))
    with torch.no_grad():
        return out.copy_(staged)


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words: counter (4 tensors), key (2 ints) -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _MUL[0])
        hi1, lo1 = _mulhilo(c2, _MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _WORD, (k1 + _WEYL[1]) & _WORD
    return [c0, c1, c2, c3]


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * m, in 16-bit halves so that int64 never overflows."""
    low, high = (a & 0xFFFF) * m, (a >> 16) * m  # each < 2^48
    s = low + ((high & 0xFFFF) << 16)  # a * m = (high >> 16) * 2^32 + s
    return (high >> 16) + (s >> 32), s & _WORD


def philox_normal_eager(
    shape, seed: int, offset: int, mean: float = 0.0, std: float = 1.0, device=None
) -> torch.Tensor:
    """The draw of normal_ in plain torch: float64 values of the given shape."""
    numel = math.prod(shape)
    blocks = -(-numel // (4 * _LANES))
    group = torch.arange(blocks * _LANES, dtype=torch.int64, device=device)
    counter = [group & _WORD, group >> 32, torch.full_like(group, offset & _WORD), torch.full_like(group, offset >> 32)]
    w = philox4x32_10(counter, (seed & _WORD, seed >> 32))
    z = torch.stack([*_box_muller(w[0], w[1]), *_box_muller(w[2], w[3])])  # (word, group)
    z = z.view(4, blocks, _LANES).transpose(0, 1).reshape(-1)[:numel]
    return (mean + std * z).view(shape)


def _box_muller(w_radius: torch.Tensor, w_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = w_radius.to(torch.float32) * 2.0**-32 + 2.0**-33  # fp32, as the kernel rounds it
    u2 = (w_angle >> 8).to(torch.float64) * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u1.to(torch.float64)))
    return r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)


def _normal_fake(out, seed, offset, mean, std):
    return None


def register_fakes() -> None:
    """Called by dipfast.native once the library has defined the ops."""
    torch.library.register_fake("dipfast_native::philox_normal_", _normal_fake)
