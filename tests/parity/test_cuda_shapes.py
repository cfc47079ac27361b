"""The fused ops at the default net's real shapes, on CUDA only (the interpreter would take hours).

At these sizes the fp32 rounding of a long reduction (a 132 x 3 x 3 dot, BN statistics and the
weight gradient over 512 x 512 pixels) is what it is for any fp32 implementation, so the bar is
flash-attention's: the kernel's error against the float64 twin is at most twice the error of the
same twin run eagerly in IEEE fp32 (TF32 off, cuDNN), plus a floor of a few fp32 ulps for tensors
the eager path happens to get nearly exact.
"""

import pytest
import torch

import dipfast.kernels
from dipfast import reference
from dipfast.engine import ieee_fp32

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: real shapes are hours in the interpreter"),
]

FLOOR = 4 * 2**-24  # relative to the tensor's max: a few fp32 ulps
DEVICE = "cuda"


def _max_rel_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    return ((actual.double() - expected64).abs().max() / expected64.abs().max()).item()


def _check_within_eager_error(kernel_fn, twin, tensors, grad_shape_of, seed, vanishing=()):
    """Output and every gradient of kernel_fn against twin: float64 oracle, fp32 eager as the yardstick.

    vanishing: indices (0 = the output, then one per input) of gradients that are zero in exact
    arithmetic (a bias followed by training BN), whose relative error is noise over noise; the
    interpreter suites bound those by sum |dL/dy| instead.
    """
    gen = torch.Generator(DEVICE).manual_seed(seed)
    leaves = {dt: [t.detach().to(dt).requires_grad_(True) for t in tensors] for dt in (torch.float32, torch.float64)}
    eager32 = [t.detach().float().requires_grad_(True) for t in tensors]
    out = kernel_fn(*leaves[torch.float32])
    g = torch.randn(grad_shape_of(out), generator=gen, device=DEVICE)
    results = [out, *torch.autograd.grad(out, leaves[torch.float32], g)]
    out64 = twin(*leaves[torch.float64])
    oracle = [out64, *torch.autograd.grad(out64, leaves[torch.float64], g.double())]
    with ieee_fp32():
        out32 = twin(*eager32)
        eager = [out32, *torch.autograd.grad(out32, eager32, g)]
    for i, (k, e, o) in enumerate(zip(results, eager, oracle, strict=True)):
        assert not torch.isnan(k).any(), f"tensor {i}: NaN"
        if i in vanishing:
            continue
        kernel_err, eager_err = _max_rel_error(k, o), _max_rel_error(e, o)
        assert kernel_err <= 2 * eager_err + FLOOR, f"tensor {i}: kernel {kernel_err:.2e}, eager fp32 {eager_err:.2e}"


@pytest.mark.parametrize(
    "n, c_in, hw, c_out, k, stride, groups",
    [
        (1, 132, 512, 128, 3, 1, 1),  # level 0: the 132 -> 128 3x3 conv, half the net's FLOPs
        (1, 132, 128, 128, 3, 1, 1),  # the same at the CPU benchmark's size
        (1, 128, 256, 128, 3, 2, 1),  # a stride-2 down conv
        (1, 128, 512, 128, 1, 1, 1),  # the 1x1 conv after a merge
        (1, 4 * 132, 128, 4 * 128, 3, 1, 4),  # four networks side by side (batching by groups)
    ],
)
def test_conv_bn_lrelu_real_shapes(n, c_in, hw, c_out, k, stride, groups):
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.rand(n, c_in, hw, hw, generator=gen, device=DEVICE)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen, device=DEVICE) * (c_in // groups * k * k) ** -0.5
    bias, beta = (torch.randn(c_out, generator=gen, device=DEVICE) for _ in range(2))
    gamma = torch.rand(c_out, generator=gen, device=DEVICE) + 0.5

    def kernel_fn(*ins):
        return dipfast.kernels.conv_bn_lrelu(*ins, stride=stride, groups=groups)

    def twin(*ins):
        return reference.conv_bn_lrelu(*ins, stride=stride, groups=groups)

    tensors = [x, weight, bias, gamma, beta]
    _check_within_eager_error(kernel_fn, twin, tensors, lambda out: out.shape, seed=1, vanishing=(3,))


def test_merge_real_shape():
    gen = torch.Generator(DEVICE).manual_seed(0)
    skip, deeper = (
        torch.rand(1, 4, 512, 512, generator=gen, device=DEVICE),
        torch.rand(1, 128, 512, 512, generator=gen, device=DEVICE),
    )
    merge_gamma = torch.rand(132, generator=gen, device=DEVICE) + 0.5
    merge_beta = torch.randn(132, generator=gen, device=DEVICE)
    weight = torch.randn(128, 132, 3, 3, generator=gen, device=DEVICE) * (132 * 9) ** -0.5
    bias, beta = (torch.randn(128, generator=gen, device=DEVICE) for _ in range(2))
    gamma = torch.rand(128, generator=gen, device=DEVICE) + 0.5
    tensors = [skip, deeper, merge_gamma, merge_beta, weight, bias, gamma, beta]
    kernel_fn, twin = dipfast.kernels.concat_bn_conv_bn_lrelu, reference.concat_bn_conv_bn_lrelu
    _check_within_eager_error(kernel_fn, twin, tensors, lambda out: out.shape, seed=1, vanishing=(4, 6))


@pytest.mark.parametrize("factor", [4, 8])
def test_lanczos2_sr_shapes(factor):
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.rand(1, 3, 384, 576, generator=gen, device=DEVICE)  # zebra's HR working size
    y = torch.rand(1, 3, 384 // factor, 576 // factor, generator=gen, device=DEVICE)

    def kernel_fn(x, y):
        return dipfast.kernels.lanczos2_mse(x, y, factor)

    def twin(x, y):
        return reference.lanczos2_mse(x, y, factor)

    _check_within_eager_error(kernel_fn, twin, [x, y], lambda out: out.shape, seed=1)
