"""The SR loss operator, Lanczos2 decimation (replicate pad + depthwise conv, stride f):
dipfast.operators.Lanczos2Decimation.A, forward and forward + backward, and the original's
dense C -> C conv (dipfast.nets.layers.LanczosDownsampler) beside it; on CUDA, the fused Triton op
(dipfast.kernels.lanczos2_downsample) against its reference twin, forward and forward + backward."""

import pytest
import torch
from cuda_timing import graphed, needs_cuda

import dipfast.kernels
from dipfast import reference
from dipfast.engine import ieee_fp32
from dipfast.nets.layers import LanczosDownsampler
from dipfast.operators import Lanczos2Decimation

CASES = [(4, 128, 128), (8, 128, 128), (4, 96, 144)]  # (factor, H, W) of the HR image
IDS = ["x4-128px", "x8-128px", "x4-96x144"]


def moved_bytes(h: int, w: int, factor: int) -> int:
    """fp32 bytes the forward reads and writes at least: the RGB image once, its decimation once (the backward
    moves as much: the gradient in, the image-sized gradient out)."""
    return 4 * 3 * (h * w + (h // factor) * (w // factor))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lanczos2_forward(benchmark, case, rng):
    f, h, w = case
    op = Lanczos2Decimation(f)
    x = torch.rand(1, 3, h, w, generator=rng)
    benchmark.extra_info["bytes"] = moved_bytes(h, w, f)
    with ieee_fp32():
        y = benchmark(op.A, x)
    assert y.shape == (1, 3, h // f, w // f)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lanczos2_full(benchmark, case, rng):
    f, h, w = case
    op = Lanczos2Decimation(f)
    x = torch.rand(1, 3, h, w, generator=rng, requires_grad=True)
    g = torch.randn(1, 3, h // f, w // f, generator=rng)
    benchmark.extra_info["bytes"] = 2 * moved_bytes(h, w, f)
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


# --- the Triton op against the reference twin (CUDA only) --------------------------------------------------

GPU_CASES = [(4, 576, 384), (8, 576, 384)]  # (factor, H, W): the SR presets' HR sizes
GPU_IDS = ["x4-576x384", "x8-576x384"]
IMPLS = {"triton": dipfast.kernels.lanczos2_downsample, "reference": reference.lanczos2_downsample}


@needs_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_lanczos2_op_forward(benchmark, case, impl, rng):
    f, h, w = case
    op = IMPLS[impl]
    x = torch.rand(1, 3, h, w, generator=rng).cuda()
    if impl == "triton":
        assert dipfast.kernels.lanczos2_path(x) == "triton"
    benchmark.extra_info["bytes"] = moved_bytes(h, w, f)
    with ieee_fp32():
        y = benchmark(graphed(benchmark, lambda: op(x, f)))
    assert y.shape == (1, 3, h // f, w // f)


@needs_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_lanczos2_op_full(benchmark, case, impl, rng):
    f, h, w = case
    op = IMPLS[impl]
    x = torch.rand(1, 3, h, w, generator=rng).cuda().requires_grad_(True)
    g = torch.randn(1, 3, h // f, w // f, generator=rng).cuda()
    benchmark.extra_info["bytes"] = 2 * moved_bytes(h, w, f)
    with ieee_fp32():
        (dx,) = benchmark(graphed(benchmark, lambda: torch.autograd.grad(op(x, f), x, g)))
    assert dx.shape == x.shape
