"""The pieces of bench/gpu_quick.sh that read or write results: the environment record, the choice of the
fastest paths from the throughput table, the op micro-benchmarks' table and the headline against the targets.

    python bench/gpu_quick_steps.py environment DIR
    python bench/gpu_quick_steps.py fastest THROUGHPUT_JSON N [--batched] [--fallback METHOD:PRECISION ...]
    python bench/gpu_quick_steps.py ops BENCHMARK_JSON [BENCHMARK_JSON ...] --out OUT_MD
    python bench/gpu_quick_steps.py headline WORK

The targets (issue 12) are read off the step outputs under WORK (throughput/, batch/, time-to-psnr/); a figure
that a step did not produce is reported as not measured, never guessed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ORIGINAL_ITERATION = 1800  # time-to-PSNR target: the PSNR the original loop reaches at this iteration


# What any PyTorch program pays before its first kernel, each timed after the last in a fresh process: the cold
# start a restore() call cannot shorten, measured apart from the start-up's parts it times itself (its Result's
# extras, dipfast.fit_io.START_UP_PARTS)
_FIRST_USE = """
import json, time
t = time.perf_counter()
def lap():
    global t
    now = time.perf_counter(); seconds, t = now - t, now
    return seconds
import torch
out = {"import torch": lap()}
import dipfast, dipfast.kernels
out["import dipfast"] = lap()
if torch.cuda.is_available():
    x = torch.ones(1, device="cuda"); torch.cuda.synchronize()
    out["CUDA context"] = lap()
    x = torch.randn(1, 64, 64, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3, device="cuda", dtype=x.dtype)); torch.cuda.synchronize()
    out["first cuDNN conv"] = lap()
    (x.flatten(1) @ x.flatten(1).T).sum().item()
    out["first cuBLAS matmul"] = lap()
