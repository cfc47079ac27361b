"""Which tensors the native kernels take, and the layouts they give their outputs.

Mirrors csrc/native/common.h: a kernel reads a 4-D tensor with unit stride along W (NCHW, or a
slice of it) or along C (channels_last); outputs are channels_last when the input keeps its
channels innermost, else NCHW. The fake (shape-only) implementations use the same rule, so
torch.compile sees the strides the kernels produce.
"""

from __future__ import annotations

import torch

from dipfast.native import runtime

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def kernels_take(*tensors: torch.Tensor, dim: int | None = 4) -> bool:
    """Whether the native kernels run on these tensors (else the eager twin does)."""
    return runtime.enabled() and all(
        t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and (dim is None or t.dim() == dim) for t in tensors
    )


def layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format a kernel gives an output computed from t (common.h, layout_of)."""
    channels_last = t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) != 1  # a 1 x 1 NCHW map has both
    return torch.channels_last if channels_last else torch.contiguous_format


def readable(t: torch.Tensor) -> torch.Tensor:
    """t, or a row-major copy the kernels can walk (unit stride along W or C). Incoming gradients are
    made walkable in C++ (csrc/native/autograd.cpp, in the layout of the tensor they belong to)."""
    if t.stride(3) == 1 or t.shape[3] == 1 or t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 statistics and parameters for fp32 and bf16 inputs; float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def channel_vector(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A BatchNorm parameter as the kernels take it: contiguous, in x's compute dtype (differentiable)."""
    return v.to(compute_dtype(x)).contiguous()
