"""barbara's four 128 px tiles (records of ../2026-12-03-cpu-tiles-9-images-auto-stop/tile_records.py, 2000
iterations each) stopped by the default denoising rule with each noise estimate, and blended as restore(tile=128)
blends them: the PSNR of the 224 px result, and per tile the gate's opening, the kept iteration and its PSNR.

    PYTHONPATH=. python bench/results/2026-12-03-cpu-noise-estimate/barbara_tiles_blended.py ../shared/data/dip RECORDS
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from dipfast import tiles
from dipfast.bench import early_stop as es
from dipfast.early_stop import DENOISING_RULE, EarlyStop
from dipfast.metrics import psnr

sys.path.insert(0, str(Path(__file__).parent))
from gate_calibration import ESTIMATES, cases_and_records  # noqa: E402


def kept_output(rec: es.Record, observed: np.ndarray, variance: float) -> tuple[torch.Tensor, int, int]:
    """What restore(stop='auto') returns for this record: (C, H, W), the gate's opening, the kept iteration."""
    losses = es.observation_losses(rec, observed)
    stopper = EarlyStop(DENOISING_RULE, 1, rec.outputs.shape[1:], "cpu", noise_variance=torch.tensor([variance]))
    outputs, iteration = torch.from_numpy(rec.outputs).float(), torch.zeros((), dtype=torch.int64)
    for t in range(len(outputs)):
        stopper.update(outputs[t : t + 1], iteration, torch.from_numpy(losses[t : t + 1]))
        iteration += 1
        if stopper.stopped[0]:
            break
    best = int(stopper.best_iteration[0])
    image = stopper.best_output[0] if best else outputs[-1]
    return image, es.gate_opening(losses, variance, DENOISING_RULE.noise_gate), best


def main(data: Path, records: Path) -> None:
    cases, recs = cases_and_records(data, records, "barbara-tiles")
    size, tile = 224, 128
    grid = tiles.TileGrid.cover(size, size, tile, tile // 8)
    clean = torch.zeros(3, size, size)
    for case, box in zip(cases, grid.boxes):
        box.crop(clean).copy_(torch.from_numpy(case.target.transpose(2, 0, 1)))
    for estimate, f in ESTIMATES.items():
        blend, rows = tiles.Blend(grid, 3), []
        for k, (case, rec) in enumerate(zip(cases, recs)):
            variance = float(f(torch.from_numpy(np.ascontiguousarray(case.observed.transpose(2, 0, 1)))[None])[0]) ** 2
            image, opens, kept = kept_output(rec, case.observed, variance)
            blend.add(k, image)
            target = torch.from_numpy(np.ascontiguousarray(case.target.transpose(2, 0, 1)))
            rows.append({"tile": k, "sigma": round(variance**0.5 * 255, 2), "gate_opens": opens, "kept": kept,
                         "psnr": round(float(psnr(image, target)), 2)})  # fmt: skip
        blended = round(float(psnr(blend.image, clean)), 2)
        print(json.dumps({"estimate": estimate, "blended_psnr": blended, "tiles": rows}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
