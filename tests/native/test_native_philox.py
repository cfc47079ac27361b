"""dipfast.native.normal_, the counter-based Gaussian draw: Philox4x32-10's known answers, the
kernel against its plain-torch twin, the distribution (moments, Kolmogorov-Smirnov, correlations:
bounds that a broken draw fails, checked on broken draws too), reproducibility, streams, thread
count, dtypes and layouts, opcheck."""

import math

import pytest
import torch
from _native_helpers import requires_native

from dipfast import native
from dipfast.native.philox import philox4x32_10, philox_normal_eager

pytestmark = pytest.mark.native

# Random123's known-answer tests for Philox4x32-10 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
N_STAT = 1 << 20  # the draw's sample
N_BROKEN = 1 << 18  # enough for every check to catch its broken draw


@pytest.mark.parametrize("counter, key, expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in out) == expected


@requires_native
@pytest.mark.parametrize("numel", [1, 63, 64, 65, 4096 * 8 + 17])
@pytest.mark.parametrize("seed, offset", [(0, 0), (123, 7), (2**40 + 5, 2**35 + 3)], ids=["zero", "small", "wide"])
def test_kernel_matches_plain_torch_twin(numel, seed, offset):
    """The same words and the same Box-Muller; the kernel's ln, cos, sin are polynomials (~1e-7)."""
    out = native.normal_(torch.empty(numel), seed, offset)
    twin = philox_normal_eager((numel,), seed, offset)
    torch.testing.assert_close(out.double(), twin, atol=2e-6, rtol=2e-6)


def _distribution_failures(z: torch.Tensor) -> list[str]:
    """The checks a N(0, 1) sample of n values passes except with probability < 1e-6 each: mean,
    variance, skewness and excess kurtosis within 5 standard errors, the KS distance to the normal
    CDF below 2.6 / sqrt(n) (its 1e-6 quantile), lag-1 and lag-16 autocorrelations (neighbours in
    one stream; the two words of a Box-Muller pair) within 5 / sqrt(n)."""
    z = z.double().flatten()
    n = z.numel()
    m = z.mean().item()
    c = z - m
    var = c.pow(2).mean().item()
    skew = c.pow(3).mean().item() / var**1.5
    kurt = c.pow(4).mean().item() / var**2 - 3
    d = (torch.special.ndtr(z.sort().values) - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max().item()
    checks = {
        "mean": abs(m) < 5 / math.sqrt(n),
        "variance": abs(var - 1) < 5 * math.sqrt(2 / n),
        "skewness": abs(skew) < 5 * math.sqrt(6 / n),
        "kurtosis": abs(kurt) < 5 * math.sqrt(24 / n),
        "ks": d < 2.6 / math.sqrt(n),
        "lag-1": abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n),
        "lag-16": abs((z[16:] * z[:-16]).mean().item()) < 5 / math.sqrt(n),
    }
    return [name for name, ok in checks.items() if not ok]


@requires_native
@pytest.mark.parametrize("seed, offset", [(0, 0), (2024, 99)])
def test_draw_is_standard_normal(seed, offset):
    assert _distribution_failures(native.normal_(torch.empty(N_STAT), seed, offset)) == []


def test_distribution_checks_reject_broken_draws(rng):
    z = torch.randn(N_BROKEN, generator=rng, dtype=torch.float64)
    assert _distribution_failures(z) == []  # torch's own generator passes
    assert "variance" in _distribution_failures(z * 1.01)  # 1% too wide
    assert "ks" in _distribution_failures((torch.rand(N_BROKEN, generator=rng) - 0.5) * math.sqrt(12))  # uniform
    assert "lag-1" in _distribution_failures((z + z.roll(1)) / math.sqrt(2))  # correlated neighbours
    assert "kurtosis" in _distribution_failures(z.clamp(-3, 3))  # truncated tails


@requires_native
def test_same_seed_and_offset_reproduce_and_streams_differ():
    a = native.normal_(torch.empty(10_000), 5, 17)
    assert torch.equal(a, native.normal_(torch.empty(10_000), 5, 17))
    assert torch.equal(a, native.normal_(torch.empty(10_000), 5, torch.tensor(17)))  # a step counter tensor
    for other in (native.normal_(torch.empty(10_000), 5, 18), native.normal_(torch.empty(10_000), 6, 17)):
        assert not torch.isclose(a, other).any()
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 5 / math.sqrt(10_000)


@requires_native
def test_bitwise_same_with_one_or_two_threads():
    results = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(native.normal_(torch.empty(3, 7, 129, 131), 11, 3))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(*results)


@requires_native
def test_dtypes_layouts_and_affine_parameters():
    base = native.normal_(torch.empty(2, 8, 9, 7), 3, 4)
    assert torch.equal(native.normal_(torch.empty(2, 8, 9, 7, dtype=torch.bfloat16), 3, 4), base.bfloat16())
    assert torch.equal(native.normal_(torch.empty(2, 8, 9, 7, dtype=torch.float64), 3, 4), base.double())
    cl = native.normal_(torch.empty(2, 8, 9, 7).contiguous(memory_format=torch.channels_last), 3, 4)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, base)  # row-major order
    torch.testing.assert_close(native.normal_(torch.empty(2, 8, 9, 7), 3, 4, mean=1.5, std=0.1), 1.5 + 0.1 * base)


@requires_native
def test_opcheck():
    torch.library.opcheck(torch.ops.dipfast_native.philox_normal_, (torch.empty(5, 13), 1, torch.tensor(2), 0.0, 1.0))


def test_bad_seed_or_offset_raises():
    with pytest.raises(ValueError, match="seed must be"):
        native.normal_(torch.empty(4), -1, 0)
    with pytest.raises(ValueError, match="offset must be"):
        native.normal_(torch.empty(4), 0, 2**63)
