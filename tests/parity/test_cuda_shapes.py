"""The fused ops at the default net's real shapes, on CUDA only (the interpreter would take hours), in each precision.

At these sizes the rounding of a long reduction (a 132 x 3 x 3 dot, BN statistics and the weight gradient over
512 x 512 pixels) is what it is for any implementation in that precision, so the bar is flash-attention's: the
kernel's error against the float64 twin is at most twice the error of the same twin run eagerly in the same
precision, plus a floor for tensors the eager path happens to get nearly exact:
  fp32: the kernels with IEEE dots (dipfast.engine.ieee_fp32), against eager IEEE fp32 (cuDNN, TF32 off); the error
    is the largest one relative to the tensor's max, the floor a few fp32 ulps.
  tf32: the kernels with TF32 dots (torch.backends.cudnn.allow_tf32, which they follow), against eager TF32 cuDNN.
  bf16: the kernels on bf16 operands (x and weight, fp32 affine parameters), against the twin under
    torch.autocast(bf16) on the same values. The error is the L2 norm of the difference relative to the oracle's.
    Floor: 2^-8, bf16's rounding.
LeakyReLU's derivative jumps at 0: where rounding moves z across it, a gradient changes by (1 - slope) |dL/dout| at
that pixel, and through the convolution's adjoint and BN's sums everywhere. Each side's gradients are therefore
compared with the float64 twin's at that side's own LeakyReLU pattern (the twin with slope 1 times the per-pixel
slope read off that side's output), as the interpreter suites do for bf16. In fp32 at 512 x 512 this is no detail:
eager IEEE fp32 on a CPU (torch 2.13, 132 -> 128 channels, this file's inputs, seeds 0 and 1) puts 3-4 of its 33.5M
outputs on the other side of the kink from float64, which moves dx by 2.5e-2 and 4.4e-2 of its max and dgamma by up
to 1.2e-3; at its own pattern the same gradients are within 3.4e-7 and 4.7e-6
(bench/results/2026-12-02-cpu-epyc-4c8fb3fa7b/). The H100 run that failed fp32 here (dx 1.4e-2 with eager at
2.7e-7, dgamma 2.6-2.8x eager; bench/results/2026-11-26-h100-f6a7824f76/) held both sides to float64's pattern.
fp32-tf32x3: the fp32 kernels with FP32_DOT = 'tf32x3' (kernels/conv_bn_lrelu.py), held to the fp32 bar.
bf16-cl: bf16 with the kernels' 4-d inputs channels_last, the triton backend's bf16 layout on CUDA (their loads are
vectors and pipelined only there), held to the bf16 bar; the eager yardstick as for bf16.
"""

import contextlib
import importlib
from dataclasses import replace

import pytest
import torch
from _error_map import describe_dx_errors

import dipfast.kernels
from dipfast import reference
from dipfast.engine import ieee_fp32
from dipfast.kernels import configs

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: real shapes are hours in the interpreter"),
]

PRECISIONS = ["fp32", "fp32-tf32x3", "tf32", "bf16", "bf16-cl"]
FLOOR = {"fp32": 4 * 2**-24, "tf32": 4 * 2**-11, "bf16": 2**-8}  # a few ulps of each format's mantissa
FLOOR["fp32-tf32x3"] = FLOOR["fp32"]
DEVICE = "cuda"


def _max_rel_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    return ((actual.double() - expected64).abs().max() / expected64.abs().max()).item()


def _l2_rel_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    return ((actual.double() - expected64).norm() / expected64.norm()).item()


def _use_fp32_dot(monkeypatch, precision: str) -> None:
    """fp32-tf32x3: the kernels' fp32 dots (TF32 off) in tf32x3 for the test (conv_bn_lrelu.FP32_DOT)."""
    if precision == "fp32-tf32x3":
        monkeypatch.setattr(importlib.import_module("dipfast.kernels.conv_bn_lrelu"), "FP32_DOT", "tf32x3")


def _oracle_at_own_pattern(twin, leaves64, out: torch.Tensor, g: torch.Tensor) -> list:
    """[None, *the float64 twin's gradients] with LeakyReLU's slope per pixel as in `out` (one side's output)."""
    pattern = torch.where(out.detach() > 0, 1.0, 0.2).double()
    linear64 = twin(*leaves64, slope=1.0) * pattern
    return [None, *torch.autograd.grad(linear64, leaves64, g.double())]


@contextlib.contextmanager
def _tf32():
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=True):
        yield


