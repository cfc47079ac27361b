"""BatchNorm (training statistics) + LeakyReLU(0.2) written reflection-padded, the input of the next conv:
dipfast.reference.batch_norm_act (eager F.batch_norm + F.leaky_relu + F.pad reflect), forward and forward +
backward on the CPU; on CUDA, the Triton op (dipfast.kernels.batch_norm_act, and concat_batch_norm for a merge)
against the eager twin in fp32 and bf16, NCHW and channels_last (and triton-folded: the op with its finalizes in the
reductions' last programs, dipfast.kernels.channel_sums.folded_finalize), with the achieved bandwidth in
extra_info["GB/s"]: the bytes the op must move at least (forward: x read twice, statistics then normalise, and the
padded output written once; backward: x and the gradient read twice, dx written once) over the median time."""

import pytest
import torch
from cuda_timing import graphed, needs_cuda

import dipfast.kernels
from dipfast import reference
from dipfast.kernels.channel_sums import folded_finalize

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _inputs(shape, rng, device="cpu", dtype=torch.float32, layout=torch.contiguous_format):
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, generator=rng).to(device=device, dtype=dtype).contiguous(memory_format=layout)
    weight = (torch.rand(c, generator=rng) + 0.5).to(device)
    bias = torch.randn(c, generator=rng).to(device)
    return [t.requires_grad_() for t in (x, weight, bias)]


def _record_bandwidth(benchmark, nbytes: int) -> None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 1)


def _bytes(x: torch.Tensor, pad: int, backward: bool) -> int:
    n, c, h, w = x.shape
    size, padded = x.element_size() * n * c * h * w, x.element_size() * n * c * (h + 2 * pad) * (w + 2 * pad)
    forward = 2 * size + padded
    return forward + (2 * size + 2 * padded + size if backward else 0)


CPU_SHAPES = [(1, 32, 64, 64), (1, 128, 32, 32)]  # (N, C, H, W): a small level-0 map, the default net's width
CPU_IDS = ["c32-64px", "c128-32px"]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=CPU_IDS)
def test_batch_norm_act_twin_forward(benchmark, shape, rng):
    x, weight, bias = _inputs(shape, rng)
    with torch.no_grad():
        out = benchmark(lambda: reference.batch_norm_act(x, weight, bias, pad=1))
    assert out.shape == (shape[0], shape[1], shape[2] + 2, shape[3] + 2)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=CPU_IDS)
def test_batch_norm_act_twin_full(benchmark, shape, rng):
    x, weight, bias = _inputs(shape, rng)
    grad = torch.randn(shape[0], shape[1], shape[2] + 2, shape[3] + 2, generator=rng)

    def step():
        return torch.autograd.grad(reference.batch_norm_act(x, weight, bias, pad=1), [x, weight, bias], grad)

    grads = benchmark(step)
    assert grads[0].shape == x.shape


# --- the Triton op against the eager twin (CUDA only) ------------------------------------------------------------

GPU_CASES = [  # (N, C, H, W, pad)
    (1, 128, 512, 512, 1),  # level 0 of the default net at 512 px: the memory-bound case
    (1, 128, 512, 512, 0),  # level 0's unpadded BatchNorms (before a 1x1 conv): 16-byte vectors in NCHW
    (1, 128, 256, 256, 1),  # level 1
    (1, 128, 64, 64, 1),  # level 3: launch-bound
    (1, 4, 512, 512, 0),  # a skip branch's BN + LeakyReLU, unpadded (its 1x1 conv pads nothing)
    (4, 128, 128, 128, 1),  # batch 4
]
GPU_IDS = ["c128-512px", "c128-512px-p0", "c128-256px", "c128-64px", "c4-512px-p0", "n4-c128-128px"]
IMPLS = {"triton": dipfast.kernels.batch_norm_act, "triton-folded": dipfast.kernels.batch_norm_act,
         "eager": reference.batch_norm_act}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _launches(impl: str):
    """The context an implementation's launches are made (and captured) in: triton-folded's finalize switch."""
    return folded_finalize(impl.endswith("-folded"))


@needs_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_batch_norm_act_op_forward(benchmark, case, impl, dtype, layout, rng):
    *shape, pad = case
    x, weight, bias = _inputs(shape, rng, "cuda", DTYPES[dtype], LAYOUTS[layout])
    if impl != "eager":
        assert dipfast.kernels.batch_norm_act_path(x) == "triton"

    def forward():
        with _launches(impl):
            return IMPLS[impl](x, weight, bias, pad=pad)

    with torch.no_grad():
        out = benchmark(graphed(benchmark, forward))
    _record_bandwidth(benchmark, _bytes(x, pad, backward=False))
    assert out.shape[-1] == shape[-1] + 2 * pad


@needs_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_batch_norm_act_op_full(benchmark, case, impl, dtype, layout, rng):
    *shape, pad = case
    x, weight, bias = _inputs(shape, rng, "cuda", DTYPES[dtype], LAYOUTS[layout])
    n, c, h, w = shape
    grad = torch.randn(n, c, h + 2 * pad, w + 2 * pad, generator=rng).to("cuda", DTYPES[dtype])
    grad = grad.contiguous(memory_format=LAYOUTS[layout])

    def step():
        with _launches(impl):
            return torch.autograd.grad(IMPLS[impl](x, weight, bias, pad=pad), [x, weight, bias], grad)

    grads = benchmark(graphed(benchmark, step))
    _record_bandwidth(benchmark, _bytes(x, pad, backward=True))
    assert grads[0].shape == x.shape


MERGE_IMPLS = {"triton": dipfast.kernels.concat_batch_norm, "triton-folded": dipfast.kernels.concat_batch_norm,
               "eager": reference.concat_batch_norm}  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", list(MERGE_IMPLS))
def test_concat_batch_norm_op_full(benchmark, impl, layout, rng):
    """The level-0 merge at 512 px in bf16: skip (4 channels) + deeper (128) -> the padded input of level.up."""
    skip = _inputs((1, 4, 512, 512), rng, "cuda", torch.bfloat16, LAYOUTS[layout])[0]
    deeper, weight, bias = _inputs((1, 128, 512, 512), rng, "cuda", torch.bfloat16, LAYOUTS[layout])
    weight, bias = (torch.cat([t.detach(), t.detach()[:4]]).requires_grad_() for t in (weight, bias))
    grad = torch.randn(1, 132, 514, 514, generator=rng).to("cuda", torch.bfloat16)
    grad = grad.contiguous(memory_format=LAYOUTS[layout])

    def step():
        with _launches(impl):
            out = MERGE_IMPLS[impl](skip, deeper, weight, bias, pad=1)
            return torch.autograd.grad(out, [skip, deeper, weight, bias], grad)

    grads = benchmark(graphed(benchmark, step))
    merged = torch.empty(1, 132, 512, 512, dtype=torch.bfloat16, device="meta")
    _record_bandwidth(benchmark, _bytes(merged, 1, backward=True))
    assert grads[1].shape == deeper.shape
