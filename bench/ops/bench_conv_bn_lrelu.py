"""The reference conv block, reflect-pad + conv + BN (training statistics) + LeakyReLU(0.2):
dipfast.reference.conv_bn_lrelu (the twin the fused kernel is timed against), eager fp32 with
IEEE convolutions, forward / backward / both; on CUDA, the fused Triton op (dipfast.kernels.conv_bn_lrelu)
against the twin, forward and forward + backward, groups 1 and 4, in fp32, TF32 and bf16, and bf16 in channels_last
(both sides: the triton backend's layout on CUDA, and cuDNN's own)."""

import pytest
import torch
from cuda_timing import graphed, needs_cuda

import dipfast.kernels
from dipfast import reference
from dipfast.engine import ieee_fp32
from dipfast.reference import conv_bn_lrelu

SHAPES = [
    (1, 32, 64, 64, 32, 3),  # (N, C_in, H, W, C_out, k): a small level-0 block
    (1, 132, 32, 32, 128, 3),  # level-0 width of the default net (skip 4 + 128), small image
    (1, 128, 32, 32, 128, 1),  # the 1x1 conv after each merge
]
IDS = ["c32-64px-k3", "c132-32px-k3", "c128-32px-k1"]


class _Block:
    """The twin with its own parameters, initialised as nn.Conv2d and nn.BatchNorm2d are."""

    def __init__(self, c_in, c_out, k, rng):
        bound = (c_in * k * k) ** -0.5
        self.weight = (torch.rand(c_out, c_in, k, k, generator=rng) * 2 - 1).mul_(bound).requires_grad_()
        self.bias = (torch.rand(c_out, generator=rng) * 2 - 1).mul_(bound).requires_grad_()
        self.gamma = torch.ones(c_out, requires_grad=True)
        self.beta = torch.zeros(c_out, requires_grad=True)

    def parameters(self):
        return [self.weight, self.bias, self.gamma, self.beta]

    def __call__(self, x):
        return conv_bn_lrelu(x, *self.parameters())


def conv_flop(n, c_in, h, w, c_out, k, stride=1, groups=1) -> int:
    """The convolution's multiply-adds x 2, forward; its input and weight gradients cost as much each. The
    BatchNorm + LeakyReLU around it are memory-bound and counted in no FLOP figure."""
    return 2 * n * c_out * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) * (c_in // groups) * k * k


def _block(shape, rng):
    n, c_in, h, w, c_out, k = shape
    block = _Block(c_in, c_out, k, rng)
    x = torch.rand(n, c_in, h, w, generator=rng, requires_grad=True)
    grad = torch.randn(n, c_out, h, w, generator=rng)
    return block, x, grad


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv_bn_lrelu_forward(benchmark, shape, rng):
    block, x, _ = _block(shape, rng)
    benchmark.extra_info["flop"] = conv_flop(*shape)
    with ieee_fp32(), torch.no_grad():
        out = benchmark(block, x)
    assert out.shape == (shape[0], shape[4], shape[2], shape[3])


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv_bn_lrelu_backward(benchmark, shape, rng):
    block, x, grad = _block(shape, rng)
    benchmark.extra_info["flop"] = 2 * conv_flop(*shape)
    with ieee_fp32():
        out = block(x)
        grads = benchmark(lambda: torch.autograd.grad(out, [x, *block.parameters()], grad, retain_graph=True))
    assert [g.shape for g in grads] == [x.shape, *(p.shape for p in block.parameters())]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv_bn_lrelu_full(benchmark, shape, rng):
    block, x, grad = _block(shape, rng)
    benchmark.extra_info["flop"] = 3 * conv_flop(*shape)

    def step():
        out = block(x)
        return torch.autograd.grad(out, [x, *block.parameters()], grad)

    with ieee_fp32():
        grads = benchmark(step)
    assert grads[0].shape == x.shape


# --- the Triton op against the reference twin (CUDA only), in each precision ------------------------------

GPU_CASES = [  # (N, C_in, H, W, C_out, k, stride, groups)
    (1, 132, 128, 128, 128, 3, 1, 1),  # level 0 of the default net, SR/denoise image size
    (1, 128, 128, 128, 128, 3, 2, 1),  # the stride-2 down conv at level 0
    (1, 128, 64, 64, 128, 1, 1, 1),  # the 1x1 conv after a merge, level 1
    (1, 128, 16, 16, 128, 3, 1, 1),  # level 3: latency-bound
    (1, 512, 64, 64, 512, 3, 1, 4),  # four networks side by side (groups 4)
]
GPU_IDS = ["c132-128px-k3", "c128-128px-k3-s2", "c128-64px-k1", "c128-16px-k3", "g4-c128-64px-k3"]
IMPLS = {"triton": dipfast.kernels.conv_bn_lrelu, "reference": reference.conv_bn_lrelu}
# fp32: IEEE dots and cuDNN convolutions; tf32: both with TF32 (the kernels follow torch.backends.cudnn.allow_tf32);
# bf16: the kernel on bf16 x and weight (fp32 BN parameters), the twin under torch.autocast(bf16), as the engine.
# (precision, layout): channels_last is what the triton backend runs bf16 in on CUDA (its kernels' operand tiles
# load as vectors only there: bench/results/2026-12-04-cpu-sm90-gemm-codegen/); NCHW as before, beside it
PRECISION_LAYOUTS = [("fp32", "nchw"), ("tf32", "nchw"), ("bf16", "nchw"), ("bf16", "channels_last")]
PL_IDS = [f"{p}-{layout}" if layout != "nchw" else p for p, layout in PRECISION_LAYOUTS]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _flags(precision: str):
    """TF32 on for 'tf32', off otherwise: the kernels and cuDNN read the same flag, forward and backward."""
    if precision == "tf32":
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=True)
    return ieee_fp32()


