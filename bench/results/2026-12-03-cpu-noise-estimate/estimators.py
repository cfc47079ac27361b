"""The noise gate's sigma, estimated two ways, against the noise the pixels carry: the paper's 9 denoising images,
centre crops of 32-224 px, sigma 15, 25 and 50 (seed 0, clipped to [0, 1] as the harness makes them).

    PYTHONPATH=. python bench/results/2026-12-03-cpu-noise-estimate/estimators.py ../shared/data/dip OUT

"carried": the RMS of noisy - clean (clipping at black or white leaves less than was drawn). Writes
estimators.json (every crop) and prints the Markdown table of variance ratios (estimate^2 / carried^2).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dipfast.bench import early_stop as es
from dipfast.noise_level import estimate_sigma

SIZES = (32, 64, 96, 128, 224)
SIGMAS = (15, 25, 50)


def donoho_sigma(y: torch.Tensor) -> torch.Tensor:
    """dipfast's estimate until this commit: Donoho's MAD of the finest Haar diagonal band, per channel, averaged."""
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    x = y[..., :h, :w].float()
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return (hh.abs().flatten(2).median(dim=2).values / 0.6745).mean(dim=1)


ESTIMATES = {"donoho": donoho_sigma, "patch_eigenvalues": estimate_sigma}


def variances(observed: np.ndarray) -> dict[str, float]:
    """Each estimate's sigma^2 of an observation (H, W, C)."""
    y = torch.from_numpy(np.ascontiguousarray(observed.transpose(2, 0, 1)))[None]
    return {k: float(f(y)[0]) ** 2 for k, f in ESTIMATES.items()}


def rows(data: Path) -> list[dict]:
    out = []
    for name, rel, _, _ in es.PAPER_IMAGES["denoise"]:
        gt = np.asarray(Image.open(data / rel).convert("RGB"), dtype=np.float32) / 255
        for size in SIZES:
            top, left = (gt.shape[0] - size) // 2, (gt.shape[1] - size) // 2
            clean = gt[top : top + size, left : left + size]
            for sigma in SIGMAS:
                noise = np.random.default_rng(0).normal(0, sigma / 255, clean.shape)
                noisy = np.clip(clean + noise, 0, 1).astype(np.float32)
                y = torch.from_numpy(noisy.transpose(2, 0, 1))[None]
                row = {"image": name, "size": size, "sigma": sigma}
                row["carried"] = float(np.sqrt(((noisy - clean) ** 2).mean())) * 255
                row.update({k: float(f(y)[0]) * 255 for k, f in ESTIMATES.items()})
                out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| crop | " + " | ".join(f"sigma {s}: {k}" for s in SIGMAS for k in ESTIMATES) + " |"]
    lines.append("|---" * (1 + len(SIGMAS) * len(ESTIMATES)) + "|")
    for size in SIZES:
        cells = []
        for sigma in SIGMAS:
            sel = [r for r in rows if (r["size"], r["sigma"]) == (size, sigma)]
            for k in ESTIMATES:
                ratio = np.array([(r[k] / r["carried"]) ** 2 for r in sel])
                worst = sel[int(np.argmax(np.abs(np.log(ratio))))]["image"]
                cells.append(f"{ratio.min():.2f}-{ratio.max():.2f} ({worst})")
        lines.append(f"| {size} px | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    got = rows(data)
    (out / "estimators.json").write_text(json.dumps(got, indent=0) + "\n")
    print(table(got))
