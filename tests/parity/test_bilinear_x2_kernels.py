"""dipfast.kernels.bilinear_x2, the Triton bilinear x2 upsample and its transpose, against torch's
F.interpolate(scale_factor=2, mode="bilinear") and its autograd gradient in float64 (the oracle): fresh random
inputs, odd and one-pixel sizes, NCHW and channels_last, fp32 and bf16; the output's layout, opcheck (fake kernels,
autograd), the vmap rules against a loop, torch.compile, and the fallback to the torch ops."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from dipfast.kernels.bilinear_x2 import bilinear_x2_path, upsample_bilinear2x_fast

bilinear_module = importlib.import_module("dipfast.kernels.bilinear_x2")

pytestmark = pytest.mark.parity

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
SHAPES = [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 1, 6), (1, 5, 13, 2), (3, 20, 8, 9)]


def _oracle(x: torch.Tensor, upstream: torch.Tensor):
    """torch's upsample and its gradient, in float64, on x's values."""
    x64 = x.detach().double().cpu().requires_grad_()
    y = F.interpolate(x64, scale_factor=2, mode="bilinear", align_corners=False)
    (dx,) = torch.autograd.grad(y, x64, upstream.double().cpu())
    return y.detach(), dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradient_match_torchs_in_float64(rng, device, assert_parity, shape, layout, dtype):
    n, c, h, w = shape
    x = torch.randn(shape, generator=rng).to(dtype).contiguous(memory_format=LAYOUTS[layout]).to(device)
    upstream = torch.randn(n, c, 2 * h, 2 * w, generator=rng).to(dtype)
    upstream = upstream.contiguous(memory_format=LAYOUTS[layout]).to(device)
    assert bilinear_x2_path(x) == "triton"
    x.requires_grad_()
    y = upsample_bilinear2x_fast(x)
    (dx,) = torch.autograd.grad(y, x, upstream)
    expected_y, expected_dx = _oracle(x, upstream)
    assert y.dtype == dx.dtype == dtype
    assert_parity(y, expected_y, dtype)
    assert_parity(dx, expected_dx, dtype)
    if c > 1 and h * w > 1:  # the input's layout out, both ways
        channels_last = layout == "cl"
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last == (not y.is_contiguous())
        assert dx.is_contiguous(memory_format=torch.channels_last) == channels_last == (not dx.is_contiguous())


def test_a_strided_view_reads_right(rng, device, assert_parity):
    """A centre crop, as concat_cropped hands a part over: strides that are no layout."""
    base = torch.randn(1, 3, 9, 12, generator=rng).to(device)
    x = base[:, :, 1:8, 2:11]
    upstream = torch.randn(1, 3, 14, 18, generator=rng).to(device)
    x.requires_grad_()
    y = upsample_bilinear2x_fast(x)
    (dx,) = torch.autograd.grad(y, x, upstream)
    expected_y, expected_dx = _oracle(x, upstream)
    assert_parity(y, expected_y)
    assert_parity(dx, expected_dx)


def test_opcheck(rng, device):
    x = torch.randn(2, 3, 4, 5, generator=rng).to(device)
    torch.library.opcheck(bilinear_module._bilinear_x2_fwd, (x,))
    torch.library.opcheck(bilinear_module._bilinear_x2_bwd, (torch.randn(2, 3, 8, 10, generator=rng).to(device),))


def test_vmap_rules_match_a_loop(rng, device, tol):
    """The vectorised step's pattern: vmap over the networks' forward, one autograd backward outside it."""
    xs = torch.randn(3, 1, 4, 5, 7, generator=rng).to(device).requires_grad_()
    weights = torch.randn(3, 1, 4, 10, 14, generator=rng).to(device)
    out = vmap(upsample_bilinear2x_fast)(xs)
    (got,) = torch.autograd.grad((out * weights).sum(), xs)
    atol, rtol = tol[torch.float32]
    for i in range(3):
        x = xs[i].detach().clone().requires_grad_()
        y = upsample_bilinear2x_fast(x)
        (expected,) = torch.autograd.grad((y * weights[i]).sum(), x)
        torch.testing.assert_close(out[i], y, atol=atol, rtol=rtol)
        torch.testing.assert_close(got[i], expected, atol=atol, rtol=rtol)


def test_compiles_with_no_graph_break(rng, device):
    x = torch.randn(1, 3, 5, 6, generator=rng).to(device).requires_grad_()
    compiled = torch.compile(lambda t: upsample_bilinear2x_fast(t).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    expected = upsample_bilinear2x_fast(x.detach()).square().sum()
    torch.testing.assert_close(loss.detach(), expected)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("why", ["no-kernels", "float64"])
def test_fallback_runs_the_torch_ops(why, monkeypatch, rng):
    x = torch.randn(1, 3, 5, 6, generator=rng)
    if why == "no-kernels":
        monkeypatch.setattr(bilinear_module, "kernels_take", lambda dtype, device: False)
    else:
        x = x.double()

    def _no_kernel(*args):
        raise AssertionError("the Triton op ran on the fallback path")

    monkeypatch.setattr(bilinear_module, "_bilinear_x2_fwd", _no_kernel)
    assert bilinear_x2_path(x) == "torch"
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_bilinear2x_fast(x), expected, rtol=0, atol=0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="takes \\(N, C, H, W\\)"):
        upsample_bilinear2x_fast(torch.ones(3, 4, 5))
