"""Tiled against untiled denoising at equal iterations, and a crop across a tile corner before and after blending.

    python bench/tiles_vs_whole.py --data ../shared/data/dip --size 256 --tile 128 --iters 200 --out /tmp/tiles-demo

A size x size crop of one of the paper's images (--image, F16 by default; the centre), sigma = 25
noise from a seeded generator, restored whole (tile=None) and in tiles (tile=--tile, the default
overlap), same seed and iterations (--stop auto: early stopping in both, --iters the upper bound;
the tiles each stop on their own). The tiles' raw outputs are recorded as they are blended, so the
script also writes the corner crop pasted (each tile over the previous ones, no blending) and
blended, 3x enlarged, as PNGs under --out.
Prints one JSON line of PSNRs and times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dipfast
from dipfast import tiles
from dipfast.bench.early_stop import PAPER_IMAGES

IMAGES = {name: path for name, path, _, _ in PAPER_IMAGES["denoise"]}


def _best(result) -> dict:
    """The history's best PSNR and its iteration (tiled: the tiles' share-weighted PSNR, tiled_restore),
    and where the fit stopped."""
    best = max(result.history, key=lambda row: row.psnr)
    tiling = result.extras.get("tiling", {})
    return {
        "best_history_psnr": best.psnr,
        "best_iteration": best.iteration,
        "iterations": result.iterations,
        "stop_reason": result.stop_reason,
        "stop_iteration": result.stop_iteration,
        "tile_stop_iterations": tiling.get("stop_iterations"),
        "tile_iterations": tiling.get("tile_iterations"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the paper's image folder (e.g. ../shared/data/dip)")
    parser.add_argument("--image", default="F16", choices=sorted(IMAGES), help="which of the paper's images")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default="/tmp/tiles-demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", choices=("iterations", "auto"), default="iterations")
    args = parser.parse_args()

    gt = np.asarray(Image.open(Path(args.data) / IMAGES[args.image]).convert("RGB"), dtype=np.float32) / 255
    if min(gt.shape[:2]) < args.size:
        parser.error(f"{args.image} is {gt.shape[1]} x {gt.shape[0]}: pass --size {min(gt.shape[:2])} or less")
    top, left = (gt.shape[0] - args.size) // 2, (gt.shape[1] - args.size) // 2
    clean = gt[top : top + args.size, left : left + args.size]
    noise = np.random.default_rng(args.seed).normal(0, 25 / 255, clean.shape)
    noisy = np.clip(clean + noise, 0, 1).astype(np.float32)
    common = {"target": clean, "iters": args.iters, "stop": args.stop, "seed": args.seed, "progress": False}

    start = time.perf_counter()
    whole = dipfast.restore(noisy, tile=None, **common)
    whole_seconds = time.perf_counter() - start

    recorded: dict[int, dict[int, torch.Tensor]] = {}  # per Blend, in order of first use: outputs, then EMA
    add = tiles.Blend.add

    def recording_add(self, index, tile):
        recorded.setdefault(id(self), {})[index] = tile.detach().float().cpu().clone()
        add(self, index, tile)

    tiles.Blend.add = recording_add
    start = time.perf_counter()
    try:
        tiled = dipfast.restore(noisy, tile=args.tile, **common)
    finally:
        tiles.Blend.add = add
    tiled_seconds = time.perf_counter() - start
    raw = next(iter(recorded.values()))

    info = tiled.extras["tiling"]
    pasted = torch.zeros(3, args.size, args.size)
    for k, (y, x, h, w) in enumerate(info["boxes"]):
        pasted[:, y : y + h, x : x + w] = raw[k]
    y, x, _, _ = info["boxes"][-1]  # the last tile's top-left corner: where four tiles meet
    c0, c1 = max(0, y - 32), min(args.size, y + 32)
    d0, d1 = max(0, x - 32), min(args.size, x + 32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in (("pasted", pasted.permute(1, 2, 0).numpy()), ("blended", tiled.image)):
        crop = (np.clip(image[c0:c1, d0:d1], 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(crop).resize((crop.shape[1] * 3, crop.shape[0] * 3), Image.NEAREST).save(
            out / f"corner-{name}.png"
        )
    Image.fromarray((tiled.image * 255).round().astype(np.uint8)).save(out / "tiled.png")
    Image.fromarray((whole.image * 255).round().astype(np.uint8)).save(out / "whole.png")
    print(
        json.dumps(
            {
                "image": args.image,
                "size": args.size,
                "tile": args.tile,
                "overlap": info["overlap"],
                "grid": info["grid"],
                "per_step": info["per_step"],
                "iters": args.iters,
                "stop": args.stop,
                "precision": tiled.precision,
                "whole": {"psnr": whole.psnr, "ema_psnr": whole.ema_psnr, "seconds": whole_seconds, **_best(whole)},
                "tiled": {"psnr": tiled.psnr, "ema_psnr": tiled.ema_psnr, "seconds": tiled_seconds, **_best(tiled)},
                "corner_crop_rows": [c0, c1],
                "corner_crop_cols": [d0, d1],
            }
        )
    )


if __name__ == "__main__":
    main()
