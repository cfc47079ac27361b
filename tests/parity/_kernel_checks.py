"""Checks every fused Triton op of dipfast.kernels shares: fresh leaves, one forward + backward, the TF32 flag's
path to the dots, and run-to-run determinism. Each op's test module supplies the op and its inputs."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

# the module, not the function: dipfast.kernels re-exports the op under the module's own name; every fused op
# takes its dot options (IEEE or TF32) from here
conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")


def leaves(tensors, dtype):
    """Fresh leaves of `tensors` in `dtype` that need gradients (None entries stay None)."""
    return [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in tensors]


def forward_backward(op: Callable, tensors, grad: torch.Tensor, **kw) -> list[torch.Tensor]:
    """[out, *d(out . grad)/d input] of op on fresh fp32 leaves of `tensors` (None inputs have no gradient)."""
    ins = leaves(tensors, torch.float32)
    out = op(*ins, **kw)
    return [out, *torch.autograd.grad(out, [t for t in ins if t is not None], grad)]


def assert_tf32_follows_the_cudnn_flag(monkeypatch, run: Callable[[], list[torch.Tensor]], launches: int = 3) -> None:
    """run() (a forward_backward in fp32) uses TF32 dots exactly where torch.backends.cudnn.allow_tf32 is set: the
    forward's GEMM, then the backward's wgrad and dgrad (`launches` GEMM launches in all: the merge's dgrad is two).
    The interpreter computes TF32 and IEEE dots alike (exact fp32 products), so there the two runs agree bit for
    bit; test_cuda_shapes.py bounds TF32's error on a GPU."""
    seen = []
    options_of = conv_bn_lrelu_module._dot_options

    def spy(dtype, tf32):
        options = options_of(dtype, tf32)
        seen.append(options["PRECISION"])
        return options

    monkeypatch.setattr(conv_bn_lrelu_module, "_dot_options", spy)
    runs = {}
    for allow_tf32 in (False, True):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
            runs[allow_tf32] = run()
    assert seen == ["ieee"] * launches + ["tf32"] * launches  # each flag: forward GEMM, the backward's wgrad, dgrad
    if conv_bn_lrelu_module._INTERPRET:
        for ieee, tf32 in zip(runs[False], runs[True], strict=True):
            assert torch.equal(ieee, tf32)


def assert_repeat_runs_are_bitwise_identical(run: Callable[[], list[torch.Tensor]]) -> None:
    """No atomics anywhere: two runs of the forward and backward agree bit for bit."""
    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)
