"""The GPU architectures where the fused Triton kernels' fp32 path is unverified: FP32_UNVERIFIED.

dipfast.backends refuses backend='triton' with precision='fp32' on an architecture listed here; an entry goes
once tests/parity/test_cuda_shapes.py passes there (the failed run that put Hopper here, and its TF32 and bf16
results: bench/results/2026-11-26-h100-f6a7824f76/). This module imports no Triton and touches no GPU at import.
"""

from __future__ import annotations

import torch

# compute capability -> the name a refusal shows
FP32_UNVERIFIED = {(9, 0): "Hopper (sm_90)"}


def fp32_unverified_arch(device: torch.device) -> str | None:
    """The name of `device`'s architecture if the kernels' fp32 path is unverified there, else None (CPU: None)."""
    if device.type != "cuda":
        return None
    return FP32_UNVERIFIED.get(torch.cuda.get_device_capability(device))
