"""The noise gate replayed with each noise estimate (Donoho's, the patch eigenvalues'), gate x patience x
tolerance, on denoising records of the paper's 9 images and on barbara's four 128 px tiles. Reads records only.

    PYTHONPATH=. python bench/results/2026-12-03-cpu-noise-estimate/gate_calibration.py ../shared/data/dip RECORDS OUT

RECORDS holds the caches of `dipfast bench early-stop --cache RECORDS/cNAME` (SETS below) and, in tiles/, those of
../2026-12-03-cpu-tiles-9-images-auto-stop/tile_records.py. Each cell is scored by gate_neighbourhood.py's score()
(../2026-12-03-cpu-early-stop-noise-gate/): the VAR curve of a bf16 window of 100, the gate's opening on the
losses of the recorded outputs, decide() from there, the PSNR of the window mean kept (or of the last output),
issue 14's denoising targets with the record's length as the fixed count (each image's row for the
calibrated cell, P 100 and tolerance 0.4).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from dipfast.bench import early_stop as es

sys.path.insert(0, str(Path(__file__).parent))
from estimators import ESTIMATES, variances  # noqa: E402

SETS = {  # name: (crop, recorded iterations, noise sigma in 8-bit units, images)
    "32": (32, 800, 25, 9),
    "64": (64, 1000, 25, 9),
    "96": (96, 1000, 25, 9),
    "128": (128, 1200, 25, 9),
    "64-sigma50": (64, 1000, 50, 9),
    "64-sigma15": (64, 1000, 15, 9),
    "barbara-tiles": (128, 2000, 25, 4),
}
GATES = (0.0, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
PATIENCES = (50, 100, 150)
TOLERANCES = (0.0, 0.2, 0.4, 0.6)
WINDOW = 100
CELLS = len(PATIENCES) * len(TOLERANCES)  # per gate


def sibling(folder: str, name: str):
    """The module `name`.py of another results folder."""
    path = Path(__file__).parent.parent / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


score = sibling("2026-12-03-cpu-early-stop-noise-gate", "gate_neighbourhood").score


def cases_and_records(data: Path, records: Path, name: str):
    size, iters, sigma, limit = SETS[name]
    if name == "barbara-tiles":
        tile_records = sibling("2026-12-03-cpu-tiles-9-images-auto-stop", "tile_records")
        cases, cache, tag = tile_records.tile_cases(data, "barbara"), records / "tiles", ""
    else:
        cases = es.load_cases(data, ["denoise"], size=size, limit=limit, sigma=None if sigma == 25 else sigma / 255)
        cache, tag = records / f"c{name.replace('-sigma', 's')}", "" if sigma == 25 else f"_sigma{sigma}"
    recs = [es.Record.load(cache / f"denoise_{c.name}_{size}x{size}_{iters}{tag}.npz") for c in cases]
    return cases, recs


def main(data: Path, records: Path, out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        cases, recs = cases_and_records(data, records, name)
        curve = es.curves(recs, "wmv", WINDOW)
        mean_psnr = [es.window_mean_psnr(r, c.target, WINDOW) for r, c in zip(recs, cases)]
        losses = [es.observation_losses(r, c.observed) for r, c in zip(recs, cases)]
        estimated = [variances(c.observed) for c in cases]
        for estimate in ESTIMATES:
            loaded = (cases, recs, curve, mean_psnr, losses, [v[estimate] for v in estimated])
            cells = itertools.product(GATES, PATIENCES, TOLERANCES)
            results[f"{name}/{estimate}"] = [score(loaded, *cell) for cell in cells]
    (out / "gate_calibration.json").write_text(json.dumps(results, indent=0) + "\n")
    print(markdown(results, names))


def markdown(results: dict, names: list[str]) -> str:
    lines = [
        f"Cells (patience x tolerance, of {CELLS}) that meet the denoising targets, per set; in brackets the",
        "calibrated rule's cell (P 100, tolerance 0.4): median / worst gap to the oracle (dB), mean stop.",
        "",
    ]
    for estimate in ESTIMATES:
        lines += [f"**{estimate}**", "", "| gate | " + " | ".join(names) + " | all sets |"]
        lines.append("|---" * (len(names) + 2) + "|")
        for i, gate in enumerate(GATES):
            cells, everywhere = [], np.ones(CELLS, dtype=bool)
            for name in names:
                entries = results[f"{name}/{estimate}"][i * CELLS : (i + 1) * CELLS]
                ok = np.array([e["summary"]["meets_targets"] for e in entries])
                everywhere &= ok
                s = next(e["summary"] for e in entries if (e["patience"], e["tolerance"]) == (100, 0.4))
                cells.append(f"{ok.sum()} ({s['median_gap_db']:+.2f} / {s['max_gap_db']:+.2f} {s['max_gap_image']}, "
                             f"{s['mean_stop_iteration']:.0f})")  # fmt: skip
            lines.append(f"| {gate} | " + " | ".join(cells) + f" | {everywhere.sum()}/{CELLS} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:] or list(SETS))
