"""The SR loss operator, Lanczos2 decimation (replicate pad + depthwise conv, stride f):
dipfast.operators.Lanczos2Decimation.A, forward and forward + backward, and the original's
dense C -> C conv (dipfast.nets.layers.LanczosDownsampler) beside it."""

import pytest
import torch

from dipfast.engine import ieee_fp32
from dipfast.nets.layers import LanczosDownsampler
from dipfast.operators import Lanczos2Decimation

CASES = [(4, 128, 128), (8, 128, 128), (4, 96, 144)]  # (factor, H, W) of the HR image
IDS = ["x4-128px", "x8-128px", "x4-96x144"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lanczos2_forward(benchmark, case, rng):
    f, h, w = case
    op = Lanczos2Decimation(f)
    x = torch.rand(1, 3, h, w, generator=rng)
    with ieee_fp32():
        y = benchmark(op.A, x)
    assert y.shape == (1, 3, h // f, w // f)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lanczos2_full(benchmark, case, rng):
    f, h, w = case
    op = Lanczos2Decimation(f)
    x = torch.rand(1, 3, h, w, generator=rng, requires_grad=True)
    g = torch.randn(1, 3, h // f, w // f, generator=rng)
    with ieee_fp32():
        (dx,) = benchmark(lambda: torch.autograd.grad(op.A(x), x, g))
    assert dx.shape == x.shape


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lanczos2_dense_original_full(benchmark, case, rng):
    f, h, w = case
    down = LanczosDownsampler(3, f, "lanczos2")  # trainable, as the notebook's: dW and db are computed too
    x = torch.rand(1, 3, h, w, generator=rng, requires_grad=True)
    g = torch.randn(1, 3, h // f, w // f, generator=rng)
    with ieee_fp32():
        grads = benchmark(lambda: torch.autograd.grad(down(x), [x, *down.parameters()], g))
    assert grads[0].shape == x.shape
