"""One timed fit of any method on one Case, with its PSNR trajectory: the unit every suite is made of.

Methods: the backends of dipfast.api.BACKENDS (through restore(), whatever they are), variants of one
backend ('native-eager', and those of FIELD_VARIANTS: native-nchw, native-cl, native-reference-blocks, ...), the
notebooks' loop twice ('original-loop' as the paper ran it, 'original-loop-tf32' as today's PyTorch runs
the same code: original_loop.OriginalLoop)
and the classical baselines (bicubic, nlm, bm3d). Times are wall seconds from the call (restore() or
the loop's construction) on a monotonic clock; the trajectory carries, for each iteration, the time of
the host read-back that brought its PSNR: every `report_every` iterations for restore() (its only
sync), every iteration for the original loop (it syncs every iteration). So a time is an upper bound,
within one read-back interval, of when the output first had that PSNR.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dipfast import api, backends, native
from dipfast.bench import baselines
from dipfast.bench.data import Case, numpy_psnr
from dipfast.fit_io import START_UP_PARTS
from dipfast.nets import SkipSpec
from dipfast.presets import PRESETS, apply_overrides
from dipfast.tasks import preset_for

ORIGINAL_LOOP = "original-loop"  # IEEE fp32 convolutions, as pytorch 0.4 ran the notebooks
ORIGINAL_LOOP_TF32 = "original-loop-tf32"  # the same code under today's default: TF32 convolutions
ORIGINAL_LOOPS = {ORIGINAL_LOOP: "fp32", ORIGINAL_LOOP_TF32: "tf32"}  # the one precision each runs
# the native backend with its C++ ops switched off (dipfast.native.disabled): the same step with the
# eager twins, i.e. eager bf16 + channels_last, which is what the ops are measured against
NATIVE_EAGER = "native-eager"


# The variants that change Backend fields (backends.variant): name -> (the backend, its changed fields as a
# function of its own), each measured side by side with the backend as it is. The H200 run of 222367b4a8 settled
# the rest (native's padded blocks on CUDA; no aligned channels; NCHW under bf16 on CUDA):
#   native-nchw            NCHW activations where the precision would run channels_last (bf16 on a CPU)
#   native-cl              channels_last under bf16 on every device: 2.6x slower than NCHW on the H200 (legacy cuDNN
#                          dgrad kernels), kept to learn where NHWC loses; on a CPU it is native itself
#   native-reference-blocks  the reference BatchNorm, LeakyReLU and pad ops on CUDA, where native runs the
#                          padded Triton kernels (dipfast.kernels.PaddedBlocks): what they are worth
#   native-aligned         conv channels padded to the tensor cores' multiple (dipfast.nets.aligned_channels): the
#                          132-channel merges, 4-channel skips and 3-channel head; 1.00x on the H200
#   native-packed-parameters  the flat parameter buffers packed, each parameter right after the last, as before
#                          the conv weights started 16-byte aligned (dipfast.flat_parameters.SLOT_ALIGN_BYTES):
#                          18 of the default net's 26 bf16 weights 8 bytes off, the suspect for cuDNN's legacy kernels
#   native-unfused-rules   the rules after the backward (output copy, EMA, backtracking, metrics row, early stopping)
#                          as some 48 torch ops (124 with early stopping), where native runs them in 3 Triton launches
#                          (7) on CUDA (dipfast.kernels.fused_rules)
#   native-pdl             the step's Triton kernels as programmatic dependent launches (Hopper and later: each
#                          scheduled while the one before it drains, dipfast.kernels.dependent_launch)
#   native-folded-finalize the BatchNorm kernels' finalize in the last program of their reduction, not a launch of
#                          its own (dipfast.kernels.channel_sums.folded_finalize): 60 launches fewer an iteration
#   native-parallel-compile  the step's Triton kernels compiled side by side in a pass before its first call
#                          (dipfast.kernels.parallel_compile), not one at a time at their first launches: a cold
#                          start's warm-up (bench/cold_start.py); the same step after it
#   native-per-network     a step of N > 1 networks runs them one after another (N launches a layer), where native
#                          vmaps them on CUDA (grouped convs, one launch a layer; Backend.vectorised): what batching
#                          is worth there; at batch 1 and on a CPU it is native itself
#   compile-forced-layout  Inductor's layout optimisation forced on every graph (Backend.layout_optimization):
#                          its own rule leaves the backward graph NCHW while the forward runs channels_last
#   compile-nchw           compile with NCHW activations under bf16 and Inductor's layout optimisation off (its own
#                          rule runs the forward's convs channels_last whatever the inputs' layout, on CUDA too), the
#                          layout that made native 2.74x faster on the H200 (compile ran channels_last there: 27.7
#                          ms against native NCHW's 12.0)
#   triton-nchw            the triton backend with NCHW activations under bf16 (its layout before channels_last),
#                          whose conv kernels load one element at a time (sm_90 codegen): what the layout is worth
#   triton-eager           the triton backend without torch.compile: native's eager step, in its CUDA graph, with the
#                          fused Triton blocks. Inside the graph Inductor can only fuse the glue between the blocks'
#                          custom ops, and its compile costs a cold start a minute: as fast, the eager step is the one
FIELD_VARIANTS = {
    "native-nchw": ("native", lambda b: {"channels_last_bf16": frozenset()}),
    "native-cl": ("native", lambda b: {"channels_last_bf16": frozenset({"cpu", "cuda"})}),
    "native-reference-blocks": ("native", lambda b: {"blocks": {**b.blocks, "cuda": "reference"}}),
    "native-aligned": ("native", lambda b: {"align_channels": frozenset({"cpu", "cuda"})}),
    "native-packed-parameters": ("native", lambda b: {"packed_parameters": frozenset({"cpu", "cuda"})}),
    "native-unfused-rules": ("native", lambda b: {"fused_rules": frozenset()}),
    "native-pdl": ("native", lambda b: {"dependent_launch": frozenset({"cuda"})}),
    "native-folded-finalize": ("native", lambda b: {"folded_finalize": frozenset({"cuda"})}),
    "native-parallel-compile": ("native", lambda b: {"parallel_compile": frozenset({"cuda"})}),
    "native-per-network": ("native", lambda b: {"vectorised": frozenset()}),
    "compile-forced-layout": ("compile", lambda b: {"layout_optimization": True}),
    "compile-nchw": ("compile", lambda b: {"channels_last_bf16": frozenset(), "layout_optimization": False}),
    "triton-nchw": ("triton", lambda b: {"channels_last_bf16": frozenset()}),
    "triton-eager": ("triton", lambda b: {"compile": False}),
}
COMPILE_FORCED_LAYOUT = "compile-forced-layout"  # tests/test_inductor_layout.py runs it by name
VARIANT_BACKEND = {NATIVE_EAGER: "native", **{name: backend for name, (backend, _) in FIELD_VARIANTS.items()}}
VARIANTS = tuple(VARIANT_BACKEND)  # methods that are one backend run another way, timed beside it
TINY_NET = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
NET_CHOICES = ("preset", "default", "tiny", *sorted(PRESETS))


def api_backends() -> list[str]:
    """The backends restore() accepts, less 'auto': later backends appear here with no change."""
    return [b for b in api.BACKENDS if b != "auto"]


def api_precisions() -> list[str]:
    return [p for p in api.PRECISIONS if p != "auto"]


def dip_methods() -> list[str]:
    return [*api_backends(), *VARIANTS, *ORIGINAL_LOOPS]


# What a suite leaves out on a device unless asked for by name (--backend, --precision, --configs) or by 'all':
# on a CPU, compile (and its variants) and triton spend minutes compiling in every cold run (Triton runs there
# only in its interpreter), tf32 computes IEEE fp32 (a CPU has no TF32), so its runs would repeat the fp32 ones,
# native-cl, native-reference-blocks, native-unfused-rules, native-pdl, native-folded-finalize,
# native-parallel-compile and native-per-network are native itself there, and native-aligned and
# native-packed-parameters are about CUDA's tensor cores.
NOT_BY_DEFAULT = {
    "cpu": {
        "methods": (
            "compile",
            "triton",
            ORIGINAL_LOOP_TF32,
            *(v for v, (backend, _) in FIELD_VARIANTS.items() if backend in ("compile", "triton")),
            "native-cl",
            "native-reference-blocks",
            "native-aligned",
            "native-packed-parameters",
            "native-unfused-rules",
            "native-pdl",
            "native-folded-finalize",
            "native-parallel-compile",
            "native-per-network",
        ),
        "precisions": ("tf32",),
    }
}


def default_methods(device_type: str) -> list[str]:
    """The methods a suite runs on `device_type` ('cpu', 'cuda') when --backend is not given."""
    left_out = NOT_BY_DEFAULT.get(device_type, {}).get("methods", ())
    return [m for m in dip_methods() if m not in left_out]


def default_precisions(device_type: str) -> list[str]:
    """The precisions a suite runs on `device_type` when --precision is not given."""
    left_out = NOT_BY_DEFAULT.get(device_type, {}).get("precisions", ())
    return [p for p in api_precisions() if p not in left_out]


def combinations(methods: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """The (method, precision) runs of methods x precisions: the pairs some method runs."""
    return [(m, p) for m in methods for p in precisions if applies(m, p)]


def applies(method: str, precision: str) -> bool:
    """Whether a method x precision pair is a measurement: each original loop runs its one precision."""
    return ORIGINAL_LOOPS.get(method, precision) == precision


def backend_of(method: str) -> str:
    """The restore() backend a DIP method runs (all but the original loops)."""
    return VARIANT_BACKEND.get(method, method)


# Backend fields that change only a step of N > 1 networks: at batch 1 their variants run the backend itself
BATCH_FIELDS = frozenset({"vectorised"})
# Backend field values that leave work out of a cold start (torch.compile's minute): a variant setting only these is
# worth adopting where it runs as fast as its backend, within noise, not only where it runs faster
QUICKER_START = {"compile": False}


def variant_fields(method: str) -> dict:
    """The Backend fields a variant of FIELD_VARIANTS runs with that differ from its backend's as they stand: what
    adopting the variant would set (empty for anything else)."""
    if method not in FIELD_VARIANTS:
        return {}
    backend, changes = FIELD_VARIANTS[method]
    spec = backends.BACKEND_TABLE[backend]
    return {name: value for name, value in changes(spec).items() if getattr(spec, name) != value}


def method_context(method: str):
    """The context a method's restore() call runs in: native-eager switches the C++ ops off, a variant of
    FIELD_VARIANTS changes its backend's fields, anything else runs as it is."""
    if method == NATIVE_EAGER:
        return native.disabled()
    if method in FIELD_VARIANTS:
        backend, changes = FIELD_VARIANTS[method]
        return backends.variant(backend, **changes(backends.BACKEND_TABLE[backend]))
    return contextlib.nullcontext()


