"""The bilinear x2 upsample with a gather backward (dipfast.nets.bilinear_x2) against torch's own.

float64, fresh random inputs, odd and one-pixel sizes (the clamped borders), both layouts: the forward is
torch's to the bit, the gradient its transpose to rounding; under vmap, under autocast (in the input's dtype),
and in PaddedBlocks, whose upsample it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from dipfast.nets.bilinear_x2 import bilinear_x2_transpose, is_bilinear_x2, upsample_bilinear2x
from tests._helpers import make_rng


def _generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(int(make_rng(request.node.nodeid).integers(2**31)))


def _torch_upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 1, 6), (3, 5, 8, 9), (1, 1, 13, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_is_torchs_and_the_gradient_its_transpose(request, shape, channels_last):
    g = _generator(request)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    upstream = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], generator=g, dtype=torch.float64)
    if channels_last:
        upstream = upstream.contiguous(memory_format=torch.channels_last)
    for upsample in (_torch_upsample, upsample_bilinear2x):
        xi = x.detach().clone().requires_grad_()
        y = upsample(xi)
        (gx,) = torch.autograd.grad(y, xi, upstream)
        outs.append(y.detach())
        grads.append(gx)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-13, atol=1e-13)
    # the gradient comes back in the incoming gradient's layout (ambiguous for one channel or one pixel)
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        assert grads[1].is_contiguous(memory_format=torch.channels_last) == channels_last
        assert grads[1].is_contiguous() == (not channels_last)


def test_the_transpose_passes_the_adjoint_test(request):
    """<up(x), g> == <x, up^T(g)>, for the map itself (not only against torch's backward)."""
    g = _generator(request)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.float64)
    lhs = (upsample_bilinear2x(x) * upstream).sum()
    rhs = (x * bilinear_x2_transpose(upstream)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-13, atol=0)


def test_under_vmap_each_network_gets_its_own_gradient(request):
    g = _generator(request)
    xs = torch.randn(3, 1, 4, 5, 6, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 1, 4, 10, 12, generator=g, dtype=torch.float64)
    got = vmap(grad(lambda x, w: (upsample_bilinear2x(x) * w).sum()))(xs, weights)
    for x, w, gx in zip(xs, weights, got, strict=True):
        x = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad((_torch_upsample(x) * w).sum(), x)
        torch.testing.assert_close(gx, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("channels_last", [False, True])
def test_vmapped_forward_then_autograd_matches_a_loop(request, channels_last):
    """The vectorised step's pattern: vmap over the networks' forward, one autograd backward outside it (the
    transpose then reads the gradient's layout inside vmap, where is_contiguous(memory_format=...) raises)."""
    g = _generator(request)
    xs = torch.randn(3, 2, 4, 5, 7, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 2, 4, 10, 14, generator=g, dtype=torch.float64)
    if channels_last:  # each network's slice channels_last
        xs = xs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        weights = weights.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    xs.requires_grad_()
    (got,) = torch.autograd.grad((vmap(upsample_bilinear2x)(xs) * weights).sum(), xs)
    for x, w, gx in zip(xs.detach(), weights, got, strict=True):
        x = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad((_torch_upsample(x) * w).sum(), x)
        torch.testing.assert_close(gx, expected, rtol=1e-13, atol=1e-13)
        assert gx.stride() == expected.stride() or not channels_last


def test_under_autocast_it_runs_in_the_inputs_dtype(request):
    g = _generator(request)
    x = torch.randn(1, 4, 6, 6, generator=g).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = upsample_bilinear2x(x)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    with torch.no_grad():
        expected = _torch_upsample(x.float())
    torch.testing.assert_close(y.float(), expected, rtol=2**-8, atol=1e-2)  # bf16: 8 bits of mantissa


def test_its_autocast_switch_asks_nothing_dynamo_cannot_trace(monkeypatch, request):
    """torch.compile of torch 2.11 (the GPU machines') cannot trace torch.amp.is_autocast_available: the compiled
    and the stacked steps on the fused blocks failed so (bench/results/2026-12-04-h200-222367b4a8). The switch
    reads which devices have autocast once, at import."""

    def untraceable(device_type):
        raise AssertionError("torch.amp.is_autocast_available called while running the step")

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)  # torch.autocast's own call stays
    x = torch.randn(1, 2, 3, 5, generator=_generator(request)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upsample_bilinear2x(x).dtype == torch.bfloat16
    assert upsample_bilinear2x(x.float()).dtype == torch.float32


def test_which_upsamples_it_replaces():
    assert is_bilinear_x2(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    assert is_bilinear_x2(nn.Upsample(scale_factor=(2, 2), mode="bilinear"))
    assert not is_bilinear_x2(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
    assert not is_bilinear_x2(nn.Upsample(scale_factor=2, mode="nearest"))
    assert not is_bilinear_x2(nn.Upsample(scale_factor=3, mode="bilinear"))
    assert not is_bilinear_x2(nn.Upsample(size=(8, 8), mode="bilinear"))
    assert not is_bilinear_x2(nn.Identity())
    with pytest.raises(ValueError, match="takes \\(N, C, H, W\\)"):
        upsample_bilinear2x(torch.zeros(2, 3, 4))


def test_padded_blocks_upsample_with_it(monkeypatch):
    from dipfast.kernels import blocks

    if not torch.cuda.is_available():  # the kernels were built for Triton's interpreter (tests/conftest.py)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    fast = blocks.upsample_bilinear2x_fast  # the Triton gathers where they run, else this file's torch ops
    monkeypatch.setattr(blocks, "upsample_bilinear2x_fast", lambda x: calls.append(x.shape) or fast(x))
    ops = blocks.PaddedBlocks()
    x = torch.rand(1, 2, 3, 4)
    y = ops.upsample(nn.Upsample(scale_factor=2, mode="bilinear"), x)
    torch.testing.assert_close(y, _torch_upsample(x))
    ops.upsample(nn.Upsample(scale_factor=2, mode="nearest"), x)
    assert calls == [x.shape]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: a CUDA graph capture")
def test_on_cuda_its_backward_is_captured_and_repeats_to_the_bit(request):
    """The captured step runs this backward: nothing in it may copy from the host, and with no atomics two
    replays agree to the bit (torch's own backward does not promise that)."""
    g = _generator(request)
    x = torch.randn(1, 8, 16, 16, generator=g).cuda().requires_grad_()
    upstream = torch.randn(1, 8, 32, 32, generator=g).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            torch.autograd.grad(upsample_bilinear2x(x), x, upstream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (gx,) = torch.autograd.grad(upsample_bilinear2x(x), x, upstream)
    graph.replay()
    first = gx.clone()
    graph.replay()
    assert torch.equal(gx, first)
    (expected,) = torch.autograd.grad(_torch_upsample(x), x, upstream)
    torch.testing.assert_close(gx, expected, rtol=1e-5, atol=1e-5)  # fp32, the same four terms in another order
