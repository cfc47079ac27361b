"""dipfast.kernels.TritonBlocks: a whole skip() net on the fused kernels against the same net on the reference
blocks in float64 (the output and every parameter gradient), and which blocks the kernels actually ran."""

import copy
import functools
import importlib

import pytest
import torch
from torch import nn

from dipfast.engine import ieee_fp32
from dipfast.kernels import TritonBlocks
from dipfast.kernels.blocks import unfused_reason
from dipfast.nets.blocks import BlockOps, block_ops_of, use_block_ops
from dipfast.nets.layers import ConvBNAct
from dipfast.nets.skip import skip

# the modules, not the functions: dipfast.kernels re-exports the ops under the modules' own names
conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")
concat_bn_conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.concat_bn_conv_bn_lrelu")

pytestmark = pytest.mark.parity

TINY = dict(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))  # two levels, every block kind
# Per level: skip (1x1), down (3x3, stride 2), conv (3x3), the merge (concat + BN + up's 3x3), up1x1 (1x1).
LEVELS = 2
# The bar, as in test_cuda_shapes.py: through a whole net, the fp32 rounding of ten BatchNorms in a row is what it is
# for any fp32 implementation (the eager fp32 reference net is up to 2.3e-4 off float64 on a BN weight gradient,
# a sum over pixels that cancels), so each tensor's error relative to its max is held to twice the eager fp32 net's
# plus the fp32 row's atol as a floor. Measured on the CPU interpreter over 3 seeds x (16x16, 17x13): the worst
# kernel error is 0.62 of that bar (1.9e-4 where eager is 2.3e-4); out <= 7.6e-7. The BatchNorms' own weight and
# bias gradients, sums that cancel, are held per channel to their sums' condition instead (_assert_net_parity).


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv_bn_lrelu_module, "POISON_OUTPUTS", True)  # every kernel output starts as NaN
    monkeypatch.setattr(concat_bn_conv_bn_lrelu_module, "POISON_OUTPUTS", True)


@pytest.fixture
def counts(monkeypatch):
    """How many blocks ran on each path: the fused ops' forwards, and the reference blocks TritonBlocks fell to."""
    counted = {"conv_bn_lrelu": 0, "merge": 0, "reference conv_bn_act": 0, "reference merge": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            counted[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        conv_bn_lrelu_module, "_conv_bn_lrelu_fwd", counting("conv_bn_lrelu", conv_bn_lrelu_module._conv_bn_lrelu_fwd)
    )
    monkeypatch.setattr(
        concat_bn_conv_bn_lrelu_module,
        "_concat_bn_conv_bn_lrelu_fwd",
        counting("merge", concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_fwd),
    )
    monkeypatch.setattr(BlockOps, "conv_bn_act", counting("reference conv_bn_act", BlockOps.conv_bn_act))
    monkeypatch.setattr(BlockOps, "merge", counting("reference merge", BlockOps.merge))
    return counted


def _net(rng, **spec):
    net = skip(4, 3, **{**TINY, **spec})
    with torch.no_grad():  # BN affine parameters away from their (1, 0) defaults
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=rng)
                m.bias.uniform_(-0.5, 0.5, generator=rng)
    return net


def _vanishing_biases(net: nn.Module, reflection: bool) -> dict[str, nn.Module]:
    """Bias parameters whose gradient is zero in exact arithmetic, with the module whose output they shift.

    A conv bias before a training-mode BN cancels; so does merge_bn's bias, whose per-channel constant the
    reflect-padded conv maps to a per-channel constant of its output (not under zero padding).
    """
    vanishing = {}
    for name, m in net.named_modules():
        if name.endswith("conv.conv2d") and isinstance(m, nn.Conv2d) and not name.startswith("head"):
            vanishing[f"{name}.bias"] = m
        if reflection and name.endswith("merge_bn"):
            vanishing[f"{name}.bias"] = m
    return vanishing


def _max_rel_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    return ((actual.double() - expected64).abs().max() / expected64.abs().max()).item()


def _run(net, z, g, extra=()):
    """The output and the gradients of every parameter (then of `extra`) for the upstream gradient g."""
    out = net(z)
    return [out, *torch.autograd.grad(out, [*net.parameters(), *extra], g, materialize_grads=True)]


def _record_batch_norm(name, outputs, normalised, module, args, output):
    """A forward hook: a BatchNorm's output (for its gradient) and its xhat, from its input's batch statistics."""
    x = args[0]
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
    normalised[name] = ((x - mean) / torch.sqrt(var + module.eps)).detach()
    outputs[f"{name}.output"] = output


