"""The Triton kernels' tile configs, in one place: block shapes, warps and stages per kernel family and precision.

Fixed configs, no autotuning: an autotuner benchmarks (and syncs) on first use, which must never happen inside a
CUDA graph capture, and it re-runs kernels whose per-tile statistics are written as partials (notes/kernels.md,
section 2.2). Two tables:

  HOPPER (sm90: the H100 and H200 machines; other GPUs run them too). Starting points, not tuned on a GPU (TUNED
  below holds what a tuning run chose). They come from Inductor's Triton conv template configs for CUDA
  (torch/_inductor/template_heuristics/triton.py, conv_configs, torch 2.13), as ConvConfig(BLOCK_M, BLOCK_N,
  BLOCK_K, num_stages, num_warps):
    conv forward and dgrad, bf16: (128, 128, 64, 3, 8). DIP's convs are 128 -> 128 channels (132 in at a merge);
      Inductor's BLOCK_K = 128 configs ("optimal when IN_C=128") would leave a 4-channel tail chunk at 132, so 64.
      Shared memory: 2 B x (128 x 64 + 64 x 128) x 3 stages = 96 KiB of the 227 KiB an SM has.
    fp32 and TF32 (4 bytes an element): (128, 128, 32, 3, 8), Inductor's (128, 128, 32, 2, 8) with a third stage,
      the same 96 KiB.
    wgrad, every precision: (64, 64, BLOCK_K, 3, 4), BLOCK_K 64 (bf16) or 32. Its GEMM is C_out x C_in k k (128 x
      1152) reduced over every pixel: 64 x 64 tiles make 36 output tiles at 128 channels, a quarter of an H100's
      132 SMs, so its split_k is FILL_SMS: as many splits as give the launch two programs per SM (wgrad_splits;
      a TUNED entry sets its own).
    elementwise passes (normalise + LeakyReLU, the pad adjoint, Lanczos2): 1024 elements, 4 warps; per-channel
      reductions (BN backward, the merge's statistics): 4 channels x 1024 pixels, 4 warps, or over channels_last
      activations 64 channels x 64 pixels (a pixel's channels are contiguous there).
    per-channel passes over a plane (batch_norm_act): one image row by up to 1024 elements, the tile's long side
      along the layout's unit-stride axis (W for NCHW, C for channels_last) so loads and stores coalesce, 4 warps;
      the statistics and the backward's sums give each program rows until about 1024 programs fill the GPU.
  INTERPRETER (TRITON_INTERPRET=1): small tiles, which the interpreter runs in reasonable time on the parity
    tests' small shapes and which those tests' tile-boundary cases are built around (two pixel tiles to merge,
    two channel tiles, two K chunks: tests/parity/test_conv_bn_lrelu.py). num_warps and num_stages are ignored.

  TUNED (tuned_tiles.json beside this file): the configs a recorded autotune on a GPU chose
    (bench/ops/tune_conv_bn_lrelu.py writes it), keyed by TileKey: GPU name, op, kernel family (the direction:
    'conv' forward, 'dgrad' input gradient, 'wgrad' weight gradient), the op's shape (shape_key) and precision.
    Read once, at the first lookup on a GPU; a key without an entry takes the HOPPER table's config.

gemm_tiles() picks, in order: a config forced by forced_tiles() (the tuner's candidates, the tests' tile-boundary
cases), the TUNED entry for this GPU and shape, then the table of the interpreter flag the kernels were built with.
fitted() shrinks a GEMM config to a small problem (a 3- or 4-channel conv, an 8 x 8 level), as Inductor scales its
configs, so a 4-channel skip conv does not run 128-wide tiles that are 97% masked.

split_k (wgrad only): the weight gradient's reduction over every output pixel split into that many programs per
output tile, each writing an fp32 partial dW that a torch sum adds in a fixed order (deterministic, no atomics), so
the 36 output tiles of a 128-channel 3x3 wgrad can fill an H100's 132 SMs. FILL_SMS leaves the count to the launch
(wgrad_splits: the GPU's SMs, the grid's tiles and the reduction's length), so the same table fits a 512 px level
and a 16 px one; the choice depends on the GPU model and the shape only, so results stay deterministic on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

# as the kernel modules do: triton.jit builds for the interpreter when TRITON_INTERPRET is set at import
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class GemmTiles:
    """An implicit-GEMM kernel's tiles: BLOCK_M x BLOCK_N outputs, BLOCK_K of the reduction per step."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    split_k: int = 1  # wgrad: programs sharing one output tile's reduction, or FILL_SMS (1 for the other families)


