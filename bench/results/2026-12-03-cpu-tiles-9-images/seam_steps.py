"""The seam at the tile corner, as a number: for each image of a tiles_vs_whole.py run, the mean |step|
across the two edge lines of the corner crop (between the tiles at 0 and at 96 of a 224 px image in
tiles of 128) over the mean |step| across every other line of the crop, for the tiles pasted, the
tiles blended, and the whole fit (which has no edge there: its ratio is what the image's content
alone gives).

    python seam_steps.py RUNS   # RUNS/results.jsonl and RUNS/<image>/{corner-*.png,whole.png}
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def edge_ratio(a: np.ndarray, e: int) -> float:
    cols = np.abs(np.diff(a, axis=1)).mean(axis=(0, 2))  # step between column j and j + 1
    rows = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))
    return (cols[e - 1] + rows[e - 1]) / (np.delete(cols, e - 1).mean() + np.delete(rows, e - 1).mean())


def main(runs: Path) -> None:
    print("| image | pasted | blended | whole fit |\n|---|---|---|---|")
    for line in (runs / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        d = runs / r["image"]
        (r0, r1), (c0, c1) = r["corner_crop_rows"], r["corner_crop_cols"]
        assert r0 == c0, "the corner crop is square around the corner"
        corner = r["size"] - r["tile"]  # the last tile's top-left corner
        crops = {k: np.asarray(Image.open(d / f"corner-{k}.png"), float)[::3, ::3] for k in ("pasted", "blended")}
        crops["whole"] = np.asarray(Image.open(d / "whole.png"), float)[r0:r1, c0:c1]
        ratios = {k: edge_ratio(a, corner - c0) for k, a in crops.items()}
        print(f"| {r['image']} | {ratios['pasted']:.2f} | {ratios['blended']:.2f} | {ratios['whole']:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