def _autocast(precision: str, impl: str):
    """The twin's bf16 is autocast's; the kernel takes bf16 tensors instead (_gpu_block)."""
    # no cast cache: the op is captured in a CUDA graph (cuda_timing.graphed), which must not keep autocast's casts
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16" and impl == "reference",
                          cache_enabled=False)  # fmt: skip


def _gpu_block(case, rng, bf16_operands: bool, layout: str = "nchw"):
    n, c_in, h, w, c_out, k, stride, groups = case
    fmt = LAYOUTS[layout]
    block = _Block(c_in // groups, c_out, k, rng)  # weight (C_out, C_in / groups, k, k)
    operand = torch.bfloat16 if bf16_operands else torch.float32
    params = [p.detach().cuda() for p in block.parameters()]
    params[0] = params[0].to(operand).contiguous(memory_format=fmt)
    params = [p.requires_grad_() for p in params]
    x = torch.rand(n, c_in, h, w, generator=rng).cuda().to(operand).contiguous(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(n, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=rng).cuda().to(operand)
    return x, params, grad.contiguous(memory_format=fmt), dict(stride=stride, groups=groups)


@needs_cuda
@pytest.mark.parametrize(("precision", "layout"), PRECISION_LAYOUTS, ids=PL_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_conv_bn_lrelu_op_forward(benchmark, case, impl, precision, layout, rng):
    x, params, _, kw = _gpu_block(case, rng, bf16_operands=precision == "bf16" and impl == "triton", layout=layout)
    op = IMPLS[impl]
    if impl == "triton":
        assert dipfast.kernels.conv_bn_lrelu_path(x) == "triton"
    benchmark.extra_info["flop"] = conv_flop(*case)
    with _flags(precision), _autocast(precision, impl), torch.no_grad():
        out = benchmark(graphed(benchmark, lambda: op(x, *params, **kw)))
    assert out.shape[1] == case[4]


@needs_cuda
@pytest.mark.parametrize(("precision", "layout"), PRECISION_LAYOUTS, ids=PL_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_conv_bn_lrelu_op_full(benchmark, case, impl, precision, layout, rng):
    x, params, grad, kw = _gpu_block(case, rng, bf16_operands=precision == "bf16" and impl == "triton", layout=layout)
    op = IMPLS[impl]
    benchmark.extra_info["flop"] = 3 * conv_flop(*case)

    def step():
        with _autocast(precision, impl):
            out = op(x, *params, **kw)
        return torch.autograd.grad(out, [x, *params], grad.to(out.dtype))

    with _flags(precision):
        grads = benchmark(graphed(benchmark, step))
    assert grads[0].shape == x.shape