def _check_within_eager_error(kernel_fn, twin, named, precision, seed, bf16_operands=(), vanishing=(), kink=True):
    """Output and every gradient of kernel_fn against twin: float64 oracle, eager `precision` as the yardstick.

    named: the inputs by name; a failure names the tensor ('out', or 'd' + the input's name). bf16_operands: the
    inputs the kernel takes in bf16 under precision 'bf16' (the conv inputs and weight; the rest stay fp32, as
    autocast leaves BatchNorm's parameters). vanishing: the gradients that are zero in exact arithmetic (a bias
    followed by training BN), whose relative error is noise over noise; the interpreter suites bound those by
    sum |dL/dy| instead. kink: the op ends in LeakyReLU (the twin takes slope=), whose pattern each side's gradients
    are compared at.
    """
    channels_last = precision.endswith("-cl")
    precision = precision.removesuffix("-cl")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    names, tensors = ["out", *(f"d{name}" for name in named)], list(named.values())
    bf16_operands = [list(named).index(n) for n in bf16_operands]
    vanishing = [names.index(n) for n in vanishing]
    gen = torch.Generator(DEVICE).manual_seed(seed)
    if precision == "bf16":  # one set of values for all three: the bf16 operands rounded once
        tensors = [t.bfloat16().float() if i in bf16_operands else t for i, t in enumerate(tensors)]
    kernel_dtypes = [
        torch.bfloat16 if precision == "bf16" and i in bf16_operands else None for i in range(len(tensors))
    ]
    kernel_leaves = [
        t.detach().to(d or t.dtype).contiguous(memory_format=layout if t.dim() == 4 else torch.contiguous_format)
        for t, d in zip(tensors, kernel_dtypes, strict=True)
    ]
    kernel_leaves = [t.requires_grad_(True) for t in kernel_leaves]
    leaves64 = [t.detach().double().requires_grad_(True) for t in tensors]
    eager32 = [t.detach().float().requires_grad_(True) for t in tensors]
    context = {"fp32": ieee_fp32, "fp32-tf32x3": ieee_fp32, "tf32": _tf32, "bf16": ieee_fp32}[precision]
    with context():
        out = kernel_fn(*kernel_leaves)
        g = torch.randn(out.shape, generator=gen, device=DEVICE).to(out.dtype)
        results = [out, *torch.autograd.grad(out, kernel_leaves, g)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            out32 = twin(*eager32)
        eager = [out32, *torch.autograd.grad(out32, eager32, g.to(out32.dtype))]
    out64 = twin(*leaves64)
    if kink:
        oracle_kernel, oracle_eager = (_oracle_at_own_pattern(twin, leaves64, side, g) for side in (out, out32))
    else:
        oracle_kernel = oracle_eager = [None, *torch.autograd.grad(out64, leaves64, g.double())]
    error = _l2_rel_error if precision == "bf16" else _max_rel_error
    for i, (k, e, ok, oe) in enumerate(zip(results, eager, oracle_kernel, oracle_eager, strict=True)):
        assert not torch.isnan(k).any(), f"{names[i]}: NaN"
        if i > 0:
            assert k.dtype == kernel_leaves[i - 1].dtype, f"{names[i]} in {k.dtype}"
        if i in vanishing:
            continue
        kernel_err, eager_err = (error(k, out64), error(e, out64)) if i == 0 else (error(k, ok), error(e, oe))
        bar = 2 * eager_err + FLOOR[precision]
        assert kernel_err <= bar, f"{precision} {names[i]}: kernel {kernel_err:.2e}, eager {eager_err:.2e}"


CONV_SHAPES = [  # (N, C_in, H = W, C_out, k, stride, groups)
    (1, 132, 512, 128, 3, 1, 1),  # level 0: the 132 -> 128 3x3 conv, half the net's FLOPs
    (1, 132, 128, 128, 3, 1, 1),  # the same at the CPU benchmark's size
    (1, 128, 256, 128, 3, 2, 1),  # a stride-2 down conv
    (1, 128, 512, 128, 1, 1, 1),  # the 1x1 conv after a merge
    (1, 4 * 132, 128, 4 * 128, 3, 1, 4),  # four networks side by side (batching by groups)
]
SHAPE_NAMES = "n, c_in, hw, c_out, k, stride, groups"


def _conv_inputs(n, c_in, hw, c_out, k, groups):
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.rand(n, c_in, hw, hw, generator=gen, device=DEVICE)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen, device=DEVICE) * (c_in // groups * k * k) ** -0.5
    bias, beta = (torch.randn(c_out, generator=gen, device=DEVICE) for _ in range(2))
    gamma = torch.rand(c_out, generator=gen, device=DEVICE) + 0.5
    return x, weight, bias, gamma, beta


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(SHAPE_NAMES, CONV_SHAPES)
def test_conv_bn_lrelu_real_shapes(n, c_in, hw, c_out, k, stride, groups, precision, monkeypatch):
    _use_fp32_dot(monkeypatch, precision)
    x, weight, bias, gamma, beta = _conv_inputs(n, c_in, hw, c_out, k, groups)

    def kernel_fn(*ins):
        return dipfast.kernels.conv_bn_lrelu(*ins, stride=stride, groups=groups)

    def twin(*ins, slope=0.2):
        return reference.conv_bn_lrelu(*ins, stride=stride, groups=groups, slope=slope)

    tensors = {"x": x, "weight": weight, "bias": bias, "gamma": gamma, "beta": beta}
    _check_within_eager_error(kernel_fn, twin, tensors, precision, seed=1, bf16_operands=("x", "weight"),
                              vanishing=("dbias",))  # fmt: skip


# the dgrad configs the localising test runs: the table's (configs.HOPPER, or a tuned entry), the same with one
# pipeline stage (no software pipelining of the loads), and smaller tiles
DGRAD_TILES = {
    "table": lambda config: config,
    "stages1": lambda config: replace(config, num_stages=1),
    "64x64x32-s1-w4": lambda config: configs.GemmTiles(64, 64, 32, 1, 4),
}


@pytest.mark.parametrize(
    "dgrad_tiles, precision", [(tiles, "fp32") for tiles in DGRAD_TILES] + [("table", "fp32-tf32x3")]
)
@pytest.mark.parametrize(SHAPE_NAMES, CONV_SHAPES)
def test_conv_bn_lrelu_fp32_dx_error_map(n, c_in, hw, c_out, k, stride, groups, dgrad_tiles, precision, monkeypatch):
    """fp32 dx element by element against the float64 twin at the kernel's LeakyReLU pattern, per dgrad config;
    a failure says which rows, columns, borders, channels and dgrad tiles are wrong (_error_map.py). The bar is the
    real-shape test's: twice eager IEEE fp32's largest error at its own pattern, plus a few ulps."""
    _use_fp32_dot(monkeypatch, precision)
    x, weight, bias, gamma, beta = _conv_inputs(n, c_in, hw, c_out, k, groups)
    kw = dict(stride=stride, groups=groups)
    conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")
    shape = conv_bn_lrelu_module.conv_shape(x, weight, stride, groups)
    config = DGRAD_TILES[dgrad_tiles](configs.gemm_tiles(conv_bn_lrelu_module.OP, "dgrad", "fp32", shape, x.device))
    p = (hw - 1) // stride + 1
    g = torch.randn(n, c_out, p, p, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE)
    dx = {}
    with ieee_fp32(), configs.forced_tiles({("dgrad", "fp32"): config}):
        for side, op in (("kernel", dipfast.kernels.conv_bn_lrelu), ("eager", reference.conv_bn_lrelu)):
            ins = [t.detach().requires_grad_(True) for t in (x, weight, bias, gamma, beta)]
            out = op(*ins, **kw)
            dx[side] = (torch.autograd.grad(out, ins[0], g)[0], out.detach())
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, weight, bias, gamma, beta)]

    def twin(*ins, slope=0.2):
        return reference.conv_bn_lrelu(*ins, **kw, slope=slope)

    err = {}
    for side, (d, out) in dx.items():
        expected = _oracle_at_own_pattern(twin, leaves64, out, g)[1]
        err[side] = (d.double() - expected).abs() / expected.abs().max()
    bar = 2 * err["eager"].max().item() + FLOOR["fp32"]
    bad = err["kernel"] > bar
    phase_pixels = n * ((hw + k - 1 + stride - 1) // stride) ** 2  # the dgrad's M: one phase of the padded input
    fitted = configs.fitted(config, phase_pixels, c_in // groups, c_out // groups)
    where = describe_dx_errors(bad, err["kernel"], (k - 1) // 2, fitted.block_m, fitted.block_n, groups, stride)
    assert not where, f"dgrad {fitted}, eager's worst {err['eager'].max().item():.2e}: {where}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_merge_real_shape(precision, monkeypatch):
    _use_fp32_dot(monkeypatch, precision)
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

    _check_within_eager_error(kernel_fn, twin, {"x": x, "y": y}, "fp32", seed=1, kink=False)