@dataclass(frozen=True)
class PassTiles:
    """An elementwise or per-channel pass: `block` elements (pixels) by `block_c` channels per program."""

    block: int
    block_c: int
    num_warps: int


@dataclass(frozen=True)
class PlaneTiles:
    """A per-channel pass over (N, C, H, W) one image row at a time: up to `elements` of (BLOCK_W x BLOCK_C) per
    tile, each side at most max_w or max_c; the reductions aim at about `programs` programs."""

    elements: int
    max_w: int
    max_c: int
    programs: int
    num_warps: int


FILL_SMS = 0  # GemmTiles.split_k: the launch picks the splits that fill the GPU (wgrad_splits)
HOPPER_SMS = 132  # an H100 SXM's and an H200's SMs: where the HOPPER table runs on no GPU (tools under the interpreter)
FILL_PROGRAMS_PER_SM = 2  # a 64 x 64 wgrad program uses 48 KiB of shared memory: 4 fit on an SM with 227
MIN_CHUNKS_PER_SPLIT = 8  # BLOCK_K chunks each split reduces at least, so its pipeline has steps to overlap
MAX_SPLITS = 16  # the fp32 partials (split_k x dW) and their sum grow with the count

_FP32_CONV = GemmTiles(128, 128, 32, 3, 8)
_BF16_CONV = GemmTiles(128, 128, 64, 3, 8)
_HOPPER_PASS = PassTiles(1024, 4, 4)
HOPPER = {
    ("conv", "fp32"): _FP32_CONV,  # forward and the merge's forward
    ("conv", "tf32"): _FP32_CONV,
    ("conv", "bf16"): _BF16_CONV,
    ("dgrad", "fp32"): _FP32_CONV,
    ("dgrad", "tf32"): _FP32_CONV,
    ("dgrad", "bf16"): _BF16_CONV,
    ("wgrad", "fp32"): GemmTiles(64, 64, 32, 3, 4, FILL_SMS),  # and the merge's wgrad
    ("wgrad", "tf32"): GemmTiles(64, 64, 32, 3, 4, FILL_SMS),
    ("wgrad", "bf16"): GemmTiles(64, 64, 64, 3, 4, FILL_SMS),
    **{("pass", p): _HOPPER_PASS for p in PRECISIONS},
    # a per-channel pass over channels_last (N, C, H, W): the tile's channels along the contiguous axis
    **{("pass-cl", p): PassTiles(64, 64, 4) for p in PRECISIONS},
    **{("plane", p): PlaneTiles(1024, 256, 128, 1024, 4) for p in PRECISIONS},
}

_INTERPRETER_GEMM = GemmTiles(64, 16, 16, 1, 4)  # tl.dot's smallest blocks are 16
INTERPRETER = {
    **{(family, p): _INTERPRETER_GEMM for family in ("conv", "dgrad") for p in PRECISIONS},
    # split in two, so every parity test's wgrad runs the split-K path (the sum of partials)
    **{("wgrad", p): replace(_INTERPRETER_GEMM, split_k=2) for p in PRECISIONS},
    **{("pass", p): PassTiles(256, 16, 4) for p in PRECISIONS},
    **{("pass-cl", p): PassTiles(16, 8, 4) for p in PRECISIONS},  # 20 channels: three channel tiles
    # 8 x 16 at most: the parity shapes' odd widths take two W chunks and 20 channels two channel tiles
    **{("plane", p): PlaneTiles(128, 8, 16, 4, 4) for p in PRECISIONS},
}


def precision_of(bf16: bool, tf32: bool) -> str:
    return "bf16" if bf16 else "tf32" if tf32 else "fp32"


FAMILIES = ("conv", "dgrad", "wgrad")  # the GEMM kernels' directions: forward, input gradient, weight gradient
TUNED_PATH = Path(__file__).with_name("tuned_tiles.json")


@dataclass(frozen=True)
class TileKey:
    """What a tuned config is chosen for: a GPU (torch.cuda.get_device_name), an op ('conv_bn_lrelu',
    'concat_bn_conv_bn_lrelu'), a family of FAMILIES, the op's shape (shape_key) and a precision of PRECISIONS."""

    gpu: str
    op: str
    family: str
    shape: str
    precision: str


def shape_key(**dims: int) -> str:
    """The op's shape as a TileKey field, in the caller's order: shape_key(n=1, c_in=132, h=512) = 'n1-c_in132-h512'."""
    return "-".join(f"{name}{value}" for name, value in dims.items())


