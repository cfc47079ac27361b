"""Shared pieces of the API, engine, command and property tests: a tiny net and small images.

The tiny net (two levels of 8 channels, 4 input channels) runs an iteration on a 16 x 16
image in a few milliseconds on one CPU core, so the tests can afford a handful of iterations
per task. Presets keep all their other settings (reg_noise_std, lr, backtracking, EMA, input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib

import numpy as np
import torch
from PIL import Image

from dipfast import engine
from dipfast.nets import SkipSpec
from dipfast.presets import PRESETS

TINY_NET = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
TINY = {"net": TINY_NET, "input_depth": 4}  # restore() overrides
FAST = {"progress": False, **TINY}  # restore(x, iters=3, **FAST)
TINY_PRESET = dataclasses.replace(PRESETS["denoise"], **TINY)  # the steps' tests: denoising on the tiny net


def random_problem(rng: torch.Generator, h: int = 16, w: int = 12) -> engine.Problem:
    """An engine problem for the steps' tests: a random (1, 3, h, w) observation and target, no operator."""
    y, target = torch.rand(1, 3, h, w, generator=rng), torch.rand(1, 3, h, w, generator=rng)
    return engine.Problem(input_shape=(4, h, w), z=None, out_size=(h, w), n_channels=3, y=y, target=target)


# CUDA's reflection-pad and bilinear-upsample backward kernels add with atomics (PyTorch lists both as
# nondeterministic), so two runs of one fit differ in their last bits there (H200,
# bench/results/2026-12-04-h200-504226cc86/). The tiny net without them, under deterministic_algorithms(),
# is what a bit-for-bit promise can be tested with on CUDA.
DETERMINISTIC_NET = SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2), pad="zero",
                             upsample_mode="nearest")  # fmt: skip


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms inside (cuDNN picks deterministic algorithms; an op without a
    deterministic CUDA kernel raises), the previous setting restored after."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def make_rng(key: str) -> np.random.Generator:
    """A generator seeded from a test's node id: fresh inputs per test, reproducible per test."""
    return np.random.default_rng(zlib.crc32(key.encode()))


def random_image(rng: np.random.Generator, h: int, w: int, c: int | None = 3, dtype=np.float32) -> np.ndarray:
    """(H, W) when c is None, else (H, W, C); integers over their full range, floats in [0, 1]."""
    shape = (h, w) if c is None else (h, w, c)
    dtype = np.dtype(dtype)
    if dtype.kind == "u":
        return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)
    return rng.random(shape).astype(dtype)


def smooth_image(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    """A smooth random float32 (H, W, C) image in [0.1, 0.9]: gradients and low-frequency waves."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = []
    for _ in range(c):
        a, b, f, g = rng.uniform(-1, 1, 4)
        chans.append(0.5 + 0.2 * a * xx + 0.2 * b * yy + 0.1 * np.sin(2 * np.pi * (f * xx + g * yy)))
    return np.clip(np.stack(chans, -1), 0.1, 0.9).astype(np.float32)


def random_mask(rng: np.random.Generator, h: int, w: int, keep: float = 0.7) -> np.ndarray:
    """(H, W) bool, True = known pixel, with at least one known and one missing pixel when h*w > 1."""
    m = rng.random((h, w)) < keep
    if m.size > 1:
        m.flat[0], m.flat[-1] = True, False
    return m


def write_png(path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def params_of(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same_params(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny nets are dominated by thread hand-offs: one thread runs them several times faster,
    and much faster when other processes share the cores. Restores the caller's setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