def net_overrides(choice: str | None, case_preset: str) -> dict:
    """restore() overrides that swap the case's network: 'preset' (none), 'default', 'tiny' or a preset's net."""
    if choice in (None, "preset"):
        return {}
    if choice == "default":
        net, depth = SkipSpec(), 32
    elif choice == "tiny":
        net, depth = TINY_NET, 4
    elif choice in PRESETS:
        net, depth = PRESETS[choice].net, PRESETS[choice].input_depth
    else:
        raise ValueError(f"unknown net {choice!r}; valid: {list(NET_CHOICES)}")
    overrides = {"net": net}
    if PRESETS[case_preset].input == "noise":  # meshgrid and guide inputs fix the depth
        overrides["input_depth"] = depth
    return overrides


@dataclass
class Run:
    method: str  # a backend (or a variant), an original loop or a baseline
    case: str  # Case.key
    precision: str | None = None
    seed: int | None = None
    mode: str = "warm"  # 'warm' (in this process, after a warm-up run), 'cold' (a fresh process) or 'first'
    seconds: float = math.nan  # from the call to the return, final output included
    iterations: int = 0
    its: float = math.nan  # iterations / seconds of the whole call
    stop_reason: str = "iterations"
    resolution: int = 1  # iterations per host read-back (the time resolution of the trajectory)
    psnr: float | None = None  # the final output vs the target: all pixels and channels, data range 1
    ema_psnr: float | None = None
    trajectory: dict = field(default_factory=dict)  # iteration, seconds, psnr, ema_psnr, fell_back lists
    extras: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # (H, W, C) float32; not in the JSON
    ema_image: np.ndarray | None = None

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("image")
        d.pop("ema_image")
        return d

    @classmethod
    def from_summary(cls, d: dict) -> Run:
        return cls(**d)


