"""dipfast.kernels.conv_bn_lrelu against dipfast.reference.conv_bn_lrelu (float64 oracle): the output and every
gradient, opcheck, torch.compile, determinism; and the fallback to the twin where Triton cannot run."""

import pytest
import torch
from _kernel_checks import (
    assert_repeat_runs_are_bitwise_identical,
    assert_tf32_follows_the_cudnn_flag,
    conv_bn_lrelu_module,
    forward_backward,
    leaves,
)

import dipfast.kernels
from dipfast import reference
from dipfast.kernels import configs

pytestmark = pytest.mark.parity

CASES = [  # (N, C_in, H, W, C_out, k, stride, groups, bias)
    (2, 3, 7, 9, 4, 3, 1, 1, True),  # odd H/W, RGB in, batch 2
    (1, 4, 5, 6, 16, 5, 2, 1, True),  # stride 2, k = 5 on a 5 x 6 input: pads of 2 on both sides of each axis
    (1, 16, 6, 5, 3, 1, 2, 1, True),  # k = 1 (no pad, no fold), stride 2, 16 -> 3 (the output head's shape)
    (1, 3, 7, 8, 6, 7, 1, 3, True),  # k = 7 on 7 rows (pad 3 = H - 4), groups 3: three 1 -> 2 networks
    (2, 6, 9, 7, 6, 3, 2, 3, False),  # groups 3, stride 2, odd H/W, no bias
    (1, 12, 5, 7, 12, 3, 1, 3, True),  # groups 3 of 4 -> 4 channels (the skip width)
    (1, 3, 8, 9, 4, 7, 2, 1, True),  # k = 7, stride 2, odd W
    (1, 3, 4, 5, 4, 7, 2, 1, True),  # pad 3 = H - 1: every row has a mirror pre-image in both pads
    (1, 20, 9, 10, 20, 3, 1, 1, True),  # 20 channels: two channel tiles and two K chunks; two pixel tiles to merge
    (1, 3, 11, 12, 4, 7, 1, 1, True),  # k = 7 with pixels off the frame (3 x 4 of them), which dgrad writes directly
]
IDS = [
    "k3-7x9-n2",
    "k5-s2-5x6-c16",
    "k1-s2-16to3",
    "k7-7x8-g3",
    "k3-s2-9x7-g3-nobias",
    "k3-5x7-g3-c4",
    "k7-s2-8x9",
    "k7-s2-4x5-pad-h-1",
    "k3-9x10-c20",
    "k7-11x12-inner",
]
# Measured on the CPU interpreter against the float64 twin, worst over these cases and 3 seeds x 4 draws, relative
# to the expected tensor's max: out 1.5e-6, dx 1.0e-6, dweight 2.8e-6, dgamma 2.2e-6, dbeta 2.2e-7 (dbias: see
# below). BN divides by the batch std, which amplifies the conv's fp32 rounding, yet all stay under the fp32 row.


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv_bn_lrelu_module, "POISON_OUTPUTS", True)  # every kernel output starts as NaN


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _laid_out(tensors, layout):
    """x and weight in `layout` (the triton backend's bf16 layout on CUDA is channels_last), the rest as they are."""
    x, weight, *rest = tensors
    return [x.contiguous(memory_format=LAYOUTS[layout]), weight.contiguous(memory_format=LAYOUTS[layout]), *rest]


def _assert_layouts(out, dx, dweight, layout):
    """The op computes in x's layout and hands each result back in its input's."""
    fmt = LAYOUTS[layout]
    for name, t in (("out", out), ("dx", dx), ("dweight", dweight)):
        assert t.is_contiguous(memory_format=fmt), f"{name} is not {layout}: strides {t.stride()}"


