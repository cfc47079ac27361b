"""dipfast.kernels.concat_bn_conv_bn_lrelu against dipfast.reference.concat_bn_conv_bn_lrelu (float64 oracle): the
output and all eight gradients, opcheck, torch.compile, determinism; and the fallback to the twin."""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from _kernel_checks import (
    assert_repeat_runs_are_bitwise_identical,
    assert_tf32_follows_the_cudnn_flag,
    forward_backward,
    leaves,
)

import dipfast.kernels
from dipfast import reference

# the module, not the function: dipfast.kernels re-exports the op under the module's own name
concat_bn_conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.concat_bn_conv_bn_lrelu")

pytestmark = pytest.mark.parity

NAMES = ["skip", "deeper", "merge_gamma", "merge_beta", "weight", "bias", "gamma", "beta"]
# (N, Cs, Cd, H, W, C_out, k, bias, groups), Cs and Cd per group: the product of the brief's values on an odd 7 x 9,
# plus wider, larger and grouped ones
CASES = [(n, cs, cd, 7, 9, 5, k, True, 1) for n, cs, cd, k in itertools.product((1, 2), (2, 4), (3, 16), (1, 3))]
CASES += [
    (2, 4, 16, 13, 11, 20, 3, True, 1),  # 286 pixels: two BN-statistic tiles, five conv tiles; 20 channels in and out
    (1, 4, 3, 6, 5, 4, 5, False, 1),  # k = 5 on 6 x 5 (pad 2 = W - 3), no bias
    (1, 2, 3, 4, 5, 3, 7, True, 1),  # k = 7 on 4 x 5: pad 3 = H - 1, every row mirrored in both pads
    (1, 2, 3, 7, 9, 6, 3, True, 3),  # three networks of [2 skip, 3 deeper] -> 2 side by side (vmap's folding)
    (2, 4, 16, 5, 6, 8, 1, False, 2),  # two networks, 1x1, batch 2, no bias
    # the skip's K: narrower than a 16-wide chunk, (tap, channel) pairs flattened (above: 4 x 9 = 36 columns, three
    # chunks); as wide, one chunk loop per tap
    (1, 5, 16, 6, 7, 8, 5, True, 2),  # 5 x 25 = 125 flat columns: eight chunks, the last of 13; two networks
    (1, 18, 5, 7, 6, 4, 3, True, 1),  # 18 skip channels: per-tap chunks of 16 and 2
]
IDS = [
    f"n{n}-cs{cs}-cd{cd}-{h}x{w}-co{co}-k{k}{'' if bias else '-nobias'}{f'-g{g}' if g > 1 else ''}"
    for n, cs, cd, h, w, co, k, bias, g in CASES
]
# Measured on the CPU interpreter against the float64 twin, worst over these cases and seeds 0-3, relative to the
# expected tensor's max: out 4.7e-7, dskip 3.4e-7, ddeeper 3.9e-7, dmerge_gamma 9.1e-7, dweight 7.2e-7,
# dgamma 8.2e-7, dbeta 3.4e-7 (dbias and dmerge_beta: see below). All under the conftest's fp32 row (1e-5), which
# is used unchanged: two BNs in a row amplify the conv's fp32 rounding, yet stay ~10x under it.


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(concat_bn_conv_bn_lrelu_module, "POISON_OUTPUTS", True)  # every kernel output starts as NaN
    monkeypatch.setattr(importlib.import_module("dipfast.kernels.conv_bn_lrelu"), "POISON_OUTPUTS", True)


def _inputs(case, rng, device):
    n, cs, cd, h, w, c_out, k, has_bias, groups = case
    c_in = cs + cd
    tensors = [
        torch.rand(n, groups * cs, h, w, generator=rng) + 0.1,  # fresh random, never zero
        torch.rand(n, groups * cd, h, w, generator=rng) * 2 - 0.5,
        torch.rand(groups * c_in, generator=rng) + 0.5,
        torch.randn(groups * c_in, generator=rng),
        torch.randn(c_out, c_in, k, k, generator=rng) * (c_in * k * k) ** -0.5,
        torch.randn(c_out, generator=rng) if has_bias else None,
        torch.rand(c_out, generator=rng) + 0.5,
        torch.randn(c_out, generator=rng),
    ]
    return [t.to(device) if t is not None else None for t in tensors]