def _assert_net_parity(net, z, rng, counts, tol, reflection=True, ops=None) -> dict[str, int]:
    """The net on `ops` (TritonBlocks by default) against its float64 reference copy, with the fp32 reference copy
    as the yardstick.

    Returns the block counts of the run on `ops`.
    """
    ops = TritonBlocks() if ops is None else ops
    net64 = use_block_ops(copy.deepcopy(net).double(), BlockOps())
    eager = use_block_ops(copy.deepcopy(net), BlockOps())
    use_block_ops(net, ops)
    assert block_ops_of(net) == {ops.name}
    names = ["out", *(name for name, _ in net.named_parameters())]
    with ieee_fp32():
        g = torch.randn(eager(z).shape, generator=rng).to(z.device)
        eager_results = _run(eager, z, g)
        for key in counts:
            counts[key] = 0
        results = _run(net, z, g)
        counted = dict(counts)
        vanishing = _vanishing_biases(net64, reflection)
        shifted = {}  # the outputs the vanishing biases shift, and the BatchNorms', kept for their gradients
        normalised = {}  # each BatchNorm's xhat
        for name, m in net64.named_modules():
            if f"{name}.bias" in vanishing:
                m.register_forward_hook(lambda mod, a, output, key=f"{name}.bias": shifted.__setitem__(key, output))
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(functools.partial(_record_batch_norm, name, shifted, normalised))
        net64(z.double())  # fills `shifted` once, so the next call's hooks replace its entries in the same order
        oracle = _run(net64, z.double(), g.double(), extra=shifted.values())
    oracle, d_shifted = oracle[: len(names)], dict(zip(shifted, oracle[len(names) :], strict=True))

    for name, actual, yardstick, expected in zip(names, results, eager_results, oracle, strict=True):
        assert actual.shape == expected.shape and actual.dtype == torch.float32, name
        assert not torch.isnan(actual).any(), f"{name}: NaN (an element was never written)"
        if name in vanishing:
            # sum over N, H, W of dL/d(shifted output): rounding noise on both sides; bounded by the sum's
            # condition, sum |dL/d(shifted output)| per channel, at the fp32 row's atol (test_conv_bn_lrelu.py)
            scale = d_shifted[name].abs().sum((0, 2, 3))
            assert ((actual.double() - expected).abs() <= tol[torch.float32][0] * scale).all(), name
            continue
        module, _, kind = name.rpartition(".")
        if module in normalised:
            # a BatchNorm's weight and bias gradients: per channel sum over N, H, W of g * xhat and of g, g its
            # output's gradient, which cancel (a BN after them renormalises). Their fp32 rounding is the sum's
            # condition, sum |g * xhat| (or |g|), at the fp32 row's atol, beside twice the eager net's own error.
            # Against the whole tensor's max (the bar below), they measured up to 1.03 of it over 4 seeds x 2 sizes
            # with the conv biases kept, and 1.04 on this suite's draw with them left out: rounding, not a bug.
            g_out = d_shifted[f"{module}.output"]
            terms = g_out * normalised[module] if kind == "weight" else g_out
            bound = 2 * (yardstick.double() - expected).abs() + tol[torch.float32][0] * terms.abs().sum((0, 2, 3))
            assert ((actual.double() - expected).abs() <= bound).all(), name
            continue
        kernel_err, eager_err = _max_rel_error(actual, expected), _max_rel_error(yardstick, expected)
        assert kernel_err <= 2 * eager_err + tol[torch.float32][0], (
            f"{name}: kernels {kernel_err:.2e}, eager {eager_err:.2e}"
        )
    return counted


@pytest.mark.parametrize("size", [(16, 16), (17, 13)], ids=["16x16", "odd-17x13"])
def test_net_on_fused_blocks_matches_float64_reference(size, rng, device, counts, tol):
    net = _net(rng).to(device)
    z = torch.rand(1, 4, *size, generator=rng).to(device)
    counted = _assert_net_parity(net, z, rng, counts, tol)
    # every ConvBNAct but the merge's up is fused (skip, down, conv, up1x1 per level), and every merge
    assert counted == {"conv_bn_lrelu": 4 * LEVELS, "merge": LEVELS, "reference conv_bn_act": 0, "reference merge": 0}


