"""The fused ops at the default net's real shapes, on CUDA only (the interpreter would take hours), in each precision.

At these sizes the rounding of a long reduction (a 132 x 3 x 3 dot, BN statistics and the weight gradient over
512 x 512 pixels) is what it is for any implementation in that precision, so the bar is flash-attention's: the
kernel's error against the float64 twin is at most twice the error of the same twin run eagerly in the same
precision, plus a floor for tensors the eager path happens to get nearly exact:
  fp32: the kernels with IEEE dots (dipfast.engine.ieee_fp32), against eager IEEE fp32 (cuDNN, TF32 off); the error
    is the largest one relative to the tensor's max, the floor a few fp32 ulps.
  tf32: the kernels with TF32 dots (torch.backends.cudnn.allow_tf32, which they follow), against eager TF32 cuDNN.
  bf16: the kernels on bf16 operands (x and weight, fp32 affine parameters), against the twin under
    torch.autocast(bf16) on the same values. The error is the L2 norm of the difference relative to the oracle's:
    LeakyReLU's derivative jumps at 0, and where bf16 rounding moves z across it the kernel and eager autocast flip
    different pixels, so the largest single-element errors are kink noise on both sides (tests/parity/
    test_conv_bn_lrelu.py), while the norm counts their number, which is alike. Floor: 2^-8, bf16's rounding.
"""

import contextlib

import pytest
import torch

import dipfast.kernels
from dipfast import reference
from dipfast.engine import ieee_fp32

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: real shapes are hours in the interpreter"),
]

PRECISIONS = ["fp32", "tf32", "bf16"]
FLOOR = {"fp32": 4 * 2**-24, "tf32": 4 * 2**-11, "bf16": 2**-8}  # a few ulps of each format's mantissa
DEVICE = "cuda"


def _max_rel_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    return ((actual.double() - expected64).abs().max() / expected64.abs().max()).item()


def _l2_rel_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    return ((actual.double() - expected64).norm() / expected64.norm()).item()


@contextlib.contextmanager
def _tf32():
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=True):
        yield


def _check_within_eager_error(kernel_fn, twin, named, precision, seed, bf16_operands=(), vanishing=()):
    """Output and every gradient of kernel_fn against twin: float64 oracle, eager `precision` as the yardstick.

    named: the inputs by name; a failure names the tensor ('out', or 'd' + the input's name). bf16_operands: the
    inputs the kernel takes in bf16 under precision 'bf16' (the conv inputs and weight; the rest stay fp32, as
    autocast leaves BatchNorm's parameters). vanishing: the gradients that are zero in exact arithmetic (a bias
    followed by training BN), whose relative error is noise over noise; the interpreter suites bound those by
    sum |dL/dy| instead.
    """
    names, tensors = ["out", *(f"d{name}" for name in named)], list(named.values())
    bf16_operands = [list(named).index(n) for n in bf16_operands]
    vanishing = [names.index(n) for n in vanishing]
    gen = torch.Generator(DEVICE).manual_seed(seed)
    if precision == "bf16":  # one set of values for all three: the bf16 operands rounded once
        tensors = [t.bfloat16().float() if i in bf16_operands else t for i, t in enumerate(tensors)]
    kernel_dtypes = [
        torch.bfloat16 if precision == "bf16" and i in bf16_operands else None for i in range(len(tensors))
    ]
    kernel_leaves = [t.detach().to(d or t.dtype).requires_grad_(True) for t, d in zip(tensors, kernel_dtypes)]
    leaves64 = [t.detach().double().requires_grad_(True) for t in tensors]
    eager32 = [t.detach().float().requires_grad_(True) for t in tensors]
    context = {"fp32": ieee_fp32, "tf32": _tf32, "bf16": ieee_fp32}[precision]
    with context():
        out = kernel_fn(*kernel_leaves)
        g = torch.randn(out.shape, generator=gen, device=DEVICE).to(out.dtype)
        results = [out, *torch.autograd.grad(out, kernel_leaves, g)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            out32 = twin(*eager32)
        eager = [out32, *torch.autograd.grad(out32, eager32, g.to(out32.dtype))]
    out64 = twin(*leaves64)
    oracle = [out64, *torch.autograd.grad(out64, leaves64, g.double())]
    error = _l2_rel_error if precision == "bf16" else _max_rel_error
    for i, (k, e, o) in enumerate(zip(results, eager, oracle, strict=True)):
        assert not torch.isnan(k).any(), f"{names[i]}: NaN"
        if i > 0:
            assert k.dtype == kernel_leaves[i - 1].dtype, f"{names[i]} in {k.dtype}"
        if i in vanishing:
            continue
        kernel_err, eager_err = error(k, o), error(e, o)
        bar = 2 * eager_err + FLOOR[precision]
        assert kernel_err <= bar, f"{precision} {names[i]}: kernel {kernel_err:.2e}, eager {eager_err:.2e}"


@pytest.mark.parametrize("precision", PRECISIONS)
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
def test_conv_bn_lrelu_real_shapes(n, c_in, hw, c_out, k, stride, groups, precision):
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.rand(n, c_in, hw, hw, generator=gen, device=DEVICE)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen, device=DEVICE) * (c_in // groups * k * k) ** -0.5
    bias, beta = (torch.randn(c_out, generator=gen, device=DEVICE) for _ in range(2))
    gamma = torch.rand(c_out, generator=gen, device=DEVICE) + 0.5

    def kernel_fn(*ins):
        return dipfast.kernels.conv_bn_lrelu(*ins, stride=stride, groups=groups)

    def twin(*ins):
        return reference.conv_bn_lrelu(*ins, stride=stride, groups=groups)

    tensors = {"x": x, "weight": weight, "bias": bias, "gamma": gamma, "beta": beta}
    _check_within_eager_error(kernel_fn, twin, tensors, precision, seed=1, bf16_operands=("x", "weight"),
                              vanishing=("dbias",))  # fmt: skip


@pytest.mark.parametrize("precision", PRECISIONS)
def test_merge_real_shape(precision):
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
    tensors = dict(skip=skip, deeper=deeper, merge_gamma=merge_gamma, merge_beta=merge_beta, weight=weight, bias=bias,
                   gamma=gamma, beta=beta)  # fmt: skip
    kernel_fn, twin = dipfast.kernels.concat_bn_conv_bn_lrelu, reference.concat_bn_conv_bn_lrelu
    _check_within_eager_error(kernel_fn, twin, tensors, precision, seed=1, bf16_operands=("skip", "deeper", "weight"),
                              vanishing=("dmerge_beta", "dbias"))  # fmt: skip


@pytest.mark.parametrize("factor", [4, 8])
def test_lanczos2_sr_shapes(factor):
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.rand(1, 3, 384, 576, generator=gen, device=DEVICE)  # zebra's HR working size
    y = torch.rand(1, 3, 384 // factor, 576 // factor, generator=gen, device=DEVICE)

    def kernel_fn(x, y):
        return dipfast.kernels.lanczos2_mse(x, y, factor)

    def twin(x, y):
        return reference.lanczos2_mse(x, y, factor)

    _check_within_eager_error(kernel_fn, twin, {"x": x, "y": y}, "fp32", seed=1)
