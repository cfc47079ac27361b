"""dipfast.native.upsample_bilinear2x against F.interpolate(scale_factor=2, mode="bilinear",
align_corners=False): float64 gradcheck, fp32 against the float64 twin, bf16 within twice eager
bf16's error, NCHW and channels_last (also a channel slice), opcheck and thread-count determinism."""

import pytest
import torch
import torch.nn.functional as F
from _native_helpers import LAYOUTS, assert_native_close, assert_within_eager_error, requires_native

from dipfast import native

pytestmark = [pytest.mark.native, requires_native]

CASES = [  # (N, C, H, W) of the input
    (2, 3, 17, 23),  # odd H/W, batch 2
    (1, 4, 1, 1),  # one pixel: every tap is a border tap
    (1, 32, 2, 3),  # two rows: no interior row
    (1, 132, 9, 5),  # a level-0 merge's width
]
IDS = ["c3-17x23-n2", "c4-1x1", "c32-2x3", "c132-9x5"]


def _eager(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _inputs(shape, rng, dtype=torch.float32, layout=torch.contiguous_format):
    n, c, h, w = shape
    x = (torch.randn(n, c, h, w, generator=rng) + 0.5).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(n, c, 2 * h, 2 * w, generator=rng).to(dtype).contiguous(memory_format=layout)
    return x, grad


def _run(fn, x, grad):
    x = x.detach().requires_grad_()
    out = fn(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    return out, dx


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_upsample_fp32_matches_float64_twin(shape, layout, rng):
    x, grad = _inputs(shape, rng, layout=LAYOUTS[layout])
    out, dx = _run(native.upsample_bilinear2x, x, grad)
    ref, dx_ref = _run(_eager, x.double(), grad.double())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.stride() == _eager(x).stride()  # the layout eager gives (a 1 x 1 input has no layout)
    assert_native_close(out, ref, torch.float32)
    assert_native_close(dx, dx_ref, torch.float32)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_upsample_gradcheck_float64(layout, rng):
    x, _ = _inputs((2, 3, 4, 5), rng, torch.float64, LAYOUTS[layout])
    x = x.requires_grad_()
    assert torch.autograd.gradcheck(native.upsample_bilinear2x, (x,))
    assert_native_close(native.upsample_bilinear2x(x), _eager(x), torch.float64)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_upsample_bf16_within_twice_eager_error(shape, layout, rng):
    x, grad = _inputs(shape, rng, torch.bfloat16, LAYOUTS[layout])
    out, dx = _run(native.upsample_bilinear2x, x, grad)
    eager, dx_eager = _run(_eager, x, grad)
    ref, dx_ref = _run(_eager, x.double(), grad.double())
    assert out.dtype == dx.dtype == torch.bfloat16
    assert_within_eager_error(out, eager, ref)
    assert_within_eager_error(dx, dx_eager, dx_ref)


def test_upsample_channel_slice_of_channels_last(rng):
    """A slice of a channels_last tensor (pixel stride 8, 4 channels read) goes in as it is."""
    x, _ = _inputs((1, 8, 5, 6), rng, layout=torch.channels_last)
    part = x[:, 2:6]
    grad = torch.randn(1, 4, 10, 12, generator=rng).contiguous(memory_format=torch.channels_last)[:, :, :, :]
    out, dx = _run(native.upsample_bilinear2x, part, grad)
    ref, dx_ref = _run(_eager, part.double(), grad.double())
    assert_native_close(out, ref, torch.float32)
    assert_native_close(dx, dx_ref, torch.float32)


def test_upsample_bitwise_same_with_one_or_two_threads(rng):
    for layout in LAYOUTS.values():
        x, grad = _inputs((1, 16, 24, 20), rng, layout=layout)
        results = []
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append(_run(native.upsample_bilinear2x, x, grad))
            finally:
                torch.set_num_threads(before)
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck(layout, rng):
    x, grad = _inputs((2, 3, 4, 5), rng, layout=LAYOUTS[layout])
    ops = torch.ops.dipfast_native
    torch.library.opcheck(ops.upsample_bilinear2x, (x.requires_grad_(),))  # the differentiable op
    torch.library.opcheck(ops.upsample_bilinear2x_fwd, (x.detach(),))
    torch.library.opcheck(ops.upsample_bilinear2x_bwd, (grad, 4, 5))


def test_bad_input_raises_at_the_cpp_boundary(rng):
    ops = torch.ops.dipfast_native
    x, grad = _inputs((1, 2, 3, 4), rng)
    with pytest.raises(RuntimeError, match=r"grad must be \(N, C, 6, 8\)"):
        ops.upsample_bilinear2x_bwd(grad[:, :, :5], 3, 4)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        ops.upsample_bilinear2x_fwd(x.half())
