"""torch.func.vmap over the fused ops, the engine's way of training N networks at once (fast_step.FastStep): three
stacked tiny nets on TritonBlocks against a loop of the three nets; each op's vmap rule against a loop of single
calls, forward and gradients (autograd outside the vmap, as the engine runs it); the backward ops' own rules; and
vmap inside torch.compile(fullgraph=True)."""

import importlib
import itertools

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import dipfast.kernels
from dipfast.kernels import TritonBlocks
from dipfast.nets.blocks import use_block_ops
from dipfast.nets.skip import skip

conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")
concat_bn_conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.concat_bn_conv_bn_lrelu")
lanczos2_module = importlib.import_module("dipfast.kernels.lanczos2")

pytestmark = pytest.mark.parity

B = 3  # networks
# The folded launch runs each network's group on the same tiles as a single call, so the conv ops agree bit for bit
# with the loop (measured: 0.0). What vmap batches differently is the rest: torch's grouped head conv, the upsample,
# and the per-network MSE, summed in another order (measured: <= 1.2e-6 of each network's largest gradient, and
# 1e-8 relative for the MSE's gradient). The bar is the fp32 row (1e-5), relative to each network's largest value.


@pytest.fixture
def rng(device) -> torch.Generator:
    """On the kernels' device (the CPU under the interpreter), so every tensor below is made there."""
    return torch.Generator(device).manual_seed(0)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    for module in (conv_bn_lrelu_module, concat_bn_conv_bn_lrelu_module, lanczos2_module):
        monkeypatch.setattr(module, "POISON_OUTPUTS", True)  # every kernel output starts as NaN


def _assert_same(actual, expected, tol, scale=None):
    """actual == expected at the fp32 row, relative to `scale` (default: expected's largest magnitude)."""
    atol, rtol = tol[torch.float32]
    if expected.numel() == 0:  # a gradient not asked for
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        return
    assert not torch.isnan(actual).any(), "NaN: an element was never written"
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def _stacked(rng, *shapes, offset=0.0):
    return [(torch.randn(B, *shape, generator=rng, device=rng.device) + offset).requires_grad_() for shape in shapes]


def _assert_vmap_matches_loop(fn, args, in_dims, rng, tol):
    """vmap(fn, in_dims)(*args) against [fn(*args_i) for each i]: output and the gradient of every float input."""
    out = vmap(fn, in_dims=in_dims)(*args)
    g = torch.randn(out.shape, generator=rng, device=rng.device)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(out, wrt, g)
    expected_grads = [torch.zeros_like(a) for a in wrt]
    for i in range(B):
        args_i = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims, strict=True)]
        out_i = fn(*args_i)
        _assert_same(out.select(0, i), out_i, tol)
        for total, grad_i in zip(expected_grads, torch.autograd.grad(out_i, wrt, g[i]), strict=True):
            total += grad_i  # an input shared by the B calls (in_dim None) gets the sum of their gradients
    for actual, expected in zip(grads, expected_grads, strict=True):
        _assert_same(actual, expected, tol)


def _conv_args(rng, x_dim, k=3):
    x = (
        torch.rand(1, 4, 7, 9, B, generator=rng, device=rng.device).movedim(-1, x_dim)
        if x_dim is not None
        else torch.rand(1, 4, 7, 9, generator=rng, device=rng.device)
    )
    weight, bias, beta = _stacked(rng, (6, 2, k, k), (6,), (6,))
    gamma = (torch.rand(B, 6, generator=rng, device=rng.device) + 0.5).requires_grad_()
    return [x.requires_grad_(), weight, bias, gamma, beta], (x_dim, 0, 0, 0, 0)


@pytest.mark.parametrize("x_dim, k", [(0, 3), (4, 1), (None, 1)], ids=["x-batched", "x-batched-last", "x-shared"])
def test_conv_bn_lrelu_rule_matches_a_loop(x_dim, k, rng, tol):
    args, in_dims = _conv_args(rng, x_dim, k)
    _assert_vmap_matches_loop(lambda *a: dipfast.kernels.conv_bn_lrelu(*a, stride=2, groups=2), args, in_dims, rng, tol)


