"""Which step runs a fit: the backends, the precisions, and what 'auto' resolves to.

    reference  the oracle (engine.ReferenceStep): eager modules, IEEE fp32, one network per fit
    native     the fast step (fast_step.FastStep) in eager mode: N networks in one step, mixed
               precision, the csrc CPU block ops on the CPU where built (dipfast.native); on CUDA
               the reference blocks, the whole step captured once and replayed as one CUDA graph
    compile    the fast step with the generator under torch.compile (and the CUDA graph on CUDA)
    triton     compile, with the generator's blocks run by the fused Triton kernels (dipfast.kernels)
    auto       the measured choice for the device: AUTO below

BACKEND_TABLE says what each runs per device: the step, the block ops, compile, layout, noise.

Precisions: fp32 (IEEE: TF32 off), tf32 (TF32 convolutions and matmuls on CUDA; a CPU has no TF32
and computes IEEE fp32), bf16 (autocast with fp32 master weights, Adam state, BatchNorm statistics,
loss, output head and metrics), auto (the measured choice: auto_precision below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from dipfast.errors import InputError
from dipfast.nets.aligned_channels import channel_multiple
from dipfast.nets.blocks import REFERENCE, BlockOps

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
TENSOR_CORE_DTYPES = {"tf32": torch.float32, "bf16": torch.bfloat16}  # the operands' dtype, where tensor cores run


@dataclass(frozen=True)
class Backend:
    """What a backend runs, per device type ('cpu', 'cuda')."""

    name: str
    step: str  # 'reference' (engine.ReferenceStep: one network per fit) or 'fast' (fast_step.FastStep: N)
    # device type -> block ops: 'reference', 'native' (dipfast.native), 'triton' (the fused conv blocks) or
    # 'padded' (cuDNN's convs; BatchNorm + LeakyReLU by Triton kernels that write the next conv's reflection pad)
    blocks: dict[str, str]
    compile: bool  # the generator under torch.compile
    # the device types where bf16 runs NHWC activations and weights: oneDNN's fast layout on a CPU; on CUDA
    # the native step ran 2.74x faster in NCHW (H200, bench/results/2026-12-04-h200-504226cc86/)
    channels_last_bf16: frozenset[str]
    noise: dict[str, str]  # device type -> the input-noise draw: 'generator' (torch's) or 'philox' (counter-based)
    # Inductor's layout optimisation (channels_last convolutions inside a compiled graph, whatever the layout of its
    # inputs): None, its own rule, which looks for aten.convolution nodes, so the forward gets it (the default net at
    # batch 1, on a CPU and, by its heuristics, on CUDA) and the backward, whose convs are convolution_backward, does
    # not (tests/test_inductor_layout.py); True, forced on every graph; False, off on every graph.
    layout_optimization: bool | None = None
    # the device types where convs run with channel counts padded for tensor cores under tf32 and bf16
    # (dipfast.nets.aligned_channels): off, as measured (H200: 1.00x in bf16 and tf32, on either block ops)
    align_channels: frozenset[str] = frozenset()
    # the device types where the flat parameter buffers pack each parameter right after the last one
    # (FlatParameters' aligned=False): the layout before the conv weights started 16-byte aligned
    packed_parameters: frozenset[str] = frozenset()
    # the device types where the fast step's rules after the backward (output copy, EMA, backtracking, metrics row;
    # early stopping's update and freeze) run as 3 Triton launches, 7 with early stopping (dipfast.kernels.fused_rules),
    # instead of some 48 small torch kernels, 124 with early stopping
    fused_rules: frozenset[str] = frozenset({"cuda"})
    # the device types where the step's Triton kernels launch as programmatic dependent launches (Hopper and later:
    # each scheduled while the kernel before it drains, dipfast.kernels.dependent_launch): off until measured
    dependent_launch: frozenset[str] = frozenset()
    # the device types where the padded BatchNorm kernels finalize in their reduction's last program instead of a
    # launch of their own (dipfast.kernels.channel_sums.folded_finalize: 60 of the step's ~200 launches): off until
    # measured
    folded_finalize: frozenset[str] = frozenset()
    # the device types where a fast step of N > 1 networks runs them as one vmapped network (grouped convs, one
    # launch a layer: generator_runner), not one after another (N launches a layer; the CPU's way, where grouped
    # convs are slower, and the one whose fits are the same bits in any group: tests/test_group_invariance.py)
    vectorised: frozenset[str] = frozenset({"cuda"})
    # the device types where a fast step compiles its Triton kernels side by side, in a pass of its generator before its
    # first call (dipfast.kernels.parallel_compile), not one at a time at their first launches: a cold process's
    # start-up; off until measured
    parallel_compile: frozenset[str] = frozenset()


BACKEND_TABLE: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "reference", {"cpu": "reference", "cuda": "reference"}, False, frozenset(), {}),
        # The csrc ops are CPU ops; on CUDA the native step runs cuDNN's convs with the padded BatchNorm
        # kernels: 1.43x the reference blocks in bf16, 1.14x in tf32 (H200, 512 px: 9.0 against 12.9 ms and
        # 10.2 against 11.7; bench/results/2026-12-04-h200-222367b4a8/). The Philox draw is the same stream
        # whether or not the extension is built (its eager twin runs otherwise).
        Backend("native", "fast", {"cpu": "native", "cuda": "padded"}, False, frozenset({"cpu"}), {"cpu": "philox"}),
        Backend("compile", "fast", {"cpu": "reference", "cuda": "reference"}, True, frozenset({"cpu", "cuda"}), {}),
        # bf16 on CUDA in channels_last: the conv kernels' loads are 16-byte vectors, pipelined, only there (sm_90
        # codegen, bench/results/2026-12-04-cpu-sm90-gemm-codegen/); on a CPU the interpreter runs NCHW
        Backend("triton", "fast", {"cpu": "triton", "cuda": "triton"}, True, frozenset({"cuda"}), {}),
    )
}
BACKENDS = ("auto", *BACKEND_TABLE)
BATCHED_BACKENDS = tuple(name for name, b in BACKEND_TABLE.items() if b.step == "fast")  # N images in one step

# What 'auto' runs, by device type: the fastest backend whose results match the reference, as
# measured by the harness (the README's Performance section; bench/results/).
AUTO = {"cpu": "native", "cuda": "native"}


def auto_precision(device: torch.device) -> str:
    """What precision='auto' runs: bf16 where the device computes it in hardware, else fp32 (the harness's
    measurements behind the choice: README, Performance). On an H200 the native step ran bf16 (NCHW) at
    9.0 ms per 512 px iteration against 10.2 ms in tf32 (bench/results/2026-12-04-h200-222367b4a8/)."""
    return "bf16" if bf16_native(device) else "fp32"


@dataclass(frozen=True)
class Plan:
    backend: str  # never 'auto'
    precision: str  # never 'auto'
    compile: bool  # the generator under torch.compile (the backend's choice; tests may turn it off)
    cuda_graph: bool  # the whole step captured once and replayed
    fused_adam: bool = True  # one fused Adam kernel for all parameters (it rounds differently from the
    # reference's for-loop Adam by ~1 ulp per step)

    @property
    def spec(self) -> Backend:
        return BACKEND_TABLE[self.backend]

    @property
    def fast(self) -> bool:
        return self.spec.step == "fast"

    def channels_last(self, device: torch.device) -> bool:
        return self.precision == "bf16" and device.type in self.spec.channels_last_bf16

    def channel_multiple(self, device: torch.device) -> int:
        """The multiple the generator's conv channels are padded to on `device`: 1 (none) where the backend does
        not align them, or where the precision has no tensor-core kernels to reach (IEEE fp32)."""
        if device.type not in self.spec.align_channels or self.precision not in TENSOR_CORE_DTYPES:
            return 1
        return channel_multiple(TENSOR_CORE_DTYPES[self.precision])

    def aligned_parameters(self, device: torch.device) -> bool:
        """Whether the flat parameter buffers start each parameter 16-byte aligned on `device` (FlatParameters)."""
        return device.type not in self.spec.packed_parameters

    def inductor_options(self) -> dict | None:
        """torch.compile's options for the generator: Inductor's layout optimisation as Backend.layout_optimization
        says (options, not an ambient config patch: they reach the backward graph too, which AOTAutograd compiles at
        the first backward, outside any context of the call)."""
        if not self.compile or self.spec.layout_optimization is None:
            return None
        if self.spec.layout_optimization:
            return {"force_layout_optimization": True}
        return {"layout_optimization": False}

    def noise(self, device: torch.device) -> str:
        return self.spec.noise.get(device.type, "generator")

    def block_ops(self, device: torch.device) -> BlockOps:
        kind = self.spec.blocks[device.type]
        if kind == "triton":
            from dipfast.kernels.blocks import TritonBlocks

            return TritonBlocks()
        if kind == "padded":
            from dipfast.kernels.blocks import PaddedBlocks

            return PaddedBlocks()
        if kind == "native":
            from dipfast.native.blocks import NativeBlocks  # the csrc ops, or their eager twins where not built

            return NativeBlocks()
        return REFERENCE

    def fused_loss(self, device: torch.device) -> bool:
        """Whether the step computes the super-resolution loss mse(Lanczos2 decimation(out), y) in one Triton
        pass (dipfast.kernels.lanczos2_mse): where the blocks are the Triton kernels."""
        return self.spec.blocks[device.type] == "triton"

    def fused_rules(self, device: torch.device) -> bool:
        """Whether the fast step runs its rules after the backward fused (dipfast.kernels.fused_rules) on `device`."""
        if device.type not in self.spec.fused_rules:
            return False
        from dipfast.kernels import fused_rules

        return fused_rules.available(device)

    def dependent_launch(self, device: torch.device) -> bool:
        """Whether the fast step's Triton kernels launch as programmatic dependent launches on `device`
        (dipfast.kernels.dependent_launch): where the backend says and the GPU can."""
        if device.type not in self.spec.dependent_launch:
            return False
        from dipfast.kernels import dependent_launch

        return dependent_launch.supported(device)

    def folded_finalize(self, device: torch.device) -> bool:
        """Whether the padded BatchNorm kernels finalize in their last program on `device` (where the backend says)."""
        return device.type in self.spec.folded_finalize

    def parallel_compile(self, device: torch.device) -> bool:
        """Whether a fast step compiles its Triton kernels side by side before its first call on `device`: where the
        backend says and Triton can (triton.AsyncCompileMode)."""
        if device.type not in self.spec.parallel_compile:
            return False
        from dipfast.kernels import parallel_compile

        return parallel_compile.available()

    def vectorised(self, device: torch.device) -> bool:
        """Whether a fast step of several networks runs them vmapped on `device` (else one after another)."""
        return device.type in self.spec.vectorised

    @contextlib.contextmanager
    def step_math(self):
        """The context of every generator call, the step's backward included: tf32's TF32 switches (around the
        forward alone, the backward's convolutions ran IEEE fp32: 5.5 of the 16.7 ms of an H200's tf32 step in cuDNN's
        FFMA dgrad kernel, bench/results/2026-12-04-h200-504226cc86/profile), and a compiled generator's cache
        settings (AOTAutograd compiles the backward at its first call, and saves both graphs after it)."""
        from dipfast.compile_cache import compile_settings

        tf32 = conv_precision(tf32=True, cudnn_benchmark=None) if self.precision == "tf32" else contextlib.nullcontext()
        with tf32, compile_settings(self.compile):
            yield

    def autocast(self, device: torch.device):
        """The forward's context: bf16 autocast, else nothing (tf32's switches are step_math's)."""
        if self.precision == "bf16":
            # no cast cache: a CUDA graph capture must not keep autocast's cached casts (PyTorch's
            # CUDA-graph notes), and each weight is cast once per forward anyway
            return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()


