"""restore() of one image in tiles: each tile its own DIP, the tiles trained side by side in chunks
of `per_step` networks (one multi-network step), the outputs and EMA outputs blended (dipfast.tiles).

Tile k of restart r is seeded tiles.tile_seed(seed + r, k), so a tile's fit is the fit of its crop
alone with that seed, whichever tiles share its step. Super-resolution tiles the low-resolution
input and blends at scale; inpaint and restore need known pixels in every tile; flash crops the
guide with the image.

With early stopping (stop='auto') each tile is one network of the criterion: it stops on its own
and contributes its output at its own detected point, so a flat tile of sky can stop long before
a tile of foliage; a step ends when all of its tiles have stopped.

What the Result holds: image, ema_image, psnr, ema_psnr and ssim of the blended whole (target=
is compared with the blended image). history: per iteration, the tiles' losses and MSEs
(from their PSNRs against their crops of the target) and criteria averaged with each tile's
share of the blended image, a tile that stopped early holding its last row; tiles fitted in
different steps are never blended at the same iteration, so these rows track the fit, and the
final psnr is the blended image's. iterations: the most any tile ran; stop_reason 'early-stop'
when every tile stopped early; stop_iteration: the latest of the tiles' detected points.
extras['tiling']: the tile side, overlap, grid, tiles per step, each tile's box and seed, the
tiles not fitted, tile_iterations (the iterations of all tiles together) and, with early
stopping, stop_iterations[r][k] (restart r, tile k: its detected point) and, with the noise gate,
noise_sigmas[k] (tile k's noise estimate).
Ctrl-C or a callback's True stops the run: tiles not fitted yet keep the observation itself
(super-resolution: its bicubic upsampling), listed in extras['tiling']['unfitted']. A step of tiles that
runs out of the device's memory all the same (the estimate chose how many share it) runs again with half
as many, down to one, with a notice (the same fits: their seeds are the tiles'; a callback sees the failed
step's iterations too); a single tile that runs out raises DeviceMemoryError.
"""

from __future__ import annotations

import gc
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipfast import engine, images, memory
from dipfast.early_stop import EarlyStopSpec
from dipfast.errors import InputError
from dipfast.fit_io import load_mask, problem_of, result_of
from dipfast.tasks import Task
from dipfast.tile_choice import TileChoice
from dipfast.tiles import Blend, TileGrid, largest_empty_square, tile_seed

_log = logging.getLogger("dipfast")


def _whole(value, name: str, shape: tuple[int, ...], what: str) -> torch.Tensor | None:
    if value is None:
        return None
    t, _, _ = images.to_tensor(value, name)
    if t.shape[-2:] != shape[-2:] or (len(shape) == 3 and t.shape != shape):
        raise InputError(f"{name} is {tuple(t.shape)} (C, H, W) but {what} is {shape}; give it at that size")
    return t


def _check_holes(m: torch.Tensor, grid: TileGrid) -> None:
    known = m.bool().any(0)
    for k, box in enumerate(grid.boxes):
        if not box.crop(known).any():
            need = largest_empty_square(known.numpy()) + 1
            raise InputError(
                f"tile {k} at ({box.y}, {box.x}), {box.h} x {box.w}, lies inside a hole of the mask (no known pixel); "
                f"the largest hole needs tiles of at least {need} px: pass tile={need} or more (or tile=None)"
            )


def _history(rows_per_tile: list[list[engine.HistoryRow]], shares: np.ndarray, offsets: list[float]):
    """Per iteration: loss, MSE (hence PSNR) and criterion of the tiles, averaged by their share of the
    image; a tile whose history ends first (stopped early, or interrupted) holds its last row."""
    rows_per_tile = [rows for rows in rows_per_tile if rows]
    if not rows_per_tile:  # a restart stopped before any of its tiles
        return []
    longest = max(rows_per_tile, key=len)
    n = len(longest)
    held = [rows + [rows[-1]] * (n - len(rows)) for rows in rows_per_tile]
    shares = shares / shares.sum()

    def column(name):
        values = [[getattr(row, name) for row in rows] for rows in held]
        return None if any(v is None for vs in values for v in vs) else np.array(values, dtype=np.float64)

    loss = shares @ column("loss")
    psnrs = [column(name) for name in ("psnr", "ema_psnr")]
    psnr, ema_psnr = (None if p is None else -10 * np.log10(shares @ 10 ** (-p / 10)) for p in psnrs)
    fell_back = column("fell_back").any(0)
    seconds = (column("seconds") + np.array(offsets)[:, None]).max(0)
    criteria = np.array([[np.nan if r.criterion is None else r.criterion for r in rows] for rows in held])
    defined = ~np.isnan(criteria)
    weight = shares[:, None] * defined
    criterion = (weight * np.nan_to_num(criteria)).sum(0) / np.maximum(weight.sum(0), 1e-300)
    return [
        engine.HistoryRow(
            longest[i].iteration,
            float(loss[i]),
            None if psnr is None else float(psnr[i]),
            None if ema_psnr is None else float(ema_psnr[i]),
            bool(fell_back[i]),
            float(seconds[i]),
            float(criterion[i]) if defined[:, i].any() else None,
        )
        for i in range(n)
    ]


