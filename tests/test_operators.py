"""dipfast.operators: Lanczos kernels, the forward operators and their adjoints, Bernoulli masks."""

import math

import numpy as np
import pytest
import torch
from _original_dip import Downsampler, get_kernel_lanczos

from dipfast.operators import Identity, Lanczos2Decimation, Mask, bernoulli_mask, lanczos2_taps, lanczos_kernel

# notes/reference_dip.md section 3: the first half of the sum-normalised 1-D taps, mirrored
NOTES_TAPS = {
    4: [-0.001065, -0.009752, -0.020384, -0.014878, 0.024594, 0.098658, 0.183115, 0.239711],
    2: [-0.008863, -0.04194, 0.1165, 0.434303],
}


def _formula_taps(factor, support=2):
    """L(d) = a sin(pi d) sin(pi d / a) / (pi^2 d^2) at d_i = |i - (K + 1) / 2| / f, i = 1..K, K = 2 a f; sum 1."""
    k = 2 * support * factor
    d = np.abs(np.arange(1, k + 1) - (k + 1) / 2) / factor
    taps = support * np.sin(np.pi * d) * np.sin(np.pi * d / support) / (np.pi**2 * d**2)
    return taps / taps.sum()


def _adjoint_gap(op, x, y, **kw):
    ax = op.A(x)
    lhs = (ax * y).sum()
    rhs = (x * op.A_adjoint(y, **kw)).sum()
    return (abs(lhs - rhs) / (ax.norm() * y.norm())).item()


# --- kernels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
def test_taps_match_notes(factor):
    taps = lanczos2_taps(factor)
    half = np.array(NOTES_TAPS[factor])
    np.testing.assert_allclose(taps[: len(half)], half, rtol=0, atol=1e-6)  # the notes print 6 decimals
    np.testing.assert_allclose(taps[len(half) :], half[::-1], rtol=0, atol=1e-6)  # mirrored


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_taps_match_formula(factor):
    taps = lanczos2_taps(factor)
    assert taps.shape == (4 * factor,)
    np.testing.assert_allclose(taps, _formula_taps(factor), rtol=0, atol=1e-15)  # float64, same formula
    assert taps.sum() == pytest.approx(1, abs=1e-15)
    assert taps.min() < 0  # negative lobes: the output can leave [0, 1]


@pytest.mark.parametrize("factor, size", [(2, 8), (4, 16), (8, 32)])
def test_kernel_is_outer_product_and_sums_to_one(factor, size):
    kernel = lanczos_kernel(factor)
    assert kernel.shape == (size, size) and kernel.dtype == np.float64
    np.testing.assert_allclose(kernel, np.outer(lanczos2_taps(factor), lanczos2_taps(factor)), rtol=0, atol=1e-15)
    assert kernel.sum() == pytest.approx(1, abs=1e-14)
    # symmetric to the last ulp only: the original's loop multiplies the i and j factors in order
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-15, atol=0)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], rtol=1e-15, atol=0)


@pytest.mark.parametrize("support", [2, 3])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_kernel_matches_original_loop(factor, support):
    ours, theirs = lanczos_kernel(factor, support), get_kernel_lanczos(factor, 2 * support * factor + 1, support)
    assert ours.shape == (2 * support * factor,) * 2
    np.testing.assert_array_equal(ours.astype(np.float32), theirs.astype(np.float32))  # fp32 weights bit-identical
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-16)
    np.testing.assert_allclose(ours, np.outer(*[_formula_taps(factor, support)] * 2), rtol=0, atol=1e-15)


@pytest.mark.parametrize("factor, size", [(2, 8), (4, 16), (8, 32)])
def test_decimation_kernel_and_padding(factor, size):
    op = Lanczos2Decimation(factor)
    assert op.kernel.shape == (size, size) and op.kernel.dtype == torch.float32
    assert torch.equal(op.kernel, torch.from_numpy(get_kernel_lanczos(factor, 4 * factor + 1, 2)).float())
    assert op.pad == (size - factor) // 2 == {2: 3, 4: 6, 8: 12}[factor]  # ReplicationPad2d((K - f) / 2)


