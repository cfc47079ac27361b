"""The reference conv block, reflect-pad + conv + BN (training statistics) + LeakyReLU(0.2):
dipfast.reference.conv_bn_lrelu (the twin the fused kernel will be timed against), eager fp32 with
IEEE convolutions, forward / backward / both."""

import pytest
import torch

from dipfast.engine import ieee_fp32
from dipfast.reference import conv_bn_lrelu

SHAPES = [
    (1, 32, 64, 64, 32, 3),  # (N, C_in, H, W, C_out, k): a small level-0 block
    (1, 132, 32, 32, 128, 3),  # level-0 width of the default net (skip 4 + 128), small image
    (1, 128, 32, 32, 128, 1),  # the 1x1 conv after each merge
]
IDS = ["c32-64px-k3", "c132-32px-k3", "c128-32px-k1"]


class _Block:
    """The twin with its own parameters, initialised as nn.Conv2d and nn.BatchNorm2d are."""

    def __init__(self, c_in, c_out, k, rng):
        bound = (c_in * k * k) ** -0.5
        self.weight = (torch.rand(c_out, c_in, k, k, generator=rng) * 2 - 1).mul_(bound).requires_grad_()
        self.bias = (torch.rand(c_out, generator=rng) * 2 - 1).mul_(bound).requires_grad_()
        self.gamma = torch.ones(c_out, requires_grad=True)
        self.beta = torch.zeros(c_out, requires_grad=True)

    def parameters(self):
        return [self.weight, self.bias, self.gamma, self.beta]

    def __call__(self, x):
        return conv_bn_lrelu(x, *self.parameters())


def _block(shape, rng):
    n, c_in, h, w, c_out, k = shape
    block = _Block(c_in, c_out, k, rng)
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
