"""dipfast.native's BatchNorm ops (batch_norm_act, batch_norm, concat_batch_norm,
batch_norm_act_reflect_pad) against the eager twin: float64 gradcheck, fp32 against the float64
twin, bf16 within twice eager bf16's error, NCHW and channels_last, opcheck, thread-count
determinism and the checks at the C++ boundary."""

import pytest
import torch
import torch.nn.functional as F
from _native_helpers import LAYOUTS, assert_native_close, assert_within_eager_error, requires_native

from dipfast import native

pytestmark = [pytest.mark.native, requires_native]

CASES = [  # (N, C, H, W)
    (2, 3, 17, 23),  # odd H/W, batch 2, RGB width
    (1, 4, 17, 23),  # the skip branches' width, one image
    (2, 32, 9, 11),  # the input depth
    (1, 132, 17, 23),  # a level-0 merge's width (skip 4 + 128)
    (3, 4, 1, 1),  # 1 x 1 maps: statistics over the batch alone
]
IDS = ["c3-17x23-n2", "c4-17x23", "c32-9x11-n2", "c132-17x23", "c4-1x1-n3"]
SLOPES = {"lrelu": 0.2, "no-act": 1.0}


def _eager(x, weight, bias, slope, eps=1e-5):
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    return y if slope == 1.0 else F.leaky_relu(y, slope)


def _inputs(shape, rng, dtype=torch.float32, layout=torch.contiguous_format):
    n, c, h, w = shape
    x = (torch.randn(n, c, h, w, generator=rng) * 2 + 0.5).to(dtype).contiguous(memory_format=layout)
    weight = torch.rand(c, generator=rng) + 0.5
    bias = torch.randn(c, generator=rng)
    grad = torch.randn(n, c, h, w, generator=rng).to(dtype).contiguous(memory_format=layout)
    return x, weight, bias, grad


