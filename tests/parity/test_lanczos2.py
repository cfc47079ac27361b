"""dipfast.kernels.lanczos2 against dipfast.reference (float64 oracle), the original's dense conv, its
own adjoint, opcheck and torch.compile; and the fallback to the twin where Triton cannot run."""

import pytest
import torch
from _original_dip import Downsampler

import dipfast.kernels
from dipfast import reference
from dipfast.kernels import lanczos2 as lanczos2_module

pytestmark = pytest.mark.parity

CASES = [  # (factor, N, C, H, W)
    (2, 1, 1, 2, 3),  # tiny: the smallest f = 2 input, one output row
    (2, 2, 3, 17, 23),  # odd H/W, batch 2, RGB
    (4, 1, 4, 17, 23),  # odd H/W, 4 channels
    (4, 2, 3, 8, 8),  # square, two outputs per axis: both borders fold into every window
    (8, 1, 3, 37, 53),  # odd, non-square, remainder rows/columns dropped
    (8, 2, 1, 8, 8),  # one output pixel: the whole image is border
    (4, 1, 3, 64, 48),  # the largest CPU shape
]
IDS = ["f2-tiny-2x3", "f2-17x23-n2", "f4-17x23-c4", "f4-8x8-n2", "f8-37x53", "f8-8x8-n2", "f4-64x48"]


def _inputs(case, rng, device):
    f, n, c, h, w = case
    x = torch.rand(n, c, h, w, generator=rng) + 0.1  # fresh random, never zero
    g = torch.randn(n, c, h // f, w // f, generator=rng)
    return f, x.to(device), g.to(device)


def test_kernels_run_on_the_triton_path(device):
    x = torch.rand(1, 1, 4, 4, device=device)
    assert dipfast.kernels.lanczos2_path(x) == "triton"
    assert torch.isnan(lanczos2_module._alloc((3,), device)).all()  # the poison fixture is live


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_dx_match_float64_twin(case, rng, device, assert_parity):
    f, x, g = _inputs(case, rng, device)
    x.requires_grad_(True)
    y = dipfast.kernels.lanczos2_downsample(x, f)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.lanczos2_downsample(x64, f)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    assert y.dtype == torch.float32 and y.shape == y64.shape
    assert_parity(y, y64)
    assert_parity(dx, dx64)


@pytest.mark.parametrize("factor, h, w", [(2, 5, 7), (4, 17, 23), (8, 37, 53)])
def test_adjoint_identity_with_kernel_backward(factor, h, w, rng, device):
    x = (torch.rand(2, 3, h, w, generator=rng) + 0.1).to(device)
    y = torch.randn(2, 3, h // factor, w // factor, generator=rng).to(device)
    ax = lanczos2_module._lanczos2_downsample_fwd(x, factor)
    aty = lanczos2_module._lanczos2_downsample_bwd(y, factor, h, w)  # the backward kernel is A^T
    lhs = (ax.double() * y.double()).sum()
    rhs = (x.double() * aty.double()).sum()
    gap = (abs(lhs - rhs) / (ax.double().norm() * y.double().norm())).item()
    assert gap < 1e-6


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[IDS[1], IDS[3], IDS[4]])
def test_fused_mse_value_and_grads_match_twin(case, rng, device, assert_parity):
    f, x, g = _inputs(case, rng, device)
    target = g.abs()  # a low-resolution target of the right shape
    x.requires_grad_(True)
    target.requires_grad_(True)
    loss = dipfast.kernels.lanczos2_mse(x, target, f)
    dx, dt = torch.autograd.grad(loss, [x, target])
    x64 = x.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True)
    loss64 = reference.lanczos2_mse(x64, t64, f)
    dx64, dt64 = torch.autograd.grad(loss64, [x64, t64])
    assert loss.shape == () and loss.dtype == torch.float32
    assert_parity(loss, loss64)
    assert_parity(dx, dx64)
    assert_parity(dt, dt64)


@pytest.mark.parametrize("factor, h, w", [(2, 9, 11), (4, 17, 23), (8, 33, 40)])
def test_matches_original_dense_conv(factor, h, w, rng, device, assert_parity):
    x = torch.rand(1, 3, h, w, generator=rng) + 0.1
    dense = Downsampler(3, factor, "lanczos2")  # the original: dense 3 -> 3 conv, kernel on the diagonal
    with torch.no_grad():
        expected = dense.double()(x.double())
    assert_parity(dipfast.kernels.lanczos2_downsample(x.to(device), factor), expected)
    # and the float64 twin is the same sums as the dense conv
    assert_parity(reference.lanczos2_downsample(x.double(), factor), expected, torch.float64)


