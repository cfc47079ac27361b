"""The native CPU ops (dipfast.native) against their eager counterparts, at the default net's shapes
for a 128 x 128 image: level l has 128 channels at (128 >> l)^2 (the merge adds the 4 skip
channels; the upsample goes from level l + 1's size to level l's). fp32 and bf16 (fp32 BatchNorm
parameters, as under autocast), NCHW and channels_last; forward + backward except for the noise
draw. Each pytest-benchmark group holds one case, native beside eager:

    python -m pytest bench/ops/bench_native_ops.py --benchmark-only --benchmark-group-by=group

Skipped when the extension is not built (the eager path would be timed against itself).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from dipfast import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="dipfast native CPU ops not built")

LEVELS = [0, 1, 2, 3, 4]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
IMPLS = ["native", "eager"]
CHANNELS, SKIP, SIZE = 128, 4, 128


def _eager_batch_norm_act(x, w, b):
    return F.leaky_relu(F.batch_norm(x, None, None, w, b, training=True, eps=1e-5), 0.2)


def _eager_concat_batch_norm(skip, deeper, w, b):
    return F.batch_norm(torch.cat([skip, deeper], 1), None, None, w, b, training=True, eps=1e-5)


def _eager_upsample(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _eager_reflect_pad(x, w, b):
    return F.pad(_eager_batch_norm_act(x, w, b), (1, 1, 1, 1), mode="reflect")


OPS = {  # name: (native, eager)
    "batch_norm_act": (functools.partial(native.batch_norm_act, eps=1e-5, negative_slope=0.2), _eager_batch_norm_act),
    "concat_batch_norm": (functools.partial(native.concat_batch_norm, eps=1e-5), _eager_concat_batch_norm),
    "upsample_bilinear2x": (native.upsample_bilinear2x, _eager_upsample),
    "batch_norm_act_reflect_pad": (
        functools.partial(native.batch_norm_act_reflect_pad, pad=1, eps=1e-5, negative_slope=0.2),
        _eager_reflect_pad,
    ),
}


def _tensor(shape, dtype, layout, rng, requires_grad=True):
    x = torch.randn(shape, generator=rng).to(dtype).contiguous(memory_format=layout)
    return x.requires_grad_(requires_grad)


def _params(c, rng):
    weight = (torch.rand(c, generator=rng) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=rng).requires_grad_()
    return weight, bias


def _inputs(op, level, dtype, layout, rng):
    side = SIZE >> level
    if op == "upsample_bilinear2x":
        return [_tensor((1, CHANNELS, side // 2, side // 2), dtype, layout, rng)]
    if op == "concat_batch_norm":
        skip = _tensor((1, SKIP, side, side), dtype, layout, rng)
        deeper = _tensor((1, CHANNELS, side, side), dtype, layout, rng)
        return [skip, deeper, *_params(SKIP + CHANNELS, rng)]
    return [_tensor((1, CHANNELS, side, side), dtype, layout, rng), *_params(CHANNELS, rng)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("level", LEVELS, ids=[f"level{lv}" for lv in LEVELS])
@pytest.mark.parametrize("op", list(OPS))
def test_native_op_full(benchmark, op, level, dtype, layout, impl, rng):
    inputs = _inputs(op, level, DTYPES[dtype], LAYOUTS[layout], rng)
    fn = OPS[op][IMPLS.index(impl)]
    grad = torch.randn_like(fn(*inputs), dtype=torch.float32).to(DTYPES[dtype])
    benchmark.group = f"{op} level{level} {dtype} {layout}"
    grads = benchmark(lambda: torch.autograd.grad(fn(*inputs), inputs, grad))
    assert [g.shape for g in grads] == [t.shape for t in inputs]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("level", LEVELS, ids=[f"level{lv}" for lv in LEVELS])
def test_batch_norm_act_forward(benchmark, level, dtype, impl, rng):
    """The forward alone (channels_last), as a no-grad evaluation runs it."""
    x, weight, bias = _inputs("batch_norm_act", level, DTYPES[dtype], torch.channels_last, rng)
    fn = OPS["batch_norm_act"][IMPLS.index(impl)]
    benchmark.group = f"batch_norm_act forward level{level} {dtype} cl"
    with torch.no_grad():
        y = benchmark(fn, x, weight, bias)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", ["1-thread", "default-threads"])
def test_input_noise_draw(benchmark, threads, impl):
    """The per-iteration input noise of the default net, (1, 32, 128, 128) fp32: dipfast.native.normal_
    (Philox, seed 0, offset = a step counter) against torch's normal_ (one thread either way)."""
    noise = torch.empty(1, 32, SIZE, SIZE)
    step = torch.zeros((), dtype=torch.int64)

    def native_draw():
        step.add_(1)
        return native.normal_(noise, 0, step)

    before = torch.get_num_threads()
    torch.set_num_threads(1 if threads == "1-thread" else before)
    try:
        benchmark.group = f"normal_ (1, 32, 128, 128) fp32 {threads}"
        out = benchmark(native_draw if impl == "native" else noise.normal_)
    finally:
        torch.set_num_threads(before)
    assert out is noise
