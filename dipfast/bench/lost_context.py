"""A run that goes on in a fresh process after a CUDA error has made its own context unusable.

An illegal address, a misaligned access or a kernel that fails to launch is sticky: every CUDA call after it in
the same process fails with the same error. In one harness process that turned one broken configuration into a
run of error rows, the original loops and every other variant included, and a GPU window of 15 minutes lost the
whole step. Out of memory, a Triton kernel that fails to compile and restore()'s refusals are not sticky: the run
goes on in its own process after them.

continue_in_fresh_process(module, job, ...) runs ``python -m MODULE JOB``: the module's own entry point takes the
job (what was measured so far and what is left, as JSON) and calls write_state() after each piece of work; the
parent reads the state as it comes (so that its partial reports keep up, and a time limit's SIGINT, which reaches
both processes, loses nothing that finished). This module knows nothing of what is measured: the throughput and
profile suites are its users (dipfast.bench.throughput, dipfast.bench.profile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NOTE = "the CUDA context was lost with it: what came after it ran in a fresh process"  # a failure's note
POLL_SECONDS = 0.5


def context_lost(device) -> bool:
    """Whether this process can no longer use the CUDA device: a sticky error fails the next synchronize or op."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:  # no host copy: a sync-debug mode that forbids one is no lost context
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError:  # torch.AcceleratorError ("CUDA error: an illegal memory access ...") is one
        return True
    return False


def noted(reason: str, device) -> tuple[str, bool]:
    """A failure's reason, with NOTE added where it left the CUDA context unusable, and whether it did (the caller
    then goes on in a fresh process)."""
    lost = context_lost(device)
    return (f"{reason} ({NOTE})" if lost else reason), lost


def _command(module: str, job: Path) -> list[str]:
    return [sys.executable, "-m", module, str(job)]


def continue_in_fresh_process(module: str, job: dict, on_state) -> tuple[int, int]:
    """Run ``python -m MODULE JOBFILE`` with `job` (JSON), its "state" path and this process's torch threads and NVTX
    switch added (read_job() applies them there); on_state(state, n) each time the process has written a state with
    n more pieces of work finished. Returns (pieces finished, exit status)."""
    from dipfast import nvtx_ranges

    finished = 0
    with tempfile.TemporaryDirectory(prefix="dipfast-fresh-") as tmp:
        job_path, state_path = Path(tmp) / "job.json", Path(tmp) / "state.json"
        carried = {"threads": torch.get_num_threads(), "nvtx": nvtx_ranges.enabled(), "state": str(state_path)}
        job_path.write_text(json.dumps({**job, **carried}))

        def read() -> None:
            nonlocal finished
            if state_path.exists():
                state = json.loads(state_path.read_text())
                if state["finished"] > finished:
                    on_state(state, state["finished"] - finished)
                    finished = state["finished"]

        proc = subprocess.Popen(_command(module, job_path))
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                read()
        except KeyboardInterrupt:  # the SIGINT reached the fresh process too: it stops after writing what it has
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            read()
            raise
        read()
    return finished, proc.returncode


def read_job(path: str | Path) -> dict:
    """The fresh process's job, with the parent's torch threads and NVTX switch applied to this process."""
    from dipfast import nvtx_ranges

    job = json.loads(Path(path).read_text())
    torch.set_num_threads(job["threads"])
    nvtx_ranges.enable(job["nvtx"])
    return job


def write_state(path: str | Path, finished: int, **state) -> None:
    """The fresh process's state, whole or not at all (the parent reads it at any time)."""
    path = Path(path)
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"finished": finished, **state}))
    os.replace(part, path)
