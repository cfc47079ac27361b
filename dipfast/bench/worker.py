"""Cold runs: one fit in a fresh Python process, so that its time includes every first-call cost
(CUDA context, cuDNN autotune, compile and graph capture of later backends).

The parent writes the case (.npz) and a job (.json) to a temporary folder and starts
``python -m dipfast.bench.worker JOB``; the worker imports dipfast, loads the case (not timed),
times the fit from the restore() call exactly as in-process runs do, and writes the Run's
summary (no images) as JSON next to the job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dipfast.bench.data import Case, load_case, save_case
from dipfast.bench.runs import Run
from dipfast.errors import InputError


def run_cold(case: Case, method: str, precision: str, *, timeout: float | None = None, **kwargs) -> Run:
    """run_dip(case, method, precision, **kwargs) in a fresh process; its Run without images."""
    import torch

    from dipfast import nvtx_ranges

    with tempfile.TemporaryDirectory(prefix="dipfast-cold-") as tmp:
        tmp = Path(tmp)
        save_case(case, tmp / "case.npz")
        job = {
            "case": str(tmp / "case.npz"),
            "method": method,
            "precision": precision,
            "kwargs": kwargs,
            "threads": torch.get_num_threads(),
            "nvtx": nvtx_ranges.enabled(),
            "result": str(tmp / "run.json"),
        }
        (tmp / "job.json").write_text(json.dumps(job))
        proc = subprocess.run(
            [sys.executable, "-m", "dipfast.bench.worker", str(tmp / "job.json")],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"cold run of {method} on {case.key} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        result = json.loads((tmp / "run.json").read_text())
        if "refused" in result:
            raise InputError(result["refused"])
        return Run.from_summary(result)


def main(argv: list[str]) -> int:
    import torch

    from dipfast import nvtx_ranges
    from dipfast.bench.runs import run_dip

    job = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(job["threads"])
    nvtx_ranges.enable(job["nvtx"])
    case = load_case(Path(job["case"]))
    try:
        run = run_dip(case, job["method"], job["precision"], mode="cold", **job["kwargs"])
    except InputError as e:  # restore() refused the method or precision: the parent reports it
        Path(job["result"]).write_text(json.dumps({"refused": str(e)}))
        return 0
    Path(job["result"]).write_text(json.dumps(run.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