def _inputs(case, rng, device):
    n, c_in, h, w, c_out, k, stride, groups, has_bias = case
    x = torch.rand(n, c_in, h, w, generator=rng) + 0.1  # fresh random, never zero
    weight = torch.randn(c_out, c_in // groups, k, k, generator=rng) * (c_in // groups * k * k) ** -0.5
    bias = torch.randn(c_out, generator=rng) if has_bias else None
    gamma = torch.rand(c_out, generator=rng) + 0.5
    beta = torch.randn(c_out, generator=rng)
    tensors = [t.to(device) if t is not None else None for t in (x, weight, bias, gamma, beta)]
    return tensors, dict(stride=stride, groups=groups)


def _grad_of_conv_output(tensors64, kw, out_grad64):
    """dL/dy of the twin in float64, y = the conv output: the twin applied to y as a leaf through an identity 1 x 1
    conv (exact in float64). Used to scale the bias-gradient bound."""
    x, weight, bias, gamma, beta = (t.detach() if t is not None else None for t in tensors64)
    y = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (weight.shape[-1] // 2,) * 4, mode="reflect") if weight.shape[-1] > 1 else x,
        weight,
        bias,
        stride=kw["stride"],
        groups=kw["groups"],
    ).requires_grad_(True)
    eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)[:, :, None, None]
    (dy,) = torch.autograd.grad(reference.conv_bn_lrelu(y, eye, None, gamma, beta), y, out_grad64)
    return dy


def test_kernels_run_on_the_triton_path(device):
    x = torch.rand(1, 3, 4, 4, device=device)
    assert dipfast.kernels.conv_bn_lrelu_path(x) == "triton"
    assert torch.isnan(conv_bn_lrelu_module._alloc((3,), device)).all()  # the poison fixture is live


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_grads_match_float64_twin(case, layout, rng, device, assert_parity, tol):
    tensors, kw = _inputs(case, rng, device)
    ins = _laid_out(leaves(tensors, torch.float32), layout)
    out = dipfast.kernels.conv_bn_lrelu(*ins, **kw)
    g = torch.randn(out.shape, generator=rng).to(device)
    wrt = [t for t in ins if t is not None]
    grads = torch.autograd.grad(out, wrt, g)
    ins64 = leaves(tensors, torch.float64)
    out64 = reference.conv_bn_lrelu(*ins64, **kw)
    grads64 = torch.autograd.grad(out64, [t for t in ins64 if t is not None], g.double())
    assert out.dtype == torch.float32 and out.shape == out64.shape
    _assert_layouts(out, grads[0], grads[1], layout)
    assert_parity(out, out64)
    names = ["x", "weight", "bias", "gamma", "beta"] if case[-1] else ["x", "weight", "gamma", "beta"]
    for name, actual, expected in zip(names, grads, grads64, strict=True):
        assert actual.shape == expected.shape and actual.dtype == torch.float32, name
        if name != "bias":
            assert_parity(actual, expected)
            continue
        # The bias cancels under training-mode BN: d(out)/d(bias) = sum over N, H, W of dL/dy is zero in exact
        # arithmetic, so both sides are rounding noise (float64 ~1e-16, fp32 ~1e-7 of the summands) and a bound
        # relative to the result's own size is meaningless. Bound it by the sum's condition, sum |dL/dy| per
        # channel, at the fp32 row's atol. Measured |error| / sum|dL/dy|: <= 1.1e-6 (same draws as above).
        assert not torch.isnan(actual).any()
        dy64 = _grad_of_conv_output(ins64, kw, g.double())
        scale = dy64.abs().sum((0, 2, 3))
        assert ((actual.double() - expected).abs() <= tol[torch.float32][0] * scale).all()


BF16_CASES = [  # (N, C_in, H, W, C_out, k, stride, groups, bias)
    (2, 3, 7, 9, 4, 3, 1, 1, True),  # odd H/W, RGB in, batch 2
    (1, 16, 12, 10, 3, 1, 2, 1, True),  # k = 1, stride 2, 16 -> 3
    (1, 20, 9, 10, 20, 3, 1, 1, True),  # two channel tiles and two K chunks
    (1, 6, 9, 7, 6, 5, 2, 3, False),  # groups 3, k = 5, stride 2, no bias
]
BF16_IDS = ["k3-7x9-n2", "k1-s2-16to3", "k3-9x10-c20", "k5-s2-g3-nobias"]