def _grads_of_intermediates(ins64, g64, groups):
    """dL/d(merged) and dL/dy of the twin's maths in float64 (merged: the normalised concat, y: the conv output)."""
    skip, deeper, mg, mb, weight, bias, gamma, beta = (t.detach() if t is not None else None for t in ins64)
    n, _, h, w = skip.shape
    concat = torch.cat([skip.reshape(n, groups, -1, h, w), deeper.reshape(n, groups, -1, h, w)], 2)
    merged = F.batch_norm(concat.reshape(n, -1, h, w), None, None, mg, mb, training=True).requires_grad_(True)
    pad = (weight.shape[-1] - 1) // 2
    y = F.conv2d(F.pad(merged, (pad,) * 4, mode="reflect") if pad else merged, weight, bias, groups=groups)
    out = F.leaky_relu(F.batch_norm(y, None, None, gamma, beta, training=True), 0.2)
    return torch.autograd.grad(out, [merged, y], g64)


def test_kernels_run_on_the_triton_path(device):
    x = torch.rand(1, 3, 4, 4, device=device)
    assert dipfast.kernels.concat_bn_conv_bn_lrelu_path(x) == "triton"
    assert torch.isnan(concat_bn_conv_bn_lrelu_module._alloc((3,), device)).all()  # the poison fixture is live


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_grads_match_float64_twin(case, layout, rng, device, assert_parity, tol):
    tensors = _inputs(case, rng, device)
    groups = case[-1]
    ins = leaves(tensors, torch.float32)
    fmt = LAYOUTS[layout]  # skip, deeper and the weight in it, as the triton backend hands them over
    ins = [t.contiguous(memory_format=fmt) if t is not None and t.dim() == 4 else t for t in ins]
    out = dipfast.kernels.concat_bn_conv_bn_lrelu(*ins, groups=groups)
    g = torch.randn(out.shape, generator=rng).to(device)
    grads = torch.autograd.grad(out, [t for t in ins if t is not None], g)
    for name, t in (("out", out), ("dskip", grads[0]), ("ddeeper", grads[1]), ("dweight", grads[4])):
        assert t.is_contiguous(memory_format=fmt), f"{name} is not {layout}: strides {t.stride()}"
    ins64 = leaves(tensors, torch.float64)
    out64 = reference.concat_bn_conv_bn_lrelu(*ins64, groups=groups)
    grads64 = torch.autograd.grad(out64, [t for t in ins64 if t is not None], g.double())
    assert out.dtype == torch.float32 and out.shape == out64.shape
    assert_parity(out, out64)
    names = [name for name, t in zip(NAMES, ins, strict=True) if t is not None]
    dmerged64, dy64 = _grads_of_intermediates(ins64, g.double(), groups)
    for name, actual, expected in zip(names, grads, grads64, strict=True):
        assert actual.shape == expected.shape and actual.dtype == torch.float32, name
        if name not in ("bias", "merge_beta"):
            assert_parity(actual, expected)
            continue
        # Both cancel under the output's training-mode BN: the bias adds a per-channel constant to y, and merge_beta
        # a per-channel constant to the merged input, which the reflect-padded conv maps to a per-channel constant
        # of y. Their gradients, sum over N, H, W of dL/dy (resp. dL/dmerged), are zero in exact arithmetic, so both
        # sides are rounding noise and a bound relative to their own size is meaningless. Bound them by the sum's
        # condition, sum |dL/dy| (resp. |dL/dmerged|) per channel, at the fp32 row's atol. Measured |error| / that:
        # dbias <= 2.9e-7, dmerge_beta <= 1.6e-7 (same draws as above).
        assert not torch.isnan(actual).any(), name
        scale = (dy64 if name == "bias" else dmerged64).abs().sum((0, 2, 3))
        assert ((actual.double() - expected).abs() <= tol[torch.float32][0] * scale).all(), name


BF16_CASES = [  # (N, Cs, Cd, H, W, C_out, k, bias, groups) as above
    (1, 4, 16, 9, 7, 8, 3, True, 1),  # the skip level's merge: 4 skip channels beside a wider deeper branch
    (2, 2, 3, 6, 5, 4, 1, True, 2),  # 1x1, two networks side by side, batch 2
]


def _dip_like(case, rng, device):
    """bf16 skip, deeper and weight, fp32 parameters, as autocast hands them to the merge: the sources are
    LeakyReLU outputs, the weight and bias initialised as nn.Conv2d does (test_conv_bn_lrelu.py)."""
    n, cs, cd, h, w, c_out, k, has_bias, groups = case
    c_in = cs + cd
    bound = (c_in * k * k) ** -0.5
    tensors = [
        F.leaky_relu(torch.randn(n, groups * cs, h, w, generator=rng), 0.2).bfloat16(),
        F.leaky_relu(torch.randn(n, groups * cd, h, w, generator=rng), 0.2).bfloat16(),
        torch.rand(groups * c_in, generator=rng) + 0.5,
        torch.randn(groups * c_in, generator=rng) * 0.5,
        ((torch.rand(c_out, c_in, k, k, generator=rng) * 2 - 1) * bound).bfloat16(),
        (torch.rand(c_out, generator=rng) * 2 - 1) * bound if has_bias else None,
        torch.rand(c_out, generator=rng) + 0.5,
        torch.randn(c_out, generator=rng) * 0.5,
    ]
    return [t.to(device) if t is not None else None for t in tensors]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BF16_CASES, ids=["skip-level-k3", "k1-g2-n2"])