def _trajectory(rows, offset: float) -> dict:
    return {
        "iteration": [r.iteration for r in rows],
        "seconds": [r.seconds + offset for r in rows],
        "psnr": [r.psnr for r in rows],
        "ema_psnr": [r.ema_psnr for r in rows],
        "fell_back": [r.fell_back for r in rows],
    }


def _final(run: Run, case: Case, image: np.ndarray, ema: np.ndarray | None) -> Run:
    run.image, run.ema_image = image, ema
    run.psnr = numpy_psnr(image, case.target)
    run.ema_psnr = numpy_psnr(ema, case.target) if ema is not None else None
    run.its = run.iterations / run.seconds if run.seconds > 0 else math.nan
    return run


def run_dip(
    case: Case,
    method: str,
    precision: str = "fp32",
    *,
    iters: int,
    seed: int = 0,
    device="auto",
    report_every: int = 10,
    net: str | None = None,
    time_limit: float | None = None,
    progress: bool = False,
    mode: str = "warm",
) -> Run:
    """One fit of `method` on `case`: restore() for the API's backends, the notebook loop for the original loops."""
    overrides = net_overrides(net, case.preset)
    if method in ORIGINAL_LOOPS:
        if not applies(method, precision):
            raise ValueError(f"{method} runs precision {ORIGINAL_LOOPS[method]!r} only; got {precision!r}")
        return _run_original(
            case,
            method,
            iters=iters,
            seed=seed,
            device=device,
            overrides=overrides,
            time_limit=time_limit,
            progress=progress,
            mode=mode,
        )
    t0 = time.perf_counter()
    offsets = []

    def callback(p) -> bool:
        now = time.perf_counter() - t0
        offsets.append(now - p.seconds)  # restore()'s set-up before the engine's clock starts
        return time_limit is not None and now > time_limit

    with method_context(method):
        result = api.restore(
            case.observed,
            **case.restore_kwargs(),
            iters=iters,
            seed=seed,
            device=device,
            precision=precision,
            backend=backend_of(method),
            progress=progress,
            callback=callback,
            report_every=report_every,
            **overrides,
        )
    seconds = time.perf_counter() - t0
    run = Run(
        method,
        case.key,
        result.precision,
        seed,
        mode,
        seconds,
        result.iterations,
        stop_reason="time limit" if result.stop_reason == "callback" else result.stop_reason,
        resolution=report_every,
        trajectory=_trajectory(result.history, min(offsets) if offsets else 0.0),
        extras={
            "backend": result.backend,
            "device": result.device,
            "loop_its": result.its,
            "restore_psnr": result.psnr,
            "restore_ema_psnr": result.ema_psnr,
            # set-up + the first iteration, and the start-up's parts: compilation, autotune, the graph capture
            "first_step_seconds": result.extras.get("first_step_seconds"),
            **{key: result.extras[key] for key in START_UP_PARTS.values() if key in result.extras},
        },
    )
    return _final(
        run,
        case,
        np.asarray(result.image, dtype=np.float32).reshape(case.target.shape),
        np.asarray(result.ema_image, dtype=np.float32).reshape(case.target.shape),
    )


