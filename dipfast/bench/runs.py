"""One timed fit of any method on one Case, with its PSNR trajectory: the unit every suite is made of.

Methods: the backends of dipfast.api.BACKENDS (through restore(), whatever they are), the
'original-loop' baseline (original_loop.OriginalLoop) and the classical baselines (bicubic,
nlm, bm3d). Times are wall seconds from the call (restore() or the loop's construction) on a
monotonic clock; the trajectory carries, for each iteration, the time of the host read-back that
brought its PSNR: every `report_every` iterations for restore() (its only sync), every iteration
for the original loop (it syncs every iteration). So a time is an upper bound, within one read-back
interval, of when the output first had that PSNR.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dipfast import api, native
from dipfast.bench import baselines
from dipfast.bench.data import Case, psnr
from dipfast.nets import SkipSpec
from dipfast.presets import PRESETS, apply_overrides
from dipfast.tasks import preset_for

ORIGINAL_LOOP = "original-loop"
# the native backend with its C++ ops switched off (dipfast.native.disabled): the same step with the
# eager twins, i.e. eager bf16 + channels_last, which is what the ops are measured against
NATIVE_EAGER = "native-eager"
TINY_NET = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
NET_CHOICES = ("preset", "default", "tiny", *sorted(PRESETS))


def api_backends() -> list[str]:
    """The backends restore() accepts, less 'auto': later backends appear here with no change."""
    return [b for b in api.BACKENDS if b != "auto"]


def api_precisions() -> list[str]:
    return [p for p in api.PRECISIONS if p != "auto"]


def dip_methods() -> list[str]:
    return [*api_backends(), NATIVE_EAGER, ORIGINAL_LOOP]


def backend_of(method: str) -> str:
    """The restore() backend a DIP method runs (all but the original loop)."""
    return "native" if method == NATIVE_EAGER else method


def method_context(method: str):
    """The context a method's restore() call runs in: native-eager switches the C++ ops off."""
    return native.disabled() if method == NATIVE_EAGER else contextlib.nullcontext()


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
    method: str  # a backend, 'original-loop' or a baseline
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
    run.psnr = psnr(image, case.target)
    run.ema_psnr = psnr(ema, case.target) if ema is not None else None
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
    """One fit of `method` on `case`: restore() for the API's backends, the notebook loop for 'original-loop'."""
    overrides = net_overrides(net, case.preset)
    if method == ORIGINAL_LOOP:
        if precision != "fp32":
            raise ValueError(f"the original loop is eager fp32 only; got precision {precision!r}")
        return _run_original(
            case,
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
        },
    )
    return _final(
        run,
        case,
        np.asarray(result.image, dtype=np.float32).reshape(case.target.shape),
        np.asarray(result.ema_image, dtype=np.float32).reshape(case.target.shape),
    )


def _run_original(case: Case, *, iters, seed, device, overrides, time_limit, progress, mode) -> Run:
    from tqdm.auto import tqdm

    from dipfast.bench.original_loop import OriginalLoop

    dev = api.resolve_device(device)
    t0 = time.perf_counter()
    preset = apply_overrides(preset_for(case.task, case.preset, case.scale), {**overrides, "iterations": iters})
    loop = OriginalLoop(
        case.task, preset, case.observed, case.target, case.mask, case.scale, device=dev, seed=seed, t0=t0
    )
    bar = tqdm(total=iters, disable=not progress, unit="it", leave=False, dynamic_ncols=True, desc=ORIGINAL_LOOP)

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
        ORIGINAL_LOOP,
        case.key,
        "fp32",
        seed,
        mode,
        seconds,
        loop.iterations,
        stop_reason="time limit" if loop.iterations < iters else "iterations",
        resolution=1,
        trajectory=_trajectory(loop.rows, 0.0),
        extras={"backend": ORIGINAL_LOOP, "device": str(dev)},
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