def test_bf16_input_loads_as_fp32(rng, device, assert_parity):
    x = (torch.rand(1, 3, 17, 23, generator=rng) + 0.1).to(device, torch.bfloat16).requires_grad_(True)
    g = torch.randn(1, 3, 4, 5, generator=rng).to(device)
    y = dipfast.kernels.lanczos2_downsample(x, 4)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.lanczos2_downsample(x64, 4)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert_parity(y, y64)  # bf16 values are exact in fp32: the fp32 bar holds for the output
    torch.testing.assert_close(dx.double(), dx64, atol=2**-8 * dx64.abs().max().item(), rtol=2**-8)  # dx rounded


@pytest.mark.parametrize(
    "op, args",
    [
        (lanczos2_module._lanczos2_downsample_fwd, lambda x, g: (x, 4)),
        (lanczos2_module._lanczos2_downsample_bwd, lambda x, g: (g, 4, 9, 10)),
        (lanczos2_module._lanczos2_mse_fwd, lambda x, g: (x, g, 4)),
    ],
    ids=["downsample_fwd", "downsample_bwd", "mse_fwd"],
)
def test_opcheck(op, args, rng, device):
    x = (torch.rand(1, 2, 9, 10, generator=rng) + 0.1).to(device).requires_grad_(True)
    g = torch.randn(1, 2, 2, 2, generator=rng).to(device).requires_grad_(True)
    torch.library.opcheck(op, args(x, g))


def test_public_ops_compile_fullgraph(rng, device, tol):
    x = (torch.rand(2, 3, 17, 23, generator=rng) + 0.1).to(device)
    target = torch.rand(2, 3, 4, 5, generator=rng).to(device)
    g = torch.randn(2, 3, 4, 5, generator=rng).to(device)

    def step(x, target):
        return (dipfast.kernels.lanczos2_downsample(x, 4) * g).sum() + dipfast.kernels.lanczos2_mse(x, target, 4)

    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_e = step(xe, target)
    loss_c = compiled(xc, target)
    (dxe,) = torch.autograd.grad(loss_e, xe)
    (dxc,) = torch.autograd.grad(loss_c, xc)
    atol, rtol = tol[torch.float32]
    torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=rtol)
    torch.testing.assert_close(dxc, dxe, atol=atol * dxe.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("why", ["no-interpreter", "no-triton", "float64"])
def test_fallback_runs_the_twin(why, monkeypatch, rng):
    x = torch.rand(1, 3, 17, 23, generator=rng) + 0.1
    target = torch.rand(1, 3, 4, 5, generator=rng)
    if why == "no-interpreter":
        monkeypatch.setattr(lanczos2_module, "_INTERPRET", False)  # CPU tensors, kernels not built for the interpreter
    elif why == "no-triton":
        monkeypatch.setattr(lanczos2_module, "_HAS_TRITON", False)
    else:
        x, target = x.double(), target.double()

    def _no_kernel(*args):
        raise AssertionError("the Triton op ran on the fallback path")

    monkeypatch.setattr(lanczos2_module, "_lanczos2_downsample_fwd", _no_kernel)
    monkeypatch.setattr(lanczos2_module, "_lanczos2_mse_fwd", _no_kernel)
    assert dipfast.kernels.lanczos2_path(x) == "reference"
    assert torch.equal(dipfast.kernels.lanczos2_downsample(x, 4), reference.lanczos2_downsample(x, 4))
    assert torch.equal(dipfast.kernels.lanczos2_mse(x, target, 4), reference.lanczos2_mse(x, target, 4))


@pytest.mark.parametrize(
    "factor, shape, match",
    [(3, (1, 1, 8, 8), "factor"), (4, (1, 1, 3, 8), "empty output"), (2, (1, 8, 8), r"\(N, C, H, W\)")],
    ids=["bad-factor", "empty-output", "not-4d"],
)
def test_bad_arguments_raise(factor, shape, match):
    with pytest.raises(ValueError, match=match):
        dipfast.kernels.lanczos2_downsample(torch.rand(shape), factor)


def test_mse_target_shape_is_checked():
    with pytest.raises(ValueError, match="y must be"):
        dipfast.kernels.lanczos2_mse(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 5, 4), 4)