def _run_original(case: Case, method: str, *, iters, seed, device, overrides, time_limit, progress, mode) -> Run:
    from tqdm.auto import tqdm

    from dipfast.bench.original_loop import OriginalLoop

    dev = api.resolve_device(device)
    t0 = time.perf_counter()
    preset = apply_overrides(preset_for(case.task, case.preset, case.scale), {**overrides, "iterations": iters})
    loop = OriginalLoop(
        case.task,
        preset,
        case.observed,
        case.target,
        case.mask,
        case.scale,
        device=dev,
        seed=seed,
        t0=t0,
        tf32=method == ORIGINAL_LOOP_TF32,
    )
    bar = tqdm(total=iters, disable=not progress, unit="it", leave=False, dynamic_ncols=True, desc=method)

    def on_step(done: int) -> bool:
        bar.update(1)
        return time_limit is not None and time.perf_counter() - t0 > time_limit

    with bar:  # the loop marks its own NVTX phases
        loop.run(iters, on_step)
    image = loop.final_output()[0].permute(1, 2, 0).cpu().numpy()
    ema = loop.out_avg[0].permute(1, 2, 0).cpu().numpy() if loop.out_avg is not None else None
    loop.close()
    seconds = time.perf_counter() - t0
    run = Run(
        method,
        case.key,
        ORIGINAL_LOOPS[method],
        seed,
        mode,
        seconds,
        loop.iterations,
        stop_reason="time limit" if loop.iterations < iters else "iterations",
        resolution=1,
        trajectory=_trajectory(loop.rows, 0.0),
        extras={"backend": method, "device": str(dev)},
    )
    return _final(run, case, image.astype(np.float32), None if ema is None else ema.astype(np.float32))


def run_baseline(case: Case, name: str) -> Run:
    """A classical baseline on `case`: one output, timed (a single point on the PSNR-time plot)."""
    t0 = time.perf_counter()
    image = baselines.run(name, case.observed, case.target.shape)
    seconds = time.perf_counter() - t0
    run = Run(
        name, case.key, None, None, "first", seconds, 0, resolution=0, extras={"settings": baselines.settings(name)}
    )
    run = _final(run, case, image, None)
    run.its = math.nan
    run.trajectory = {
        "iteration": [0],
        "seconds": [seconds],
        "psnr": [run.psnr],
        "ema_psnr": [None],
        "fell_back": [False],
    }
    return run


def cuda_sync(device) -> None:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
