"""restore_many(ray=True) on a local 2-CPU Ray cluster (one per module): the outputs of the local path,
one record per image, and a worker killed in the middle of a task. Tiny net, 16 x 16 images."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY, make_rng, random_image, torch_threads
from PIL import Image

import dipfast
from dipfast import batch, batch_ray

ray = pytest.importorskip("ray", reason="the Ray tests need Ray (requirements-ci.txt installs it)")

KW = {"progress": False, **TINY}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _images(root: Path, n: int, key: str) -> Path:
    rng = make_rng(key)
    for k in range(n):
        h = 16 if k % 2 == 0 else 12  # two sizes, so two kinds of groups
        (root / "in").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(rng, h, 16, 3, np.uint8)).save(root / "in" / f"{k}.png")
    return root / "in"


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_ray_gives_the_local_outputs_and_one_record_each(cluster, tmp_path):
    src = _images(tmp_path, 4, "ray-local")
    summary = dipfast.restore_many(src, tmp_path / "ray", iters=3, ray=True, **KW)
    assert (summary.restored, summary.failed) == (4, 0)
    with torch_threads(1):  # as on the workers: a task of one CPU runs one torch thread
        dipfast.restore_many(src, tmp_path / "local", iters=3, **KW)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local") and len(_outputs(tmp_path / "ray")) == 4
    records = _records(tmp_path / "ray")
    assert [r["output"] for r in records] == [f"{k}.png" for k in range(4)]
    assert all(r["status"] == "ok" and r["ran"]["worker"].startswith("ray:") for r in records)
    assert all(r["ran"]["pid"] != os.getpid() for r in records)
    again = dipfast.restore_many(src, tmp_path / "ray", iters=3, ray=True, **KW)
    assert (again.restored, again.skipped) == (0, 4)


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return seen


def _running_group_tasks() -> list[int]:
    """Our cluster's worker processes while they run a group (Ray titles them ray::<function>)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::_run_on_worker") and os.getpid() in _ancestors(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_a_killed_worker_s_task_is_retried_and_nothing_is_lost_or_doubled(cluster, tmp_path):
    src = _images(tmp_path, 3, "ray-kill")
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in _running_group_tasks():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    summary = dipfast.restore_many(src, tmp_path / "out", iters=150, ray=True, **KW)
    killer.join()
    assert killed, "no worker was seen running a group"
    assert (summary.restored, summary.failed) == (3, 0)
    records = _records(tmp_path / "out")
    assert [r["output"] for r in records] == ["0.png", "1.png", "2.png"]  # one record per image
    assert all(r["ran"]["pid"] != killed[0] for r in records)  # the killed attempt wrote nothing
    with torch_threads(1):
        dipfast.restore_many(src, tmp_path / "local", iters=150, **KW)
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "local")


def test_gpu_share_packs_small_fits_and_gives_a_big_one_a_whole_gpu():
    gib = 2**30
    assert batch_ray.gpu_share(10 * gib, 80 * gib) == 0.125
    assert batch_ray.gpu_share(30 * gib, 80 * gib) == 0.5
    assert batch_ray.gpu_share(26 * gib, 80 * gib) == 0.3333  # three fit in one GPU: three shares <= 1
    assert batch_ray.gpu_share(90 * gib, 80 * gib) == 1.0


def test_group_estimate_grows_with_networks_and_pixels(tmp_path):
    src = _images(tmp_path, 1, "estimate")
    job = batch._Job(batch.Source(src / "0.png", "0.png"), shape=(3, 16, 16))
    big = batch._Job(batch.Source(src / "0.png", "0.png"), shape=(3, 256, 256))
    kwargs = {"task": "denoise", "preset": None, "scale": None, "iters": None, "precision": "auto"}
    task = batch.GroupTask(kwargs, ())
    one, four = batch._estimate(task, [job]), batch._estimate(task, [job] * 4)
    assert one < four < 4 * one and batch._estimate(task, [big]) > 10 * (one - 512 * 2**20)


def test_bench_times_ray_round_trips(cluster, tmp_path):
    from dipfast.bench.batch import _round_trips

    trips = _round_trips(ray, _images(tmp_path, 1, "trips"), 3)
    assert len(trips) == 3 and all(0 < t < 10 for t in trips)
