"""The reference conv block, reflect-pad + conv + BN (training statistics) + LeakyReLU(0.2):
dipfast.nets.layers.ConvBNAct with pad='reflection', eager fp32, forward / backward / both."""

import pytest
import torch

from dipfast.engine import ieee_fp32
from dipfast.nets.layers import ConvBNAct

SHAPES = [
    (1, 32, 64, 64, 32, 3),  # (N, C_in, H, W, C_out, k): a small level-0 block
    (1, 132, 32, 32, 128, 3),  # level-0 width of the default net (skip 4 + 128), small image
    (1, 128, 32, 32, 128, 1),  # the 1x1 conv after each merge
]
IDS = ["c32-64px-k3", "c132-32px-k3", "c128-32px-k1"]


def _block(shape, rng):
    n, c_in, h, w, c_out, k = shape
    block = ConvBNAct(c_in, c_out, k, pad="reflection")
    x = torch.rand(n, c_in, h, w, generator=rng, requires_grad=True)
    grad = torch.randn(n, c_out, h, w, generator=rng)
    return block, x, grad


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv_bn_lrelu_forward(benchmark, shape, rng):
    block, x, _ = _block(shape, rng)
    with ieee_fp32(), torch.no_grad():
        out = benchmark(block, x)
    assert out.shape == (shape[0], shape[4], shape[2], shape[3])


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv_bn_lrelu_backward(benchmark, shape, rng):
    block, x, grad = _block(shape, rng)
    with ieee_fp32():
        out = block(x)
        grads = benchmark(lambda: torch.autograd.grad(out, [x, *block.parameters()], grad, retain_graph=True))
    assert [g.shape for g in grads] == [x.shape, *(p.shape for p in block.parameters())]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv_bn_lrelu_full(benchmark, shape, rng):
    block, x, grad = _block(shape, rng)

    def step():
        out = block(x)
        return torch.autograd.grad(out, [x, *block.parameters()], grad)

    with ieee_fp32():
        grads = benchmark(step)
    assert grads[0].shape == x.shape
