"""A phone photo's size (12 MP, 4000 x 3000) denoised end to end through restore(), or as far as a time budget.

    python bench/large_photo.py --device cuda --data .gpu-data/dip --budget 540 --out DIR    # a call of its own
    python bench/large_photo.py --device cpu --megapixels 0.05 --iters 20 --out DIR          # the script's check

Issue 17's speed target: a 12-megapixel photo denoised on one GPU, the time reported with early stopping and
with the preset's count. The photo is a mosaic of the paper's denoising images (--data; each scaled to a cell
of the grid, bicubic), or a synthetic one without --data, with sigma 25 noise from a seeded generator. It runs
restore(task="denoise", tile="auto", stop=--stop) as a user's call would: whole where the fit fits the device
(bf16 on an H200: about 80 GiB by dipfast's estimate), else in tiles side by side. A callback stops the fit
when --budget seconds have passed; the JSON then says how far it got and projects the whole run from the rate
measured (set-up and capture excluded): the preset's count, and the early stop's iterations where known.

Writes large_photo.json (and prints it as one line) in --out; the noisy and restored images are not kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import dipfast
from dipfast.bench.early_stop import PAPER_IMAGES
from dipfast.presets import PRESETS


def mosaic(data: Path | None, h: int, w: int) -> np.ndarray:
    """An h x w float32 RGB photo: the paper's denoising images found in data, in a grid of near-square cells, or
    a synthetic one (waves, a checkerboard, stripes) where data has none of them."""
    paths = [] if data is None else [data / path for _, path, _, _ in PAPER_IMAGES["denoise"]]
    paths = [p for p in paths if p.is_file()]  # a folder with some of them: those
    if not paths:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 0.5 + 0.4 * np.sin(xx / 97) * np.cos(yy / 131)
        g = 0.5 + 0.4 * np.sin((xx + yy) / 57)
        b = np.clip(0.2 + 0.6 * ((xx // 211 + yy // 173) % 2) + 0.1 * np.sin(xx / 5), 0, 1)
        return np.stack([r, g, b], -1).astype(np.float32)
    rows = max(1, round(math.sqrt(len(paths) * h / w)))
    cols = math.ceil(len(paths) / rows)
    out = np.zeros((h, w, 3), np.float32)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        top, left = r * h // rows, c * w // cols
        bottom, right = (r + 1) * h // rows, (c + 1) * w // cols
        cell = Image.open(paths[k % len(paths)]).convert("RGB").resize((right - left, bottom - top), Image.BICUBIC)
        out[top:bottom, left:right] = np.asarray(cell, np.float32) / 255
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--megapixels", type=float, default=12.0, help="the photo's size at 4:3 (default 12)")
    parser.add_argument("--data", type=Path, help="the paper's image folder (default: a synthetic photo)")
    parser.add_argument("--stop", choices=("auto", "iterations"), default="auto")
    parser.add_argument("--iters", type=int, help="the upper bound (default: the denoise preset's)")
    parser.add_argument("--tile", default="auto", help="restore()'s tile=: 'auto' (default), 'none' or a side")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds before the callback stops the fit")
    parser.add_argument("--report-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder")
    w = int(round(math.sqrt(args.megapixels * 1e6 * 4 / 3) / 16)) * 16
    h = w * 3 // 4
    clean = mosaic(args.data, h, w)
    noisy = np.clip(clean + np.random.default_rng(args.seed).normal(0, 25 / 255, clean.shape), 0, 1)
    noisy = noisy.astype(np.float32)
    iters = args.iters or PRESETS["denoise"].iterations
    tile = {"auto": "auto", "none": None}.get(args.tile) if not args.tile.isdigit() else int(args.tile)

    progress = {"iteration": 0, "seconds": 0.0, "first": None}
    start = time.perf_counter()

    def on_progress(info) -> bool:
        now = time.perf_counter() - start
        if progress["first"] is None:
            progress["first"] = (info.iteration, now)  # set-up, warm-up and capture are behind this point
        progress.update(iteration=info.iteration, seconds=now)
        return now > args.budget

    result = dipfast.restore(noisy, task="denoise", device=args.device, stop=args.stop, iters=iters, tile=tile,
                             target=clean, seed=args.seed, callback=on_progress, report_every=args.report_every,
                             progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    tiling = result.extras.get("tiling")
    record = {
        "megapixels": h * w / 1e6,
        "size": [h, w],
        "image": "synthetic" if args.data is None else f"mosaic of the paper's images in {args.data}",
        "device": result.device,
        "backend": result.backend,
        "precision": result.precision,
        "stop": args.stop,
        "iters_bound": iters,
        "budget_s": args.budget,
        "seconds": seconds,
        "stop_reason": result.stop_reason,
        "iterations": result.iterations,
        "stop_iteration": result.stop_iteration,
        "psnr": result.psnr,
        "ema_psnr": result.ema_psnr,
        "tiling": None if tiling is None else {k: tiling[k] for k in ("tile", "overlap", "grid", "per_step")},
        "tile_stop_iterations": None if tiling is None else tiling.get("stop_iterations"),
        "tile_iterations": None if tiling is None else tiling["tile_iterations"],
    }
    first = progress["first"]
    if tiling is not None and tiling["tile_iterations"]:
        # tiles: each step is a fit of its own whose read-backs count from 1, so the rate is the tiles' iterations
        # over the whole call (set-up and each step's capture included: an upper bound of the time)
        tiles_per_s = tiling["tile_iterations"] / seconds
        record["image_iterations_per_s"] = tiles_per_s / len(tiling["boxes"])
        record["rate_timed_from"] = "start"
        record["projected_s_preset_count"] = iters * len(tiling["boxes"]) / tiles_per_s
        record["end_to_end"] = result.stop_reason != "callback" or result.iterations >= iters
    elif first is not None:
        # the loop's rate after its first read-back (set-up, warm-up and capture behind it); with one read-back
        # only, from the call's start (set-up included: an upper bound of the time)
        (i0, t0), timed_from = (first, "first read-back") if progress["iteration"] > first[0] else ((0, 0.0), "start")
        rate = (progress["iteration"] - i0) / (progress["seconds"] - t0)
        record["image_iterations_per_s"] = rate
        record["rate_timed_from"] = timed_from
        record["projected_s_preset_count"] = t0 + (iters - i0) / rate
        record["end_to_end"] = result.stop_reason != "callback" or result.iterations >= iters
    if not record.get("end_to_end"):
        record["note"] = f"stopped by the {args.budget:.0f} s budget: the projection is from the measured rate"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large_photo.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