@pytest.mark.parametrize("groups, k", [(1, 3), (2, 1)], ids=["skip-level", "grouped"])
def test_merge_rule_matches_a_loop(groups, k, rng, tol):
    cs, cd, c_out = 2, 3, 4  # per group
    skip_, deeper = (
        torch.rand(B, 1, groups * c, 5, 6, generator=rng, device=rng.device).requires_grad_() for c in (cs, cd)
    )
    merge_beta, weight, bias, beta = _stacked(rng, (groups * (cs + cd),), (groups * c_out, cs + cd, k, k), *[(8,)] * 2)
    weight = weight.detach().mul(0.3).requires_grad_()
    bias, beta = (t.detach()[:, : groups * c_out].requires_grad_() for t in (bias, beta))
    merge_gamma, gamma = (
        (torch.rand(B, n, generator=rng, device=rng.device) + 0.5).requires_grad_()
        for n in (groups * (cs + cd), groups * c_out)
    )
    args = [skip_, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta]
    _assert_vmap_matches_loop(
        lambda *a: dipfast.kernels.concat_bn_conv_bn_lrelu(*a, groups=groups), args, (0,) * 8, rng, tol
    )


def test_lanczos2_rules_match_a_loop(rng, tol):
    x = torch.rand(B, 1, 3, 16, 12, generator=rng, device=rng.device).requires_grad_()
    target = torch.rand(
        1, 3, 4, 3, generator=rng, device=rng.device
    ).requires_grad_()  # one observed image for every network
    _assert_vmap_matches_loop(lambda a: dipfast.kernels.lanczos2_downsample(a, 2), [x], (0,), rng, tol)
    _assert_vmap_matches_loop(lambda a, y: dipfast.kernels.lanczos2_mse(a, y, 4), [x, target], (0, None), rng, tol)


def test_backward_op_rules_match_a_loop(rng, tol):
    """The backward ops under vmap (a backward that itself runs inside a vmap), against a loop of single calls."""
    args, _ = _conv_args(rng, 0)
    args = [a.detach() for a in args]
    saved = [conv_bn_lrelu_module._conv_bn_lrelu_fwd(*(a[i] for a in args), 1, 2, 1e-5, 0.2, False) for i in range(B)]
    grad = torch.randn(B, 1, 6, 7, 9, generator=rng, device=rng.device)
    x, weight, _, gamma, beta = args
    y, mean, rstd = (torch.stack([s[j] for s in saved]) for j in (1, 2, 3))
    batched = (grad, x, weight, y, mean, rstd, gamma, beta)
    for bwd, bias_grad in itertools.product(
        (conv_bn_lrelu_module._conv_bn_lrelu_bwd, conv_bn_lrelu_module._conv_bn_lrelu_bwd_params), (True, False)
    ):
        results = vmap(lambda *a, op=bwd, db=bias_grad: op(*a, 1, 2, 0.2, False, db))(*batched)
        for i in range(B):
            expected = bwd(*(a[i] for a in batched), 1, 2, 0.2, False, bias_grad)
            assert (expected[-3].numel() > 0) == bias_grad  # dbias: empty unless asked for
            for actual, e in zip(results, expected, strict=True):
                _assert_same(actual[i], e, tol)

    grad_lr = torch.randn(B, 1, 3, 4, 3, generator=rng, device=rng.device)
    results = vmap(lambda g: lanczos2_module._lanczos2_downsample_bwd(g, 4, 16, 12))(grad_lr)
    for i in range(B):
        _assert_same(results[i], lanczos2_module._lanczos2_downsample_bwd(grad_lr[i], 4, 16, 12), tol)