def _run(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("slope", list(SLOPES.values()), ids=list(SLOPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_batch_norm_act_fp32_matches_float64_twin(shape, layout, slope, rng):
    x, weight, bias, grad = _inputs(shape, rng, layout=LAYOUTS[layout])
    out, grads = _run(lambda *t: native.batch_norm_act(*t, negative_slope=slope), [x, weight, bias], grad)
    ref, ref_grads = _run(lambda *t: _eager(*t, slope), [x.double(), weight.double(), bias.double()], grad.double())
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_native_close(out, ref, torch.float32)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert_native_close(g, g_ref, torch.float32)


@pytest.mark.parametrize("slope", list(SLOPES.values()), ids=list(SLOPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_norm_act_gradcheck_float64(layout, slope, rng):
    x, weight, bias, _ = _inputs((2, 3, 5, 7), rng, torch.float64, LAYOUTS[layout])
    inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda *t: native.batch_norm_act(*t, negative_slope=slope), inputs)
    out = native.batch_norm_act(*inputs, negative_slope=slope)
    assert_native_close(out, _eager(*inputs, slope), torch.float64)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_batch_norm_act_bf16_within_twice_eager_error(shape, layout, rng):
    """As under autocast: bf16 activations, fp32 parameters; the output bf16, dweight and dbias fp32."""
    x, weight, bias, grad = _inputs(shape, rng, torch.bfloat16, LAYOUTS[layout])
    out, grads = _run(native.batch_norm_act, [x, weight, bias], grad)
    eager, eager_grads = _run(lambda *t: _eager(*t, 0.2), [x, weight, bias], grad)
    ref, ref_grads = _run(lambda *t: _eager(*t, 0.2), [x.double(), weight.double(), bias.double()], grad.double())
    assert out.dtype == eager.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert grads[1].dtype == grads[2].dtype == torch.float32
    assert_within_eager_error(out, eager, ref)
    for g, g_eager, g_ref in zip(grads, eager_grads, ref_grads, strict=True):
        assert_within_eager_error(g, g_eager, g_ref)


def _merge_inputs(rng, dtype=torch.float32, layout=torch.contiguous_format, cs=4, cd=32, h=9, w=11):
    skip = torch.randn(2, cs, h + 2, w + 1, generator=rng).to(dtype).contiguous(memory_format=layout)
    skip = skip[:, :, 1 : 1 + h, :w]  # a centred crop, as concat_cropped takes it: a strided view
    deeper = (torch.randn(2, cd, h, w, generator=rng) + 1).to(dtype).contiguous(memory_format=layout)
    weight = torch.rand(cs + cd, generator=rng) + 0.5
    bias = torch.randn(cs + cd, generator=rng)
    grad = torch.randn(2, cs + cd, h, w, generator=rng).to(dtype).contiguous(memory_format=layout)
    return skip, deeper, weight, bias, grad


def _eager_merge(skip, deeper, weight, bias, pad=0):
    y = F.batch_norm(torch.cat([skip, deeper], 1), None, None, weight, bias, training=True, eps=1e-5)
    return F.pad(y, (pad,) * 4, mode="reflect") if pad else y


def _padded(grad, pad, rng):
    """A fresh gradient for the reflection-padded output of the merge whose gradient is `grad`."""
    n, c, h, w = grad.shape
    fresh = torch.randn(n, c, h + 2 * pad, w + 2 * pad, generator=rng).to(grad.dtype)
    return fresh.contiguous(memory_format=torch.channels_last if grad.stride(1) == 1 else torch.contiguous_format)


@pytest.mark.parametrize("pad", [0, 1, 3], ids=["unpadded", "p1", "p3"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cs, cd", [(4, 32), (4, 128), (3, 1)], ids=["c4+32", "c4+128", "c3+1"])
def test_concat_batch_norm_fp32_matches_float64_twin(cs, cd, layout, pad, rng):
    skip, deeper, weight, bias, grad = _merge_inputs(rng, layout=LAYOUTS[layout], cs=cs, cd=cd)
    grad = _padded(grad, pad, rng) if pad else grad
    out, grads = _run(lambda *t: native.concat_batch_norm(*t, pad=pad), [skip, deeper, weight, bias], grad)
    ref, ref_grads = _run(
        lambda *t: _eager_merge(*t, pad=pad), [t.double() for t in (skip, deeper, weight, bias)], grad.double()
    )
    assert out.shape == (2, cs + cd, 9 + 2 * pad, 11 + 2 * pad) and out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_native_close(out, ref, torch.float32)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert_native_close(g, g_ref, torch.float32)


@pytest.mark.parametrize("pad", [0, 2], ids=["unpadded", "p2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_concat_batch_norm_gradcheck_float64(layout, pad, rng):
    skip, deeper, weight, bias, _ = _merge_inputs(rng, torch.float64, LAYOUTS[layout], cs=3, cd=4, h=4, w=5)
    inputs = [t.double().requires_grad_() for t in (skip, deeper, weight, bias)]
    assert torch.autograd.gradcheck(lambda *t: native.concat_batch_norm(*t, pad=pad), inputs)


@pytest.mark.parametrize("pad", [0, 1], ids=["unpadded", "p1"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_concat_batch_norm_bf16_within_twice_eager_error(layout, pad, rng):
    skip, deeper, weight, bias, grad = _merge_inputs(rng, torch.bfloat16, LAYOUTS[layout], cd=128)
    grad = _padded(grad, pad, rng) if pad else grad
    merge, eager_merge = (lambda *t: native.concat_batch_norm(*t, pad=pad)), (lambda *t: _eager_merge(*t, pad=pad))
    out, grads = _run(merge, [skip, deeper, weight, bias], grad)
    eager, eager_grads = _run(eager_merge, [skip, deeper, weight, bias], grad)
    ref, ref_grads = _run(eager_merge, [t.double() for t in (skip, deeper, weight, bias)], grad.double())
    assert out.dtype == torch.bfloat16
    assert_within_eager_error(out, eager, ref)
    for g, g_eager, g_ref in zip(grads, eager_grads, ref_grads, strict=True):
        assert_within_eager_error(g, g_eager, g_ref)


def _eager_reflect_pad(x, weight, bias, pad):
    return F.pad(_eager(x, weight, bias, 0.2), (pad,) * 4, mode="reflect")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape, pad", [((2, 3, 17, 23), 1), ((1, 32, 5, 4), 3)], ids=["p1-17x23", "p3-5x4"])
def test_batch_norm_act_reflect_pad_fp32_matches_float64_twin(shape, pad, layout, rng):
    x, weight, bias, _ = _inputs(shape, rng, layout=LAYOUTS[layout])
    n, c, h, w = shape
    grad = torch.randn(n, c, h + 2 * pad, w + 2 * pad, generator=rng)
    out, grads = _run(lambda *t: native.batch_norm_act_reflect_pad(*t, pad=pad), [x, weight, bias], grad)
    ref, ref_grads = _run(
        lambda *t: _eager_reflect_pad(*t, pad), [x.double(), weight.double(), bias.double()], grad.double()
    )
    assert out.shape == ref.shape and out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_native_close(out, ref, torch.float32)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert_native_close(g, g_ref, torch.float32)


def test_batch_norm_act_reflect_pad_gradcheck_float64(rng):
    x, weight, bias, _ = _inputs((2, 2, 4, 5), rng, torch.float64)
    inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda *t: native.batch_norm_act_reflect_pad(*t, pad=2), inputs)


def test_batch_norm_act_bitwise_same_with_one_or_two_threads(rng):
    """Block sums in a fixed order: the thread count changes nothing, in either layout."""
    for layout in LAYOUTS.values():
        x, weight, bias, grad = _inputs((1, 32, 48, 40), rng, layout=layout)
        results = []
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append(_run(native.batch_norm_act, [x, weight, bias], grad))
            finally:
                torch.set_num_threads(before)
        (out1, grads1), (out2, grads2) = results
        assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))


def test_strided_inputs_and_gradients_are_taken_or_copied(rng):
    x, weight, bias, _ = _inputs((2, 8, 6, 10), rng)
    odd_view = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)[:, :, :, ::2]  # no unit stride at all
    grad = torch.randn(2, 8, 1, 5, generator=rng).expand(2, 8, 6, 5)  # stride 0 along H
    out, grads = _run(native.batch_norm_act, [odd_view, weight, bias], grad)
    ref, ref_grads = _run(lambda *t: _eager(*t, 0.2), [t.double() for t in (odd_view, weight, bias)], grad.double())
    assert_native_close(out, ref, torch.float32)
    assert_native_close(grads[0], ref_grads[0], torch.float32)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck(layout, rng):
    """The differentiable ops (C++ autograd, csrc/native/autograd.cpp) with inputs that need
    gradients; the forward and backward kernel ops they pair, as plain ops."""
    x, weight, bias, grad = _inputs((2, 3, 5, 7), rng, layout=LAYOUTS[layout])
    ops = torch.ops.dipfast_native
    for pad in (0, 2):
        torch.library.opcheck(ops.batch_norm_act, (x.requires_grad_(), weight.requires_grad_(), bias, 1e-5, 0.2, pad))
    x, weight = x.detach(), weight.detach()
    y, mean, rstd = ops.batch_norm_act_fwd(x, weight, bias, 1e-5, 0.2)
    torch.library.opcheck(ops.batch_norm_act_fwd, (x, weight, bias, 1e-5, 0.2))
    torch.library.opcheck(ops.batch_norm_act_bwd, (grad, x, weight, bias, mean, rstd, 0.2))
    y, mean, rstd = ops.batch_norm_act_reflect_pad_fwd(x, weight, bias, 1e-5, 0.2, 2)
    torch.library.opcheck(ops.batch_norm_act_reflect_pad_fwd, (x, weight, bias, 1e-5, 0.2, 2))
    torch.library.opcheck(
        ops.batch_norm_act_reflect_pad_bwd, (torch.randn_like(y), x, weight, bias, mean, rstd, 0.2, 2)
    )

    skip, deeper, w2, b2, _ = _merge_inputs(rng, layout=LAYOUTS[layout], cs=3, cd=4, h=4, w=5)
    for pad in (0, 1):
        args = (skip.detach().requires_grad_(), deeper.requires_grad_(), w2.requires_grad_(), b2, 1e-5, pad)
        torch.library.opcheck(ops.concat_batch_norm, args)
        skip, deeper, w2 = skip.detach(), deeper.detach(), w2.detach()
        y2, m2, r2 = ops.concat_batch_norm_fwd(skip, deeper, w2, b2, 1e-5, pad)
        torch.library.opcheck(ops.concat_batch_norm_fwd, (skip, deeper, w2, b2, 1e-5, pad))
        torch.library.opcheck(ops.concat_batch_norm_bwd, (torch.randn_like(y2), skip, deeper, w2, m2, r2, pad))


def test_bad_input_raises_at_the_cpp_boundary(rng):
    ops = torch.ops.dipfast_native
    x, weight, bias, _ = _inputs((1, 3, 1, 1), rng)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.batch_norm_act_fwd(x, weight, bias, 1e-5, 0.2)
    x, weight, bias, _ = _inputs((2, 3, 4, 4), rng)
    with pytest.raises(RuntimeError, match="weight must be a contiguous vector of 3"):
        ops.batch_norm_act_fwd(x, weight[:2], bias, 1e-5, 0.2)
    with pytest.raises(RuntimeError, match="compute dtype"):
        ops.batch_norm_act_fwd(x, weight.double(), bias, 1e-5, 0.2)
    with pytest.raises(RuntimeError, match="reflection padding needs"):
        ops.batch_norm_act_reflect_pad_fwd(x, weight, bias, 1e-5, 0.2, 4)
    with pytest.raises(RuntimeError, match="reflection padding needs"):
        ops.concat_batch_norm_fwd(x, x, torch.ones(6), torch.zeros(6), 1e-5, -1)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        ops.batch_norm_act_fwd(x.half(), weight, bias, 1e-5, 0.2)
