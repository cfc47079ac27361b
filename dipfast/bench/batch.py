"""`dipfast bench batch`: images per hour of restore_many() in this process and on a local Ray cluster
of 1 and 2 workers, and Ray's overhead per task.

Each configuration restores the same synthetic images (seeded noise, PNG) into a fresh folder.
Ray clusters are started per worker count; a warm-up pass (one image per worker) first brings
every worker's torch and dipfast imports in, and the cluster's start and that pass are reported
apart from the timed pass. Every worker (and the local run) holds one CPU and one torch thread,
so the worker counts compare like with like.

Ray's overhead per task is measured as a round trip: a task that carries a group's payload (the
image file's bytes) to a warm worker and returns it unchanged, timed from submission until the
driver holds the result. It is set against one task's time at the chosen settings, extrapolated
from the measured time per iteration (`--ref-size`, default net) times the preset's iterations.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dipfast.errors import InputError


def _write_images(folder: Path, n: int, size: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k:04d}.png")


def _timed(src: Path, out: Path, **kwargs) -> dict:
    from dipfast.batch import restore_many

    start = time.perf_counter()
    summary = restore_many(src, out, **kwargs)
    wall = time.perf_counter() - start
    if summary.failed:
        raise InputError(f"bench batch: {summary.failed} images failed: {summary.errors[0]['error']}")
    fits = [r["seconds"] for r in summary.records]
    return {
        "images": summary.restored,
        "wall_s": wall,
        "images_per_hour": 3600 * summary.restored / wall,
        "fit_s_mean": statistics.fmean(fits),
    }


def _echo(task):
    return [{"key": item.key, "output": item.image} for item in task.items]


def _round_trips(ray, src: Path, n: int) -> list[float]:
    """Seconds from submission to result for n payload-only tasks, one at a time, on a warm worker."""
    from dipfast.batch import GroupTask, Item

    data = sorted(src.glob("*.png"))[0].read_bytes()
    task = GroupTask({}, (Item("0.png", data),))
    echo = ray.remote(_echo)
    ray.get(echo.remote(task))  # the worker's first call
    times = []
    for _ in range(n):
        start = time.perf_counter()
        ray.get(echo.remote(task))
        times.append(time.perf_counter() - start)
    return times


def _seconds_per_iteration(size: int, iters: int, device, seed: int) -> float:
    """The default net's warm time per iteration at size x size (restore()'s loop rate)."""
    from dipfast import restore

    x = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    restore(x, iters=2, stop="iterations", device=device, progress=False)  # warm-up: first-call costs
    r = restore(x, iters=iters, stop="iterations", device=device, progress=False)
    return 1 / r.its


def run_batch_bench(
    *,
    images: int,
    size: int,
    iters: int,
    net: str,
    workers: list[int],
    batch: int,
    ref_size: int,
    ref_iters: int,
    round_trips: int,
    device,
    seed: int,
    progress: bool,
) -> dict:
    import torch

    from dipfast.bench.runs import net_overrides
    from dipfast.presets import PRESETS

    common = {"iters": iters, "stop": "iterations", "seed": seed, "progress": progress, **net_overrides(net, "denoise")}
    rows, ray_info = [], {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="dipfast-bench-batch-") as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        _write_images(src, images, size, seed)
        torch.set_num_threads(1)  # one worker, one CPU: as each Ray task below
        try:
            _timed(src, tmp / "warm", device=device, **{**common, "iters": 1})
            for b in sorted({1, batch}):
                row = _timed(src, tmp / f"local-b{b}", device=device, batch=b, **common)
                rows.append({"mode": "local", "workers": 1, "batch": b, **row})
        finally:
            torch.set_num_threads(threads)
        try:
            import ray
        except ImportError:
            ray = None
            ray_info["skipped"] = 'Ray is not installed (pip install "dipfast[ray]")'
        for k in workers if ray is not None else []:
            start = time.perf_counter()
            ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False)
            try:
                started = time.perf_counter() - start
                warm = _timed(src, tmp / f"ray{k}-warm", ray=True, **{**common, "iters": 1})
                row = _timed(src, tmp / f"ray{k}", ray=True, batch=batch, **common)
                rows.append({"mode": "ray", "workers": k, "batch": batch, "cluster_start_s": started, **row})
                rows[-1]["warm_up_s"] = warm["wall_s"]
                if k == min(workers):
                    trips = _round_trips(ray, src, round_trips)
                    ray_info["round_trip_ms"] = {
                        "median": 1000 * statistics.median(trips),
                        "p90": 1000 * sorted(trips)[int(0.9 * (len(trips) - 1))],
                        "n": len(trips),
                        "payload_bytes": len(sorted(src.glob("*.png"))[0].read_bytes()),
                    }
            finally:
                ray.shutdown()

    per_it = _seconds_per_iteration(ref_size, ref_iters, device, seed)
    preset_iters = PRESETS["denoise"].iterations
    task_s = per_it * preset_iters
    if "round_trip_ms" in ray_info:
        ray_info["reference_task_s"] = task_s
        ray_info["overhead_fraction"] = ray_info["round_trip_ms"]["median"] / 1000 / task_s
    local_1 = next(r for r in rows if r["mode"] == "local" and r["batch"] == 1)
    for r in rows:
        r["speedup_vs_local"] = r["images_per_hour"] / local_1["images_per_hour"]
    return {
        "suite": "batch",
        "settings": {
            "images": images,
            "size": size,
            "iters": iters,
            "net": net,
            "workers": workers,
            "batch": batch,
            "ref_size": ref_size,
            "ref_iters": ref_iters,
            "ref_seconds_per_iteration": per_it,
            "ref_preset_iterations": preset_iters,
            "device": str(device),
        },
        "rows": rows,
        "ray": ray_info,
    }


def batch_markdown(report: dict) -> str:
    from dipfast.bench.report import _f, _header, table

    s = report["settings"]
    out = io.StringIO()
    out.write(_header(report, "dipfast bench batch"))
    out.write(
        f"{s['images']} images of {s['size']} x {s['size']}, {s['iters']} iterations each, net {s['net']}; "
        "one CPU and one torch thread per worker.\n\n"
    )
    rows = [
        [
            r["mode"],
            str(r["workers"]),
            str(r["batch"]),
            _f(r["images_per_hour"], "{:.0f}"),
            _f(r["speedup_vs_local"]),
            _f(r["wall_s"]),
            _f(r.get("cluster_start_s")),
            _f(r.get("warm_up_s")),
        ]
        for r in report["rows"]
    ]
    headers = ["mode", "workers", "batch", "images/hour", "x local", "wall s", "cluster start s", "warm-up s"]
    out.write(table(headers, rows) + "\n")
    ray = report["ray"]
    if "round_trip_ms" in ray:
        t = ray["round_trip_ms"]
        out.write(
            f"\nRay round trip per task (warm worker, {t['payload_bytes']} B payload): median {t['median']:.2f} ms, "
            f"p90 {t['p90']:.2f} ms over {t['n']}. One task at the default settings on "
            f"{s['ref_size']} x {s['ref_size']} (default net, {s['ref_preset_iterations']} iterations at the measured "
            f"{1000 * s['ref_seconds_per_iteration']:.1f} ms/iteration): {ray['reference_task_s']:.1f} s, so the "
            f"overhead is {100 * ray['overhead_fraction']:.2g}% of a task; it stays under 2% for any task longer than "
            f"{50 * t['median'] / 1000:.2g} s ({1e6 * t['median'] / 1000 * 50 / s['ref_preset_iterations']:.3g} "
            f"us/iteration over {s['ref_preset_iterations']} iterations).\n"
        )
    elif "skipped" in ray:
        out.write(f"\nRay: {ray['skipped']}\n")
    return out.getvalue()
