"""dipfast.restore_many(): many images, each its own fit, into one folder; resumable, nothing lost.

The driver (the calling process):
1. expands the inputs (files, folders searched recursively by image suffix, globs) to sources,
   each with its key: the output's path relative to out_dir (a folder's files keep their paths
   below it; a file or a glob's match keeps its name, or its path below the glob's fixed part);
2. hashes each input (and its mask) and skips those whose manifest record (manifest.py) has the
   same hashes and settings and whose output exists;
3. decodes the rest (a corrupt image, a mask of another size, an output folder that cannot be
   written is recorded as that image's error, and the rest goes on) and groups same-size images;
4. runs each group, here or as a Ray task (batch_ray.py), and as each group comes back writes its
   outputs (temporary name, then rename) and one manifest record per image.

Same seed, same output: every image is fitted with `seed` (as `dipfast restore --seed` would),
whichever images share its group. On the CPU a group is one image: restore() on a list trains
its networks one after another there (no speed to gain); grouped, they give the same bits too
(FlatParameters pads each network's row: tests/test_group_invariance.py), with the same torch
thread count. On CUDA
a group of N is one step with grouped convolutions (the speed of batching), whose rounding
differs from N single convolutions: outputs match the single-image ones to float rounding, and
groups are cut from the whole sorted input list, so a rerun forms the same groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from dipfast import images, tile_choice
from dipfast.batch_group import GroupTask, Item, run_group
from dipfast.errors import InputError
from dipfast.manifest import Manifest
from dipfast.tasks import task_named

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".pnm", ".tga")
UNSUPPORTED_TASKS = ("flash", "custom")  # a guide per image, a user's callable: not a folder job (yet)


@dataclass(frozen=True)
class Source:
    path: Path  # the input file
    key: str  # the output's path relative to out_dir, '/'-separated


@dataclass
class BatchSummary:
    """What restore_many() did: this run's records (manifest.py), and the counts."""

    records: list[dict] = field(default_factory=list)
    restored: int = 0
    skipped: int = 0  # done by an earlier run with the same input and settings
    failed: int = 0
    seconds: float = 0.0
    manifest: Path | None = None
    interrupted: bool = False

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "error"]


