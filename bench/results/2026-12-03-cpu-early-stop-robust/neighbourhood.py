"""The calibrated rule's neighbourhood on the cached records: window x patience x tolerance, per record set.

Replays dipfast.bench.early_stop's calibration path (the criterion's VAR curves from EarlyStop.update with a bf16
buffer, decide() on them, the PSNR of the window's mean at the kept iteration) and scores issue 14's denoising
targets with the record's length as the fixed count. Reads the records only; it never fits.

    PYTHONPATH=. python3 bench/results/2026-12-03-cpu-early-stop-robust/neighbourhood.py OUT_DIR
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dipfast.bench import early_stop as es

SETS = {  # name: (task, crop, recorded iterations, cache folder)
    "denoise-32": ("denoise", 32, 800, "/tmp/es_traces"),
    "denoise-64": ("denoise", 64, 1000, "/tmp/es64/cache"),
    "jpeg-32": ("jpeg", 32, 800, "/tmp/es_traces"),
}
WINDOWS = (50, 100)
PATIENCES = (50, 75, 100, 125, 150, 200)
TOLERANCES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def score(names, psnr, mean_psnr, curve, window, patience, tolerance) -> dict:
    t_len = psnr.shape[0]
    rows = []
    for k, name in enumerate(names):
        kept, stop, stopped = es.decide(curve[:, k], patience, 0.0, window, tolerance)
        value = float(mean_psnr[kept - 1, k])
        rows.append(
            {
                "image": name,
                "kept": kept,
                "stop": stop,
                "stopped": stopped,
                "gap_db": float(psnr[:, k].max()) - value,
                "gain_db": value - float(psnr[-1, k]),
            }
        )
    gaps = [r["gap_db"] for r in rows]
    worst = int(np.argmax(gaps))
    mean_stop = float(np.mean([r["stop"] for r in rows]))
    s = {
        "median_gap_db": float(np.median(gaps)),
        "max_gap_db": gaps[worst],
        "max_gap_image": names[worst],
        "mean_gain_over_fixed_db": float(np.mean([r["gain_db"] for r in rows])),
        "mean_stop_iteration": mean_stop,
        "fixed_iteration": t_len,
    }
    s["meets_targets"] = bool(
        s["median_gap_db"] <= 0.5
        and s["max_gap_db"] <= 1.5
        and s["mean_gain_over_fixed_db"] >= -0.3
        and 2 * mean_stop <= t_len
    )
    return s


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result = {}
    for name, (task, size, iters, cache) in SETS.items():
        cases = es.load_cases("/work/shared/data/dip", [task], size, 0)
        recs = _cached(cases, iters, Path(cache))
        names = [c.name for c in cases]
        psnr = np.stack([r.psnr for r in recs], 1)
        for window in WINDOWS:
            curve = es.curves(recs, "wmv", window)
            mean_psnr = np.stack([es.window_mean_psnr(r, c.target, window) for r, c in zip(recs, cases)], 1)
            for patience, tol in itertools.product(PATIENCES, TOLERANCES):
                key = f"W{window}-P{patience}-tol{tol}"
                result.setdefault(name, {})[key] = score(names, psnr, mean_psnr, curve, window, patience, tol)
    out.mkdir(parents=True, exist_ok=True)
    (out / "neighbourhood.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = []
    for window in WINDOWS:
        lines += [
            f"\nW = {window}. Each cell: Y where every denoising target is met at 32 and at 64 px (j: and jpeg's at "
            "32 px); the max gap in dB at 32 / 64 px (the worst image at 64); the mean stop at 32 / 64 px\n",
            "| P \\ tolerance | " + " | ".join(str(t) for t in TOLERANCES) + " |",
            "|---" * (len(TOLERANCES) + 1) + "|",
        ]
        for patience in PATIENCES:
            cells = []
            for tol in TOLERANCES:
                key = f"W{window}-P{patience}-tol{tol}"
                a, b, j = (result[s][key] for s in SETS)
                mark = ("Y" if a["meets_targets"] and b["meets_targets"] else "-") + ("j" if j["meets_targets"] else "")
                cells.append(
                    f"{mark} {a['max_gap_db']:.2f}/{b['max_gap_db']:.2f} ({b['max_gap_image']}) "
                    f"{a['mean_stop_iteration']:.0f}/{b['mean_stop_iteration']:.0f}"
                )
            lines.append(f"| {patience} | " + " | ".join(cells) + " |")
    (out / "neighbourhood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cached(cases, iters, cache: Path) -> list[es.Record]:
    """The cached records, by the name record_cached gives them; a missing one is an error, never a fit."""
    recs = []
    for c in cases:
        h, w = c.target.shape[:2]
        path = cache / f"{es.task_of(c)}_{c.name}_{h}x{w}_{iters}.npz"
        if not path.is_file():
            raise SystemExit(f"no record {path}: record it with dipfast bench early-stop --cache first")
        recs.append(es.Record.load(path))
    return recs


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
