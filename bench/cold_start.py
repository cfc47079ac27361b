"""A cold start in parts, methods side by side: each fit in a fresh process with empty Triton and Inductor caches.

    python bench/cold_start.py --device cuda --size 512 --precision bf16 --out DIR    # gpu_quick's start-up step

Issue 12's time-to-PSNR target counts from a cold process: on the H200 (bench/results/2026-12-04-h200-222367b4a8/)
native tf32 took 9.97 s before its first read-back, a third of its run, and a step at the targets' pace would make
start-up most of a fit. This times what a user's first image pays, by part, for each method: the process (Python,
torch, dipfast imported), restore()'s preparation, its set-up, the CUDA graph's eager warm-up (cuDNN's algorithm
search, the Triton kernels' compiles) and its capture (fit_io.START_UP_PARTS), and the first step. The default pair
is native against native-parallel-compile: the step's Triton kernels compiled side by side in a pass before its first
call (dipfast.kernels.parallel_compile) against one at a time at their first launches.

Each round runs every method once, in turn, so that the machine's drift falls on all alike; each run gets its own
empty cache folders. Writes cold_start.json and cold_start.md in --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dipfast.bench.data import throughput_case
from dipfast.bench.report import save_and_print
from dipfast.bench.worker import run_cold
from dipfast.fit_io import START_UP_PARTS

PARTS = {"process": "process_seconds", **START_UP_PARTS, "first step": "first_step_seconds", "restore()": "seconds"}
CACHES = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


def cold_run(method: str, precision: str, *, size: int, net: str, iters: int, device: str) -> dict:
    """One fit of `method` in a fresh process with empty compile caches: its start-up parts, seconds each."""
    case = throughput_case(size)
    saved = {name: os.environ.get(name) for name in CACHES}
    with tempfile.TemporaryDirectory(prefix="dipfast-cold-start-") as caches:
        for name in CACHES:
            os.environ[name] = str(Path(caches) / name.lower())
        try:
            start = time.perf_counter()
            run = run_cold(case, method, precision, iters=iters, net=net, device=device, report_every=iters)
            wall = time.perf_counter() - start
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
    parts = {key: run.extras.get(key) for key in PARTS.values() if key in run.extras}
    # the process's own cost: its wall time less the fit, which restore()'s seconds cover
    return {"method": method, "precision": precision, "seconds": run.seconds, "process_seconds": wall - run.seconds,
            **parts}  # fmt: skip


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"## Cold start by part ({s['net']} net, {s['size']} px, {s['precision']}, {s['iters']} iterations, "
             f"{report['machine']}; median of {s['rounds']})\n",
             "Seconds. process: Python, torch and dipfast imported, the case loaded; then restore()'s parts.\n",
             "| method | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]  # fmt: skip
    medians = {}
    for method in s["methods"]:
        rows = [r for r in report["rows"] if r["method"] == method]
        medians[method] = {key: statistics.median(r[key] for r in rows) for key in PARTS.values() if key in rows[0]}
        cells = [f"{medians[method][key]:.2f}" if key in medians[method] else "-" for key in PARTS.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    first, *others = s["methods"]
    for method in others:  # each against the first: what its start-up saves
        saved = medians[first]["seconds"] - medians[method]["seconds"]
        lines.append(f"\n{method}: restore() {abs(saved):.2f} s {'faster' if saved > 0 else 'slower'} than {first}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--net", default="default", help="'default', 'tiny' or a preset's name")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--iters", type=int, default=10, help="per fit: the warm-up, the capture and a few replays")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["native", "native-parallel-compile"])
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cold_start: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 2
    rows = []
    for _ in range(args.rounds):
        for method in args.methods:
            rows.append(cold_run(method, args.precision, size=args.size, net=args.net, iters=args.iters,
                                 device=args.device))  # fmt: skip
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    report = {"suite": "cold_start", "machine": machine, "torch": torch.__version__, "settings": vars(args),
              "rows": rows}  # fmt: skip
    save_and_print(Path(args.out), "cold_start", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