@contextlib.contextmanager
def variant(name: str, **changes):
    """Within the block, backend `name` runs with these Backend fields changed (plans resolved inside see
    them): the harness's side-by-side variants (dipfast.bench.runs), which restore() does not take."""
    saved = BACKEND_TABLE[name]
    BACKEND_TABLE[name] = dataclasses.replace(saved, **changes)
    try:
        yield
    finally:
        BACKEND_TABLE[name] = saved


def cuda_choices_on_cpu(name: str) -> dict:
    """Backend `name`'s per-device fields with CUDA's choice made for the CPU as well: variant(name, **these) runs on
    a CPU the step that CUDA runs (its block ops, layout, noise draw, rules, launches), for the Triton interpreter's
    instruments and the launch census, which follow the table as the GPU's measurements change it."""
    spec, changes = BACKEND_TABLE[name], {}
    for field in dataclasses.fields(spec):
        where = getattr(spec, field.name)
        if isinstance(where, frozenset):  # the device types where a choice is on
            changes[field.name] = where | {"cpu"} if "cuda" in where else where - {"cpu"}
        elif isinstance(where, dict):  # device type -> a choice; a device type left out takes the default
            changes[field.name] = {k: v for k, v in where.items() if k != "cpu"}
            if "cuda" in where:
                changes[field.name]["cpu"] = where["cuda"]
    return changes