def restore_tiled(
    image,
    choice: TileChoice,
    task: Task,
    preset,
    plan,
    device: torch.device,
    seed: int,
    mask,
    guide,
    target,
    scale,
    restarts: int,
    progress: bool,
    callback,
    report_every: int,
    name: str = "image",
    early_stop: EarlyStopSpec | None = None,
):
    """One image through tiles; returns the Result of the blended whole (module docstring)."""
    start = time.perf_counter()
    x0, alpha, form = images.to_tensor(image, name)
    c, h, w = x0.shape
    factor = task.factor(preset, scale)
    out_size = (h * factor, w * factor)
    grid = TileGrid.cover(h, w, choice.tile, choice.overlap)
    out_grid = grid.scaled(factor)
    boxes, out_boxes = grid.boxes, out_grid.boxes
    m = load_mask(mask, h, w) if mask is not None and "mask" in task.inputs else None
    if m is not None:
        _check_holes(m, grid)
    g = _whole(guide, "guide", out_size, f"the image is {h} x {w}") if "guide" in task.inputs else None
    t = _whole(target, "target", (c, *out_size), "the output")
    problems = [
        problem_of(
            task,
            preset,
            box.crop(x0),
            box.crop(m) if m is not None else mask,
            out_box.crop(g) if g is not None else guide,
            out_box.crop(t) if t is not None else None,
            None,
            None,
            scale,
            device,
        )
        for box, out_box in zip(boxes, out_boxes)
    ]
    if early_stop is not None:
        early_stop.validate(preset.iterations, problems[0].out_size)  # every tile has one size

    networks = [(k, r) for k in range(len(grid)) for r in range(restarts)]
    outs = [Blend(out_grid, c) for _ in range(restarts)]
    emas = [Blend(out_grid, c) for _ in range(restarts)]
    fitted: dict[tuple[int, int], tuple[engine.Fit, float]] = {}
    stop_reason = "iterations"
    # summed over the steps (chunks), which run one after another, each set up, warmed up and captured anew
    loop_seconds = setup_seconds = warmup_seconds = capture_seconds = 0.0
    bar = tqdm(
        total=len(networks) * preset.iterations, disable=not progress, unit="tile-it", leave=False, dynamic_ncols=True
    )
    per_step, first, ran_out = choice.per_step, 0, False
    with bar:
        while first < len(networks):
            if ran_out:  # the failed step's tensors went with its error: hand their cached blocks back first
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                ran_out = False
            chunk = networks[first : first + per_step]
            offset = time.perf_counter() - start
            seen = {"done": 0}

            def on_progress(info, chunk=chunk, seen=seen):
                bar.update((info.iteration - seen["done"]) * len(chunk))
                seen["done"] = info.iteration
                return callback(info) if callback is not None else None

            try:
                fits = engine.fit_many(
                    [problems[k] for k, _ in chunk],
                    preset,
                    device=device,
                    seeds=[tile_seed(seed + r, k) for k, r in chunk],
                    progress=False,
                    callback=on_progress,
                    report_every=report_every,
                    plan=plan,
                    early_stop=early_stop,
                )
            except KeyboardInterrupt:
                stop_reason = "interrupted"
                break
            except torch.OutOfMemoryError as error:  # eager or inside the capture (cuda_graph raises it as is)
                if len(chunk) > 1:  # the estimate let more tiles share a step than fit: fewer, the same fits
                    per_step, ran_out = len(chunk) // 2, True
                    bar.update(-seen["done"] * len(chunk))
                    _log.warning(
                        "dipfast: %d tiles in one step ran out of memory on %s; %d per step from here",
                        len(chunk), device, per_step,
                    )  # fmt: skip
                    continue
                size = problems[0].input_shape[1:]
                need = memory.estimate_bytes(preset.net, preset.input_depth, c, size, 1, plan.precision, device,
                                             early_stop)  # fmt: skip
                raise memory.ran_out(error, need, 1, size, plan.precision, device, choice.tile) from error
            loop_seconds += fits[0].loop_seconds
            setup_seconds += fits[0].setup_seconds
            warmup_seconds += fits[0].warmup_seconds
            capture_seconds += fits[0].capture_seconds
            for (k, r), fit in zip(chunk, fits):
                outs[r].add(k, fit.image[0])
                emas[r].add(k, fit.ema_image[0])
                # blended on the host: the tile's device tensors go now, not with the last chunk (on a GPU they add
                # up, 25 MB a 1024 px tile, beside the later chunks that tile_choice sized to the free memory)
                fit.image = fit.ema_image = None
                fitted[k, r] = (fit, offset)
            ended = [fit.stop_reason for fit in fits if fit.stop_reason in ("callback", "interrupted")]
            if ended:  # every fit of the step shares the loop's reason
                stop_reason = ended[0]
                break
            bar.update((preset.iterations - seen["done"]) * len(chunk))  # a step that stopped early: its rest
            first += len(chunk)
    if stop_reason == "iterations" and fitted and all(fit.early_stopped for fit, _ in fitted.values()):
        stop_reason = "early-stop"
    if not fitted:
        raise KeyboardInterrupt  # interrupted before any tile's first step: nothing to return

    unfitted = sorted({k for k, r in networks if (k, r) not in fitted})
    for k, r in networks:
        if (k, r) not in fitted:
            obs = boxes[k].crop(x0)
            if factor > 1:
                obs = F.interpolate(obs[None], scale_factor=factor, mode="bicubic", align_corners=False)[0].clamp(0, 1)
            outs[r].add(k, obs)
            emas[r].add(k, obs)

    shares = np.array([float(wt.sum()) for wt in outs[0].weights])
    seconds = time.perf_counter() - start
    whole_fits = []
    for r in range(restarts):
        mine = [(k, fitted[k, r]) for k in range(len(grid)) if (k, r) in fitted]
        fits_r = [fit for _, (fit, _) in mine]
        detected = [f.stop_iteration for f in fits_r if f.stop_iteration is not None]
        whole_fits.append(
            engine.Fit(
                image=outs[r].image[None],
                ema_image=emas[r].image[None],
                history=_history([f.history for f in fits_r], shares[[k for k, _ in mine]], [o for _, (_, o) in mine]),
                iterations=max((f.iterations for f in fits_r), default=0),
                seconds=seconds,
                loop_seconds=loop_seconds,
                stop_reason=stop_reason,
                stop_iteration=max(detected, default=None),
                first_step_seconds=fits_r[0].first_step_seconds if fits_r else 0.0,
                setup_seconds=setup_seconds,
                warmup_seconds=warmup_seconds,
                capture_seconds=capture_seconds,
            )
        )
    whole = engine.Problem(input_shape=(0, 0, 0), z=None, out_size=out_size, n_channels=c, target=_batched(t))
    result = result_of(task, preset, plan, device, seed, (x0, alpha, form), whole, whole_fits)
    tile_iterations = sum(fit.iterations for fit, _ in fitted.values())
    result.extras["tiling"] = {
        "tile": choice.tile,
        "overlap": choice.overlap,
        "grid": (len(grid.rows), len(grid.cols)),
        "per_step": per_step,  # choice.per_step, or fewer where a step of them ran out of memory
        "boxes": [(b.y, b.x, b.h, b.w) for b in boxes],
        "seeds": [tile_seed(seed, k) for k in range(len(grid))],  # restart r: tile_seed(seed + r, k)
        "unfitted": unfitted,
        "tile_iterations": tile_iterations,
        "tile_its": tile_iterations / result.seconds if result.seconds > 0 else math.nan,
    }
    if early_stop is not None:
        result.extras["tiling"]["stop_iterations"] = [
            [fitted[k, r][0].stop_iteration if (k, r) in fitted else None for k in range(len(grid))]
            for r in range(restarts)
        ]
    if early_stop is not None and early_stop.noise_gate > 0:  # each tile's own estimate (restart 0's fits)
        sigmas = [fitted[k, 0][0].noise_sigma if (k, 0) in fitted else None for k in range(len(grid))]
        result.extras["tiling"]["noise_sigmas"] = sigmas
    if unfitted:
        result.extras["tiling"]["note"] = (
            f"{len(unfitted)} of {len(grid)} tiles were not fitted ({stop_reason}): they hold the observation itself"
        )
    return result


def restore_all(
    inputs, batch: bool, choice, masks, guides, targets, task, preset, plan, device, seed, scale, *rest, early_stop
) -> list:
    """restore_tiled for each image of a restore() call; rest: restarts, progress, callback, report_every."""
    return [
        restore_tiled(
            image,
            choice,
            task,
            preset,
            plan,
            device,
            seed,
            masks[k],
            guides[k],
            targets[k],
            scale,
            *rest,
            name=f"image[{k}]" if batch else "image",
            early_stop=early_stop,
        )
        for k, image in enumerate(inputs)
    ]


def _batched(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[None]
