"""restore_many()'s groups as Ray tasks: one task per group, GPUs shared by the memory estimate, retries.

Ray (`pip install "dipfast[ray]"`) schedules, places and retries; dipfast only says what a task
needs. Each group is one task whose `num_gpus` is 1/k, k the fits of its estimated size
(memory.estimate_bytes) that fit side by side in a worker GPU's memory, so small fits share a GPU;
on a cluster without GPUs a task takes one CPU. A task whose worker dies (a lost node, a
killed process) is retried up to MAX_RETRIES times; the driver writes every output and record
when a task comes back, so a retried task writes nothing twice. Tasks carry the files' bytes and
return the outputs' bytes: the data stays with the driver, and workers need dipfast, not a
shared disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable

from dipfast.errors import InputError

MAX_RETRIES = 3  # per task, for worker failures (Ray's default for tasks)


def gpu_share(need_bytes: int, gpu_bytes: int) -> float:
    """num_gpus of a task needing `need_bytes` on GPUs of `gpu_bytes`: 1/k for k such tasks per GPU,
    rounded down to Ray's 1e-4 resolution so that k of them add up to at most one GPU."""
    k = max(1, gpu_bytes // max(1, need_bytes))
    return min(1.0, math.floor(10_000 / k) / 10_000)


def _run_on_worker(task):
    """A group's fit on a Ray worker, with as many torch threads as the task holds CPUs."""
    import ray
    import torch

    from dipfast.batch_group import run_group

    context = ray.get_runtime_context()
    cpus = context.get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return run_group(task, worker=f"ray:{context.get_node_id()[:8]}:{context.get_worker_id()[:8]}")


def _gpu_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


class Cluster:
    """A connection to Ray: ADDRESS, else RAY_ADDRESS, else a local cluster (shut down on close);
    a cluster this process already joined (ray.init before restore_many) is used as it is."""

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise InputError('--ray needs Ray; install it with: pip install "dipfast[ray]"') from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            try:
                if address is None:
                    ray.init(log_to_driver=False, include_dashboard=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                raise InputError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
            self.started = True
        self.has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.gpu_bytes = None
        if self.has_gpus:  # what one worker GPU holds: the unit of the packing
            self.gpu_bytes = ray.get(ray.remote(num_gpus=1)(_gpu_bytes).remote())
        self.remote = ray.remote(max_retries=MAX_RETRIES)(_run_on_worker)

    def run(self, tasks: Iterable, estimate: Callable, finished: Callable[[list[dict]], None]) -> None:
        """Run (task, group) pairs, at most `in_flight` at a time so that the object store holds a few
        groups' files, not the whole batch; hand each task's outcomes to `finished` (in the driver) as
        it completes. A task that fails for good (retries spent) gives each of its images the error."""
        ray = self.ray
        tasks = iter(tasks)
        pending = {}
        in_flight = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))

        def submit() -> None:
            for task, group in tasks:
                resources = {}  # without GPUs: Ray's default of one CPU
                if self.has_gpus:
                    resources = {"num_gpus": gpu_share(estimate(task, group), self.gpu_bytes), "num_cpus": 1}
                pending[self.remote.options(**resources).remote(task)] = task
                if len(pending) >= in_flight:
                    return

        try:
            submit()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        outcomes = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        line = (str(e).strip().splitlines() or [""])[0]
                        error = f"Ray task failed after {MAX_RETRIES} retries: {type(e).__name__}: {line}"
                        outcomes = [{"key": item.key, "error": error} for item in task.items]
                    finished(outcomes)
                submit()
        finally:
            for ref in pending:  # interrupted: nothing more is written; the rerun redoes these
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