REFERENCE_PLAN = Plan("reference", "fp32", compile=False, cuda_graph=False, fused_adam=False)


@contextlib.contextmanager
def conv_precision(tf32: bool, cudnn_benchmark: bool | None = False):
    """TF32 on or off for cuDNN convolutions and CUDA matmuls (and what reads those flags: the Triton
    kernels, Inductor's conv template), restored afterwards. cudnn_benchmark: cudnn.benchmark inside; None
    leaves it as it is (a step's TF32 switch must not undo the benchmark its CUDA graph's warm-up runs with)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    benchmark = torch.backends.cudnn.benchmark if cudnn_benchmark is None else cudnn_benchmark
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=benchmark, deterministic=False, allow_tf32=tf32):
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
    unverified = None
    if backend == "triton":
        _check_triton_runs(device)
        unverified = _triton_fp32_unverified(device)
    if precision == "auto":
        # where the Triton kernels' fp32 path is unverified, their tensor-core precision
        precision = "bf16" if unverified else auto_precision(device)
    if precision == "bf16" and device.type == "cuda" and not bf16_native(device):
        raise InputError("precision='bf16' needs an Ampere or newer GPU; use precision='fp32' or 'tf32'")
    if unverified and precision == "fp32":
        raise InputError(
            f"backend='triton' with precision='fp32' has not passed parity on {unverified} yet; "
            "use precision='tf32' or 'bf16', or backend='native'"
        )
    return Plan(backend, precision, compile=BACKEND_TABLE[backend].compile, cuda_graph=device.type == "cuda")


def _check_triton_runs(device: torch.device) -> None:
    """backend='triton' where its kernels do not run would be the compile backend in disguise (its blocks falling
    back to torch's ops): refused, with what runs instead."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise InputError("backend='triton' needs the triton package (pip install triton); or use backend='native'")
        return
    from dipfast.kernels.conv_bn_lrelu import kernels_take

    if kernels_take(torch.float32, device):
        return
    raise InputError(
        f"backend='triton' runs its kernels on a CUDA GPU, not on device {device.type!r} (a CPU runs them only in "
        "Triton's interpreter, for tests: TRITON_INTERPRET=1 before dipfast is imported); use backend='native'"
    )


def _triton_fp32_unverified(device: torch.device) -> str | None:
    """The GPU architecture's name where the Triton kernels' fp32 path is unverified (dipfast.kernels.hardware)."""
    from dipfast.kernels.hardware import fp32_unverified_arch

    return fp32_unverified_arch(device)
