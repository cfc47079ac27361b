"""Classical baselines measured beside DIP on the same inputs.

- bicubic (SR): the notebook's own baseline, PIL BICUBIC upsampling of the 8-bit LR image
  (dipfast.bench.data.bicubic_upsample, which also scores an SR case's input).
- nlm (denoising): scikit-image's non-local means, fast mode, 5 x 5 patches, 13 x 13 search
  window, h = 0.6 sigma with the true sigma (the scikit-image gallery's recipe).
- bm3d (denoising): the optional `bm3d` package (non-commercial licence, never a dependency),
  run only when it imports; otherwise reported as unavailable, never silently left out.

Each takes a Case-like input (observed, target shapes) and returns the image, float32 (H, W, C).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from dipfast.bench.data import SIGMA, bicubic_upsample

BASELINES = ("bicubic", "nlm", "bm3d")
TASKS_OF = {"bicubic": ("sr4", "sr8"), "nlm": ("denoise",), "bm3d": ("denoise",)}
NLM_SETTINGS = {"patch_size": 5, "patch_distance": 6, "h": 0.6 * SIGMA, "sigma": SIGMA, "fast_mode": True}


def unavailable(name: str) -> str | None:
    """Why a baseline cannot run here, or None when it can."""
    if name == "bm3d" and importlib.util.find_spec("bm3d") is None:
        return "the optional bm3d package is not installed (pip install bm3d; non-commercial licence)"
    return None


def applies(name: str, bench_task: str) -> bool:
    return bench_task in TASKS_OF[name]


def nlm(noisy: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    out = denoise_nl_means(noisy, channel_axis=-1, **NLM_SETTINGS)
    return np.clip(out, 0, 1).astype(np.float32).reshape(noisy.shape)


def bm3d(noisy: np.ndarray) -> np.ndarray:
    import bm3d as bm3d_lib

    if noisy.shape[2] == 3:
        out = bm3d_lib.bm3d_rgb(noisy, SIGMA)
    else:
        out = bm3d_lib.bm3d(noisy[..., 0], SIGMA)[..., None]
    return np.clip(out, 0, 1).astype(np.float32)


def run(name: str, observed: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """The baseline's output for one input (the caller times it)."""
    reason = unavailable(name)
    if reason is not None:
        raise RuntimeError(f"baseline {name!r} is unavailable: {reason}")
    if name == "bicubic":
        return bicubic_upsample(observed, target_shape[:2])
    if name == "nlm":
        return nlm(observed)
    if name == "bm3d":
        return bm3d(observed)
    raise ValueError(f"unknown baseline {name!r}; valid: {list(BASELINES)}")


def settings(name: str) -> dict:
    if name == "nlm":
        return {"function": "skimage.restoration.denoise_nl_means", **NLM_SETTINGS}
    if name == "bm3d":
        return {"function": "bm3d.bm3d_rgb / bm3d.bm3d", "sigma_psd": SIGMA}
    return {"function": "PIL.Image.resize(BICUBIC) of the 8-bit LR image"}
