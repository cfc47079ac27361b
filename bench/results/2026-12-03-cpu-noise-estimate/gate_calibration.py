"""The noise gate replayed with each noise estimate (Donoho's, the patch eigenvalues'), gate x patience x
tolerance, on denoising records of the paper's 9 images and on barbara's four 128 px tiles. Reads records only.

    PYTHONPATH=. python bench/results/2026-12-03-cpu-noise-estimate/gate_calibration.py ../shared/data/dip RECORDS OUT

RECORDS holds the caches of `dipfast bench early-stop --cache RECORDS/cNAME` (SETS below) and, in tiles/, those of
../2026-12-03-cpu-tiles-9-images-auto-stop/tile_records.py. The replay is gate_neighbourhood.py's
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
import torch

from dipfast.bench import early_stop as es
from dipfast.noise_level import estimate_sigma

sys.path.insert(0, str(Path(__file__).parent))
from estimators import donoho_sigma  # noqa: E402

SETS = {  # name: (crop, recorded iterations, noise sigma in 8-bit units, images)
    "32": (32, 800, 25, 9),
    "64": (64, 1000, 25, 9),
    "96": (96, 1000, 25, 9),
    "128": (128, 1200, 25, 3),
    "64-sigma50": (64, 1000, 50, 9),
    "64-sigma15": (64, 1000, 15, 9),
    "barbara-tiles": (128, 2000, 25, 4),
}
ESTIMATES = {"donoho": donoho_sigma, "patch_eigenvalues": estimate_sigma}
GATES = (0.0, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
PATIENCES = (50, 100, 150)
TOLERANCES = (0.0, 0.2, 0.4, 0.6)
WINDOW = 100


def cases_and_records(data: Path, records: Path, name: str):
    size, iters, sigma, limit = SETS[name]
    if name == "barbara-tiles":
        path = Path(__file__).parent.parent / "2026-12-03-cpu-tiles-9-images-auto-stop" / "tile_records.py"
        spec = importlib.util.spec_from_file_location("tile_records", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cases, cache, tag = module.tile_cases(data, "barbara"), records / "tiles", ""
    else:
        cases = es.load_cases(data, ["denoise"], size=size, limit=limit, sigma=None if sigma == 25 else sigma / 255)
        cache, tag = records / f"c{name.replace('-sigma', 's')}", "" if sigma == 25 else f"_sigma{sigma}"
    recs = [es.Record.load(cache / f"denoise_{c.name}_{size}x{size}_{iters}{tag}.npz") for c in cases]
    return cases, recs


def score(cases, recs, curve, mean_psnr, losses, variances, gate, patience, tolerance) -> dict:
    rows = []
    for k, (case, rec) in enumerate(zip(cases, recs)):
        opens = es.gate_opening(losses[k], variances[k], gate)
        kept, stop, _ = es.decide(curve[:, k], patience, 0.0, max(WINDOW, opens), tolerance)
        value = float(mean_psnr[k][kept - 1]) if kept else float(rec.psnr[-1])
        rows.append({"image": case.name, "gate_opens": opens, "kept": kept, "stop": stop,
                     "gap_db": float(rec.psnr.max()) - value, "gain_db": value - float(rec.psnr[-1])})  # fmt: skip
    gaps = [r["gap_db"] for r in rows]
    s = {
        "median_gap_db": float(np.median(gaps)),
        "max_gap_db": max(gaps),
        "max_gap_image": rows[int(np.argmax(gaps))]["image"],
        "mean_gain_over_fixed_db": float(np.mean([r["gain_db"] for r in rows])),
        "mean_stop_iteration": float(np.mean([r["stop"] for r in rows])),
    }
    s["meets_targets"] = s["median_gap_db"] <= 0.5 and s["max_gap_db"] <= 1.5 and s["mean_gain_over_fixed_db"] >= -0.3
    if (patience, tolerance) != (100, 0.4):  # each image only for the calibrated rule's cell: the file stays small
        return {"summary": s}
    return {"summary": s, "images": rows}


def main(data: Path, records: Path, out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        cases, recs = cases_and_records(data, records, name)
        curve = es.curves(recs, "wmv", WINDOW)
        mean_psnr = [es.window_mean_psnr(r, c.target, WINDOW) for r, c in zip(recs, cases)]
        losses = [es.observation_losses(r, c.observed) for r, c in zip(recs, cases)]
        for estimate, f in ESTIMATES.items():
            ys = [torch.from_numpy(np.ascontiguousarray(c.observed.transpose(2, 0, 1)))[None] for c in cases]
            variances = [float(f(y)[0]) ** 2 for y in ys]
            loaded = (cases, recs, curve, mean_psnr, losses, variances)
            results[f"{name}/{estimate}"] = [
                {"gate": g, "patience": p, "tolerance": t, **score(*loaded, g, p, t)}
                for g, p, t in itertools.product(GATES, PATIENCES, TOLERANCES)
            ]
    (out / "gate_calibration.json").write_text(json.dumps(results, indent=0) + "\n")
    print(markdown(results, names))


def markdown(results: dict, names: list[str]) -> str:
    lines = ["Cells (patience x tolerance, of 12) that meet the denoising targets, per set; in brackets the calibrated",
             "rule's cell (P 100, tolerance 0.4): median / worst gap to the oracle (dB), mean stop.", ""]  # fmt: skip
    for estimate in ESTIMATES:
        lines += [f"**{estimate}**", "", "| gate | " + " | ".join(names) + " | all sets |"]
        lines.append("|---" * (len(names) + 2) + "|")
        for i, gate in enumerate(GATES):
            cells, everywhere = [], np.ones(len(PATIENCES) * len(TOLERANCES), dtype=bool)
            for name in names:
                entries = results[f"{name}/{estimate}"][i * 12 : (i + 1) * 12]
                ok = np.array([e["summary"]["meets_targets"] for e in entries])
                everywhere &= ok
                s = next(e["summary"] for e in entries if (e["patience"], e["tolerance"]) == (100, 0.4))
                cells.append(f"{ok.sum()} ({s['median_gap_db']:+.2f} / {s['max_gap_db']:+.2f} {s['max_gap_image']}, "
                             f"{s['mean_stop_iteration']:.0f})")  # fmt: skip
            lines.append(f"| {gate} | " + " | ".join(cells) + f" | {everywhere.sum()}/12 |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:] or list(SETS))