def test_bf16_matches_float64_twin(case, layout, rng, device, assert_parity, tol):
    """The conftest's bf16 row; gradients at the kernel's own LeakyReLU pattern (test_conv_bn_lrelu.py says why)."""
    tensors = _dip_like(case, rng, device)
    groups = case[-1]
    ins = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
    ins = [t.contiguous(memory_format=LAYOUTS[layout]) if t is not None and t.dim() == 4 else t for t in ins]
    out = dipfast.kernels.concat_bn_conv_bn_lrelu(*ins, groups=groups)
    assert out.dtype == torch.bfloat16
    g = torch.randn(out.shape, generator=rng).bfloat16().to(device)
    wrt = [t for t in ins if t is not None]
    grads = torch.autograd.grad(out, wrt, g)
    ins64 = leaves(tensors, torch.float64)
    wrt64 = [t for t in ins64 if t is not None]
    assert_parity(out, reference.concat_bn_conv_bn_lrelu(*ins64, groups=groups), torch.bfloat16)
    pattern = torch.where(out.detach() > 0, 1.0, 0.2).double()
    linear64 = reference.concat_bn_conv_bn_lrelu(*ins64, groups=groups, slope=1.0) * pattern
    grads64 = torch.autograd.grad(linear64, wrt64, g.double())
    names = [name for name, t in zip(NAMES, ins, strict=True) if t is not None]
    dmerged64, dy64 = _grads_of_intermediates(ins64, g.double(), groups)
    for name, actual, t, expected in zip(names, grads, wrt, grads64, strict=True):
        assert actual.dtype == t.dtype, name  # bf16 for the sources and the weight, fp32 for the rest
        if name not in ("bias", "merge_beta"):
            assert_parity(actual, expected, torch.bfloat16)
            continue
        # zero in exact arithmetic (see the fp32 test): bounded by sum |dL/dy| (|dL/dmerged|) at the bf16 row's atol
        assert not torch.isnan(actual).any(), name
        scale = (dy64 if name == "bias" else dmerged64).abs().sum((0, 2, 3))
        assert ((actual.double() - expected).abs() <= tol[torch.bfloat16][0] * scale).all(), name


def test_tf32_follows_the_cudnn_flag(rng, device, monkeypatch):
    """As test_conv_bn_lrelu.py's: the flag reaches the merge's dots, forward and backward."""
    tensors = _inputs((1, 2, 3, 5, 6, 4, 3, True, 1), rng, device)
    g = torch.randn(1, 4, 5, 6, generator=rng).to(device)
    assert_tf32_follows_the_cudnn_flag(
        monkeypatch, lambda: forward_backward(dipfast.kernels.concat_bn_conv_bn_lrelu, tensors, g), launches=4
    )  # the dgrad once per source


def test_repeat_runs_are_bitwise_identical(rng, device):
    tensors = _inputs((2, 4, 16, 7, 9, 5, 3, True, 1), rng, device)  # two conv pixel tiles, a 20-channel K split
    g = torch.randn(2, 5, 7, 9, generator=rng).to(device)
    assert_repeat_runs_are_bitwise_identical(
        lambda: forward_backward(dipfast.kernels.concat_bn_conv_bn_lrelu, tensors, g)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, rng, device):
    """Also the fake implementations' strides against the kernels' in either layout (what torch.compile traces)."""
    ins = leaves(_inputs((1, 2, 3, 5, 6, 4, 3, True, 2), rng, device), torch.float32)
    ins = [t.contiguous(memory_format=LAYOUTS[layout]) if t is not None and t.dim() == 4 else t for t in ins]
    args = (*ins, 2, 1e-5, 0.2, False)
    torch.library.opcheck(concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_fwd, args)
    # the backward op, with its forward's saved tensors (it has no derivative of its own: no double backward)
    with torch.no_grad():
        out, y, mean, rstd, mmean, mrstd = concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_fwd(*args)
    skip, deeper, mg, mb, weight, _, gamma, beta = (t.detach() if t is not None else None for t in ins)
    g = torch.randn(out.shape, generator=rng).to(device)
    bwd_args = (g, skip, deeper, mg, mb, weight, y, mean, rstd, gamma, beta, mmean, mrstd, 2, 0.2, False)
    for bias_grad in (True, False):  # False: an empty dbias, for a bias left out or not trained
        torch.library.opcheck(concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_bwd, (*bwd_args, bias_grad))


