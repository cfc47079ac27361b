"""The reference twins equal the modules the reference engine runs (dipfast.nets.layers)."""

import pytest
import torch

from dipfast.nets.layers import ConvBNAct, concat_cropped
from dipfast.nets.skip import SkipLevel, SkipSpec
from dipfast.reference import batch_norm_act, concat_batch_norm, concat_bn_conv_bn_lrelu, conv_bn_lrelu


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
        block.conv.conv2d = torch.nn.Conv2d(c_in, c_out, k, stride, groups=groups).double()
    with torch.no_grad():  # BN affine parameters away from their (1, 0) defaults
        block.bn.weight.uniform_(0.5, 1.5, generator=rng)
        block.bn.bias.uniform_(-0.5, 0.5, generator=rng)
    x = torch.rand(n, c_in, h, w, dtype=torch.float64, generator=rng, requires_grad=True)
    grad = torch.randn(n, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1, dtype=torch.float64, generator=rng)
    conv, bn = block.conv.conv2d, block.bn
    params = [conv.weight, conv.bias, bn.weight, bn.bias]

    ours = conv_bn_lrelu(x, *params, stride=stride, groups=groups)
    theirs = block(x)
    # float64, the same ops in the same order: equal to rounding (measured 0 or a few 1e-16)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [x, *params], grad), torch.autograd.grad(theirs, [x, *params], grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "n, cs, cd, c_up, h, w, k",
    [
        (1, 4, 16, 8, 17, 23, 3),  # odd H/W, the default skip width
        (2, 2, 3, 5, 7, 9, 1),  # 1x1 up conv (no pad), batch 2
        (1, 4, 32, 16, 12, 10, 5),  # k = 5
    ],
)
def test_concat_bn_conv_bn_lrelu_equals_the_skip_level_merge(n, cs, cd, c_up, h, w, k, rng):
    """The twin equals SkipLevel's merge: concat_cropped([skip, deeper]) -> merge_bn -> up (ConvBNAct)."""
    spec = SkipSpec(channels_down=(cd,), channels_up=(c_up,), channels_skip=(cs,), filter_size_up=k)
    level = SkipLevel(spec, 0, 3).double()  # last level: the concat is skip (cs) + down (cd) channels
    merge_bn, up = level.merge_bn, level.up
    assert merge_bn.num_features == cs + cd and up.conv.conv2d.weight.shape == (c_up, cs + cd, k, k)
    with torch.no_grad():  # BN affine parameters away from their (1, 0) defaults
        for bn in (merge_bn, up.bn):
            bn.weight.uniform_(0.5, 1.5, generator=rng)
            bn.bias.uniform_(-0.5, 0.5, generator=rng)
    skip = torch.rand(n, cs, h, w, dtype=torch.float64, generator=rng, requires_grad=True)
    deeper = torch.rand(n, cd, h, w, dtype=torch.float64, generator=rng, requires_grad=True)
    grad = torch.randn(n, c_up, h, w, dtype=torch.float64, generator=rng)
    conv, bn = up.conv.conv2d, up.bn
    params = [merge_bn.weight, merge_bn.bias, conv.weight, conv.bias, bn.weight, bn.bias]

    ours = concat_bn_conv_bn_lrelu(skip, deeper, *params)
    theirs = up(merge_bn(concat_cropped([skip, deeper])))
    # float64, the same ops in the same order: equal to rounding
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    wrt = [skip, deeper, *params]
    for a, b in zip(torch.autograd.grad(ours, wrt, grad), torch.autograd.grad(theirs, wrt, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("act, slope", [("LeakyReLU", 0.2), ("none", 1.0)], ids=["lrelu", "no-act"])
def test_batch_norm_act_padded_is_what_the_next_conv_reads(act, slope, rng):
    """conv2d(batch_norm_act(y, pad=1), padding=0) is the next reflection-padded block's conv of act(bn(y))."""
    first = ConvBNAct(3, 5, 3, pad="reflection", act=act).double()
    second = ConvBNAct(5, 4, 3, pad="reflection").double()
    with torch.no_grad():
        first.bn.weight.uniform_(0.5, 1.5, generator=rng)
        first.bn.bias.uniform_(-0.5, 0.5, generator=rng)
    y = torch.randn(2, 5, 9, 7, dtype=torch.float64, generator=rng)
    padded = batch_norm_act(y, first.bn.weight, first.bn.bias, pad=1, eps=first.bn.eps, negative_slope=slope)
    assert padded.shape == (2, 5, 11, 9)
    expected = second.conv(first.act(first.bn(y)))
    torch.testing.assert_close(second.conv.conv2d(padded), expected, atol=1e-12, rtol=1e-12)


def test_concat_batch_norm_is_the_skip_level_merge_bn(rng):
    bn = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=rng)
        bn.bias.uniform_(-0.5, 0.5, generator=rng)
    skip = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=rng)
    deeper = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=rng)
    cropped = [skip[:, :, :8], deeper]  # concat_cropped's centre crop of 9 rows to 8 starts at row 0
    out = concat_batch_norm(*cropped, bn.weight, bn.bias, pad=2, eps=bn.eps)
    expected = torch.nn.functional.pad(bn(concat_cropped([skip, deeper])), (2,) * 4, mode="reflect")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
