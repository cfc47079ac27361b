"""Tiled restore (dipfast.tiles, tile_choice, tiled_restore): the grid and its blending weights, tiles
that are exactly the separate fits of their crops, no seams, every local task through tiles, the
memory refusal before any conversion, and the one-line errors. Fits run on the CPU, on a GPU machine too: the tiles
equal their crops' separate fits bit for bit there (tests/test_cuda_restore.py checks the tiles on CUDA)."""

from __future__ import annotations

import logging
import tracemalloc
import weakref

import numpy as np
import pytest
import torch
from _helpers import FAST, TINY, TINY_NET, random_image, random_mask, smooth_image, write_png

import dipfast
from dipfast import memory, tile_choice
from dipfast.early_stop import CALIBRATED, EarlyStopSpec
from dipfast.errors import InputError
from dipfast.tiles import Blend, TileGrid, axis_positions, largest_empty_square, tile_seed

pytestmark = pytest.mark.usefixtures("auto_device_is_the_cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny nets run fastest on one thread."""


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# the grid and the blending weights


@pytest.mark.parametrize(
    "h, w, tile, overlap",
    [
        (64, 64, 16, 2),  # tiles fit exactly
        (53, 37, 16, 4),  # odd sizes: edge tiles spread inward
        (130, 17, 128, 16),  # a second tile overlapping almost all of the first; one tile across
        (40, 40, 12, 5),  # overlaps of non-neighbours (stride below tile / 2)
        (33, 70, 10, 0),  # no overlap asked
        (9, 9, 16, 2),  # image smaller than a tile: one tile, clipped
    ],
)
def test_tiles_of_one_size_cover_the_image_and_their_weights_sum_to_one(h, w, tile, overlap):
    grid = TileGrid.cover(h, w, tile, overlap)
    total = torch.zeros(h, w, dtype=torch.float64)
    for box, weight in zip(grid.boxes, grid.weights()):
        assert (box.h, box.w) == (min(tile, h), min(tile, w))
        assert 0 <= box.y and box.y + box.h <= h and 0 <= box.x and box.x + box.w <= w
        assert (weight > 0).all()
        box.crop(total).add_(weight.double())
    torch.testing.assert_close(total, torch.ones(h, w, dtype=torch.float64), atol=1e-6, rtol=0)
    for positions, side, size in ((grid.rows, grid.tile_h, h), (grid.cols, grid.tile_w, w)):
        gaps = np.diff(positions)
        assert positions[0] == 0 and positions[-1] + side == size
        assert (side - gaps >= min(overlap, side)).all()  # neighbours overlap by at least `overlap`


def test_weights_sum_to_one_at_scale():
    grid = TileGrid.cover(23, 31, 8, 3).scaled(4)
    blend = Blend(grid, 1)
    for k in range(len(grid)):
        blend.add(k, torch.ones(1, grid.tile_h, grid.tile_w))
    torch.testing.assert_close(blend.image, torch.ones(1, 92, 124), atol=1e-6, rtol=0)


def test_windows_are_raised_cosines_across_equal_overlaps():
    """Neighbours overlapping by the same width need no normalisation: rise + fall = 1 by construction."""
    grid = TileGrid.cover(28, 10, 10, 4)  # rows 0, 6, 12, 18: every overlap 4 px
    assert grid.rows == (0, 6, 12, 18)
    first, second = grid.weights()[0][:, 0], grid.weights()[1][:, 0]
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(4) + 0.5) / 4)
    np.testing.assert_allclose(second[:4].numpy(), rise, rtol=1e-6)
    np.testing.assert_allclose(first[6:].numpy(), rise[::-1], rtol=1e-6)
    assert (first[:6] == 1).all()  # flat up to the overlap, and at the image border


def test_tile_seeds_depend_on_seed_and_index_only():
    assert tile_seed(7, 0) == 7  # a one-tile grid is the untiled fit
    seeds = {tile_seed(s, k) for s in range(4) for k in range(50)}
    assert len(seeds) == 200
    assert axis_positions(100, 100, 10) == [0] and axis_positions(100, 40, 8) == [0, 30, 60]


