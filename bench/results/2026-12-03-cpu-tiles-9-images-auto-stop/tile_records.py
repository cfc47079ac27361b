"""One image's 2 x 2 tiles of 128, cut from its noisy 224 px centre crop as tiles_vs_whole.py cuts them,
fitted side by side with every iteration recorded; the default denoising rule replayed on each record.
Prints one JSON line per tile (oracle, best window mean, what stop="auto" returns, the noise estimate).

    OMP_NUM_THREADS=1 python tile_records.py ../shared/data/dip barbara 2000
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dipfast import tiles
from dipfast.bench import early_stop as es
from dipfast.bench.data import Case
from dipfast.early_stop import DENOISING_RULE

SIZE, TILE = 224, 128
KEEP = (
    "name",
    "recorded_iterations",
    "oracle_psnr",
    "oracle_iteration",
    "auto_psnr",
    "detected_iteration",
    "stop_iteration",
)


def tile_cases(data_dir: Path, name: str) -> list[Case]:
    path = dict((n, p) for n, p, _, _ in es.PAPER_IMAGES["denoise"])[name]
    gt = np.asarray(Image.open(data_dir / path).convert("RGB"), dtype=np.float32) / 255
    top, left = (gt.shape[0] - SIZE) // 2, (gt.shape[1] - SIZE) // 2
    clean = gt[top : top + SIZE, left : left + SIZE]
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)
    cases = []
    # restore(tile=TILE)'s own layout and default overlap: boxes at 0 and 96 on each axis
    for k, b in enumerate(tiles.TileGrid.cover(SIZE, SIZE, TILE, TILE // 8).boxes):
        box = (slice(b.y, b.y + b.h), slice(b.x, b.x + b.w))
        case = Case(f"{name}-t{k}", "denoise", noisy[box].copy(), clean[box].copy(), preset="denoise")
        case.extras["es_task"] = "denoise"
        cases.append(case)
    return cases


def main(data_dir: Path, name: str, iters: int) -> None:
    cases = tile_cases(data_dir, name)
    records = es.record_cached(cases, iters, Path("tile-records-cache"))
    for case in cases:
        rec = records[es.key_of(case)]
        row = es.evaluate(case, rec, DENOISING_RULE, iters)
        window_mean = es.window_mean_psnr(rec, case.target, DENOISING_RULE.window)
        row = {k: row[k] for k in KEEP}
        row["window_mean_best"] = float(np.nanmax(window_mean))
        row["window_mean_best_iteration"] = int(np.nanargmax(window_mean)) + 1
        row["noise_variance"] = es.noise_variance(case.observed)
        print(json.dumps(row))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
