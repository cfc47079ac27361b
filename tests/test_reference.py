"""The reference twins equal the modules the reference engine runs (dipfast.nets.layers)."""

import pytest
import torch

from dipfast.nets.layers import ConvBNAct
from dipfast.reference import conv_bn_lrelu


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w, k, stride, groups",
    [
        (1, 3, 4, 17, 23, 3, 1, 1),  # odd H/W, RGB in
        (1, 4, 16, 17, 23, 3, 2, 1),  # stride 2 on odd sizes
        (1, 6, 9, 12, 10, 5, 1, 3),  # groups: three networks side by side
        (2, 32, 32, 11, 9, 7, 2, 1),  # k = 7, batch 2
        (1, 132, 8, 6, 7, 1, 1, 1),  # the 1x1 conv after a merge (no pad), level-0 width
    ],
)
def test_conv_bn_lrelu_equals_the_engine_block(n, c_in, c_out, h, w, k, stride, groups, rng):
    block = ConvBNAct(c_in, c_out, k, stride=stride, pad="reflection").double()
    if groups > 1:  # ConvBNAct has no groups: give its conv the grouped weight shape
        block.conv.conv = torch.nn.Conv2d(c_in, c_out, k, stride, groups=groups).double()
    with torch.no_grad():  # BN affine parameters away from their (1, 0) defaults
        block.bn.weight.uniform_(0.5, 1.5, generator=rng)
        block.bn.bias.uniform_(-0.5, 0.5, generator=rng)
    x = torch.rand(n, c_in, h, w, dtype=torch.float64, generator=rng, requires_grad=True)
    grad = torch.randn(n, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1, dtype=torch.float64, generator=rng)
    conv, bn = block.conv.conv, block.bn
    params = [conv.weight, conv.bias, bn.weight, bn.bias]

    ours = conv_bn_lrelu(x, *params, stride=stride, groups=groups)
    theirs = block(x)
    # float64, the same ops in the same order: equal to rounding (measured 0 or a few 1e-16)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [x, *params], grad), torch.autograd.grad(theirs, [x, *params], grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
