"""What one kernel launch costs inside a CUDA graph on this GPU, and what programmatic dependent launch takes off it.

    python bench/launch_gap.py --out DIR [--launches 200] [--repeats 20] [--device cuda]

The native step launches about 200 Triton kernels an iteration (bench/step_launches.py), most of them short, and
75 ATen ops, all replayed in one CUDA graph. Whether fewer launches (a fused finalize, a fused output head) or
overlapped ones (dipfast.kernels.dependent_launch, the harness's native-pdl) would pay depends on what a launch
costs there, which no profile of the step says directly. This captures chains of `--launches` dependent launches
of a kernel that does next to nothing (each program adds 1 to its block of a buffer the previous launch wrote) in
one CUDA graph, replays it `--repeats` times, and reports microseconds per launch:

    triton, 1 program          the launch itself: a one-program kernel after another
    triton, 4 programs an SM   a grid that fills the GPU, as the step's passes do
    each of those with PDL     the same kernels launched dependent (Hopper and later; skipped elsewhere)
    aten add_                  torch's own elementwise launch, for comparison

Every chain must leave each element at exactly --launches (a launch that read its buffer before the previous one
had written it would lose a count): the check that dependent launches keep their order on this GPU. On a CPU
(tests, gpu_quick --tiny) the chains run eagerly in Triton's interpreter, for the counts only; their times are not
launch costs. Writes launch_gap.json and launch_gap.md in --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are built: the CPU runs them interpreted

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dipfast.bench.report import save_and_print  # noqa: E402
from dipfast.kernels import dependent_launch  # noqa: E402
from dipfast.kernels.dependent_launch import wait_for_previous_kernel  # noqa: E402

_BLOCK = 128


@triton.jit
def _bump_kernel(x_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + at, tl.load(x_ptr + at) + 1.0)


def _programs_filling(device: torch.device) -> int:
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _chain(kind: str, x: torch.Tensor, launches: int, pdl: bool):
    """A callable launching the chain once: `launches` launches, each adding 1 to every element of x."""
    if kind == "aten":
        return lambda: [x.add_(1.0) for _ in range(launches)]
    grid = (x.numel() // _BLOCK,)

    def run():
        with dependent_launch.dependent_launches(pdl):
            options = dependent_launch.launch_options(x)
            for _ in range(launches):
                _bump_kernel[grid](x, BLOCK=_BLOCK, **options)

    return run


def measure(kind: str, programs: int, pdl: bool, launches: int, repeats: int, device: torch.device) -> dict:
    """One chain: microseconds per launch (CUDA: replayed as one graph) and whether every element counted them all."""
    x = torch.zeros(programs * _BLOCK, device=device)
    run = _chain(kind, x, launches, pdl)
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        runs = 1
    else:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()  # the warm-up: Triton's compilation, outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()  # the first replay uploads the graph
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        seconds = begin.elapsed_time(end) / 1e3
        runs = 2 + repeats  # the warm-up, the capture's first replay and the timed ones (the capture runs nothing)
    counted = bool((x == runs * launches).all())
    return {
        "kind": kind,
        "programs": programs,
        "pdl": pdl,
        "us_per_launch": 1e6 * seconds / ((repeats if device.type == "cuda" else 1) * launches),
        "every_launch_counted": counted,
    }


def run_all(launches: int, repeats: int, device: torch.device) -> list[dict]:
    """Every chain; one that fails (a driver that cannot capture a dependent launch, say) is a row with its error, and
    the others still run."""
    pdl = [False, True] if dependent_launch.supported(device) else [False]
    chains = [("triton", programs, p) for programs in (1, _programs_filling(device)) for p in pdl]
    rows = []
    for kind, programs, p in [*chains, ("aten", _programs_filling(device), False)]:
        try:
            rows.append(measure(kind, programs, p, launches, repeats, device))
        except RuntimeError as error:
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            rows.append({"kind": kind, "programs": programs, "pdl": p, "error": first_line[:300]})
    return rows


def markdown(report: dict) -> str:
    where = f"chains of {report['launches']} launches"
    if report["device"] == "cuda":
        where += f" replayed {report['repeats']} times as one CUDA graph"
    lines = [
        f"## One kernel launch ({report['device_name']}; {where})",
        "",
        "| kernel | programs | PDL | us per launch | every launch counted |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        head = f"| {r['kind']} | {r['programs']} | {'yes' if r['pdl'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | - |")
        else:
            counted = "yes" if r["every_launch_counted"] else "**no**"
            lines.append(f"{head} {r['us_per_launch']:.2f} | {counted} |")
    if report["device"] == "cpu":
        lines += ["", "On a CPU the chains run in Triton's interpreter: the counts are checked, the times are not "
                  "launch costs."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.launches < 1 or args.repeats < 1:
        parser.error("--launches and --repeats must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA GPU; use --device cpu")
    rows = run_all(args.launches, args.repeats, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton's interpreter"
    report = {"device": device.type, "device_name": name, "launches": args.launches, "repeats": args.repeats,
              "rows": rows}  # fmt: skip
    save_and_print(args.out, "launch_gap", report, markdown(report))
    return 0 if all(r.get("every_launch_counted") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