def _dip_like(case, rng, device):
    """bf16 x and weight, fp32 bias, gamma and beta, as autocast hands them to the block: x a LeakyReLU output,
    weight and bias initialised as nn.Conv2d does. y's |mean| / std then stays near DIP's (about 1, <= 2.3 here)."""
    n, c_in, h, w, c_out, k, stride, groups, has_bias = case
    bound = (c_in // groups * k * k) ** -0.5
    x = torch.nn.functional.leaky_relu(torch.randn(n, c_in, h, w, generator=rng), 0.2).bfloat16()
    weight = ((torch.rand(c_out, c_in // groups, k, k, generator=rng) * 2 - 1) * bound).bfloat16()
    bias = (torch.rand(c_out, generator=rng) * 2 - 1) * bound if has_bias else None
    gamma = torch.rand(c_out, generator=rng) + 0.5
    beta = torch.randn(c_out, generator=rng) * 0.5
    tensors = [t.to(device) if t is not None else None for t in (x, weight, bias, gamma, beta)]
    return tensors, dict(stride=stride, groups=groups)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BF16_CASES, ids=BF16_IDS)
def test_bf16_matches_float64_twin(case, layout, rng, device, assert_parity, tol):
    tensors, kw = _dip_like(case, rng, device)
    ins = _laid_out([t.detach().requires_grad_(True) if t is not None else None for t in tensors], layout)
    out = dipfast.kernels.conv_bn_lrelu(*ins, **kw)
    assert out.dtype == torch.bfloat16
    g = torch.randn(out.shape, generator=rng).bfloat16().to(device)
    wrt = [t for t in ins if t is not None]
    grads = torch.autograd.grad(out, wrt, g)
    _assert_layouts(out, grads[0], grads[1], layout)
    ins64 = leaves(tensors, torch.float64)
    wrt64 = [t for t in ins64 if t is not None]
    assert_parity(out, reference.conv_bn_lrelu(*ins64, **kw), torch.bfloat16)
    # LeakyReLU's derivative jumps at 0, and bf16 rounding moves z by ~1e-2: where |z| is that small the kernel and
    # the float64 twin may take different sides, which changes a gradient by (1 - slope) |dL/dout| at that pixel
    # and, through BN's sums, everywhere (measured up to 0.3 of the max, against 0.05 for eager bf16; the eager
    # path's flips are as many, but at other pixels). That is the kink, not the kernel's arithmetic, so the
    # gradients are compared with the twin's at the kernel's own pattern: its LeakyReLU (slope 1 is the identity)
    # replaced by the kernel's per-pixel slope, read off the sign of the kernel's output.
    pattern = torch.where(out.detach() > 0, 1.0, 0.2).double()
    linear64 = reference.conv_bn_lrelu(*ins64, **kw, slope=1.0) * pattern
    grads64 = torch.autograd.grad(linear64, wrt64, g.double())
    names = ["x", "weight", "bias", "gamma", "beta"] if case[-1] else ["x", "weight", "gamma", "beta"]
    for name, actual, t, expected in zip(names, grads, wrt, grads64, strict=True):
        assert actual.dtype == t.dtype, name  # bf16 for x and weight, fp32 for the rest
        if name != "bias":
            assert_parity(actual, expected, torch.bfloat16)
            continue
        # zero in exact arithmetic (see the fp32 test): bounded by sum |dL/dy| at the bf16 row's atol
        assert not torch.isnan(actual).any()
        scale = _grad_of_conv_output(ins64, kw, g.double()).abs().sum((0, 2, 3))
        assert ((actual.double() - expected).abs() <= tol[torch.bfloat16][0] * scale).all()


@pytest.mark.parametrize("case", BF16_CASES, ids=BF16_IDS)
def test_bf16_statistics_are_those_of_the_y_it_stores(case, rng, device):
    """The normalisation reads the stored (rounded) y, so the statistics are its own, as autocast's BatchNorm takes
    them from the conv's rounded output: taken from the fp32 accumulator, a level of a few pixels per channel was
    normalised by another mean (2x eager bf16's error at 2 x 2). Held to fp32's summation error."""
    tensors, kw = _dip_like(case, rng, device)
    x, weight, bias, gamma, beta = tensors
    _, y, mean, rstd = torch.ops.dipfast.conv_bn_lrelu_fwd(x, weight, bias, gamma, beta, kw["stride"], kw["groups"],
                                                           1e-5, 0.2, False)  # fmt: skip
    assert y.dtype == torch.bfloat16
    y64 = y.double()
    scale = y64.abs().amax((0, 2, 3))
    assert ((mean.double() - y64.mean((0, 2, 3))).abs() <= 1e-6 * scale).all()
    var = rstd.double() ** -2 - 1e-5
    assert ((var - y64.var((0, 2, 3), unbiased=False)).abs() <= 1e-5 * scale**2).all()


def test_tf32_follows_the_cudnn_flag(rng, device, monkeypatch):
    """fp32 inputs use TF32 dots where torch.backends.cudnn.allow_tf32 is set, the flag of the cuDNN convolution the
    kernel replaces (_kernel_checks.assert_tf32_follows_the_cudnn_flag)."""
    tensors, kw = _inputs(CASES[0], rng, device)
    g = torch.randn(2, 4, 7, 9, generator=rng).to(device)
    assert_tf32_follows_the_cudnn_flag(
        monkeypatch, lambda: forward_backward(dipfast.kernels.conv_bn_lrelu, tensors, g, **kw)
    )


def test_repeat_runs_are_bitwise_identical(rng, device):
    tensors, kw = _inputs(CASES[4], rng, device)
    g = torch.randn(2, 6, 5, 4, generator=rng).to(device)
    assert_repeat_runs_are_bitwise_identical(lambda: forward_backward(dipfast.kernels.conv_bn_lrelu, tensors, g, **kw))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, rng, device):
    """Also the fake implementations' strides against the kernels' in either layout (what torch.compile traces)."""
    tensors, kw = _inputs((1, 3, 5, 6, 4, 3, 1, 1, True), rng, device)
    x, weight, bias, gamma, beta = _laid_out(leaves(tensors, torch.float32), layout)
    args = (x, weight, bias, gamma, beta, kw["stride"], kw["groups"], 1e-5, 0.2, False)
    torch.library.opcheck(conv_bn_lrelu_module._conv_bn_lrelu_fwd, args)
    # the backward op, with its forward's saved tensors (it has no derivative of its own: no double backward)
    with torch.no_grad():
        out, y, mean, rstd = conv_bn_lrelu_module._conv_bn_lrelu_fwd(*args)
    g = torch.randn(out.shape, generator=rng).to(device)
    bwd_args = (g, x.detach(), weight.detach(), y, mean, rstd, gamma.detach(), beta.detach(), 1, 1, 0.2, False)
    for bias_grad in (True, False):  # False: an empty dbias, for a bias left out or not trained
        torch.library.opcheck(conv_bn_lrelu_module._conv_bn_lrelu_bwd, (*bwd_args, bias_grad))
        torch.library.opcheck(conv_bn_lrelu_module._conv_bn_lrelu_bwd_params, (*bwd_args, bias_grad))


def test_an_input_without_grad_runs_no_dgrad(rng, device, monkeypatch):
    """A conv reading the net's input z (no grad) skips its input gradient, and the parameters' gradients are those
    of a run that computes it (the same kernels: equal)."""
    tensors, kw = _inputs((1, 5, 9, 8, 6, 3, 2, 1, True), rng, device)
    x, *params = leaves(tensors, torch.float32)
    g = torch.randn(1, 6, 5, 4, generator=rng).to(device)
    expected = torch.autograd.grad(dipfast.kernels.conv_bn_lrelu(x, *params, **kw), params, g)

    def no_dgrad(*args, **kwargs):
        raise AssertionError("the dgrad ran for an input that needs no gradient")

    monkeypatch.setattr(conv_bn_lrelu_module, "dgrad", no_dgrad)
    actual = torch.autograd.grad(dipfast.kernels.conv_bn_lrelu(x.detach(), *params, **kw), params, g)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_conv_bn_lrelu_compiles(rng, device, tol):
    tensors, kw = _inputs((1, 4, 5, 7, 3, 3, 2, 1, True), rng, device)
    g = torch.randn(1, 3, 3, 4, generator=rng).to(device)

    def step(*ins):
        return (dipfast.kernels.conv_bn_lrelu(*ins, **kw) * g).sum()

    compiled = torch.compile(step, fullgraph=True)
    ins_e, ins_c = leaves(tensors, torch.float32), leaves(tensors, torch.float32)
    loss_e, loss_c = step(*ins_e), compiled(*ins_c)
    grads_e = torch.autograd.grad(loss_e, ins_e)
    grads_c = torch.autograd.grad(loss_c, ins_c)
    atol, rtol = tol[torch.float32]
    torch.testing.assert_close(loss_c, loss_e, atol=atol * loss_e.abs().item(), rtol=rtol)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, atol=atol * ge.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("why", ["no-interpreter", "no-triton", "float64"])
def test_fallback_runs_the_twin(why, monkeypatch, rng):
    tensors, kw = _inputs(CASES[0], rng, "cpu")
    if why == "no-interpreter":
        monkeypatch.setattr(
            conv_bn_lrelu_module, "_INTERPRET", False
        )  # CPU tensors, kernels not built for the interpreter
    elif why == "no-triton":
        monkeypatch.setattr(conv_bn_lrelu_module, "_HAS_TRITON", False)
    else:
        tensors = [t.double() for t in tensors]

    def _no_kernel(*args):
        raise AssertionError("the Triton op ran on the fallback path")

    monkeypatch.setattr(conv_bn_lrelu_module, "_conv_bn_lrelu_fwd", _no_kernel)
    assert dipfast.kernels.conv_bn_lrelu_path(tensors[0]) == "reference"
    expected = reference.conv_bn_lrelu(*tensors, **kw)
    assert torch.equal(dipfast.kernels.conv_bn_lrelu(*tensors, **kw), expected)


@pytest.mark.parametrize(
    "x_shape, w_shape, kw, match",
    [
        ((1, 3, 8, 8), (4, 3, 2, 2), {}, "k in"),
        ((1, 3, 8, 8), (4, 3, 3, 3), {"stride": 3}, "stride"),
        ((1, 3, 8, 8), (4, 1, 3, 3), {"groups": 2}, "groups"),
        ((1, 3, 3, 8), (4, 3, 7, 7), {}, "reflection pad"),
        ((3, 8, 8), (4, 3, 3, 3), {}, r"\(N, C_in, H, W\)"),
    ],
    ids=["even-k", "stride-3", "bad-groups", "pad-too-large", "not-4d"],
)
def test_bad_arguments_raise(x_shape, w_shape, kw, match):
    c_out = w_shape[0]
    with pytest.raises(ValueError, match=match):
        dipfast.kernels.conv_bn_lrelu(
            torch.rand(x_shape), torch.rand(w_shape), torch.rand(c_out), torch.rand(c_out), torch.rand(c_out), **kw
        )


@pytest.mark.parametrize("split_k", [1, 4, 9], ids=["whole", "split4-last-empty", "split9-capped-to-6"])
def test_wgrad_split_k_matches_float64_twin(split_k, rng, device, assert_parity):
    """dW with its pixel reduction in split_k programs per tile, summed in torch. 2 x 45 = 90 pixels make 6 chunks of
    16: 4 splits take 2, 2, 2 and none; 9 are capped to one per chunk (configs.fitted)."""
    tensors, kw = _inputs((2, 20, 9, 5, 20, 3, 1, 1, True), rng, device)
    g = torch.randn(2, 20, 9, 5, generator=rng).to(device)
    wgrad = configs.GemmTiles(16, 64, 16, 1, 4, split_k=split_k)
    with configs.forced_tiles({("wgrad", "fp32"): wgrad}):
        dweight = forward_backward(dipfast.kernels.conv_bn_lrelu, tensors, g, **kw)[2]
    ins64 = leaves(tensors, torch.float64)
    (dweight64,) = torch.autograd.grad(reference.conv_bn_lrelu(*ins64, **kw), ins64[1], g.double())
    assert dweight.dtype == torch.float32
    assert_parity(dweight, dweight64)


def test_fp32_dot_option_reaches_every_gemm(rng, device, monkeypatch):
    """FP32_DOT = 'tf32x3' is the input precision of the forward, wgrad and dgrad dots when TF32 is off. The
    interpreter computes it as IEEE (np.matmul), so there the results are IEEE's bit for bit; its error on a GPU is
    test_cuda_shapes.py's to bound."""
    tensors, kw = _inputs(CASES[0], rng, device)
    g = torch.randn(2, 4, 7, 9, generator=rng).to(device)
    ieee = forward_backward(dipfast.kernels.conv_bn_lrelu, tensors, g, **kw)
    seen, options_of = [], conv_bn_lrelu_module._dot_options
    monkeypatch.setattr(
        conv_bn_lrelu_module, "_dot_options", lambda dtype, tf32: seen.append(options_of(dtype, tf32)) or seen[-1]
    )
    monkeypatch.setattr(conv_bn_lrelu_module, "FP32_DOT", "tf32x3")
    tf32x3 = forward_backward(dipfast.kernels.conv_bn_lrelu, tensors, g, **kw)
    assert [o["PRECISION"] for o in seen] == ["tf32x3"] * 3
    if conv_bn_lrelu_module._INTERPRET:
        for a, b in zip(ieee, tf32x3, strict=True):
            assert torch.equal(a, b)
