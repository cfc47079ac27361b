"""barbara's four 128 px tiles (records of ../2026-12-03-cpu-tiles-9-images-auto-stop/tile_records.py, 2000
iterations each) stopped by the default denoising rule with each noise estimate, and blended as restore(tile=128)
blends them: the PSNR of the 224 px result, and per tile the gate's opening, the kept iteration and its PSNR.

    PYTHONPATH=. python bench/results/2026-12-03-cpu-noise-estimate/barbara_tiles_blended.py ../shared/data/dip RECORDS
"""

import json
import sys
from pathlib import Path

import torch

from dipfast import tiles
from dipfast.bench import early_stop as es
from dipfast.early_stop import DENOISING_RULE
from dipfast.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from estimators import ESTIMATES, variances  # noqa: E402
from gate_calibration import cases_and_records  # noqa: E402


def main(data: Path, records: Path) -> None:
    cases, recs = cases_and_records(data, records, "barbara-tiles")
    size, tile = 224, 128
    grid = tiles.TileGrid.cover(size, size, tile, tile // 8)
    clean = torch.zeros(3, size, size)
    for case, box in zip(cases, grid.boxes):
        box.crop(clean).copy_(torch.from_numpy(case.target.transpose(2, 0, 1)))
    estimated = [variances(case.observed) for case in cases]
    for estimate in ESTIMATES:
        blend, rows = tiles.Blend(grid, 3), []
        for k, (case, rec) in enumerate(zip(cases, recs)):
            variance = estimated[k][estimate]
            det = es.detect(rec, case.target, DENOISING_RULE, observed=case.observed, gate_variance=variance)
            blend.add(k, det.output)
            opens = es.gate_opening(es.observation_losses(rec, case.observed), variance, DENOISING_RULE.noise_gate)
            rows.append({"tile": k, "sigma": round(variance**0.5 * 255, 2), "gate_opens": opens,
                         "kept": det.best_iteration, "psnr": round(det.psnr, 2)})  # fmt: skip
        blended = round(float(psnr(blend.image, clean)), 2)
        print(json.dumps({"estimate": estimate, "blended_psnr": blended, "tiles": rows}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