def test_concat_bn_conv_bn_lrelu_compiles(rng, device, tol):
    tensors = _inputs((1, 2, 3, 5, 7, 3, 3, True, 1), rng, device)
    g = torch.randn(1, 3, 5, 7, generator=rng).to(device)

    def step(*ins):
        return (dipfast.kernels.concat_bn_conv_bn_lrelu(*ins) * g).sum()

    compiled = torch.compile(step, fullgraph=True)
    ins_e, ins_c = leaves(tensors, torch.float32), leaves(tensors, torch.float32)
    loss_e, loss_c = step(*ins_e), compiled(*ins_c)
    grads_e = torch.autograd.grad(loss_e, ins_e)
    grads_c = torch.autograd.grad(loss_c, ins_c)
    atol, rtol = tol[torch.float32]
    torch.testing.assert_close(loss_c, loss_e, atol=atol * loss_e.abs().item(), rtol=rtol)
    for name, gc, ge in zip(NAMES, grads_c, grads_e, strict=True):
        # dbias and dmerge_beta are rounding noise (see above): same kernels, so equal up to the same noise
        scale = ge.abs().max().item() if name not in ("bias", "merge_beta") else 1e-3
        torch.testing.assert_close(gc, ge, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("why", ["no-interpreter", "no-triton", "float64"])
def test_fallback_runs_the_twin(why, monkeypatch, rng):
    tensors = _inputs(CASES[0], rng, "cpu")
    if why == "no-interpreter":
        monkeypatch.setattr(
            concat_bn_conv_bn_lrelu_module, "_INTERPRET", False
        )  # CPU tensors, kernels not built for the interpreter
    elif why == "no-triton":
        monkeypatch.setattr(concat_bn_conv_bn_lrelu_module, "_HAS_TRITON", False)
    else:
        tensors = [t.double() for t in tensors]

    def _no_kernel(*args):
        raise AssertionError("the Triton op ran on the fallback path")

    monkeypatch.setattr(concat_bn_conv_bn_lrelu_module, "_concat_bn_conv_bn_lrelu_fwd", _no_kernel)
    assert dipfast.kernels.concat_bn_conv_bn_lrelu_path(tensors[0]) == "reference"
    expected = reference.concat_bn_conv_bn_lrelu(*tensors)
    assert torch.equal(dipfast.kernels.concat_bn_conv_bn_lrelu(*tensors), expected)


@pytest.mark.parametrize(
    "skip_shape, deeper_shape, w_shape, match",
    [
        ((1, 2, 8, 8), (1, 3, 8, 7), (4, 5, 3, 3), "crop them first"),
        ((1, 0, 8, 8), (1, 3, 8, 8), (4, 3, 3, 3), ">= 1 channel"),
        ((1, 2, 8, 8), (1, 3, 8, 8), (4, 4, 3, 3), r"\(C_out, 5, k, k\)"),
        ((1, 2, 8, 8), (1, 3, 8, 8), (4, 5, 2, 2), "k in"),
        ((1, 2, 3, 8), (1, 3, 3, 8), (4, 5, 7, 7), "reflection pad"),
        ((2, 8, 8), (1, 3, 8, 8), (4, 5, 3, 3), r"\(N, C, H, W\)"),
        ((1, 3, 8, 8), (1, 4, 8, 8), (4, 5, 3, 3), "groups=2"),  # 3 skip channels do not split in 2 groups
    ],
    ids=["uncropped", "no-skip", "bad-c-in", "even-k", "pad-too-large", "not-4d", "bad-groups"],
)
def test_bad_arguments_raise(skip_shape, deeper_shape, w_shape, match):
    c_in, c_out = skip_shape[1] + deeper_shape[1], w_shape[0]
    kw = {"groups": 2} if "groups" in match else {}
    with pytest.raises(ValueError, match=match):
        dipfast.kernels.concat_bn_conv_bn_lrelu(
            torch.rand(skip_shape),
            torch.rand(deeper_shape),
            torch.rand(c_in),
            torch.rand(c_in),
            torch.rand(w_shape),
            torch.rand(c_out),
            torch.rand(c_out),
            torch.rand(c_out),
            **kw,
        )
