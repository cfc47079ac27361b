"""The noise gate's neighbourhood on the cached denoising records: gate x patience x tolerance, per crop size.

Replays dipfast.bench.early_stop's calibration path (the criterion's VAR curves from EarlyStop.update with a bf16
buffer; gate_opening() on the losses of the recorded outputs against the observation, with the noise variance
estimated from the observation; decide() started where the gate opens; the PSNR of the window's mean at the kept
iteration, or of the last output where nothing was kept) and scores issue 14's denoising targets with the
record's length as the fixed count. Reads the records only; it never fits.

    PYTHONPATH=. python3 bench/results/2026-12-03-cpu-early-stop-noise-gate/gate_neighbourhood.py OUT_DIR [SET ...]

The records: `dipfast bench early-stop --data ../shared/data/dip --size S --iters T [--sigma 50] --cache DIR`.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

from dipfast.bench import early_stop as es

DATA = "../shared/data/dip"
SETS = {  # name: (crop, recorded iterations, cache folder, noise sigma in 8-bit units)
    "32": (32, 800, "/tmp/es_traces", 25),
    "64": (64, 1000, "/tmp/es64/cache", 25),
    "96": (96, 1000, "/tmp/es96/cache", 25),
    "128": (128, 1200, "/tmp/es128/cache", 25),
    "64-sigma50": (64, 1000, "/tmp/es64s50/cache", 50),
    "64-sigma15": (64, 1000, "/tmp/es64s15/cache", 15),
}
GATES = (0.0, 0.9, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5)
PATIENCES = (50, 100, 150)
TOLERANCES = (0.0, 0.2, 0.4, 0.6)
WINDOW = 100


def load(name: str):
    size, iters, cache, sigma = SETS[name]
    cases = es.load_cases(DATA, ["denoise"], size=size, sigma=None if sigma == 25 else sigma / 255)
    tag = "" if sigma == 25 else f"_sigma{sigma}"
    recs = [es.Record.load(Path(cache) / f"denoise_{c.name}_{size}x{size}_{iters}{tag}.npz") for c in cases]
    curve = es.curves(recs, "wmv", WINDOW)
    mean_psnr = [es.window_mean_psnr(r, c.target, WINDOW) for r, c in zip(recs, cases)]
    losses = [es.observation_losses(r, c.observed) for r, c in zip(recs, cases)]
    variances = [es.noise_variance(c.observed) for c in cases]
    return cases, recs, curve, mean_psnr, losses, variances


def score(loaded, gate, patience, tolerance) -> dict:
    cases, recs, curve, mean_psnr, losses, variances = loaded
    rows = []
    for k, (case, rec) in enumerate(zip(cases, recs)):
        opens = es.gate_opening(losses[k], variances[k], gate)
        kept, stop, stopped = es.decide(curve[:, k], patience, 0.0, max(WINDOW, opens), tolerance)
        value = float(mean_psnr[k][kept - 1]) if kept else float(rec.psnr[-1])
        rows.append(
            {
                "image": case.name,
                "gate_opens": opens,
                "kept": kept,
                "stop": stop,
                "stopped": stopped,
                "gap_db": float(rec.psnr.max()) - value,
                "gain_db": value - float(rec.psnr[-1]),
            }
        )
    gaps = [r["gap_db"] for r in rows]
    worst = int(np.argmax(gaps))
    s = {
        "median_gap_db": float(np.median(gaps)),
        "max_gap_db": gaps[worst],
        "max_gap_image": rows[worst]["image"],
        "mean_gain_over_fixed_db": float(np.mean([r["gain_db"] for r in rows])),
        "mean_stop_iteration": float(np.mean([r["stop"] for r in rows])),
        "fixed_iteration": len(recs[0].psnr),
    }
    s["meets_targets"] = bool(
        s["median_gap_db"] <= 0.5 and s["max_gap_db"] <= 1.5 and s["mean_gain_over_fixed_db"] >= -0.3
    )
    entry = {"gate": gate, "patience": patience, "tolerance": tolerance, "summary": s}
    if (patience, tolerance) == (100, 0.4):  # the calibrated rule's: each image (the file stays small)
        entry["images"] = rows
    return entry


def main(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        loaded = load(name)
        results[name] = [score(loaded, *c) for c in itertools.product(GATES, PATIENCES, TOLERANCES)]
    (out / "gate_neighbourhood.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| gate | P | tol | " + " | ".join(f"{n} px: median / max gap, mean iters" for n in names) + " |"]
    lines.append("|---" * (3 + len(names)) + "|")
    for i, (gate, patience, tolerance) in enumerate(itertools.product(GATES, PATIENCES, TOLERANCES)):
        cells = []
        for name in names:
            s = results[name][i]["summary"]
            mark = "" if s["meets_targets"] else " (missed)"
            gaps = f"{s['median_gap_db']:+.2f} / {s['max_gap_db']:+.2f} {s['max_gap_image']}"
            cells.append(f"{gaps}, {s['mean_stop_iteration']:.0f}{mark}")
        lines.append(f"| {gate} | {patience} | {tolerance} | " + " | ".join(cells) + " |")
    (out / "gate_neighbourhood.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(SETS))
