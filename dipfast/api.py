"""dipfast.restore(): normalise the inputs, build the task's problems (fit_io), run the engine, hand back.

Every argument is validated here, once, with an InputError (a ValueError) or InputTypeError
that names the argument, what was expected and what came; the engine holds no checks.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable

import torch

from dipfast import backends, early_stop, engine, images, memory, tile_choice
from dipfast.backends import BACKENDS, BATCHED_BACKENDS, PRECISIONS  # noqa: F401  (re-exported: the harness lists them)
from dipfast.early_stop import STOPS, EarlyStopSpec
from dipfast.errors import GraphCaptureError, InputError, InputTypeError
from dipfast.fit_io import Result, problem_of, result_of
from dipfast.presets import SR_SCALES, TaskPreset, apply_overrides
from dipfast.tasks import TASKS, Task, preset_for, task_named


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but this torch sees no CUDA GPU; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'")
    return dev


def restore(
    image,
    task: str = "denoise",
    *,
    mask=None,
    scale: int | None = None,
    guide=None,
    target=None,
    iters: int | None = None,
    preset: str | None = None,
    seed: int = 0,
    device="auto",
    precision: str = "auto",
    backend: str = "auto",
    progress: bool = True,
    callback: Callable[[engine.Progress], bool | None] | None = None,
    operator: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    report_every: int = 25,
    restarts: int = 1,
    tile: int | str | None = "auto",
    overlap: int | None = None,
    stop: str | None = None,
    early_stop: EarlyStopSpec | None = None,
    **overrides,
) -> Result | list[Result]:
    """Restore `image` with Deep Image Prior.

    image: the corrupted observation (path, PIL, numpy (H, W[, C]) or tensor ([1,] C, H, W)).
    task: 'denoise', 'jpeg', 'sr' (scale= 2, 4 or 8; image is the low-resolution input),
        'inpaint' and 'restore' (mask= of the image's size, nonzero = known pixel), 'enhance',
        'flash' (guide= the flash image; image is the no-flash one) or 'custom'.
    mask, guide, target: image-likes; target (the ground truth) adds PSNR and SSIM.
    iters, preset, **overrides: the preset (presets.PRESETS) and its fields, e.g. lr=0.001.
    operator: a differentiable A; the fit minimises ||A(x) - image||^2, x of size image x scale.
    loss: a callable of the generated image x (1, C, H, W) returning a scalar; replaces the data term.
        operator and loss must be pure tensor functions: on CUDA the fast backends capture the step in a CUDA
        graph, which replays their tensor ops without calling them again.
    callback: called with an engine.Progress every `report_every` iterations; True stops the run.
    Ctrl-C stops the run and returns the result so far.
    tile: 'auto' (tiles only where the whole fit would not fit the device's memory), an int (square tiles
        of that side, trained side by side and blended) or None (never tile); overlap: pixels shared by
        neighbouring tiles (default tile // 8). See dipfast.tiled_restore.
    stop: 'iterations' (the preset's fixed count, as the paper) or 'auto' (early stopping without ground
        truth, dipfast.early_stop: each fit stops where its outputs start to fit the noise and returns
        the output of that point, Result.stop_iteration; iters is the upper bound; in tiles, each tile
        stops on its own). None: the task's default (early_stop.DEFAULT_STOP: 'auto' for denoise), or
        'iterations' where 'auto' cannot act (fewer iterations than its window).
    early_stop: an EarlyStopSpec for stop='auto' instead of the task's calibrated rule (early_stop.CALIBRATED).

    >>> import numpy as np, dipfast
    >>> noisy = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    >>> r = dipfast.restore(noisy, iters=2, progress=False, net=dipfast.nets.SkipSpec(channels_down=(4, 4),
    ...                     channels_up=(4, 4), channels_skip=(2, 2)), input_depth=4)
    >>> r.image.shape, r.image.dtype, r.iterations
    ((32, 32, 3), dtype('float32'), 2)
    """
    called = time.perf_counter()
    task = task_named(task)
    preset_obj = _settings(task, preset, scale, iters, overrides)
    stop_rule = stop_rule_of(task, stop, early_stop, preset_obj.iterations)
    dev = resolve_device(device)
    plan = backends.resolve(backend, precision, dev)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer; got {seed!r}")
    seed = int(seed)
    if not isinstance(restarts, numbers.Integral) or isinstance(restarts, bool) or restarts <= 0:
        raise InputError(f"restarts must be a positive integer; got {restarts!r}")
    if not isinstance(report_every, int) or report_every <= 0:
        raise InputError(f"report_every must be a positive integer; got {report_every!r}")
    for name, fn in (("callback", callback), ("operator", operator), ("loss", loss)):
        if fn is not None and not callable(fn):
            raise InputTypeError(f"{name} must be callable; got {type(fn).__name__}")

    batch = isinstance(image, (list, tuple))
    inputs = list(image) if batch else [image]
    if not inputs:
        raise InputError("image is an empty list; give one image or a list of images")
    named = [("mask", mask), ("guide", guide), ("target", target)]
    masks, guides, targets = (_per_image(name, value, len(inputs), batch) for name, value in named)
    custom = operator is not None or loss is not None
    tiling = tile_choice.choose(inputs, task, preset_obj, plan, dev, tile, overlap, restarts, scale, custom, stop_rule)
    if tiling is not None:  # every image of the call in tiles of one size (the memory check is done)
        from dipfast.tiled_restore import restore_all

        common = (task, preset_obj, plan, dev, seed, scale, restarts, progress, callback, report_every)
        prepared = time.perf_counter() - called
        results = restore_all(inputs, batch, tiling, masks, guides, targets, *common, early_stop=stop_rule)
        results = _with_prepare(results, prepared)
        return results if batch else results[0]
    observed, problems = [], []
    for k, img in enumerate(inputs):
        x0, alpha, form = images.to_tensor(img, f"image[{k}]" if batch else "image")
        observed.append((x0, alpha, form))
        problems.append(problem_of(task, preset_obj, x0, masks[k], guides[k], targets[k], operator, loss, scale, dev))
        if stop_rule is not None:
            stop_rule.validate(preset_obj.iterations, problems[-1].out_size)

    # Same-size problems share one step (fast backends); each restart is one more network.
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    for k, problem in enumerate(problems):
        key = (problem.input_shape, problem.out_size, problem.n_channels)
        buckets.setdefault(key, []).extend((k, r) for r in range(restarts))
    fits: dict[tuple[int, int], engine.Fit] = {}
    estimates: dict[int, int] = {}  # image -> bytes, memory's estimate of the step (all its networks) that fits it
    prepared = time.perf_counter() - called
    for (input_shape, _, n_channels), members in buckets.items():
        n_networks = len(members) if plan.fast else 1
        need = memory.check_fits(
            preset_obj.net, input_shape[0], n_channels, input_shape[1:], n_networks, plan.precision, dev, stop_rule
        )
        estimates.update((k, need) for k, _ in members)
        try:
            done = engine.fit_many(
                [problems[k] for k, _ in members],
                preset_obj,
                device=dev,
                seeds=[seed + r for _, r in members],
                progress=progress,
                callback=callback,
                report_every=report_every,
                plan=plan,
                early_stop=stop_rule,
            )
        except torch.OutOfMemoryError as error:
            raise memory.ran_out(error, need, n_networks, input_shape[1:], plan.precision, dev) from error
        except GraphCaptureError as error:
            if not custom:
                raise
            raise InputError(
                f"operator= or loss= could not be captured in a CUDA graph ({error.reason}): "
                "it must be a pure tensor function (no .item(), .cpu(), printing or Python-side state); "
                "or pass backend='reference', which runs without a graph"
            ) from error
        fits.update(zip(members, done))

    results = [
        result_of(task, preset_obj, plan, dev, seed, observed[k], problems[k], [fits[k, r] for r in range(restarts)])
        for k in range(len(inputs))
    ]
    results = _with_prepare(results, prepared)
    for k, result in enumerate(results):  # beside the peak a GPU measures (dipfast bench throughput)
        result.extras["memory_estimate_mib"] = estimates[k] / memory.MIB
    return results if batch else results[0]


def _with_prepare(results: list[Result], seconds: float) -> list[Result]:
    """Each result with the seconds from the call to its first fit: the checks, the conversions, the tile and
    memory choice (the start-up's first part; Fit's set-up, warm-up and capture follow)."""
    for result in results:
        result.extras["prepare_seconds"] = seconds
    return results


def _per_image(name: str, value, n: int, batch: bool) -> list:
    """One mask/guide/target per image: a list of n for a batch, or the one value for every image."""
    if batch and isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"{name} is a list of {len(value)} for {n} images; give one per image, or one for all")
        return list(value)
    return [value] * n


def stop_rule_of(task: Task, stop, spec, iterations: int) -> EarlyStopSpec | None:
    """The early-stopping rule restore(stop=, early_stop=) runs for `task` with `iterations` as the upper
    bound, or None for the fixed count. An explicit 'auto' (or a spec) that cannot act is an InputError;
    the task's default falls back to the fixed count there."""
    if stop is not None and (not isinstance(stop, str) or stop not in STOPS):
        raise InputError(f"unknown stop {stop!r}; valid: {list(STOPS)}")
    if spec is not None and not isinstance(spec, EarlyStopSpec):
        raise InputTypeError(f"early_stop must be a dipfast.early_stop.EarlyStopSpec; got {type(spec).__name__}")
    if spec is not None and stop == "iterations":
        raise InputError("early_stop= is the rule of stop='auto'; drop it, or give stop='auto'")
    explicit = stop == "auto" or spec is not None
    if not explicit and (stop == "iterations" or early_stop.default_stop(task.name) == "iterations"):
        return None
    rule = spec if spec is not None else early_stop.calibrated(task.name)
    try:
        rule.validate(iterations)
    except InputError:
        if explicit:
            raise
        return None  # too few iterations for the default rule to act: the fixed count
    return rule


def _settings(task: Task, preset, scale, iters, overrides) -> TaskPreset:
    if scale is not None and task.scale == "none":
        takes = [t.name for t in TASKS.values() if t.scale != "none"]
        raise InputError(f"scale= applies to task {' or '.join(map(repr, takes))}; task {task.name!r} takes none")
    if task.scale == "preset" and scale is not None and (isinstance(scale, bool) or scale not in SR_SCALES):
        raise InputError(f"SR scale must be one of {list(SR_SCALES)}; got {scale!r}")
    chosen = preset_for(task.name, preset, scale if task.scale == "preset" else None)
    if task.scale == "preset" and scale is not None and chosen.scale != scale:
        raise InputError(f"preset {preset!r} is for scale {chosen.scale}, not {scale}")
    if iters is not None:
        if "iterations" in overrides:
            raise InputError("give iters= or iterations=, not both")
        overrides = {**overrides, "iterations": iters}
    if "iterations" in overrides:
        n = overrides["iterations"]
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
            raise InputError(f"iterations must be a positive integer; got {n!r}")
        overrides["iterations"] = int(n)
    return apply_overrides(chosen, overrides)
