"""Whether a restore() runs in tiles, and which: from the inputs' shapes alone, before any conversion.

    tile=None    never tile; a fit that would not fit the device's memory is refused here, before
                 the image is converted, in constant memory
    tile=int     square tiles of that side (clipped to the image), `overlap` pixels shared by neighbours
    tile='auto'  no tiles when the whole fit fits by the estimate (dipfast.memory); otherwise the
                 largest tile of TILE_SIDES that fits, and the most tiles per step that fit, with a
                 one-line notice of the choice

Tiling needs a local forward operator (each output pixel seen through its own neighbourhood):
every task's but a user's operator= or loss=.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dipfast import input_shape, memory, nets
from dipfast.errors import InputError
from dipfast.presets import TaskPreset
from dipfast.tasks import Task

_log = logging.getLogger("dipfast")

TILE_SIDES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32)


@dataclass(frozen=True)
class TileChoice:
    tile: int  # side of the square tiles, in input pixels
    overlap: int
    per_step: int  # networks trained side by side in one step


def default_overlap(tile: int) -> int:
    return max(1, tile // 8)


def runs_at(spec, input_depth: int, side: int, factor: int) -> bool:
    """Whether the net runs at a square tile of `side` (times `factor`) as it is (working_size grows nothing)."""
    out = side * factor
    return nets.working_size(spec, input_depth, out, out) == (out, out)


def smallest_tile(spec, input_depth: int, factor: int, start: int = 1) -> int:
    """The smallest square side >= start the net runs at as it is (one shape probe per side: for messages)."""
    side = start
    while not runs_at(spec, input_depth, side, factor):
        side += 1
    return side


def _working_size(preset: TaskPreset, h: int, w: int) -> tuple[int, int]:
    """nets.working_size, but a large image's own size: the nets grow only small sides (by a few pixels
    at most otherwise), and the shape probe at a huge size takes minutes."""
    if h * w > memory.PROBE_AREA and min(h, w) >= 256:
        return h, w
    return nets.working_size(preset.net, preset.input_depth, h, w)


def _need(preset: TaskPreset, channels: int, out_h: int, out_w: int, n: int, precision: str, device, early_stop=None):
    size = _working_size(preset, out_h, out_w)
    return memory.estimate_bytes(preset.net, preset.input_depth, channels, size, n, precision, device, early_stop)


def _most_per_step(preset, channels, side, factor, limit, precision, device, free, early_stop=None) -> int:
    size = _working_size(preset, side * factor, side * factor)
    indexed = memory.most_networks_indexed(preset.net, preset.input_depth, channels, size, device)
    limit = limit if indexed is None else min(limit, indexed)
    one = _need(preset, channels, side * factor, side * factor, 1, precision, device, early_stop)
    if free is None:
        return max(1, limit)
    fixed = memory.FIXED[device.type]
    per_network = max(one - fixed, 1)
    return max(1, min(limit, (free - fixed) // per_network))


def choose(
    inputs: list,
    task: Task,
    preset: TaskPreset,
    plan,
    device,
    tile,
    overlap,
    restarts: int,
    scale: int | None,
    custom: bool,
    early_stop=None,
) -> TileChoice | None:
    """The tiling of a restore() call (None: the whole image in one fit, checked to fit here). Every
    estimate counts the early-stopping criterion's state where early_stop, the fits' EarlyStopSpec, is
    given: each tile runs it too."""
    check_arguments(tile, overlap)
    factor = task.factor(preset, scale)
    shapes = [input_shape.peek(img) for img in inputs]
    known = [s for s in shapes if s is not None]
    if isinstance(tile, int):
        if custom or task.name == "custom":
            raise InputError(
                "tiling needs a local operator, and a custom operator= or loss= acts on the whole image; pass tile=None"
            )
        if not runs_at(preset.net, preset.input_depth, tile, factor):
            least = smallest_tile(preset.net, preset.input_depth, factor, start=tile + 1)
            raise InputError(f"tile={tile} is smaller than this net runs at; use tile >= {least}")
        overlap = default_overlap(tile) if overlap is None else overlap
        if overlap >= tile:
            raise InputError(f"overlap={overlap} must be smaller than tile={tile}; the default is tile // 8")
        c = max((s[0] for s in known), default=3)
        # tiles are clipped to their image: a tile larger than every image is the image (checked at its side)
        side = min(tile, max((max(s[1], s[2]) for s in known), default=tile))
        size = (side * factor,) * 2
        memory.check_fits(preset.net, preset.input_depth, c, size, 1, plan.precision, device, early_stop)
        n_networks = restarts * max((_tiles(s, tile, overlap) for s in known), default=1)
        free = memory.available_bytes(device)
        per_step = _most_per_step(preset, c, side, factor, n_networks, plan.precision, device, free, early_stop)
        return TileChoice(tile, overlap, per_step if plan.fast else 1)
    if tile == "auto" and not custom and task.name != "custom":
        choice = _auto(known, preset, plan, device, factor, overlap, restarts, early_stop)
        if choice is not None:
            return choice
    _check_whole(shapes, preset, plan, device, factor, restarts, early_stop)
    return None


def check_arguments(tile, overlap) -> None:
    """restore()'s tile= and overlap= as values, before any image is read (sizes are checked in choose)."""
    if tile is not None and tile != "auto" and (not isinstance(tile, int) or isinstance(tile, bool)):
        raise InputError(f"tile must be 'auto', None or a positive integer; got {tile!r}")
    if overlap is not None and (not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0):
        raise InputError(f"overlap must be a non-negative integer; got {overlap!r}")


