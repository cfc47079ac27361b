"""A group's fit, what a worker runs (here or as a Ray task, batch_ray.py): same-size images as bytes in, one
restore() call, each image's output file as bytes and its figures out. It takes and returns bytes, never
paths, so it runs anywhere dipfast is installed, with no shared disk."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from dipfast import api, images
from dipfast.errors import InputError, NumericalError


@dataclass(frozen=True)
class Item:
    """One image of a group, as a worker gets it: the files' bytes, so workers need no shared disk."""

    key: str
    image: bytes
    mask: bytes | None = None
    target: bytes | None = None


@dataclass(frozen=True)
class GroupTask:
    """Same-size images fitted in one restore() call with the same settings."""

    restore_kwargs: dict
    items: tuple[Item, ...]


def run_group(task: GroupTask, worker: str = "local") -> list[dict]:
    """Fit a group's images in one restore() call; one outcome per image: the output file's bytes
    and the figures, or its one-line error. A failing group is retried image by image, so one bad
    image (or a group too big for the memory) costs only itself.

    Runs anywhere dipfast is installed: it takes and returns bytes, never paths.
    """
    outcomes, members = {}, []
    for item in task.items:
        try:
            image = images.decode_image(item.image, f"input {item.key!r}")
            mask = images.decode_image(item.mask, f"mask of {item.key!r}") if item.mask is not None else None
            target = images.decode_image(item.target, f"target of {item.key!r}") if item.target is not None else None
            members.append((item, image, mask, target))
        except InputError as e:
            outcomes[item.key] = {"key": item.key, "error": str(e)}
    for outcome in _fit(members, task.restore_kwargs, worker):
        outcomes[outcome["key"]] = outcome
    return [outcomes[item.key] for item in task.items]


def _fit(members: list, restore_kwargs: dict, worker: str) -> list[dict]:
    if not members:
        return []
    kwargs = dict(restore_kwargs)
    if any(m[2] is not None for m in members):
        kwargs["mask"] = [m[2] for m in members]
    if any(m[3] is not None for m in members):
        kwargs["target"] = [m[3] for m in members]
    try:
        results = api.restore([m[1] for m in members], **kwargs)
    except (InputError, NumericalError, RuntimeError, MemoryError) as e:  # RuntimeError: CUDA out of memory
        if len(members) > 1:
            return [outcome for m in members for outcome in _fit([m], restore_kwargs, worker)]
        return [{"key": members[0][0].key, "error": _one_line(e)}]
    if any(r.stop_reason == "interrupted" for r in results):
        raise KeyboardInterrupt  # an interrupted fit is not a finished image: the rerun redoes it
    outcomes = []
    for (item, *_), r in zip(members, results):
        outcome = {
            "key": item.key,
            "iterations": r.iterations,
            "stop_reason": r.stop_reason,
            "seconds": r.seconds,
            "psnr": r.psnr,
            "ema_psnr": r.ema_psnr,
            "ran": {
                "host": socket.gethostname(),
                "device": r.device,
                "backend": r.backend,
                "precision": r.precision,
                "worker": worker,
                "pid": os.getpid(),
                "group": len(members),
            },
        }
        try:
            outcome["output"] = images.encode_image(r.image, Path(item.key).suffix)
        except InputError as e:
            outcome = {"key": item.key, "error": str(e)}
        outcomes.append(outcome)
    return outcomes


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return first if isinstance(e, InputError) else f"{type(e).__name__}: {first}"
