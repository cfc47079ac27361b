"""dipfast.nets.fusable: the rules that say where a fused block op computes exactly what the modules do."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dipfast.nets.fusable import batch_norm_reason, conv_bias_cancels, leaky_relu_slope, takes_padded_input
from dipfast.nets.layers import ConvBNAct, PadConv


def _batch_norm(training: bool, track_running_stats: bool, drop_buffers: bool, rng) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(5, track_running_stats=track_running_stats)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=rng)
        bn.bias.normal_(generator=rng)
    if track_running_stats:
        bn(torch.randn(3, 5, 6, 7, generator=rng) * 4 + 2)  # running statistics far from any batch's
    if drop_buffers:
        bn.running_mean = bn.running_var = None
    return bn.train(training)


@pytest.mark.parametrize("training, track_running_stats, drop_buffers", itertools.product((True, False), repeat=3))
def test_batch_norm_is_fusable_exactly_where_the_module_uses_batch_statistics(
    training, track_running_stats, drop_buffers, rng
):
    """The rule is nn.BatchNorm2d's own: asked of every mode and buffer state, it says 'fusable' exactly
    where the module's output is the batch-statistics normalisation the fused ops compute."""
    bn = _batch_norm(training, track_running_stats, drop_buffers, rng)
    x = torch.randn(2, 5, 9, 11, generator=rng, dtype=torch.float64)
    bn = bn.double()
    with torch.no_grad():
        batch_statistics = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        module_uses_them = torch.allclose(bn(x), batch_statistics, rtol=0, atol=1e-12)
    assert (batch_norm_reason(bn) is None) == module_uses_them


def test_batch_norm_reasons_name_the_problem():
    assert "not BatchNorm2d" in batch_norm_reason(nn.GroupNorm(1, 4))
    assert "affine" in batch_norm_reason(nn.BatchNorm2d(4, affine=False))
    assert "running statistics" in batch_norm_reason(nn.BatchNorm2d(4).eval())


def test_leaky_relu_slope():
    assert leaky_relu_slope(nn.LeakyReLU(0.137)) == pytest.approx(0.137)
    assert leaky_relu_slope(nn.Identity()) == 1.0  # BatchNorm alone
    assert leaky_relu_slope(nn.ReLU()) is None
    assert leaky_relu_slope(nn.SiLU()) is None


@pytest.mark.parametrize(
    "kernel_size, pad, downsample_mode, stride, size, expected",
    [
        (3, "reflection", "stride", 1, 7, True),
        (5, "reflection", "stride", 2, 7, True),  # a strided conv reads the padded buffer as well
        (5, "reflection", "stride", 1, 2, False),  # reflection by 2 needs H and W > 2
        (3, "reflection", "avg", 2, 8, False),  # a downsampler follows the conv
        (1, "reflection", "stride", 1, 7, False),  # a 1x1 conv pads nothing
        (3, "zero", "stride", 1, 7, False),  # zero padding is the conv's own
    ],
)
def test_takes_padded_input(kernel_size, pad, downsample_mode, stride, size, expected):
    m = ConvBNAct(4, 6, kernel_size, stride, pad=pad, downsample_mode=downsample_mode)
    assert takes_padded_input(m, torch.empty(1, 4, size, size + 3)) is expected
    assert not takes_padded_input(m.conv, torch.empty(1, 4, 9, 9))  # not a ConvBNAct


@pytest.mark.parametrize(
    "act, downsample_mode, eval_mode, expected",
    [
        ("LeakyReLU", "stride", False, True),
        ("none", "stride", False, True),  # BatchNorm alone
        # these two cancel it as well, but the block is the reference's, which computes the bias: kept
        ("Swish", "stride", False, False),
        ("LeakyReLU", "avg", False, False),  # a downsampler between the conv and its BatchNorm
        ("LeakyReLU", "stride", True, False),  # eval mode: running statistics, which do not cancel the bias
    ],
)
def test_conv_bias_cancels_only_where_the_fused_batch_norm_takes_it_out(act, downsample_mode, eval_mode, expected, rng):
    """Where the rule says so, the block's output does not move when its conv bias does (float64, large shifts); in
    eval mode it moves, so leaving it out there would change the result."""
    m = ConvBNAct(4, 6, 3, stride=2, pad="reflection", downsample_mode=downsample_mode, act=act).double()
    x = torch.randn(2, 4, 9, 10, generator=rng, dtype=torch.float64)
    if eval_mode:
        m(x)  # running statistics
        m.eval()
    assert conv_bias_cancels(m) is expected
    with torch.no_grad():
        before = m(x)
        m.conv.conv2d.bias.add_(torch.randn(6, generator=rng, dtype=torch.float64) * 3)
        moved = (m(x) - before).abs().max().item()
    if expected:
        assert moved < 1e-12
    if eval_mode:
        assert moved > 1e-3
    assert not conv_bias_cancels(PadConv(4, 6, 1))  # no BatchNorm: the head's conv