# --- output sizes and alignment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factor, hw, out",
    [
        (4, (576, 384), (144, 96)),  # the SR x4 notebook
        (8, (576, 384), (72, 48)),
        (2, (17, 23), (8, 11)),  # odd sizes floor
        (4, (37, 30), (9, 7)),
        (8, (71, 9), (8, 1)),
    ],
)
def test_output_sizes(factor, hw, out, rng):
    op = Lanczos2Decimation(factor)
    x = torch.rand(1, 3, *hw, generator=rng)
    assert op.A(x).shape == (1, 3, *out)
    assert op.output_size(*hw) == out


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_constant_and_ramp(factor):
    op = Lanczos2Decimation(factor)
    h, w = 12 * factor, 10 * factor
    const = torch.full((1, 2, h, w), 0.37, dtype=torch.float64)
    torch.testing.assert_close(op.A(const), torch.full((1, 2, 12, 10), 0.37, dtype=torch.float64))  # sums to 1
    # a symmetric kernel reproduces a linear ramp: output o sits on input coordinate o * f + (f - 1) / 2
    ramp = torch.arange(w, dtype=torch.float64).expand(1, 1, h, w)
    out = op.A(ramp)[0, 0, 5]
    expected = torch.arange(10, dtype=torch.float64) * factor + (factor - 1) / 2
    inner = slice(2, 8)  # away from the replicated border
    torch.testing.assert_close(out[inner], expected[inner], rtol=0, atol=1e-5)  # fp32 kernel taps


# --- agreement with the original's dense conv ---------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("channels, hw", [(3, (64, 48)), (1, (37, 53)), (4, (67, 45))])
def test_matches_original_dense_conv(factor, channels, hw, rng):
    op = Lanczos2Decimation(factor)
    dense = Downsampler(channels, factor, "lanczos2")  # the original: dense C -> C conv, weight[c, c] = kernel
    x = torch.rand(1, channels, *hw, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(op.A(x), dense(x), rtol=1e-5, atol=1e-6)  # fp32, different summation order
        # float64 with the same fp32-rounded taps: only summation order differs
        torch.testing.assert_close(op.A(x.double()), dense.double()(x.double()), rtol=1e-12, atol=1e-13)


# --- adjoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize(
    "factor, hw", [(2, (32, 32)), (4, (64, 40)), (8, (64, 96)), (2, (17, 23)), (4, (37, 30)), (8, (71, 45))]
)
def test_lanczos_adjoint(factor, hw, channels, rng):
    op = Lanczos2Decimation(factor)
    x = torch.rand(1, channels, *hw, generator=rng, dtype=torch.float64)
    y = torch.randn(1, channels, hw[0] // factor, hw[1] // factor, generator=rng, dtype=torch.float64)
    assert op.A_adjoint(y, size=hw).shape == x.shape
    assert _adjoint_gap(op, x, y, size=hw) < 1e-12


def test_lanczos_adjoint_default_size(rng):
    op = Lanczos2Decimation(4)
    y = torch.randn(1, 3, 9, 7, generator=rng, dtype=torch.float64)
    assert op.A_adjoint(y).shape == (1, 3, 36, 28)
    x = torch.rand(1, 3, 36, 28, generator=rng, dtype=torch.float64)
    assert _adjoint_gap(op, x, y) < 1e-12


def test_lanczos_adjoint_is_not_trivial(rng):
    op = Lanczos2Decimation(2)
    y = torch.randn(1, 1, 8, 8, generator=rng, dtype=torch.float64)
    back = op.A_adjoint(y)
    nearest = y.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4
    assert not torch.allclose(back, nearest)  # a real transpose conv, with the replicate pad folded in at the borders
    assert back[0, 0, 0, 0] != back[0, 0, 4, 4]


@pytest.mark.parametrize("channels, hw", [(1, (8, 8)), (3, (17, 23)), (4, (5, 40))])
def test_identity(channels, hw, rng):
    op = Identity()
    x = torch.rand(1, channels, *hw, generator=rng, dtype=torch.float64)
    y = torch.randn(1, channels, *hw, generator=rng, dtype=torch.float64)
    assert torch.equal(op.A(x), x) and torch.equal(op.A_adjoint(y), y)
    assert op.output_size(*hw) == hw
    assert _adjoint_gap(op, x, y) < 1e-12


@pytest.mark.parametrize("mask_shape", ["HW", "1HW", "CHW"])
@pytest.mark.parametrize("channels, hw", [(1, (16, 16)), (3, (17, 23)), (4, (40, 7))])
def test_mask(mask_shape, channels, hw, rng):
    m = bernoulli_mask({"HW": hw, "1HW": (1, *hw), "CHW": (channels, *hw)}[mask_shape], 0.5, generator=rng)
    op = Mask(m)
    x = torch.rand(1, channels, *hw, generator=rng, dtype=torch.float64)
    y = torch.randn(1, channels, *hw, generator=rng, dtype=torch.float64)
    expected = x * m.double().reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    assert torch.equal(op.A(x), expected)
    assert (op.A(x)[expected == 0] == 0).all() and op.A(x).count_nonzero() > 0
    assert op.output_size(*hw) == hw
    assert _adjoint_gap(op, x, y) < 1e-12


def test_operators_do_not_write_attributes(rng):
    for op in (Identity(), Mask(bernoulli_mask((8, 8), 0.5, generator=rng)), Lanczos2Decimation(2)):
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(op).items()}
        x = torch.rand(1, 3, 8, 8, generator=rng)
        op.A(x)
        op.A_adjoint(op.A(x))
        after = vars(op)
        assert before.keys() == after.keys()
        for k, v in before.items():
            assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]


