"""Which GPU architectures the fused Triton kernels have not yet passed fp32 parity on.

On Hopper (sm_90) the H100's real-shape fp32 parity tests failed (bench/results/2026-11-26-h100-f6a7824f76/) and
no GPU run has passed them since, so dipfast.backends refuses backend='triton' with precision='fp32' there until a
run of tests/parity/test_cuda_shapes.py passes and the entry below is removed. TF32 and bf16 passed on the same
run. This module imports no Triton and touches no GPU at import.
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
