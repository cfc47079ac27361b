"""A fit's input and output: restore()'s arguments made into an engine.Problem (the task's observation, operator,
generator input and output size, every input checked), and the engine's Fits made into the Result it returns.
restore() and tiled_restore (one Problem per tile, one Result of the blend) both build on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dipfast import engine, images, nets
from dipfast.errors import InputError
from dipfast.metrics import psnr as psnr_metric
from dipfast.metrics import ssim as ssim_metric
from dipfast.presets import TaskPreset
from dipfast.tasks import IMAGE_INPUTS, Observation, Task, tasks_taking

# The start-up's parts in a Result's extras, in the order they happen, each where it happened: restore()'s
# checks, conversions, tile and memory choice before the first fit (api.restore); the fit's networks built and
# moved and its step made; on CUDA the eager iterations before the graph (cuDNN's search, the Triton kernels'
# compilation or cache load) and the graph's capture (engine.Fit). first_step_seconds spans the set-up and the
# first iteration.
START_UP_PARTS = {
    "prepare": "prepare_seconds",
    "set-up": "setup_seconds",
    "warm-up": "warmup_seconds",
    "capture": "capture_seconds",
}


@dataclass
class Result:
    """What restore() returns. Images come back in the input's own form (type, layout, dtype)."""

    image: object  # the final output (the notebooks' "result": one more forward)
    ema_image: object  # the exponential moving average of the outputs (0.99)
    psnr: float | None  # of .image against target=, all pixels and channels, data range 1
    ema_psnr: float | None
    ssim: float | None
    history: list[engine.HistoryRow]
    iterations: int
    seconds: float
    its: float  # iterations per second of the loop
    stop_reason: str  # 'iterations', 'early-stop', 'callback' or 'interrupted'
    task: str
    settings: TaskPreset
    backend: str
    device: str
    precision: str
    seed: int
    extras: dict = field(default_factory=dict)
    # stop='auto': the detected iteration, whose output .image is (None: stop='iterations', the fixed count)
    stop_iteration: int | None = None

    def __repr__(self) -> str:
        quality = f", psnr={self.psnr:.2f} dB, ema_psnr={self.ema_psnr:.2f} dB" if self.psnr is not None else ""
        detected = f", stop_iteration={self.stop_iteration}" if self.stop_iteration is not None else ""
        return (
            f"Result(task={self.task!r}, iterations={self.iterations}, seconds={self.seconds:.1f}, "
            f"its={self.its:.1f}{quality}, stop_reason={self.stop_reason!r}{detected})"
        )


def load_mask(mask, h: int, w: int) -> torch.Tensor:
    """Any image-like mask -> (1 or C, H, W) float {0, 1}; nonzero (after scaling) means known."""
    if isinstance(mask, torch.Tensor):
        mask = mask.float() if mask.dtype == torch.bool else mask
        mask = mask[None] if mask.dim() == 2 else mask  # (H, W), as operators.bernoulli_mask makes it
    elif hasattr(mask, "dtype") and str(mask.dtype) == "bool":
        mask = mask.astype("float32")
    m, alpha, _ = images.to_tensor(mask, "mask")
    if alpha is not None:
        raise InputError("mask has an alpha channel; give a 1-channel (or RGB) mask, white = known pixel")
    if m.shape[-2:] != (h, w):
        raise InputError(
            f"mask is {m.shape[-2]} x {m.shape[-1]} but the image is {h} x {w}; give a mask of the image's size"
        )
    return (m > 0).float()


def result_of(task, preset_obj, plan, dev, seed, observed, problem, fits: list[engine.Fit]) -> Result:
    """One image's Result; restarts average their outputs (the paper's two-run average)."""
    x0, alpha, form = observed
    out = torch.stack([f.image[0].cpu() for f in fits]).mean(0)
    ema = torch.stack([f.ema_image[0].cpu() for f in fits]).mean(0)
    first = fits[0]
    # the cold-start cost: set-up + first iteration, and its parts (START_UP_PARTS)
    extras = {"first_step_seconds": first.first_step_seconds, "setup_seconds": first.setup_seconds}
    if first.capture_seconds:  # a CUDA graph: its eager warm-up and its capture
        extras["warmup_seconds"] = first.warmup_seconds
        extras["capture_seconds"] = first.capture_seconds
    if len(fits) > 1:
        extras["restarts"] = [
            {
                "seed": seed + r,
                "psnr": f.history[-1].psnr,
                "ema_psnr": f.history[-1].ema_psnr,
                "stop_iteration": f.stop_iteration,
            }
            for r, f in enumerate(fits)
        ]
    if first.gate_opened is not None:  # stop='auto' with the noise gate (denoising)
        extras["noise_sigma"] = first.noise_sigma
        extras["noise_gate_opened"] = all(f.gate_opened for f in fits)
    if task.finish is not None:
        out, ema, finished = task.finish(out, ema, x0)
        extras.update({k: images.from_tensor(v, alpha, form) for k, v in finished.items()})
    result_psnr = result_ema_psnr = result_ssim = None
    if problem.target is not None:
        tgt = problem.target[0].cpu()
        result_psnr = float(psnr_metric(out, tgt))
        result_ema_psnr = float(psnr_metric(ema, tgt))
        if min(problem.out_size) >= 3:
            result_ssim = ssim_metric(out, tgt)
    return Result(
        image=images.from_tensor(out, alpha, form),
        ema_image=images.from_tensor(ema, alpha, form),
        psnr=result_psnr,
        ema_psnr=result_ema_psnr,
        ssim=result_ssim,
        history=first.history,
        iterations=first.iterations,
        seconds=first.seconds,
        its=first.iterations / first.loop_seconds if first.loop_seconds > 0 else math.nan,
        stop_reason=first.stop_reason,
        task=task.name,
        settings=preset_obj,
        backend=plan.backend,
        device=str(dev),
        precision=plan.precision,
        seed=seed,
        extras=extras,
        stop_iteration=first.stop_iteration,
    )