@pytest.mark.parametrize("factor", [0, 1, 3, 16, "4"])
def test_lanczos_bad_factor(factor):
    with pytest.raises(ValueError, match="factor"):
        Lanczos2Decimation(factor)


# --- Bernoulli masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.9])
def test_bernoulli_keep_fraction(keep, rng):
    m = bernoulli_mask((3, 200, 300), keep, generator=rng)
    assert m.shape == (3, 200, 300) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    sigma = math.sqrt(keep * (1 - keep) / m.numel())
    assert abs(m.mean().item() - keep) < 6 * sigma  # 180,000 draws


def test_bernoulli_extremes_and_seed(rng):
    assert bernoulli_mask((50, 50), 0.0, generator=rng).sum() == 0
    assert bernoulli_mask((50, 50), 1.0, generator=rng).sum() == 2500
    a = bernoulli_mask((20, 30), 0.5, generator=torch.Generator().manual_seed(3))
    b = bernoulli_mask((20, 30), 0.5, generator=torch.Generator().manual_seed(3))
    c = bernoulli_mask((20, 30), 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bernoulli_matches_original_rule():
    # the original: random_sample(shape) > zero_fraction; here U[0, 1) from the generator > 1 - keep
    g = torch.Generator().manual_seed(7)
    u = torch.rand((40, 40), generator=g)
    m = bernoulli_mask((40, 40), 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(m, (u > 0.7).float())


@pytest.mark.parametrize("keep", [-0.1, 1.5, float("nan"), float("inf")])
def test_bernoulli_errors(keep):
    with pytest.raises(ValueError, match="keep"):
        bernoulli_mask((4, 4), keep)


def test_lanczos2_keeps_one_kernel_per_device_and_dtype():
    """A copies its kernel to a device once (a CUDA graph captured after a warm-up call replays no copy), one copy
    per dtype, each equal to the kernel of __init__."""
    op = Lanczos2Decimation(2)
    x = torch.rand(1, 3, 8, 8)
    first = op(x)
    cached = dict(op._on_device)
    torch.testing.assert_close(op(x), first, rtol=0, atol=0)
    assert op._on_device == cached and list(cached) == [(x.device, torch.float32)]
    op.A(x.double())
    assert len(op._on_device) == 2
    for kernel in op._on_device.values():
        torch.testing.assert_close(kernel.float(), op.kernel, rtol=0, atol=0)
