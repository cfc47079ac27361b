"""`dipfast demo`: denoise a crop of scikit-image's astronaut (sigma = 25) on any machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dipfast.errors import InputError

DEMO_FILES = ("clean.png", "noisy.png", "restored.png", "ema.png", "psnr.png")


def demo_images(size: int = 64, sigma: float = 25 / 255, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) float32 (size, size, 3): a crop around the astronaut's face, noise as the
    notebooks' get_noisy_image (Gaussian, clipped to [0, 1], not quantised) from a seeded RNG."""
    from skimage import data

    full = data.astronaut()
    if not 8 <= size <= min(full.shape[:2]):
        raise InputError(f"demo size must be between 8 and {min(full.shape[:2])}; got {size}")
    top, left = max(0, 110 - size // 2 + 32), max(0, 230 - size // 2 + 32)
    top, left = min(top, full.shape[0] - size), min(left, full.shape[1] - size)
    clean = full[top : top + size, left : left + size].astype(np.float32) / 255
    noisy = np.clip(clean + np.random.default_rng(seed).normal(scale=sigma, size=clean.shape), 0, 1)
    return clean, noisy.astype(np.float32)


def run_demo(
    out: Path,
    *,
    iters: int = 400,
    size: int = 64,
    device="auto",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from dipfast import restore
    from dipfast.api import resolve_device
    from dipfast.metrics import psnr

    resolve_device(device)  # the size and the device are checked before anything is written
    clean, noisy = demo_images(size, seed=seed)
    if out.exists() and not out.is_dir():
        raise InputError(f"demo output {str(out)!r} is a file; give a folder")
    existing = [name for name in DEMO_FILES if (out / name).exists()]
    if existing and not force:
        raise InputError(f"{str(out)!r} already holds {existing}; pass --force to overwrite or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the demo folder {str(out)!r}: {e.strerror or e}") from None

    noisy_psnr = float(psnr(torch.from_numpy(noisy), torch.from_numpy(clean)))
    print(f"dipfast demo: {size}x{size} astronaut crop, sigma=25, noisy PSNR {noisy_psnr:.2f} dB, {iters} iterations")
    result = restore(noisy, "denoise", target=clean, iters=iters, seed=seed, device=device, progress=progress)

    def to_png(arr, name):
        Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(out / name)

    to_png(clean, "clean.png")
    to_png(noisy, "noisy.png")
    to_png(result.image, "restored.png")
    to_png(result.ema_image, "ema.png")

    it = [row.iteration for row in result.history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(it, [row.psnr for row in result.history], label="output", lw=1)
    ax.plot(it, [row.ema_psnr for row in result.history], label="EMA of outputs", lw=1.5)
    ax.axhline(noisy_psnr, color="gray", ls="--", lw=1, label="noisy input")
    if result.stop_iteration is not None:  # stop='auto': the returned output, at the point the criterion chose
        ax.axvline(result.stop_iteration, color="r", ls=":", lw=1)
        ax.plot([result.stop_iteration], [result.psnr], "ro", label=f"returned (auto stop, it {result.stop_iteration})")
    ax.set(
        xlabel="iteration",
        ylabel="PSNR vs clean (dB)",
        title=f"DIP denoising, sigma=25, {size}x{size}, {result.device}",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "psnr.png", dpi=120)
    plt.close(fig)
    detected = f", the output of iteration {result.stop_iteration}" if result.stop_iteration is not None else ""
    print(
        f"restored: PSNR {result.psnr:.2f} dB, EMA {result.ema_psnr:.2f} dB "
        f"({result.iterations} iterations in {result.seconds:.1f} s on {result.device}{detected}); wrote {out}/"
    )
