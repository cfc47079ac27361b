"""Which step runs a fit: the backends, the precisions, and what 'auto' resolves to.

    reference  the oracle (engine.ReferenceStep): eager modules, IEEE fp32, one network per fit
    native     the fast step (fast_step.FastStep) in eager mode: N networks in one step, mixed
               precision, the csrc CPU block ops on the CPU where built (dipfast.native); on CUDA
               the reference blocks, the whole step captured once and replayed as one CUDA graph
    compile    the fast step with the generator under torch.compile (and the CUDA graph on CUDA)
    triton     compile, with the generator's blocks run by the fused Triton kernels (dipfast.kernels)
    auto       the measured choice for the device: AUTO below

Precisions: fp32 (IEEE: TF32 off), tf32 (TF32 convolutions and matmuls on CUDA; a CPU has no TF32
and computes IEEE fp32), bf16 (autocast with fp32 master weights, Adam state, BatchNorm statistics,
loss, output head and metrics), auto (the measured choice: auto_precision below).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dipfast.errors import InputError
from dipfast.nets.blocks import REFERENCE, BlockOps

BACKENDS = ("auto", "reference", "native", "compile", "triton")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
BATCHED_BACKENDS = ("native", "compile", "triton")  # N images (or restarts) in one step

# What 'auto' runs, by device type: the fastest backend whose results match the reference. CPU:
# measured (README "Performance", bench/results/): native bf16 1.9-3.1x the reference, compile slower
# than eager and minutes to start (docs/notes/compile-bf16-nan.md), no Triton. CUDA: the first H100 run
# (bench/results/2026-11-26-h100-f6a7824f76/, 512 px, batch 1, image-iterations/s): native fp32 42.0,
# reference 39.4, compile bf16 33.6, native bf16 28.1, triton bf16 12.9; the fp32 Triton kernels
# failed parity there, and compile and TF32 are not yet timed in fp32.
AUTO = {"cpu": "native", "cuda": "native"}


def auto_precision(device: torch.device) -> str:
    """What precision='auto' runs: bf16 on a CPU that computes it in hardware (1.5-2.4x native fp32 here), else
    fp32. On CUDA fp32 too: the H100 ran the native step 1.5x faster in fp32 than in bf16 (AUTO's comment)."""
    return "bf16" if device.type == "cpu" and bf16_native(device) else "fp32"


@dataclass(frozen=True)
class Plan:
    backend: str  # never 'auto'
    precision: str  # never 'auto'
    compile: bool  # the generator under torch.compile
    cuda_graph: bool  # the whole step captured once and replayed
    fused_adam: bool = True  # one fused Adam kernel for all parameters (3x faster than foreach on the CPU;
    # it rounds differently from the reference's for-loop Adam by ~1 ulp per step)

    @property
    def fast(self) -> bool:
        return self.backend != "reference"

    @property
    def channels_last(self) -> bool:
        """NHWC activations and weights: oneDNN's and cuDNN's fast bf16 layout (-13% per step on the
        CPU, docs/notes/compile-bf16-nan.md). The Triton kernels index NCHW."""
        return self.precision == "bf16" and self.backend in ("native", "compile")

    def block_ops(self, device: torch.device) -> BlockOps:
        if self.backend == "triton":
            from dipfast.kernels.blocks import TritonBlocks

            return TritonBlocks()
        if self.backend == "native" and device.type == "cpu":  # the csrc ops are CPU ops
            from dipfast.native.blocks import NativeBlocks  # the csrc ops, or eager ones where not built

            return NativeBlocks()
        return REFERENCE

    def autocast(self, device: torch.device):
        """The forward's context: bf16 autocast, or the fp32 flavour's TF32 switches."""
        if self.precision == "bf16":
            # no cast cache: a CUDA graph capture must not keep autocast's cached casts (PyTorch's
            # CUDA-graph notes), and each weight is cast once per forward anyway
            return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
        if self.precision == "tf32":
            return conv_precision(tf32=True)
        return contextlib.nullcontext()


REFERENCE_PLAN = Plan("reference", "fp32", compile=False, cuda_graph=False, fused_adam=False)


@contextlib.contextmanager
def conv_precision(tf32: bool, cudnn_benchmark: bool = False):
    """TF32 on or off for cuDNN convolutions and CUDA matmuls (and what reads those flags: the Triton
    kernels, Inductor's conv template), restored afterwards."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=cudnn_benchmark, deterministic=False, allow_tf32=tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware (CPU: AVX512-BF16 or AMX; CUDA: Ampere or later)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve(backend: str, precision: str, device: torch.device) -> Plan:
    """The plan for a (backend, precision) request on `device`; raises InputError on a bad request."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    if backend == "auto":
        backend = AUTO[device.type]
    if backend == "reference":
        if precision not in ("auto", "fp32"):
            raise InputError(
                f"the reference backend is the IEEE fp32 oracle; for precision={precision!r} use backend='native'"
            )
        return REFERENCE_PLAN
    if precision == "auto":
        precision = auto_precision(device)
    if precision == "bf16" and device.type == "cuda" and not bf16_native(device):
        raise InputError("precision='bf16' needs an Ampere or newer GPU; use precision='fp32' or 'tf32'")
    return Plan(backend, precision, compile=backend in ("compile", "triton"), cuda_graph=device.type == "cuda")
