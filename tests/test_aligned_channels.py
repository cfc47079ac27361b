"""Convs with channels padded for tensor cores (dipfast.nets.aligned_channels) compute the module's results.

Checked in float64 against the unpadded module: forward and every gradient, odd channel counts on both sides,
strides 1 and 2, with and without bias, both memory formats; then a whole net (alone, under vmap, with the fast
block ops), and a fit through the fast step with the backend's alignment switched on.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import dipfast
from dipfast import backends
from dipfast.nets import SkipSpec, build, layers
from dipfast.nets.aligned_channels import align_conv_channels, aligned_conv2d, channel_multiple
from dipfast.nets.blocks import use_block_ops
from tests._helpers import FAST, make_rng, random_image

F64 = {"rtol": 1e-12, "atol": 1e-12}  # the same sums in another order, in float64
# a net with the default net's misalignments at toy size: 20-channel merges (4 skip + 16), 4-channel skips, 3 out
ODD_NET = SkipSpec(channels_down=(16, 16), channels_up=(16, 16), channels_skip=(4, 4))


def _seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(int(make_rng(request.node.nodeid).integers(2**31)))


def test_the_multiple_is_sixteen_bytes_of_channels():
    assert channel_multiple(torch.bfloat16) == 8
    assert channel_multiple(torch.float32) == 4


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "padding", "bias"), [
    (5, 3, 3, 1, 0, True), (12, 7, 3, 2, 1, True), (13, 16, 1, 1, 0, False), (9, 4, 3, 1, 1, False),
])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True])
def test_aligned_conv_matches_the_module_forward_and_gradients(
    request, multiple, c_in, c_out, k, stride, padding, bias, channels_last
):
    g = _seeded(request)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=bias).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, c_in, 11, 9, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = None
    results = []
    for run in (lambda t: conv(t), lambda t: aligned_conv2d(conv, t, multiple)):
        conv.zero_grad()
        xi = x.detach().clone().requires_grad_()
        y = run(xi)
        grad = torch.randn(y.shape, generator=g, dtype=torch.float64) if grad is None else grad
        y.backward(grad)
        results.append((y.detach(), xi.grad, *(p.grad.clone() for p in conv.parameters())))
    for expected, got in zip(*results, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **F64)


def test_aligned_net_matches_the_net_forward_and_every_parameter_gradient(request):
    g = _seeded(request)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    net = build(ODD_NET, 6, 3).double()
    z = torch.rand(1, 6, 24, 20, generator=g, dtype=torch.float64)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    runs = []
    for multiple in (1, 8):
        align_conv_channels(net, multiple)
        net.zero_grad()
        y = net(z)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        runs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], **F64)
    for got, expected in zip(runs[1][1], runs[0][1], strict=True):
        torch.testing.assert_close(got, expected, **F64)
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes  # the parameters keep their shapes
    assert {m.channel_multiple for m in net.modules() if isinstance(m, layers.PadConv)} == {8}


def test_aligned_net_pads_the_convs_it_should_and_no_other(monkeypatch):
    padded = []

    def spy(conv, x, multiple, bias=True):
        padded.append((conv.in_channels, conv.out_channels))
        return conv(x)

    monkeypatch.setattr(layers, "aligned_conv2d", spy)
    net = align_conv_channels(build(ODD_NET, 8, 3), 8)
    net(torch.rand(1, 8, 16, 16))
    # every conv goes through the aligned path (which leaves aligned ones as they are); the odd ones are these
    odd = sorted({c for c in padded if c[0] % 8 or c[1] % 8})
    assert odd == [(8, 4), (16, 3), (16, 4), (20, 16)]


def test_the_plan_aligns_where_the_backend_says_and_tensor_cores_run():
    cuda = torch.device("cuda")
    plan = backends.Plan("native", "bf16", compile=False, cuda_graph=True)
    assert plan.channel_multiple(cuda) == 1  # off by default until measured
    with backends.variant("native", align_channels=frozenset({"cuda"})):
        assert backends.Plan("native", "bf16", False, True).channel_multiple(cuda) == 8
        assert backends.Plan("native", "tf32", False, True).channel_multiple(cuda) == 4
        assert backends.Plan("native", "fp32", False, True).channel_multiple(cuda) == 1  # IEEE: no tensor cores
        assert backends.Plan("native", "bf16", False, False).channel_multiple(torch.device("cpu")) == 1


def test_a_fit_with_aligned_channels_returns_the_unaligned_fit(request, monkeypatch):
    """tf32 computes IEEE fp32 on a CPU: the aligned fit differs only by its order of summation."""
    calls = []
    original = layers.aligned_conv2d
    monkeypatch.setattr(layers, "aligned_conv2d", lambda *a: calls.append(a[2]) or original(*a))
    x = random_image(make_rng(request.node.nodeid), 16, 16)
    kw = {"task": "denoise", "iters": 4, "backend": "native", "precision": "tf32", "seed": 3, **FAST, "net": ODD_NET}
    plain = dipfast.restore(x, **kw)
    assert calls == []
    with backends.variant("native", align_channels=frozenset({"cpu"})):
        aligned = dipfast.restore(x, **kw)
    assert calls and set(calls) == {4}
    np.testing.assert_allclose(aligned.image, plain.image, rtol=0, atol=1e-5)


def test_aligned_nets_under_vmap_match_each_network_alone(request):
    """The vectorised step's path (vmap over stacked networks: each conv becomes a grouped conv below the
    pad): each network's channels are padded alone, and its outputs and gradients are its own."""
    g = _seeded(request)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    nets = [build(ODD_NET, 6, 3).double() for _ in range(2)]
    params, buffers = stack_module_state(nets)
    module = align_conv_channels(build(ODD_NET, 6, 3).double(), 8)
    z = torch.rand(2, 1, 6, 16, 12, generator=g, dtype=torch.float64)
    y = vmap(lambda p, b, x: functional_call(module, (p, b), (x,)))(params, buffers, z)
    weights = torch.rand(y.shape, generator=g, dtype=torch.float64)
    (y * weights).sum().backward()
    for i, net in enumerate(nets):
        yi = net(z[i])
        (yi * weights[i]).sum().backward()
        torch.testing.assert_close(y[i].detach(), yi.detach(), **F64)
        for name, p in net.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, **F64)


@pytest.mark.parametrize("ops", ["padded", "native"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fast_block_ops_with_aligned_convs_match_the_reference_net(request, ops, channels_last):
    """The blocks that write the next conv's input padded (PaddedWrites: PaddedBlocks, here its eager twins, and
    NativeBlocks) hand the aligned conv its buffer: forward and every gradient as the reference net's, float64."""
    from dipfast.kernels.blocks import PaddedBlocks
    from dipfast.native.blocks import NativeBlocks

    g = _seeded(request)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    reference = build(ODD_NET, 6, 3).double()
    net = align_conv_channels(
        use_block_ops(copy.deepcopy(reference), {"padded": PaddedBlocks, "native": NativeBlocks}[ops]()), 8
    )
    z = torch.rand(1, 6, 24, 20, generator=g, dtype=torch.float64)
    if channels_last:
        net, z_fast = net.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    else:
        z_fast = z
    weights = torch.rand(1, 3, 24, 20, generator=g, dtype=torch.float64)
    expected, got = reference(z), net(z_fast)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        # a conv bias that a fused BatchNorm cancels is left out (fusable.conv_bias_cancels): no gradient, where the
        # reference's is zero in exact arithmetic
        torch.testing.assert_close(torch.zeros_like(p) if p.grad is None else p.grad, q.grad, rtol=1e-10, atol=1e-12)