def problem_of(
    task: Task, preset: TaskPreset, x0, mask, guide, target, operator, loss, scale, device
) -> engine.Problem:
    """The engine.Problem of one image x0 (C, h, w): the task's observation, operator, generator input and output
    size, every input checked."""
    c, h, w = x0.shape
    factor = task.factor(preset, scale)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
        raise InputError(f"scale must be a positive integer; got {scale!r}")
    if task.name == "custom" and operator is None and loss is None:
        raise InputError("task 'custom' needs operator= or loss=")
    if operator is not None and loss is not None:
        raise InputError("give operator= or loss=, not both")
    out_size = (h * factor, w * factor)
    given = {"mask": mask, "guide": guide}
    for name in IMAGE_INPUTS:
        takes = tasks_taking(name)
        if given[name] is not None and name not in task.inputs:
            raise InputError(f"{name}= applies to task {' or '.join(map(repr, takes))}, not {task.name!r}")
    if "mask" in task.inputs and mask is None:
        raise InputError(
            f"task {task.name!r} needs mask= (--mask FILE on the command; nonzero or white = a known pixel); "
            "dipfast.operators.bernoulli_mask makes a random one"
        )
    m = None
    if mask is not None:
        m = load_mask(mask, h, w)
        if m.shape[0] not in (1, c):
            raise InputError(f"mask has {m.shape[0]} channels for an image of {c}; give 1 or {c}")
        if not m.any():
            raise InputError("mask has no known pixel (all zero); white or nonzero marks the pixels to keep")
    A, observed = task.observe(Observation(x0, m, factor, device))
    if operator is not None:  # the user's A fits the image as given
        A, observed = operator, x0

    if preset.input == "guide":
        if guide is None:
            raise InputError(f"task {task.name!r} needs guide= (--guide FILE on the command: the flash image)")
        g, _, _ = images.to_tensor(guide, "guide")
        if g.shape[-2:] != out_size:
            raise InputError(
                f"guide is {g.shape[-2]} x {g.shape[-1]} but the image is {h} x {w}; give images of one size"
            )
        if g.shape[0] != preset.input_depth:
            raise InputError(f"guide has {g.shape[0]} channels; this preset takes {preset.input_depth} (input_depth)")

    depth = preset.input_depth
    if preset.input == "meshgrid" and depth != 2:
        raise InputError(f"the meshgrid input has 2 channels; got input_depth={depth}")
    work_h, work_w = nets.working_size(preset.net, depth, *out_size)
    z = None  # U[0, 0.1) noise, drawn by the engine right after the network, as in the original
    if preset.input == "guide":
        pad_h, pad_w = work_h - out_size[0], work_w - out_size[1]
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        mode = "reflect" if max(pads) < min(out_size) else "replicate"
        z = torch.nn.functional.pad(g[None], pads, mode=mode) if any(pads) else g[None]
    elif preset.input == "meshgrid":
        z = nets.meshgrid_input(work_h, work_w)

    tgt = None
    if target is not None:
        t, _, _ = images.to_tensor(target, "target")
        if t.shape != (c, *out_size):
            raise InputError(
                f"target is {tuple(t.shape)} (C, H, W) but the output will be {(c, *out_size)}; "
                "give the ground truth at the output size"
            )
        tgt = t[None]
    return engine.Problem(
        input_shape=(depth, work_h, work_w),
        z=z,
        out_size=out_size,
        n_channels=c,
        y=observed[None] if loss is None else None,
        operator=A,
        loss=loss,
        target=tgt,
    )