print(json.dumps(out))
"""


def first_use_seconds() -> dict:
    """_FIRST_USE's laps in seconds, from a fresh interpreter (an error's last line where it failed)."""
    done = subprocess.run([sys.executable, "-c", _FIRST_USE], capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout)


# the packages a window's runs use beside torch, triton and numpy (machine_info records those), so that
# stack_check.sh can rebuild the machine's stack on a CPU (bench/results/2026-12-06-cpu-device-stack/: pytest 9.2
# broke pytest-benchmark before 5.3.1)
TOOLS = ("pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "hypothesis", "nvidia-cudnn-frontend")


def environment(out: Path) -> int:
    """environment.json (dipfast.bench.machine's record, the native ops, the kernels, the first-use costs) and
    environment.txt (the same, then nvidia-smi)."""
    first_use = first_use_seconds()  # before this process touches the GPU: the machine's, not a warm driver's
    import torch

    import dipfast
    from dipfast.bench.machine import machine_info, package_version

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine_info(device)
    info["dipfast_path"] = dipfast.__file__
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import dipfast.native

        info["native_ops"] = dipfast.native.enabled()
    except Exception as e:  # noqa: BLE001  (recorded: the environment step never fails on a missing part)
        info["native_ops"] = f"{type(e).__name__}: {e}"
    try:
        import dipfast.kernels

        info["kernels_path"] = dipfast.kernels.__file__
    except Exception as e:  # noqa: BLE001
        info["kernels_path"] = f"{type(e).__name__}: {e}"
    info["first_use_seconds"] = first_use
    info["tools"] = {name: package_version(name) for name in TOOLS}
    smi = shutil.which("nvidia-smi")
    text = "\n".join(f"{k}: {v}" for k, v in info.items()) + "\n"
    if smi:
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit,compute_cap"
        q = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, check=False)
        info["nvidia_smi"] = q.stdout.strip()
        full = subprocess.run([smi], capture_output=True, text=True, check=False).stdout
        text += f"\n{q.stdout}\n{full}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    (out / "environment.txt").write_text(text)
    print(text)
    return 0


def _ok_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []
    return [r for r in rows if r.get("status") == "ok"]


def fastest(path: Path, n: int, batched: bool, fallback: list[str]) -> int:
    """Print the n fastest restore() paths of a throughput JSON as METHOD:PRECISION lines (the fallback's first
    where the table has fewer)."""
    from dipfast import api
    from dipfast.bench import runs

    rows = [r for r in _ok_rows(path) if r["method"] not in runs.ORIGINAL_LOOPS]
    if batched:
        rows = [r for r in rows if runs.backend_of(r["method"]) in api.BATCHED_BACKENDS]
    ranked = [f"{r['method']}:{r['precision']}" for r in sorted(rows, key=lambda r: -r["its_median"])]
    picked = list(dict.fromkeys([*ranked, *fallback]))[:n]
    print("\n".join(picked))
    return 0


def _ops_figures(bench: dict) -> tuple[float, str]:
    """(median ms, 'x TFLOP/s' or 'x GB/s' from the benchmark's extra_info, or '-')."""
    ms = bench["stats"]["median"] * 1e3
    extra = bench.get("extra_info", {})
    if extra.get("flop"):
        return ms, f"{extra['flop'] / (ms * 1e-3) / 1e12:.1f} TFLOP/s"
    if extra.get("bytes"):
        return ms, f"{extra['bytes'] / (ms * 1e-3) / 1e9:.0f} GB/s"
    if extra.get("GB/s"):  # bench_batch_norm_act's: the bytes the op must move over the median
        return ms, f"{extra['GB/s']:.0f} GB/s"
    return ms, "-"


def ops(paths: list[Path], out: Path) -> int:
    """ops.md: each op micro-benchmark's median ms and TFLOP/s (or GB/s), the fused op beside its reference twin,
    from pytest-benchmark's JSON files (a missing one, from a run its step's limit cut, is said so)."""
    reports = [json.loads(p.read_text()) for p in paths if p.exists()]
    data = {"machine_info": reports[0].get("machine_info", {}) if reports else {}}
    data["benchmarks"] = [b for report in reports for b in report.get("benchmarks", [])]
    lines = [
        "## Op micro-benchmarks (pytest-benchmark medians)\n",
        f"Machine: {data.get('machine_info', {}).get('node', '?')}; "
        f"{data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '')}\n",
        *(f"Missing: {p.name} (its run did not finish)\n" for p in paths if not p.exists()),
        "| benchmark | median ms | rate | rounds | timed |",
        "|---|---|---|---|---|",
    ]
    for b in data.get("benchmarks", []):
        ms, rate = _ops_figures(b)
        timing = b.get("extra_info", {}).get("timing", "wall")  # the CUDA cases: a CUDA graph's replay
        lines.append(f"| {b['fullname'].split('::')[-1]} | {ms:.3f} | {rate} | {b['stats']['rounds']} | {timing} |")
    if not data.get("benchmarks"):
        lines.append("| (none ran: the CUDA cases skip on a CPU) | - | - | - | - |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


def _speed(row: dict) -> float:
    return row["its_median"]


def _row(rows: list[dict], method: str, precision: str, batch: int = 1) -> dict | None:
    return next((r for r in rows if (r["method"], r["precision"], r["batch"]) == (method, precision, batch)), None)


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "missed"


def _time_to_original(ttp: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """Per output ('psnr', 'ema_psnr'): the original loop's PSNR at ORIGINAL_ITERATION, its time there, and the
    fastest other run's first time at that PSNR."""
    from dipfast.bench import runs
    from dipfast.bench.time_to_psnr import first_reach

    found = []
    for case in ttp.get("cases", []):
        orig = next((r for r in case["runs"] if r["method"] == runs.ORIGINAL_LOOP), None)
        others = [r for r in case["runs"] if r["method"] not in runs.ORIGINAL_LOOPS and r["trajectory"]["iteration"]]
        if orig is None:
            continue
        t = orig["trajectory"]
        k = max((i for i, it in enumerate(t["iteration"]) if it <= ORIGINAL_ITERATION), default=None)
        for key in ("psnr", "ema_psnr"):
            level = t[key][k] if k is not None else None
            if level is None:
                continue
            best = None
            for r in others:
                sec, _ = first_reach(r["trajectory"], key, level)
                if sec is not None and (best is None or sec < best[1]):
                    best = (f"{r['method']} {r['precision']}", sec)
            found.append((key, level, t["seconds"][k], best))
    return found


# a variant is a decision where it beats its backend by more than this in the same run: the H200's CUDA-graph steps
# repeated within 0.15 % (bench/results/2026-12-04-h200-222367b4a8/); the rest is room for drift between
# configurations timed minutes apart
DECISIVE_SPEEDUP = 1.02


def _field_value(value) -> str:
    if isinstance(value, frozenset):
        return "{" + ", ".join(sorted(value)) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    return str(value)


def _decision(method: str, base: str, ratio: float, batch: int) -> str:
    """What the side-by-side figure says to do with the Backend table (runs.variant_fields)."""
    from dipfast.bench import runs

    fields = runs.variant_fields(method)
    if batch == 1 and fields and set(fields) <= runs.BATCH_FIELDS:
        return "the backend itself at batch 1"
    setting = "; ".join(f"{base}.{name} = {_field_value(v)}" for name, v in fields.items())
    if ratio <= 1 / DECISIVE_SPEEDUP:
        return "keep the backend"
    if ratio < DECISIVE_SPEEDUP:
        if fields and fields.items() <= runs.QUICKER_START.items():
            return f"set {setting}: as fast, and a cold start skips its work (its CUDA tests passing)"
        return "keep the backend (within noise)"
    if not fields:
        return "faster, no Backend field to set"
    return f"set {setting} (its CUDA tests passing)"


def variants(*tables: list[dict]) -> list[str]:
    """Markdown lines: each variant of a backend (runs.VARIANT_BACKEND) against that backend at the same
    precision and batch, measured in the same run (one table of rows), and the Backend field its figure says to set:
    the decisions the throughput step, and the batch, triton and compile steps, exist for."""
    from dipfast.bench import runs

    found = []
    for rows in tables:
        for r in rows:
            base = runs.VARIANT_BACKEND.get(r["method"])
            plain = base and _row(rows, base, r["precision"], r["batch"])
            if plain:
                ratio = plain["ms_per_iter"] / r["ms_per_iter"]
                batch = f", batch {r['batch']}" if r["batch"] != 1 else ""
                found.append(
                    f"| {r['method']} {r['precision']}{batch} | {r['ms_per_iter']:.2f} ms | {base} "
                    f"{plain['ms_per_iter']:.2f} ms | {ratio:.2f}x {'faster' if ratio > 1 else 'slower'} "
                    f"| {_decision(r['method'], base, ratio, r['batch'])} |"
                )
    if not found:
        return []
    title = "\n## Variants against their backend (same run, same precision)\n"
    return [title, "| variant | ms/iteration | the backend | speed-up | decision |", "|---|---|---|---|---|", *found]


def _triton_against_the_rest(rows: list[dict]) -> str:
    """Issue 13's target for the whole step, as a headline row: the triton backend's fastest bf16 path (itself or a
    variant) against the fastest other backend's, both from the triton step's one run."""
    from dipfast.bench import runs

    bf16 = [r for r in rows if r["precision"] == "bf16" and r["batch"] == 1]
    triton = max((r for r in bf16 if runs.backend_of(r["method"]) == "triton"), key=_speed, default=None)
    other = max((r for r in bf16 if runs.backend_of(r["method"]) != "triton"), key=_speed, default=None)
    ratio = triton["ms_per_iter"] / other["ms_per_iter"] if triton and other else None
    measured = (
        f"{triton['method']} {triton['ms_per_iter']:.2f} ms, {other['method']} {other['ms_per_iter']:.2f} ms"
        if ratio
        else "-"
    )
    return (
        f"| issue 13: the triton backend's bf16 step no slower than the fastest other backend (triton step) "
        f"| {measured}{f' = {ratio:.2f}x its time' if ratio else ''} | {_verdict(ratio, 1.0, False)} |"
    )


def memory_against_estimate(tables: dict[str, list[dict]]) -> list[str]:
    """restore()'s memory estimate of each step measured (by the harness step that measured it) beside its peaks:
    after the warm-up (what the fit holds: parameters, Adam's state, the CUDA graph's pool) and over the whole fit
    (with cuDNN's algorithm search, which takes what workspace the allocator gives it): the figures to hold
    memory.py's MARGIN and FIXED against. On a CPU the peaks are the process's resident set."""
    rows = [(step, r) for step, table in tables.items() for r in table
            if r.get("memory_estimate_mib") and r.get("steady_peak_memory_mib")]  # fmt: skip
    if not rows:
        return []
    lines = ["\n## Memory: restore()'s estimate against the measured peaks (MiB)\n"]
    lines += ["| step | path | estimate | peak after warm-up | peak of the fit | after warm-up / estimate |"]
    lines += ["|---|---|---|---|---|---|"]
    for step, r in rows:
        steady, estimate = r["steady_peak_memory_mib"], r["memory_estimate_mib"]
        lines.append(
            f"| {step} | {r['method']} {r['precision']}, {r['size']} px, batch {r['batch']} | {estimate:.0f} "
            f"| {steady:.0f} | {r['peak_memory_mib']:.0f} | {steady / estimate:.2f} |"
        )
    return lines


def headline(work: Path) -> int:
    """headline.md: issue 12's targets against what the steps measured."""
    from dipfast.bench.report import start_up

    rows = _ok_rows(work / "throughput" / "throughput.json")
    batch = _ok_rows(work / "batch" / "throughput.json")
    where = f"net '{rows[0]['net']}', {rows[0]['size']} x {rows[0]['size']}" if rows else "no throughput figures"
    lines = [f"## Headline: issue 12's targets (set for the default net at 512 x 512; here {where}, batch 1)\n"]
    lines += ["| target | measured | verdict |", "|---|---|---|"]
    fast = [r for r in rows if r["method"] not in ("original-loop", "original-loop-tf32")]
    best = max(fast, key=_speed, default=None)
    bf16 = min((r["ms_per_iter"] for r in fast if r["precision"] == "bf16"), default=None)
    tf32 = min((r["ms_per_iter"] for r in fast if r["precision"] == "tf32"), default=None)
    ratio = best and best.get("ratio_vs_original_loop")
    ratio_tf32 = best and best.get("ratio_vs_original_loop_tf32")
    name = f" ({best['method']} {best['precision']})" if best else ""
    lines.append(f"| bf16 <= 2.0 ms/iteration | {_fmt(bf16, '{:.2f} ms')} | {_verdict(bf16, 2.0, False)} |")
    lines.append(f"| tf32 <= 4.0 ms/iteration | {_fmt(tf32, '{:.2f} ms')} | {_verdict(tf32, 4.0, False)} |")
    lines.append(
        f"| >= 10x the original loop (IEEE fp32) | {_fmt(ratio, '{:.2f}x')}{name} | {_verdict(ratio, 10, True)} |"
    )
    lines.append(
        f"| >= 3x the original loop under today's defaults (TF32) | {_fmt(ratio_tf32, '{:.2f}x')}{name} "
        f"| {_verdict(ratio_tf32, 3, True)} |"
    )
    # the best of each batch size: the batch step runs the fastest path and native-per-network beside it
    one, four = (max((r for r in batch if r["batch"] == n), key=_speed, default=None) for n in (1, 4))
    gain = four["its_median"] / one["its_median"] if one and four else None
    how = f" ({four['method']} {four['precision']})" if gain else ""
    lines.append(
        f"| 256 x 256: batch 4 >= 2x the images/s of batch 1 | {_fmt(gain, '{:.2f}x')}{how} "
        f"| {_verdict(gain, 2, True)} |"
    )
    try:
        ttp = json.loads((work / "time-to-psnr" / "time_to_psnr.json").read_text())
    except (OSError, ValueError):
        ttp = {}
    reached = _time_to_original(ttp)
    if not reached:
        lines.append(
            f"| time to the original loop's PSNR at iteration {ORIGINAL_ITERATION} <= 1/10 | - | not measured |"
        )
    for key, level, orig_s, best_run in reached:
        share = best_run[1] / orig_s if best_run and orig_s else None
        measured = (
            f"{best_run[0]}: {best_run[1]:.1f} s of {orig_s:.1f} s" if best_run else f"not reached ({orig_s:.1f} s)"
        )
        verdict = _verdict(share, 0.1, False) if best_run else "missed"
        lines.append(
            f"| {key} {level:.2f} dB (original loop, iteration {ORIGINAL_ITERATION}) reached in <= 1/10 of its time "
            f"| {measured}{f' = {share:.3f}' if share else ''} | {verdict} |"
        )
    for case in ttp.get("cases", []):  # where a cold run's time went before its first iteration
        for r in case["runs"]:
            lines.append(f"| start-up, cold: {r['method']} {r['precision']} (first step: parts) | {start_up(r)} | |")
    lines.append(_triton_against_the_rest(_ok_rows(work / "triton" / "throughput.json")))
    steps = ("throughput", "batch", "triton", "compile")
    lines += variants(*(_ok_rows(work / step / "throughput.json") for step in steps))
    lines += memory_against_estimate({step: _ok_rows(work / step / "throughput.json") for step in steps})
    cold = work / "start-up" / "cold_start.md"  # the start-up step's parts, native against its parallel compile
    if cold.is_file():
        lines += ["", cold.read_text().replace("## ", "## Start-up step: ", 1).rstrip()]
    text = "\n".join(lines) + "\n"
    (work / "headline.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("environment").add_argument("dir", type=Path)
    f = sub.add_parser("fastest")
    f.add_argument("json", type=Path)
    f.add_argument("n", type=int)
    f.add_argument("--batched", action="store_true", help="only methods that train N images in one step")
    f.add_argument("--fallback", nargs="*", default=[], metavar="METHOD:PRECISION")
    o = sub.add_parser("ops")
    o.add_argument("json", type=Path, nargs="+")
    o.add_argument("--out", type=Path, required=True)
    sub.add_parser("headline").add_argument("work", type=Path)
    args = p.parse_args(argv)
    if args.command == "environment":
        return environment(args.dir)
    if args.command == "fastest":
        return fastest(args.json, args.n, args.batched, args.fallback)
    if args.command == "ops":
        return ops(args.json, args.out)
    return headline(args.work)


if __name__ == "__main__":
    sys.exit(main())