def test_fused_blocks_leave_out_the_biases_their_batch_norm_cancels(rng, device, monkeypatch):
    """A fused conv runs without its bias (its training-mode BatchNorm cancels it): the bias gets no gradient, and
    the backward sums no dy for one (the BIAS_SUMS pass launches none). The head's conv, no BatchNorm after it, and
    the BatchNorms' own biases keep theirs."""
    net = use_block_ops(_net(rng).to(device), TritonBlocks())
    sums = []
    kernel = conv_bn_lrelu_module._bn_lrelu_bwd_kernel

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                sums.append(kwargs["BIAS_SUMS"])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(conv_bn_lrelu_module, "_bn_lrelu_bwd_kernel", Recorded())
    net(torch.rand(1, 4, 16, 16, generator=rng).to(device)).square().sum().backward()
    fused = [m.conv.conv2d for m in net.modules() if isinstance(m, ConvBNAct)]
    assert len(fused) == 5 * LEVELS and all(c.bias is not None and c.bias.grad is None for c in fused)
    assert net.head.conv2d.bias.grad is not None
    assert all(m.bias.grad is not None for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(sums) == 2 * 5 * LEVELS and not any(sums)  # two passes per fused conv (merges included)


def test_zero_padded_net_fuses_only_its_1x1_blocks(rng, device, counts, tol):
    """Zero padding: the 3x3 blocks fall back (reference), the 1x1 ones (no pad) stay fused; one net, both paths."""
    net = _net(rng, pad="zero").to(device)
    z = torch.rand(1, 4, 16, 16, generator=rng).to(device)
    counted = _assert_net_parity(net, z, rng, counts, tol, reflection=False)
    # fused: skip and up1x1 per level; reference: down, conv and the merge (whose up is then a reference block)
    assert counted == {
        "conv_bn_lrelu": 2 * LEVELS,
        "merge": 0,
        "reference conv_bn_act": 3 * LEVELS,
        "reference merge": LEVELS,
    }


@pytest.mark.parametrize(
    "spec, fused_convs, reason",
    [
        (dict(act="Swish"), 0, "activation is Swish"),
        (dict(downsample_mode="avg"), 3 * LEVELS, "AvgPool2d downsampler"),  # only the strided down falls back
    ],
    ids=["swish", "avg-downsampler"],
)
def test_ineligible_blocks_take_the_reference_path(spec, fused_convs, reason, rng, device, counts):
    net = use_block_ops(_net(rng, **spec).to(device), TritonBlocks())
    z = torch.rand(1, 4, 16, 16, generator=rng).to(device)
    with torch.no_grad(), ieee_fp32():
        expected = use_block_ops(copy.deepcopy(net), BlockOps())(z)
        for key in counts:
            counts[key] = 0
        out = net(z)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert counts["conv_bn_lrelu"] == fused_convs
    assert counts["reference conv_bn_act"] == 5 * LEVELS - fused_convs - counts["merge"]
    assert reason in unfused_reason(net.level.down, z)


def test_autocast_runs_the_kernels_on_bf16_operands(rng, device, monkeypatch, tol):
    """precision='bf16' as the engine runs it: the generator under torch.autocast(bf16) with fp32 parameters."""
    net = _net(rng, channels_down=(8,), channels_up=(8,), channels_skip=(2,)).to(device)  # one level: every kind
    net64 = use_block_ops(copy.deepcopy(net).double(), BlockOps())
    eager = use_block_ops(copy.deepcopy(net), BlockOps())
    use_block_ops(net, TritonBlocks())
    operands = []  # (x, weight, gamma) dtypes of every fused call

    def spying(fn, weight_index, gamma_index):
        def wrapper(*args):
            operands.append((args[0].dtype, args[weight_index].dtype, args[gamma_index].dtype))
            return fn(*args)

        return wrapper

    monkeypatch.setattr(
        conv_bn_lrelu_module, "_conv_bn_lrelu_fwd", spying(conv_bn_lrelu_module._conv_bn_lrelu_fwd, 1, 3)
    )
    monkeypatch.setattr(
        concat_bn_conv_bn_lrelu_module,
        "_concat_bn_conv_bn_lrelu_fwd",
        spying(concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_fwd, 4, 6),
    )
    z = torch.rand(1, 4, 8, 8, generator=rng).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, out_eager = net(z), eager(z)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert len(operands) == 5 and set(operands) == {(bf16, bf16, fp32)}  # 4 ConvBNAct and the merge, all fused
    out64 = net64(z.double())
    assert out.dtype == out_eager.dtype
    # Five blocks of bf16 rounding: the bar is the eager autocast net's own error against float64, twice it plus 2^-8.
    # Measured over 6 seeds, relative to the max: eager 4.1e-3 to 6.7e-3, the kernels 4.5e-3 to 1.0e-2, at most 0.68
    # of the bar (with the interpreter truncating to bf16, before _gpu_arithmetic.py made it round as a GPU does).
    kernel_err, eager_err = _max_rel_error(out, out64), _max_rel_error(out_eager, out64)
    assert kernel_err <= 2 * eager_err + 2**-8, f"kernels {kernel_err:.2e}, eager autocast {eager_err:.2e}"
    g = torch.randn(out.shape, generator=rng).to(device)
    grads = torch.autograd.grad(out.float(), list(net.parameters()), g, materialize_grads=True)  # biases left out: 0
    for (name, p), grad in zip(net.named_parameters(), grads, strict=True):
        assert grad.dtype == p.dtype == torch.float32 and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_the_reference_upsample_keeps_its_inputs_dtype_under_autocast(rng, device, mode):
    """CUDA's autocast would run upsample_bilinear2d in fp32 and carry the merge after it in fp32 (the H200
    profile); the block runs it in its input's dtype, with the bits of the op called outside autocast."""
    from dipfast.nets.layers import upsample

    m = upsample(mode)
    x = torch.randn(2, 5, 7, 9, generator=rng).to(device).bfloat16()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = BlockOps().upsample(m, x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 14, 18)
    assert torch.equal(y, m(x))