def restore_many(
    inputs,
    out_dir,
    *,
    task: str = "denoise",
    preset: str | None = None,
    scale: int | None = None,
    mask_dir=None,
    target_dir=None,
    iters: int | None = None,
    backend: str = "auto",
    precision: str = "auto",
    device="auto",
    batch: int = 4,
    seed: int = 0,
    ray=None,
    stop: str | None = None,
    tile: int | str | None = "auto",
    overlap: int | None = None,
    progress: bool = True,
    **overrides,
) -> BatchSummary:
    """Restore every image of `inputs` into `out_dir`, keeping relative paths and formats.

    inputs: a path, a glob or a list of them (files; folders, searched recursively for image files).
    out_dir: created if missing; gets the outputs and the manifest (manifest.jsonl).
    mask_dir: for 'inpaint' and 'restore', the masks at the inputs' relative paths (any image suffix).
    target_dir: ground truths at the outputs' relative paths: the manifest gets their PSNR.
    batch: the most networks trained in one step (CUDA; one on the CPU, see the module docstring).
    ray: None (this process), True (RAY_ADDRESS, or a local cluster) or a Ray address.
    task, preset, scale, iters, backend, precision, device, seed, stop, tile, overlap, **overrides: as
        restore() (an image in tiles is one restore() of its own; its tiles share steps).
    Ctrl-C (KeyboardInterrupt) stops the batch: every finished image keeps its output and record, and
    the summary comes back with interrupted=True.

    >>> summary = dipfast.restore_many("photos/", "restored/", iters=1000)  # doctest: +SKIP
    >>> summary.restored, summary.skipped, summary.failed  # doctest: +SKIP
    """
    from dipfast import api

    if task in UNSUPPORTED_TASKS:
        raise InputError(f"task {task!r} is not available in batch; restore such images one at a time")
    if task in ("inpaint", "restore") and mask_dir is None:
        raise InputError(f"task {task!r} needs mask_dir= (--mask-dir): the masks at the inputs' relative paths")
    for name, value, least in (("batch", batch, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InputError(f"{name} must be an integer >= {least}; got {value!r}")
    _check_names(backend, precision)
    tile_choice.check_arguments(tile, overlap)
    settings_obj = api._settings(task_named(task), preset, scale, iters, dict(overrides))
    stop_rule = api.stop_rule_of(task_named(task), stop, None, settings_obj.iterations)
    # Everything that changes an output belongs in `settings`: a rerun with another value recomputes.
    settings = {
        "task": task,
        "preset": settings_obj,
        "stop": stop_rule if stop_rule is not None else "iterations",
        "backend": backend,
        "precision": precision,
        "device": str(device),
        "seed": seed,
    }
    if (tile, overlap) != ("auto", None):  # the default is what batches ran before --tile: their records hold
        settings.update(tile=tile, overlap=overlap)
    settings = _jsonable(settings)
    restore_kwargs = {
        "task": task,
        "preset": preset,
        "scale": scale,
        "iters": iters,
        "seed": seed,
        "device": device,
        "backend": backend,
        "precision": precision,
        "stop": stop,
        "tile": tile,
        "overlap": overlap,
        "progress": False,
        **overrides,
    }

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {str(out_dir)!r}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"the output folder {str(out_dir)!r} is not writable; check its permissions")
    sources = expand_inputs(inputs, exclude=out_dir)
    mask_dir = _folder(mask_dir, "mask_dir")
    target_dir = _folder(target_dir, "target_dir")

    start = time.perf_counter()
    summary = BatchSummary(manifest=out_dir / "manifest.jsonl")
    manifest = Manifest(out_dir)  # the folder's lock: from here on, this driver alone writes there
    _remove_stale_temporaries(out_dir)
    bar = tqdm(total=len(sources), disable=not progress, unit="img", dynamic_ncols=True)
    try:
        pending = []
        for source in sources:
            job = _prepare(source, mask_dir, target_dir, settings)
            if job.error is None and manifest.finished(source.key, job.fingerprint):
                summary.skipped += 1
                bar.update(1)
                continue
            if job.error is None:  # only images to compute are decoded
                try:
                    _check(job, out_dir)
                except InputError as e:
                    job.error = str(e)
            if job.error is not None:
                _record(manifest, summary, job, {"error": job.error})
                bar.update(1)
            else:
                pending.append(job)
        if pending:
            runner = _Runner(ray, device, batch)
            groups = plan_groups(pending, runner.group_size)
            jobs = {job.source.key: job for job in pending}

            def finished(outcomes: list[dict]) -> None:
                for outcome in outcomes:
                    with _interrupt_after():  # an output and its record go together
                        _finish(manifest, summary, out_dir, jobs[outcome["key"]], outcome)
                    bar.update(1)

            runner.run(groups, lambda group: _task(group, restore_kwargs), finished)
    except KeyboardInterrupt:  # what finished is written and recorded; the rerun does the rest
        summary.interrupted = True
    finally:
        bar.close()
        manifest.close()
        summary.seconds = time.perf_counter() - start
    return summary


# -- inputs --------------------------------------------------------------------------------------


def expand_inputs(inputs, exclude: Path | None = None) -> list[Source]:
    """Files, folders (recursively, image suffixes only, hidden files skipped) and globs -> sources, by key.

    A file named directly is kept whatever its suffix or state (a missing one becomes that image's
    error). Files under `exclude` (the output folder) are left out, so outputs never become inputs.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise InputError("no inputs given; name image files, folders or globs")
    skip = Path(exclude).resolve() if exclude is not None else None
    found: dict[str, Source] = {}
    skipped = 0  # images left out as inside the output folder
    for given in inputs:
        text = os.fspath(given)
        if _is_glob(text):
            base = _glob_base(text)
            candidates = [(Path(p), Path(p).relative_to(base)) for p in sorted(_glob(text)) if Path(p).is_file()]
            candidates = [(p, rel) for p, rel in candidates if _is_image(p)]
        elif Path(text).is_dir():
            root = Path(text)
            candidates = [(p, p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and _is_image(p)]
            candidates = [(p, rel) for p, rel in candidates if not any(part.startswith(".") for part in rel.parts)]
        else:
            candidates = [(Path(text), Path(Path(text).name))]
        for path, rel in candidates:
            if skip is not None and path.exists() and path.resolve().is_relative_to(skip):
                skipped += 1
                continue
            key = rel.as_posix()
            if key in found and found[key].path != path:
                raise InputError(
                    f"inputs {str(found[key].path)!r} and {str(path)!r} would both be written to {key!r}; "
                    "restore them in separate runs, or name their common parent folder"
                )
            found[key] = Source(path, key)
    if not found and skipped:
        raise InputError(
            f"every image found ({skipped}) is inside the output folder {os.fspath(exclude)!r}, and outputs never "
            "become inputs; choose an output folder outside the inputs"
        )
    if not found:
        raise InputError(f"no image files found in {[os.fspath(i) for i in inputs]}; suffixes: {list(IMAGE_SUFFIXES)}")
    return [found[k] for k in sorted(found)]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob without wildcards: its matches' keys are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern, recursive=True)


def _folder(path, name: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{name} {str(path)!r} is not a folder")
    return path


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of a killed run (images.write_atomic's names): never an output."""
    for tmp in out_dir.rglob(f".*{images.TEMP_MARK}*"):
        tmp.unlink(missing_ok=True)


def _check_names(backend: str, precision: str) -> None:
    from dipfast.backends import BACKENDS, PRECISIONS

    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")


def _jsonable(value):
    """Settings as JSON values: dataclasses as {'type': name, fields...}, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **fields}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# -- one image's preparation and record ------------------------------------------------------------


@dataclass
class _Job:
    source: Source
    fingerprint: dict = field(default_factory=dict)  # input and mask hashes, settings: what a rerun matches
    mask_path: Path | None = None
    target_path: Path | None = None
    shape: tuple[int, int, int] | None = None  # (C, H, W) of the decoded input
    error: str | None = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _companion(folder: Path | None, key: str) -> Path | None:
    """The file for `key` in a mask or target folder: the same relative path, or its stem with any image suffix."""
    if folder is None:
        return None
    exact = folder / key
    if exact.is_file():
        return exact
    stem = exact.with_suffix("")
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem.with_suffix(suffix), stem.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def _prepare(source: Source, mask_dir, target_dir, settings: dict) -> _Job:
    """Hash one image (and its mask) and find its companions; a failure becomes its one-line error."""
    job = _Job(source)
    try:
        data = _read(source.path, "input")
        job.fingerprint = {"input_sha256": hashlib.sha256(data).hexdigest(), "mask_sha256": None, "settings": settings}
        if mask_dir is not None:
            job.mask_path = _companion(mask_dir, source.key)
            if job.mask_path is None:
                raise InputError(f"no mask for {source.key!r} in {str(mask_dir)!r}; give one at the same relative path")
            job.fingerprint["mask_sha256"] = hashlib.sha256(_read(job.mask_path, "mask")).hexdigest()
        job.target_path = _companion(target_dir, source.key)
    except InputError as e:
        job.error = str(e)
    return job


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name} file {str(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{name} {str(path)!r} is a folder, not an image file") from None
    except OSError as e:
        raise InputError(f"{name} file {str(path)!r} cannot be read: {e.strerror or e}") from None


def _check(job: _Job, out_dir: Path) -> None:
    """Decode the input (and mask), learn its shape, and make sure its output can be written."""
    x, _, _ = images.to_tensor(images.load_image(job.source.path, "input"), "input")
    job.shape = tuple(x.shape)
    if job.mask_path is not None:
        mask = images.decode_image(_read(job.mask_path, "mask"), f"mask file {str(job.mask_path)!r}")
        if (mask.height, mask.width) != job.shape[1:]:
            raise InputError(
                f"mask {str(job.mask_path)!r} is {mask.height} x {mask.width} but the image is "
                f"{job.shape[1]} x {job.shape[2]}; give a mask of the image's size"
            )
    out = out_dir / job.source.key
    if out.exists() and job.source.path.exists() and os.path.samefile(out, job.source.path):
        raise InputError(f"output {str(out)!r} is the input file; choose another output folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output folder {str(out.parent)!r} cannot be created: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"output folder {str(out.parent)!r} is not writable; check its permissions")


def _finite(v):
    return v if isinstance(v, float) and math.isfinite(v) else None


def _record(manifest: Manifest, summary: BatchSummary, job: _Job, outcome: dict) -> None:
    error = outcome.get("error")
    record = {
        "output": job.source.key,
        "input": str(job.source.path),
        "input_sha256": job.fingerprint.get("input_sha256"),
        "mask": str(job.mask_path) if job.mask_path is not None else None,
        "mask_sha256": job.fingerprint.get("mask_sha256"),
        "settings": job.fingerprint.get("settings"),
        "status": "error" if error else "ok",
        "error": error,
        "iterations": outcome.get("iterations"),
        "stop_reason": outcome.get("stop_reason"),
        "seconds": _finite(outcome.get("seconds")),
        "psnr": _finite(outcome.get("psnr")),
        "ema_psnr": _finite(outcome.get("ema_psnr")),
        "output_sha256": outcome.get("output_sha256"),
        "ran": outcome.get("ran"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.add(record)
    summary.records.append(record)
    if error:
        summary.failed += 1
    else:
        summary.restored += 1


@contextlib.contextmanager
def _interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block is done, then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _finish(manifest: Manifest, summary: BatchSummary, out_dir: Path, job: _Job, outcome: dict) -> None:
    """Write a group member's output (temporary name, then rename), then its record."""
    if outcome.get("error") is None:
        try:
            images.write_atomic(out_dir / job.source.key, outcome["output"])
            outcome = {**outcome, "output_sha256": hashlib.sha256(outcome["output"]).hexdigest()}
        except InputError as e:
            outcome = {**outcome, "error": str(e)}
    _record(manifest, summary, job, outcome)


# -- groups ----------------------------------------------------------------------------------------


def plan_groups(jobs: list, group_size: int) -> list[list]:
    """Jobs (sorted by key) -> groups of at most `group_size` with one shape each, in key order.

    Groups are cut from each shape's jobs in key order; jobs whose check fails are recorded
    by the caller, not grouped.
    """
    by_shape: dict[tuple, list] = {}
    for job in jobs:
        by_shape.setdefault(job.shape, []).append(job)
    groups = [members[i : i + group_size] for members in by_shape.values() for i in range(0, len(members), group_size)]
    return sorted(groups, key=lambda g: g[0].source.key)


def _task(group: list[_Job], restore_kwargs: dict) -> GroupTask:
    items = []
    for job in group:
        mask = job.mask_path.read_bytes() if job.mask_path is not None else None
        target = job.target_path.read_bytes() if job.target_path is not None else None
        items.append(Item(job.source.key, job.source.path.read_bytes(), mask, target))
    return GroupTask(restore_kwargs, tuple(items))


class _Runner:
    """Where the groups run: this process, or Ray tasks; and how many images a group may hold."""

    def __init__(self, ray, device, batch: int):
        self.ray = ray
        if ray is None or ray is False:
            from dipfast.api import resolve_device

            on_cuda = resolve_device(device).type == "cuda"
        else:
            from dipfast import batch_ray

            self.cluster = batch_ray.Cluster(None if ray is True else ray)
            on_cuda = self.cluster.has_gpus and str(device) != "cpu"
        self.group_size = batch if on_cuda else 1

    def run(self, groups: list, make_task, finished) -> None:
        """Each group's task, made when it is due (its files are read then), and its outcomes to `finished`."""
        if self.ray is None or self.ray is False:
            for group in groups:
                finished(run_group(make_task(group)))
            return
        try:
            self.cluster.run(((make_task(g), g) for g in groups), _estimate, finished)
        finally:
            self.cluster.close()


def _estimate(task: GroupTask, group: list) -> int:
    """Bytes the group's fit needs on a GPU (memory.estimate_bytes), for Ray's GPU packing."""
    from dipfast import api, memory, nets

    kw = task.restore_kwargs
    overrides = {k: v for k, v in kw.items() if k not in _RESTORE_ARGS}
    preset = api._settings(task_named(kw["task"]), kw["preset"], kw["scale"], kw["iters"], overrides)
    c, h, w = group[0].shape
    factor = preset.scale or 1
    size = nets.working_size(preset.net, preset.input_depth, h * factor, w * factor)
    precision = kw["precision"] if kw["precision"] == "bf16" else "fp32"
    return memory.estimate_bytes(preset.net, preset.input_depth, c, size, len(group), precision, "cuda")


_RESTORE_ARGS = ("task", "preset", "scale", "iters", "seed", "device", "backend", "precision", "stop", "progress")


def print_summary(summary: BatchSummary, file=None) -> None:
    """The errors, one per line, then the counts (on `file`, by default stdout)."""
    file = file or sys.stdout
    for record in summary.errors:
        print(f"  {record['output']}: {record['error']}", file=file)
    rate = summary.restored / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.restored} restored ({rate:.3g} images/s), {summary.skipped} already done, "
        f"{summary.failed} failed; manifest: {summary.manifest}" + (" [interrupted]" if summary.interrupted else ""),
        file=file,
    )