def test_merge_backward_op_rule_matches_a_loop(rng, tol):
    skip_, deeper = (
        torch.rand(B, 1, 2, 5, 6, generator=rng, device=rng.device),
        torch.rand(B, 1, 3, 5, 6, generator=rng, device=rng.device),
    )
    merge_gamma, gamma = (
        torch.rand(B, 5, generator=rng, device=rng.device) + 0.5,
        torch.rand(B, 4, generator=rng, device=rng.device) + 0.5,
    )
    merge_beta, bias, beta = (
        torch.randn(B, 5, generator=rng, device=rng.device),
        torch.randn(B, 4, generator=rng, device=rng.device),
        torch.randn(B, 4, generator=rng, device=rng.device),
    )
    weight = torch.randn(B, 4, 5, 3, 3, generator=rng, device=rng.device) * 0.3
    ins = (skip_, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta)
    saved = [
        concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_fwd(*(a[i] for a in ins), 1, 1e-5, 0.2, False)
        for i in range(B)
    ]
    y, mean, rstd, mmean, mrstd = (torch.stack([s[j] for s in saved]) for j in range(1, 6))
    grad = torch.randn(B, 1, 4, 5, 6, generator=rng, device=rng.device)
    batched = (grad, skip_, deeper, merge_gamma, merge_beta, weight, y, mean, rstd, gamma, beta, mmean, mrstd)
    bwd = concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_bwd
    for bias_grad in (True, False):
        results = vmap(lambda *a, db=bias_grad: bwd(*a, 1, 0.2, False, db))(*batched)
        for i in range(B):
            expected = bwd(*(a[i] for a in batched), 1, 0.2, False, bias_grad)
            assert (expected[5].numel() > 0) == bias_grad  # dbias: empty unless asked for
            for actual, e in zip(results, expected, strict=True):
                _assert_same(actual[i], e, tol)


def test_stacked_nets_match_a_loop(rng, tol):
    """The engine's batching: vmap(functional_call) over stack_module_state of three nets on TritonBlocks."""
    # one level has every block kind: skip, down, conv, the merge and up1x1
    nets = [skip(4, 3, channels_down=(4,), channels_up=(4,), channels_skip=(2,)) for _ in range(B)]
    nets = [use_block_ops(net.to(rng.device), TritonBlocks()) for net in nets]
    params, buffers = stack_module_state(nets)
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    z = torch.rand(B, 1, 4, 8, 8, generator=rng, device=rng.device)
    out = vmap(lambda p, b, x: functional_call(nets[0], (p, b), (x,)))(params, buffers, z)
    g = torch.randn(out.shape, generator=rng, device=rng.device)
    grads = torch.autograd.grad(out, list(params.values()), g, materialize_grads=True)  # biases left out: 0
    for i, net in enumerate(nets):
        out_i = net(z[i])
        grads_i = torch.autograd.grad(out_i, list(net.parameters()), g[i], materialize_grads=True)
        _assert_same(out[i], out_i, tol)
        # relative to the network's largest gradient: the conv biases' gradients, zero in exact arithmetic under
        # training BN, are rounding noise at that scale on both sides
        scale = max(grad.abs().max().item() for grad in grads_i)
        for stacked, grad_i in zip(grads, grads_i, strict=True):
            _assert_same(stacked[i], grad_i, tol, scale=scale)


def test_vmapped_ops_compile_fullgraph(rng, tol):
    """vmap over the conv op and the fused MSE inside torch.compile(fullgraph=True), forward and backward."""
    args, _ = _conv_args(rng, 0)
    target = torch.rand(1, 6, 2, 2, generator=rng, device=rng.device)  # one observed image for every network

    def loss(x, weight, bias, gamma, beta):
        def one(*a):
            out = dipfast.kernels.conv_bn_lrelu(*a, stride=2, groups=2)  # (1, 6, 4, 5)
            return dipfast.kernels.lanczos2_mse(out, target, 2)

        return vmap(one)(x, weight, bias, gamma, beta).sum()

    leaves_e = [a.detach().requires_grad_() for a in args]
    leaves_c = [a.detach().requires_grad_() for a in args]
    loss_e = loss(*leaves_e)
    loss_c = torch.compile(loss, fullgraph=True)(*leaves_c)
    _assert_same(loss_c, loss_e, tol)
    for gc, ge in zip(torch.autograd.grad(loss_c, leaves_c), torch.autograd.grad(loss_e, leaves_e), strict=True):
        _assert_same(gc, ge, tol)
