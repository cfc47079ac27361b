"""restore() of one image in tiles: each tile its own DIP, the tiles trained side by side in chunks
of `per_step` networks (one multi-network step), the outputs and EMA outputs blended (dipfast.tiles).

Tile k of restart r is seeded tiles.tile_seed(seed + r, k), so a tile's fit is the fit of its crop
alone with that seed, whichever tiles share its step. Super-resolution tiles the low-resolution
input and blends at scale; inpaint and restore need known pixels in every tile; flash crops the
guide with the image.

What the Result holds: image, ema_image, psnr, ema_psnr and ssim of the blended whole (target=
is compared with the blended image). history: per iteration, the tiles' losses and MSEs
(from their PSNRs against their crops of the target) averaged with each tile's share of the
blended image; tiles fitted in different steps are never blended at the same iteration, so
these rows track the fit, and the final psnr is the blended image's. extras['tiling']: the
tile side, overlap, grid, tiles per step, each tile's box and seed, and the tiles not fitted.
Ctrl-C or a callback's True stops the run: tiles not fitted yet keep the observation itself
(super-resolution: its bicubic upsampling), listed in extras['tiling']['unfitted'].
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipfast import engine, images
from dipfast.errors import InputError
from dipfast.fit_io import load_mask, problem_of, result_of
from dipfast.tasks import Task
from dipfast.tile_choice import TileChoice
from dipfast.tiles import Blend, TileGrid, largest_empty_square, tile_seed


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
    """Per iteration: loss and MSE (hence PSNR) of the tiles, averaged by their share of the image."""
    if not rows_per_tile:  # a restart stopped before any of its tiles
        return []
    n = min(len(rows) for rows in rows_per_tile)
    shares = shares / shares.sum()

    def column(name):
        values = [[getattr(row, name) for row in rows[:n]] for rows in rows_per_tile]
        return None if any(v is None for vs in values for v in vs) else np.array(values, dtype=np.float64)

    loss = shares @ column("loss")
    psnrs = [column(name) for name in ("psnr", "ema_psnr")]
    psnr, ema_psnr = (None if p is None else -10 * np.log10(shares @ 10 ** (-p / 10)) for p in psnrs)
    fell_back = column("fell_back").any(0)
    seconds = (column("seconds") + np.array(offsets)[:, None]).max(0)
    return [
        engine.HistoryRow(
            rows_per_tile[0][i].iteration,
            float(loss[i]),
            None if psnr is None else float(psnr[i]),
            None if ema_psnr is None else float(ema_psnr[i]),
            bool(fell_back[i]),
            float(seconds[i]),
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

    networks = [(k, r) for k in range(len(grid)) for r in range(restarts)]
    outs = [Blend(out_grid, c) for _ in range(restarts)]
    emas = [Blend(out_grid, c) for _ in range(restarts)]
    fitted: dict[tuple[int, int], tuple[engine.Fit, float]] = {}
    stop_reason = "iterations"
    loop_seconds = capture_seconds = 0.0  # summed over the steps (chunks), which run one after another
    bar = tqdm(
        total=len(networks) * preset.iterations, disable=not progress, unit="tile-it", leave=False, dynamic_ncols=True
    )
    with bar:
        for first in range(0, len(networks), choice.per_step):
            chunk = networks[first : first + choice.per_step]
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
                )
            except KeyboardInterrupt:
                stop_reason = "interrupted"
                break
            loop_seconds += fits[0].loop_seconds
            capture_seconds += fits[0].capture_seconds
            for (k, r), fit in zip(chunk, fits):
                outs[r].add(k, fit.image[0])
                emas[r].add(k, fit.ema_image[0])
                fitted[k, r] = (fit, offset)
            bar.update(fits[0].iterations * len(chunk) - seen["done"] * len(chunk))
            if fits[0].stop_reason != "iterations":
                stop_reason = fits[0].stop_reason
                break
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
        whole_fits.append(
            engine.Fit(
                image=outs[r].image[None],
                ema_image=emas[r].image[None],
                history=_history([f.history for f in fits_r], shares[[k for k, _ in mine]], [o for _, (_, o) in mine]),
                iterations=min((f.iterations for f in fits_r), default=0),
                seconds=seconds,
                loop_seconds=loop_seconds,
                stop_reason=stop_reason,
                first_step_seconds=fits_r[0].first_step_seconds if fits_r else 0.0,
                capture_seconds=capture_seconds,
            )
        )
    whole = engine.Problem(input_shape=(0, 0, 0), z=None, out_size=out_size, n_channels=c, target=_batched(t))
    result = result_of(task, preset, plan, device, seed, (x0, alpha, form), whole, whole_fits)
    result.extras["tiling"] = {
        "tile": choice.tile,
        "overlap": choice.overlap,
        "grid": (len(grid.rows), len(grid.cols)),
        "per_step": choice.per_step,
        "boxes": [(b.y, b.x, b.h, b.w) for b in boxes],
        "seeds": [tile_seed(seed, k) for k in range(len(grid))],  # restart r: tile_seed(seed + r, k)
        "unfitted": unfitted,
        "tile_its": len(fitted) * result.iterations / result.seconds if result.seconds > 0 else math.nan,
    }
    if unfitted:
        result.extras["tiling"]["note"] = (
            f"{len(unfitted)} of {len(grid)} tiles were not fitted ({stop_reason}): they hold the observation itself"
        )
    return result


def restore_all(
    inputs, batch: bool, choice, masks, guides, targets, task, preset, plan, device, seed, scale, *rest
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
        )
        for k, image in enumerate(inputs)
    ]


def _batched(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[None]