def test_largest_empty_square():
    known = np.ones((20, 30), dtype=bool)
    known[3:10, 5:14] = False  # a 7 x 9 hole
    assert largest_empty_square(known) == 7
    assert largest_empty_square(np.ones((5, 5), dtype=bool)) == 0


# ---------------------------------------------------------------------------------------------
# tiles are the separate fits of their crops


def _separate_fits(image: np.ndarray, grid: TileGrid, seed: int, **kwargs) -> list[dipfast.Result]:
    """Each tile's crop restored alone with its tile seed: what the tiled fit must equal, tile by tile."""
    return [
        dipfast.restore(
            box.crop(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy(),
            seed=tile_seed(seed, k),
            tile=None,
            **kwargs,
        )
        for k, box in enumerate(grid.boxes)
    ]


def test_each_tile_is_the_separate_fit_of_its_crop_whatever_shares_its_step(np_rng, monkeypatch):
    image = random_image(np_rng, 26, 21)
    kwargs = {"iters": 3, "backend": "native", "precision": "fp32", **FAST}
    whole = dipfast.restore(image, seed=5, tile=10, overlap=3, **kwargs)
    info = whole.extras["tiling"]
    grid = TileGrid.cover(26, 21, 10, 3)
    assert info["grid"] == (len(grid.rows), len(grid.cols)) and len(grid) > 4
    assert info["per_step"] == len(grid)  # all tiles in one step: plenty of memory for the tiny net
    tiles = [r.image for r in _separate_fits(image, grid, 5, **kwargs)]

    expected = Blend(grid, 3)
    for k, (box, tile) in enumerate(zip(grid.boxes, tiles)):
        expected.add(k, torch.from_numpy(tile).permute(2, 0, 1))
        alone = np.ones((26, 21), dtype=bool)  # pixels of this tile and no other: the tile itself
        for j, other in enumerate(grid.boxes):
            if j != k:
                alone[other.y : other.y + other.h, other.x : other.x + other.w] = False
        inside = alone[box.y : box.y + box.h, box.x : box.x + box.w]
        assert inside.any()
        np.testing.assert_array_equal(whole.image[alone], tile[inside])
    np.testing.assert_allclose(whole.image, expected.image.permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)

    # two tiles per step: the same fits
    monkeypatch.setattr(tile_choice, "_most_per_step", lambda *args: 2)
    paired = dipfast.restore(image, seed=5, tile=10, overlap=3, **kwargs)
    assert paired.extras["tiling"]["per_step"] == 2
    # each step sets itself up: the set-ups summed over the steps, after one preparation of the call
    assert paired.extras["setup_seconds"] > 0 and paired.extras["prepare_seconds"] > 0
    np.testing.assert_array_equal(paired.image, whole.image)
    np.testing.assert_array_equal(paired.ema_image, whole.ema_image)


def test_no_seam_at_tile_edges(np_rng):
    """A constant image plus noise: the tiles fit slightly different levels. Blended, the columns and rows
    at tile edges change no more than the others; pasted without overlap (the control), they do."""
    clean = np.full((48, 48, 3), 0.5, dtype=np.float32)
    noisy = np.clip(clean + np_rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    kwargs = {"iters": 8, "seed": 1, **FAST}

    def edge_jump(result, overlap) -> float:
        grid = TileGrid.cover(48, 48, 16, overlap)
        out = result.image.mean(-1)
        dx, dy = np.abs(np.diff(out, axis=1)), np.abs(np.diff(out, axis=0))
        cols = sorted({c - 1 for c in grid.cols[1:]} | {c + grid.tile_w - 1 for c in grid.cols[:-1]})
        rows = sorted({r - 1 for r in grid.rows[1:]} | {r + grid.tile_h - 1 for r in grid.rows[:-1]})
        at_edges = np.concatenate([dx[:, cols].ravel(), dy[rows, :].ravel()]).mean()
        elsewhere = np.concatenate([np.delete(dx, cols, axis=1).ravel(), np.delete(dy, rows, axis=0).ravel()]).mean()
        return at_edges / elsewhere

    blended = edge_jump(dipfast.restore(noisy, tile=16, overlap=4, **kwargs), 4)
    pasted = edge_jump(dipfast.restore(noisy, tile=16, overlap=0, **kwargs), 0)
    # measured over three noise draws: blended 0.91-1.09, pasted 1.65-2.01
    assert blended < 1.25, blended
    assert pasted > 1.4, pasted


@pytest.mark.parametrize("noise_gate", [0.0, 1.2], ids=["ungated", "noise-gate"])
def test_early_stopped_tiles_are_the_separate_early_stopped_fits_of_their_crops(np_rng, monkeypatch, noise_gate):
    """stop='auto' in tiles: each tile stops on its own at the point its separate fit detects, whichever
    tiles share its step, and the blend holds each tile's output of that point; with the noise gate, each
    tile's gate reads the noise of its own crop."""
    clean = smooth_image(np_rng, 21, 24)  # tiles of 12: the smallest the noise estimate takes (RGB: 11 x 11)
    noisy = np.clip(clean + np_rng.normal(scale=0.1, size=clean.shape), 0, 1).astype(np.float32)
    spec = EarlyStopSpec("wmv", window=4, patience=4, noise_gate=noise_gate)
    kwargs = {"iters": 300, "stop": "auto", "early_stop": spec, "backend": "native", "precision": "fp32",
              "report_every": 1, **FAST}  # fmt: skip
    monkeypatch.setattr(tile_choice, "_most_per_step", lambda *args: 2)
    tiled = dipfast.restore(noisy, seed=2, tile=12, overlap=3, target=clean, **kwargs)
    grid = TileGrid.cover(21, 24, 12, 3)
    alone = _separate_fits(noisy, grid, 2, **kwargs)

    info = tiled.extras["tiling"]
    stops = [r.stop_iteration for r in alone]
    assert all(r.stop_reason == "early-stop" for r in alone) and len(set(stops)) > 1  # tiles stop apart
    assert info["stop_iterations"] == [stops]
    if noise_gate:
        assert info["noise_sigmas"] == [r.extras["noise_sigma"] for r in alone]
        assert 0.05 < min(info["noise_sigmas"]) and len(set(info["noise_sigmas"])) == len(alone)
    else:
        assert "noise_sigmas" not in info
    assert tiled.stop_reason == "early-stop" and tiled.stop_iteration == max(stops)
    assert tiled.iterations == max(r.iterations for r in alone) < 300
    assert info["tile_iterations"] == sum(r.iterations for r in alone)
    expected = Blend(grid, 3)
    for k, r in enumerate(alone):
        expected.add(k, torch.from_numpy(r.image).permute(2, 0, 1))
    np.testing.assert_allclose(tiled.image, expected.image.permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)

    # the history runs to the last tile's stop, the ones stopped earlier holding their last row
    assert [h.iteration for h in tiled.history] == list(range(1, tiled.iterations + 1))
    assert tiled.history[-1].criterion is not None and tiled.history[0].criterion is None


def test_the_default_stop_of_a_tiled_fit_is_the_tasks(np_rng):
    """Denoising's default is 'auto' in tiles as in one fit (the calibrated rule runs in every tile);
    stop='iterations' is the fixed count; a rule that cannot act at the tile's size is a one-line error."""
    image = random_image(np_rng, 14, 14)
    iters = CALIBRATED["denoise"].window + 10
    default = dipfast.restore(image, iters=iters, tile=8, overlap=2, report_every=iters, **FAST)
    assert len(default.extras["tiling"]["stop_iterations"][0]) == 4
    fixed = dipfast.restore(image, iters=iters, tile=8, overlap=2, stop="iterations", report_every=iters, **FAST)
    assert fixed.iterations == iters and fixed.stop_iteration is None
    assert "stop_iterations" not in fixed.extras["tiling"]
    with pytest.raises(InputError) as e:
        _tiled(image, stop="auto", early_stop=EarlyStopSpec("emv", patience=4, downsample=9))
    assert "downsample factor 9 exceeds the output's 8 x 8" in _one_line(e)


# ---------------------------------------------------------------------------------------------
# every local task through tiles


def _tiled(image, task="denoise", **kwargs):
    return dipfast.restore(image, task, iters=2, tile=8, overlap=2, **FAST, **kwargs)


@pytest.mark.parametrize("task", ["denoise", "jpeg", "enhance"])
def test_identity_tasks_through_tiles(np_rng, task):
    clean = smooth_image(np_rng, 19, 22)
    noisy = random_image(np_rng, 19, 22)
    r = _tiled(noisy, task, target=clean)
    assert r.image.shape == (19, 22, 3) and r.image.dtype == np.float32
    assert r.extras["tiling"]["grid"] == (3, 4)
    assert r.psnr == pytest.approx(dipfast.metrics.psnr(torch.from_numpy(r.image), torch.from_numpy(clean)).item())
    assert len(r.history) == 2 and r.history[-1].psnr is not None
    if task == "enhance":
        assert "coarse" in r.extras


def test_sr_tiles_the_low_resolution_input(np_rng):
    lr = random_image(np_rng, 13, 17)
    hr = smooth_image(np_rng, 26, 34)
    r = _tiled(lr, "sr", scale=2, target=hr)
    assert r.image.shape == (26, 34, 3)
    assert r.extras["tiling"]["boxes"][1] == (0, 4, 8, 8)  # in low-resolution pixels
    assert r.ssim is not None


@pytest.mark.parametrize("task", ["inpaint", "restore"])
def test_masked_tasks_through_tiles(np_rng, task):
    image, mask = random_image(np_rng, 20, 20), random_mask(np_rng, 20, 20, keep=0.6)
    r = _tiled(image, task, mask=mask)
    assert r.image.shape == (20, 20, 3) and len(r.extras["tiling"]["boxes"]) == 9


def test_a_hole_larger_than_a_tile_names_the_tile_size_needed(np_rng):
    image = random_image(np_rng, 30, 30)
    mask = np.ones((30, 30), dtype=bool)
    mask[4:16, 2:15] = False  # a 12 x 13 hole: a tile of 8 can lie inside it
    with pytest.raises(InputError) as e:
        _tiled(image, "inpaint", mask=mask)
    assert "lies inside a hole" in _one_line(e) and "tile=13" in str(e.value)


def test_flash_tiles_the_guide_alongside(np_rng):
    noflash, flash = random_image(np_rng, 18, 21), smooth_image(np_rng, 18, 21)
    r = dipfast.restore(noflash, "flash", guide=flash, iters=2, tile=8, overlap=2, net=TINY_NET, progress=False)
    assert r.image.shape == (18, 21, 3)
    with pytest.raises(InputError, match="guide is"):
        dipfast.restore(noflash, "flash", guide=flash[:10], iters=1, tile=8, net=TINY_NET, progress=False)


def test_a_list_of_images_in_tiles(np_rng):
    a, b = random_image(np_rng, 12, 12), random_image(np_rng, 20, 9)
    ra, rb = _tiled([a, b])
    assert ra.image.shape == a.shape and rb.image.shape == b.shape
    assert rb.extras["tiling"]["grid"] == (3, 2)


def test_restarts_in_tiles_average_the_tiled_fits_of_each_seed(np_rng):
    image = random_image(np_rng, 14, 12)
    both = _tiled(image, restarts=2, seed=3)
    first, second = _tiled(image, seed=3), _tiled(image, seed=4)
    np.testing.assert_allclose(both.image, (first.image + second.image) / 2, atol=1e-6, rtol=0)


def test_a_steps_tile_outputs_go_once_blended(np_rng, monkeypatch):
    """The blend is on the host: a step's tile outputs (on a GPU, 25 MB a 1024 px tile) are not kept until the last
    step, beside the later steps that the free memory was measured for."""
    monkeypatch.setattr(tile_choice, "_most_per_step", lambda *args: 3)
    fit_many, held = dipfast.engine.fit_many, []

    def recording(*args, **kwargs):
        assert all(ref() is None for ref in held), "an earlier step's tile outputs are still held"
        fits = fit_many(*args, **kwargs)
        held.extend(weakref.ref(t) for fit in fits for t in (fit.image, fit.ema_image))
        return fits

    monkeypatch.setattr(dipfast.engine, "fit_many", recording)
    r = dipfast.restore(random_image(np_rng, 20, 20), iters=2, tile=8, overlap=2, progress=False, **TINY)
    assert r.extras["tiling"]["per_step"] == 3 and len(held) == 2 * len(r.extras["tiling"]["boxes"])


# ---------------------------------------------------------------------------------------------
# stopping: the blended result so far


def test_ctrl_c_returns_the_blend_so_far_with_the_observation_in_unfitted_tiles(np_rng, monkeypatch):
    image = random_image(np_rng, 20, 20)
    monkeypatch.setattr(tile_choice, "_most_per_step", lambda *args: 3)
    calls = []

    def interrupt_second_step(progress):
        calls.append(progress.iteration)
        if len(calls) == 3:  # the second step's first report
            raise KeyboardInterrupt

    r = dipfast.restore(
        image, iters=4, tile=8, overlap=2, callback=interrupt_second_step, report_every=2, progress=False, **TINY
    )
    info = r.extras["tiling"]
    assert r.stop_reason == "interrupted"
    assert info["unfitted"] == [6, 7, 8] and "not fitted" in info["note"]
    y, x, h, w = info["boxes"][8]  # the last tile's own corner is the observation
    np.testing.assert_allclose(r.image[y + h - 1, x + w - 1], image[y + h - 1, x + w - 1], atol=1e-6)
    assert not np.allclose(r.image[0, 0], image[0, 0], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# memory: the check before any conversion, and 'auto'


def test_too_large_input_is_refused_before_conversion_in_constant_memory(monkeypatch):
    """tracemalloc sees numpy's allocations: converting the array would take 8 bytes a pixel (1.1 GB)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.GIB)
    with pytest.raises(InputError):  # the first call imports and caches what every later one uses
        dipfast.restore(np.zeros((2000, 2000), dtype=np.uint8), tile=None, device="cpu", progress=False)
    big = np.zeros((12000, 12000), dtype=np.uint8)  # 144 MB
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as e:
            dipfast.restore(big, tile=None, device="cpu", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "12000 x 12000" in _one_line(e) and "tile" in str(e.value)
    assert peak < 16 * 2**20, peak


def test_a_file_too_large_is_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("L", (900, 700)).save(path)
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.FIXED["cpu"] + 2**20)

    def never(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(dipfast.images, "load_image", never)
    with pytest.raises(InputError, match=r"at 700 x 900"):
        dipfast.restore(str(path), tile=None, progress=False, **TINY)


def test_auto_tiles_only_what_would_not_fit(np_rng, monkeypatch, caplog):
    image = random_image(np_rng, 72, 80)
    settings = dipfast.presets.apply_overrides(dipfast.presets.PRESETS["denoise"], TINY)
    need = tile_choice._need
    free = (
        need(settings, 3, 64, 64, 1, "fp32", torch.device("cpu")) + need(settings, 3, 72, 80, 1, "fp32", "cpu")
    ) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    with caplog.at_level(logging.WARNING, logger="dipfast"):
        r = dipfast.restore(image, iters=1, precision="fp32", **FAST)
    assert r.extras["tiling"]["tile"] == 64 and r.extras["tiling"]["overlap"] == 8
    assert "tiles of 64 px" in caplog.text and len(caplog.records) == 1
    small = dipfast.restore(random_image(np_rng, 40, 40), iters=1, precision="fp32", **FAST)
    assert "tiling" not in small.extras


def test_auto_judges_a_step_by_every_same_size_image_it_holds(monkeypatch):
    """A fast plan fits same-size images side by side in one step (dipfast batch's group of 4 on CUDA). A 12 MP photo
    alone fits an H200 (139 GiB free, one network under 2^31 elements) and four together do not: 'auto' tiles them,
    where it judged each photo alone, left them whole, and the step was then refused ('try ... tiles')."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 139 * memory.GIB)
    preset = dipfast.presets.PRESETS["denoise"]
    plan = dipfast.backends.Plan("native", "bf16", compile=False, cuda_graph=True)
    task, cuda = dipfast.tasks.task_named("denoise"), torch.device("cuda")
    photo = np.zeros((3000, 4000, 3), dtype=np.uint8)
    assert tile_choice.choose([photo], task, preset, plan, cuda, "auto", None, 1, None, False) is None
    choice = tile_choice.choose([photo] * 4, task, preset, plan, cuda, "auto", None, 1, None, False)
    assert choice is not None and choice.tile < 3000


def test_on_a_gpu_a_steps_channels_stay_within_cudas_grid(monkeypatch):
    """The BatchNorm and pad kernels put a step's channels (N networks' folded into one tensor) on a grid axis that CUDA
    caps at 65535 programs, at least 2 channels a program: with small tiles that, not the 2^31 offsets, bounds a step
    (992 networks of the default net's 132-channel merges at 64 px; an H200 holds ~1400 by memory, a B200 more)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**50)
    preset = dipfast.presets.PRESETS["denoise"]
    cuda = torch.device("cuda")
    probe = (preset.net, preset.input_depth, 3, (64, 64))
    assert memory._scaled_activation_and_param_bytes(*probe[:3], 64, 64).channels == 132
    assert memory.most_networks_indexed(*probe, cuda) == 65535 * 2 // 132 == 992
    memory.check_fits(*probe, 992, "bf16", cuda)
    with pytest.raises(InputError, match=r"^993 network\(s\) at 64 x 64 fold 131076 channels into one kernel launch"):
        memory.check_fits(*probe, 993, "bf16", cuda)
    assert tile_choice._most_per_step(preset, 3, 64, 1, 10**6, "bf16", cuda, 2**50) == 992


def test_a_tile_larger_than_the_image_is_checked_at_the_image(monkeypatch):
    """Tiles are clipped to their image, so tile=6000 on a 1500 x 2000 photo is one tile, the photo: checked at
    6000 x 6000 on CUDA it was refused (4.8e9 elements, past the kernels' 2^31)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 139 * memory.GIB)
    preset = dipfast.presets.PRESETS["denoise"]
    plan = dipfast.backends.Plan("native", "bf16", compile=False, cuda_graph=True)
    task, cuda = dipfast.tasks.task_named("denoise"), torch.device("cuda")
    photo = np.zeros((1500, 2000, 3), dtype=np.uint8)
    choice = tile_choice.choose([photo], task, preset, plan, cuda, 6000, None, 1, None, False)
    assert choice.tile == 6000 and choice.per_step >= 1


def test_free_gpu_memory_counts_what_the_caching_allocator_holds(monkeypatch):
    """After a fit the caching allocator keeps what it reserved, its CUDA graph's pool included, and the GPU counts it
    used: the next size of a call, a batch's next group or a notebook's next call were checked against the memory
    less the last fit's. The cache is handed back before the GPU is asked."""
    cached = {"bytes": 30 * memory.GIB}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.update(bytes=0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * memory.GIB - cached["bytes"], 0))
    assert memory.available_bytes(torch.device("cuda")) == 100 * memory.GIB


def test_on_a_gpu_a_step_keeps_its_largest_tensor_under_the_kernels_32_bit_offsets(monkeypatch):
    """The GPU kernels address a tensor with 32-bit offsets, and vmap folds a step's networks into one tensor: on CUDA
    a step holds no more networks than keep its largest tensor (the top merge's padded input, 132 x 1026 x 1026 at
    1024 px) under 2^31 elements, whatever the free memory (a GPU with a petabyte free here); a CPU has no limit."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**50)
    preset = dipfast.presets.PRESETS["denoise"]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plan = dipfast.backends.Plan("native", "bf16", compile=False, cuda_graph=True)
    probe = (preset.net, preset.input_depth, 3, (1024, 1024))
    assert memory._scaled_activation_and_param_bytes(*probe[:3], 1024, 1024).largest == 132 * 1026 * 1026
    assert memory.most_networks_indexed(*probe, cuda) == 15 and memory.most_networks_indexed(*probe, cpu) is None
    memory.check_fits(*probe, 15, "bf16", cuda)
    memory.check_fits(*probe, 16, "bf16", cpu)
    with pytest.raises(InputError, match=r"^16 network\(s\) at 1024 x 1024 make a tensor of 2.22e\+09 elements") as e:
        memory.check_fits(*probe, 16, "bf16", cuda)
    assert "at most 15 images or restarts per call" in _one_line(e)
    # tiles: as many per step as the offsets allow; a whole image past them is tiled though it fits the memory
    assert tile_choice._most_per_step(preset, 3, 1024, 1, 40, "bf16", cuda, 2**50) == 15
    assert tile_choice._most_per_step(preset, 3, 1024, 1, 40, "bf16", cpu, 2**50) == 40
    photo = np.zeros((4000, 4500, 3), dtype=np.uint8)  # 132 x 4002 x 4502 = 2.4e9 elements whole
    task = dipfast.tasks.task_named("denoise")
    choice = tile_choice.choose([photo], task, preset, plan, cuda, "auto", None, 1, None, False)
    assert choice is not None and choice.tile < 4000
    assert tile_choice.choose([photo], task, preset, plan, cpu, "auto", None, 1, None, False) is None


def test_large_sizes_are_estimated_from_a_smaller_probe_of_the_same_shape():
    from dipfast.memory import PROBE_AREA, _activation_and_param_bytes, _scaled_activation_and_param_bytes

    h, w = 1280, 1100
    assert h * w > PROBE_AREA
    exact = _activation_and_param_bytes(TINY_NET, 4, 3, h, w)
    scaled = _scaled_activation_and_param_bytes(TINY_NET, 4, 3, h, w)
    assert scaled.params == exact.params and abs(scaled.saved / exact.saved - 1) < 0.01, (scaled, exact)
    assert abs(scaled.largest / exact.largest - 1) < 0.01, (scaled, exact)


# ---------------------------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"tile": 8, "overlap": 8}, "overlap=8 must be smaller than tile=8"),
        ({"tile": 3}, "tile=3 is smaller than this net runs at; use tile >= 5"),
        ({"tile": "big"}, "tile must be 'auto', None or a positive integer"),
        ({"tile": 8, "overlap": -1}, "overlap must be a non-negative integer"),
        ({"tile": 8, "operator": lambda x: x}, "tiling needs a local operator"),
    ],
)
def test_bad_tile_values_are_one_line_errors(np_rng, kwargs, fragment):
    with pytest.raises(InputError) as e:
        dipfast.restore(random_image(np_rng, 16, 16), iters=1, **FAST, **kwargs)
    assert fragment in _one_line(e)


def test_command_takes_tile_and_overlap(np_rng, tmp_path, capsys):
    from dipfast.cli import main

    write_png(tmp_path / "in.png", random_image(np_rng, 34, 40, dtype=np.uint8))
    args = ["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--iters", "1", "--quiet"]
    assert main([*args, "--tile", "34", "--overlap", "4", "--precision", "fp32"]) == 0
    assert "2 tiles of 34 px" in capsys.readouterr().out
    assert main([*args, "--tile", "64", "--precision", "fp32", "--force"]) == 0  # a tile is clipped to the image
    assert "1 tile of 34 x 40 px" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--tile", "-3"])
    assert e.value.code == 2 and "expected 'auto', 'none' or a positive integer" in capsys.readouterr().err


def test_a_step_of_tiles_that_runs_out_of_memory_runs_again_with_fewer(np_rng, monkeypatch, caplog):
    """The estimate chose how many tiles share a step, and the device ran out all the same (CUDA raises
    torch.OutOfMemoryError; here the engine does, for steps of more than one tile): the step runs again with half as
    many, down to one, with a notice, and the result is the same bits (each tile's seed is its own)."""
    image = random_image(np_rng, 24, 24)
    kwargs = dict(iters=2, tile=16, overlap=4, seed=3, precision="fp32", **FAST)
    whole = dipfast.restore(image, **kwargs)
    assert whole.extras["tiling"]["per_step"] == 4
    real, steps = dipfast.engine.fit_many, []

    def fit_many(problems, *args, **kwargs):
        steps.append(len(problems))
        if len(problems) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB.")
        return real(problems, *args, **kwargs)

    monkeypatch.setattr(dipfast.engine, "fit_many", fit_many)
    with caplog.at_level(logging.WARNING, logger="dipfast"):
        fewer = dipfast.restore(image, **kwargs)
    assert steps == [4, 2, 1, 1, 1, 1]
    assert "4 tiles in one step ran out of memory on cpu; 2 per step from here" in caplog.text
    assert fewer.extras["tiling"]["per_step"] == 1
    np.testing.assert_array_equal(fewer.image, whole.image)
    np.testing.assert_array_equal(fewer.ema_image, whole.ema_image)
