"""Autocast's bf16 rule for the convolutions inside torch.func.vmap, whose batching rule autocast does not reach.

Inside vmap an op meets functorch's batching key first, above autocast's: a composite op runs on the batched
tensors, and autocast acts only on the plain ops the batching rules call, where the device's autocast lists name
them (CUDA's names aten::convolution, the CPU's only aten::conv2d). F.conv2d's own check that the bias has the
input's dtype runs at the batched level, so the vectorised step (N networks as grouped convs), whose conv weights
and biases are cast to bf16 once per step, met it with fp32 activations and raised "Input type (float) and bias type
(c10::BFloat16) should be the same" (H200, bench/results/2026-12-04-h200-504226cc86/). Under `bf16_convolutions()`
each convolution gets bf16 operands, as autocast's lower-precision list gives it, and BatchNorm normalises in fp32,
the dtype of its statistics: vmap's batching rule hands the CPU's kernel bf16 activations beside fp32 running
statistics, which it refuses ("expected scalar type BFloat16 but found Float"). The other ops are left to autocast
where it reaches them, and keep their inputs' dtype where it does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# torch.nn.functional's convolutions are these same builtins
CONVOLUTIONS = frozenset({torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d})
BATCH_NORMS = frozenset({F.batch_norm, torch.batch_norm})


class bf16_convolutions(TorchFunctionMode):  # noqa: N801  (used as a context, like torch.autocast)
    """Within the block, every convolution computes on bf16 operands (its fp32 tensors cast; autograd
    carries the gradients back to fp32) and every BatchNorm on an fp32 input."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONVOLUTIONS:
            args = tuple(_bf16(a) for a in args)
            kwargs = {k: _bf16(v) for k, v in kwargs.items()}
        elif func in BATCH_NORMS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bfloat16:
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


def _bf16(value):
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float16):
        return value.to(torch.bfloat16)
    return value
