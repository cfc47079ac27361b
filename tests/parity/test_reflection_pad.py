"""dipfast.kernels.reflection_pad, the layout-keeping reflection pad and its gather adjoint, against
F.pad(mode="reflect") and its autograd gradient in float64 (the oracle): fresh random inputs, odd sizes, pads up to
size - 1, NCHW, channels_last and a strided view, fp32 and bf16, outputs allocated full of NaN; the output's layout,
opcheck (fake kernels, autograd), the vmap rules against a loop, torch.compile, and the fallback to torch's pad.

Tolerance: the forward is a gather, so it is F.pad's to the bit; the gradient sums at most four pre-images in fp32 and
rounds once to the input's dtype (the parity conftest's bar per dtype)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from dipfast.kernels.reflection_pad import reflection_pad, reflection_pad_path

pad_module = importlib.import_module("dipfast.kernels.reflection_pad")

pytestmark = pytest.mark.parity

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
SHAPES = [  # (N, C, H, W, pad)
    (2, 3, 7, 9, 1),
    (1, 5, 11, 12, 3),  # k = 7
    (1, 2, 4, 9, 3),  # pad = H - 1: every row mirrored
    (3, 4, 2, 2, 1),  # the smallest image a pad of 1 reflects
    (1, 20, 6, 13, 1),  # channels past one tile of a channels_last pass
]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setattr(pad_module, "POISON_OUTPUTS", True)


def _oracle(x: torch.Tensor, pad: int, upstream: torch.Tensor):
    """F.pad(mode='reflect') and its gradient, in float64, on x's values."""
    x64 = x.detach().double().cpu().requires_grad_()
    y = F.pad(x64, (pad,) * 4, mode="reflect")
    (dx,) = torch.autograd.grad(y, x64, upstream.double().cpu())
    return y.detach(), dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradient_match_the_reflect_pad_in_float64(rng, device, assert_parity, shape, layout, dtype):
    n, c, h, w, pad = shape
    x = torch.randn(n, c, h, w, generator=rng).to(dtype).contiguous(memory_format=LAYOUTS[layout]).to(device)
    upstream = torch.randn(n, c, h + 2 * pad, w + 2 * pad, generator=rng).to(dtype)
    upstream = upstream.contiguous(memory_format=LAYOUTS[layout]).to(device)
    assert reflection_pad_path(x, pad) == "triton"
    x.requires_grad_()
    y = reflection_pad(x, pad)
    (dx,) = torch.autograd.grad(y, x, upstream)
    expected_y, expected_dx = _oracle(x, pad, upstream)
    assert y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y.cpu(), expected_y.to(dtype), rtol=0, atol=0)  # a gather: every element exact
    assert_parity(dx, expected_dx, dtype)
    if c > 1:  # the input's layout out, both ways
        channels_last = layout == "cl"
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last == (not y.is_contiguous())
        assert dx.is_contiguous(memory_format=torch.channels_last) == channels_last == (not dx.is_contiguous())


def test_a_strided_view_reads_right(rng, device, assert_parity):
    """A centre crop: strides that are no layout (its output NCHW)."""
    base = torch.randn(1, 3, 9, 12, generator=rng).to(device)
    x = base[:, :, 1:8, 2:11].requires_grad_()
    upstream = torch.randn(1, 3, 11, 13, generator=rng).to(device)
    y = reflection_pad(x, 2)
    (dx,) = torch.autograd.grad(y, x, upstream)
    expected_y, expected_dx = _oracle(x, 2, upstream)
    torch.testing.assert_close(y.cpu(), expected_y.float(), rtol=0, atol=0)
    assert_parity(dx, expected_dx)


def test_opcheck(rng, device):
    x = torch.randn(2, 3, 4, 5, generator=rng).to(device)
    torch.library.opcheck(pad_module._reflection_pad_fwd, (x, 1))
    torch.library.opcheck(pad_module._reflection_pad_bwd, (torch.randn(2, 3, 8, 9, generator=rng).to(device), 2))


def test_vmap_rules_match_a_loop(rng, device, tol):
    """The vectorised step's pattern: vmap over the networks' forward, one autograd backward outside it."""
    xs = torch.randn(3, 1, 4, 5, 7, generator=rng).to(device).requires_grad_()
    weights = torch.randn(3, 1, 4, 7, 9, generator=rng).to(device)
    out = vmap(lambda x: reflection_pad(x, 1))(xs)
    (got,) = torch.autograd.grad((out * weights).sum(), xs)
    atol, rtol = tol[torch.float32]
    for i in range(3):
        x = xs[i].detach().clone().requires_grad_()
        y = reflection_pad(x, 1)
        (expected,) = torch.autograd.grad((y * weights[i]).sum(), x)
        torch.testing.assert_close(out[i], y, atol=0, rtol=0)
        torch.testing.assert_close(got[i], expected, atol=atol, rtol=rtol)


def test_compiles_with_no_graph_break(rng, device):
    x = torch.randn(1, 3, 5, 6, generator=rng).to(device).requires_grad_()
    compiled = torch.compile(lambda t: reflection_pad(t, 1).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    expected_loss = F.pad(x.detach(), (1,) * 4, mode="reflect").square().sum()
    torch.testing.assert_close(loss.detach(), expected_loss)
    x64 = x.detach().double().requires_grad_()
    F.pad(x64, (1,) * 4, mode="reflect").square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["no-kernels", "float64", "pad-of-zero"])
def test_fallback_runs_torchs_pad_in_the_input_layout(why, monkeypatch, rng):
    x = torch.randn(1, 3, 5, 6, generator=rng).contiguous(memory_format=torch.channels_last)
    pad = 0 if why == "pad-of-zero" else 2
    if why == "no-kernels":
        monkeypatch.setattr(pad_module, "kernels_take", lambda dtype, device: False)
    elif why == "float64":
        x = x.double()

    def _no_kernel(*args):
        raise AssertionError("the Triton op ran on the fallback path")

    monkeypatch.setattr(pad_module, "_reflection_pad_fwd", _no_kernel)
    assert reflection_pad_path(x, pad) == "torch"
    y = reflection_pad(x, pad)
    torch.testing.assert_close(y, F.pad(x, (pad,) * 4, mode="reflect"), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_bad_input_raises_as_torchs_pad():
    with pytest.raises(ValueError, match="takes \\(N, C, H, W\\)"):
        reflection_pad(torch.ones(3, 4, 5), 1)
    x = torch.ones(1, 2, 3, 3)
    assert reflection_pad_path(x, 3) == "torch"  # no reflection of a pad as wide as the image: torch's error
    with pytest.raises(RuntimeError, match="Padding size should be less than"):
        reflection_pad(x, 3)
