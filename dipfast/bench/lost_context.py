"""The rest of a throughput run in a fresh process, after a CUDA error has made this one's context unusable.

An illegal address, a misaligned access or a kernel that fails to launch is sticky: every CUDA call after it in
the same process fails with the same error. In one harness process that turned one broken configuration into a
run of error rows, the original loops and every other variant included, and a GPU window of 15 minutes lost the
whole step. Out of memory, a Triton kernel that fails to compile and restore()'s refusals are not sticky: the run
goes on in its own process after them.

measure_in_fresh_process() hands what was measured so far and the schedule's remaining configurations to
``python -m dipfast.bench.lost_context JOB``, which measures them with the same settings and writes what it has
after each one; the parent reads it as it comes (so its partial reports keep up, and a time limit's SIGINT,
which reaches both processes, loses nothing that finished) and takes it over when the process ends. A process
that dies without writing leaves its remaining configurations as error rows that say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple
from pathlib import Path

import torch

NOTE = "the CUDA context was lost with it: the configurations after it ran in a fresh process"
POLL_SECONDS = 0.5


def context_lost(device) -> bool:
    """Whether this process can no longer use the CUDA device: a sticky error fails the next synchronize or op."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).cpu()
    except RuntimeError:  # torch.AcceleratorError ("CUDA error: an illegal memory access ...") is one
        return True
    return False


def _command(job: Path) -> list[str]:
    return [sys.executable, "-m", "dipfast.bench.lost_context", str(job)]


def measure_in_fresh_process(schedule, measured, *, job: dict, on_config):
    """Measure `schedule` (throughput.Config, in order) in a fresh process that continues `measured`
    (throughput.Measured); job: measure_schedule()'s settings. on_config(measured, n) each time it has finished n
    more of the schedule. Returns the Measured it handed back."""
    from dipfast import nvtx_ranges
    from dipfast.bench.throughput import Measured

    finished = 0
    with tempfile.TemporaryDirectory(prefix="dipfast-throughput-") as tmp:
        job_path, state = Path(tmp) / "job.json", Path(tmp) / "measured.json"
        job = {
            **job,
            "schedule": [astuple(c) for c in schedule],
            "measured": measured.to_json(),
            "threads": torch.get_num_threads(),
            "nvtx": nvtx_ranges.enabled(),
            "state": str(state),
        }
        job_path.write_text(json.dumps(job))

        def take_over() -> None:
            nonlocal measured, finished
            if not state.exists():
                return
            written = json.loads(state.read_text())
            if written["finished"] > finished:
                measured = Measured.from_json(written["measured"])
                on_config(measured, written["finished"] - finished)
                finished = written["finished"]

        proc = subprocess.Popen(_command(job_path))
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                take_over()
        except KeyboardInterrupt:  # the SIGINT reached the fresh process too: it stops after writing what it has
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            take_over()
            raise
        take_over()
    if finished < len(schedule):  # it died without finishing: the rest are rows that say so
        reason = f"the fresh process after a lost CUDA context ended (exit {proc.returncode}) before measuring it"
        for c in schedule[finished:]:
            measured.failed.setdefault(c, ("error", reason))
            measured.done.add(c)
        on_config(measured, len(schedule) - finished)
    return measured


def main(argv: list[str]) -> int:
    from dipfast import nvtx_ranges
    from dipfast.bench.throughput import Config, Measured, measure_schedule

    job = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(job["threads"])
    nvtx_ranges.enable(job["nvtx"])
    state = Path(job["state"])
    finished = 0

    def write(measured: Measured, n: int) -> None:  # whole, or not at all: the parent reads it at any time
        nonlocal finished
        finished += n
        part = state.with_suffix(".part")
        part.write_text(json.dumps({"finished": finished, "measured": measured.to_json()}))
        os.replace(part, state)

    settings = {k: job[k] for k in ("iters", "repeats", "warmup", "net", "device", "seed")}
    measure_schedule(
        [Config(*c) for c in job["schedule"]], Measured.from_json(job["measured"]), on_config=write, **settings
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # what it measured is written already
        sys.exit(130)