def _tiles(shape, tile: int, overlap: int) -> int:
    from dipfast.tiles import TileGrid

    return len(TileGrid.cover(shape[1], shape[2], tile, overlap))


def _auto(known, preset, plan, device, factor, overlap, restarts, early_stop) -> TileChoice | None:
    """Tiles when some step of the untiled fits would not fit (in the free memory, or within the GPU kernels' limits:
    memory.most_networks_indexed) and some tile side smaller than it does. A fast plan's step holds every same-size
    image's networks (_check_whole's count): four 12 MP photos of a batch group, each of which an H200 holds alone,
    were left untiled and then refused together."""
    free = memory.available_bytes(device)
    if free is None or not known:
        return None

    def exceeds(s) -> bool:
        h, w = s[1] * factor, s[2] * factor
        n_networks = _networks_in_step(known.count(s), restarts, plan)
        indexed = memory.most_networks_indexed(
            preset.net, preset.input_depth, s[0], _working_size(preset, h, w), device
        )
        over_index = indexed is not None and n_networks > indexed
        return over_index or _need(preset, s[0], h, w, n_networks, plan.precision, device, early_stop) > free

    too_large = [s for s in known if exceeds(s)]
    if not too_large:
        return None
    c = max(s[0] for s in too_large)
    longest = max(max(s[1], s[2]) for s in too_large)
    for side in TILE_SIDES:
        if side >= longest or not runs_at(preset.net, preset.input_depth, side, factor):
            continue
        if _need(preset, c, side * factor, side * factor, 1, plan.precision, device, early_stop) > free:
            continue
        lap = default_overlap(side) if overlap is None else overlap
        if lap >= side:
            continue
        n_networks = restarts * max(_tiles(s, side, lap) for s in known)
        per_step = _most_per_step(preset, c, side, factor, n_networks, plan.precision, device, free, early_stop)
        per_step = per_step if plan.fast else 1
        h, w = too_large[0][1:]
        _log.warning(
            "dipfast: a %d x %d fit is more than one step holds on %s (%.1f GiB free; on a GPU, tensors under 2^31 "
            "elements): tiles of %d px overlapping by %d, %d per step (tile=None refuses instead)",
            h,
            w,
            device,
            free / memory.GIB,
            side,
            lap,
            per_step,
        )
        return TileChoice(side, lap, per_step)
    return None


def _networks_in_step(same_size: int, restarts: int, plan) -> int:
    """The networks of one untiled step: a fast plan's holds every same-size image's restarts, the reference one."""
    return same_size * restarts if plan.fast else 1


def _check_whole(shapes, preset, plan, device, factor, restarts, early_stop) -> None:
    """The untiled fits' memory check from the shapes alone: same-size images share a step."""
    counts: dict[tuple[int, int, int], int] = {}
    for s in shapes:
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    for (c, h, w), n in counts.items():
        size = _working_size(preset, h * factor, w * factor)
        n_networks = _networks_in_step(n, restarts, plan)
        memory.check_fits(preset.net, preset.input_depth, c, size, n_networks, plan.precision, device, early_stop)