def tuned_table_from_json(text: str) -> dict[TileKey, GemmTiles]:
    """The TUNED table from the JSON tuned_tiles.json holds: {"entries": [{"key": {...}, "tiles": {...}, ...}]}; the
    other fields of an entry (timings, versions) are the tuner's record."""
    entries = json.loads(text)["entries"]
    return {TileKey(**e["key"]): GemmTiles(**e["tiles"]) for e in entries}


def tuned_table_to_json(entries: list[dict]) -> str:
    """tuned_tiles.json's text for entries of {"key": TileKey, "tiles": GemmTiles, **record}, sorted by key."""
    rows = [{**e, "key": asdict(e["key"]), "tiles": asdict(e["tiles"])} for e in entries]
    rows.sort(key=lambda e: tuple(e["key"].values()))
    return json.dumps({"entries": rows}, indent=1, sort_keys=True) + "\n"


@functools.cache
def tuned_table() -> dict[TileKey, GemmTiles]:
    """TUNED, read from tuned_tiles.json once (at the first lookup on a GPU; an absent file is an empty table)."""
    return tuned_table_from_json(TUNED_PATH.read_text()) if TUNED_PATH.exists() else {}


@functools.cache
def gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


_forced: dict[tuple[str, str], GemmTiles | PassTiles | PlaneTiles] = {}


@contextlib.contextmanager
def forced_tiles(overrides: dict[tuple[str, str], GemmTiles | PassTiles | PlaneTiles]):
    """Within the block, launches of (family, precision) in overrides take that config over every table: the
    tuner's candidates and the tests' small tiles. Read when an op launches, so the block must cover the backward
    too where it is meant to."""
    saved = dict(_forced)
    _forced.update(overrides)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def tiles(family: str, precision: str) -> GemmTiles | PassTiles | PlaneTiles:
    """The config of a kernel family ('conv', 'dgrad', 'wgrad', 'pass', 'plane') in a precision ('fp32', 'tf32',
    'bf16'): forced, else the table of the flag the kernels were built with."""
    forced = _forced.get((family, precision))
    return forced if forced is not None else (INTERPRETER if _INTERPRET else HOPPER)[family, precision]


def gemm_tiles(op: str, family: str, precision: str, shape: str, device: torch.device) -> GemmTiles:
    """A GEMM kernel's config: forced, else TUNED's entry for this GPU and shape, else tiles(family, precision)."""
    if (family, precision) not in _forced and device.type == "cuda" and not _INTERPRET:
        key = TileKey(gpu_name(device.index or 0), op, family, shape, precision)
        tuned = tuned_table().get(key)
        if tuned is not None:
            return tuned
    return tiles(family, precision)


def pass_tiles(dtype: torch.dtype, channels_last: bool = False) -> PassTiles:
    """The elementwise and per-channel passes' tiles for tensors of `dtype`; channels_last: a per-channel pass over
    channels_last activations, whose tile runs along the channels."""
    return tiles("pass-cl" if channels_last else "pass", precision_of(dtype == torch.bfloat16, False))


def _fit(block: int, size: int) -> int:
    """block, or the smallest power of two >= size when that is smaller; never under 16 (tl.dot's minimum)."""
    return max(16, min(block, 1 << max(size - 1, 0).bit_length()))


def fitted(config: GemmTiles, m: int, n: int, k: int) -> GemmTiles:
    """config with each block shrunk to the problem's m, n or k where the problem is smaller, and split_k to at most
    one split per BLOCK_K chunk of k (FILL_SMS stays for wgrad_splits)."""
    block_k = _fit(config.block_k, k)
    split_k = config.split_k if config.split_k == FILL_SMS else max(1, min(config.split_k, -(-k // block_k)))
    return replace(
        config, block_m=_fit(config.block_m, m), block_n=_fit(config.block_n, n), block_k=block_k, split_k=split_k
    )


def wgrad_splits(config: GemmTiles, tiles: int, k: int, sms: int) -> int:
    """The split_k of a (fitted) wgrad launch of `tiles` output tiles reducing over k pixels on a GPU of `sms` SMs:
    config's own, or for FILL_SMS the fewest splits that give FILL_PROGRAMS_PER_SM programs per SM, each split
    reducing at least MIN_CHUNKS_PER_SPLIT chunks, at most MAX_SPLITS (1 where the grid fills the GPU already)."""
    if config.split_k != FILL_SMS:
        return config.split_k
    wanted = -(-FILL_PROGRAMS_PER_SM * sms // tiles)
    return max(1, min(wanted, -(-k // config.block_k) // MIN_CHUNKS_PER_SPLIT, MAX_SPLITS))
