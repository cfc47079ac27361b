"""What a suite leaves behind: JSON with every figure and the machine, a Markdown table, PNG plots.

Files in the output folder (overwritten by the next run of the same suite):
    throughput.json, throughput.md, throughput.png                 (bars: image-iterations/s)
    time_to_psnr.json, time_to_psnr.md, psnr_vs_time_<case>.png    (PSNR against wall time)
    quality.json, quality.md
    profile.json, profile.md                                       (each method's top ops, per iteration)
    floor.json, floor.md                                           (the cost model of one iteration)
    batch.json, batch.md                                           (images/hour: local, Ray workers; Ray's overhead)
    early_stop.json, early_stop.md, early_stop_<image>.png         (PSNR against iteration, the stop marked)
Every JSON has: schema, suite, created (UTC), machine (machine.machine_info), settings and the
suite's figures; NaN is written as null.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from dipfast.bench.kernel_groups import SHORT_KERNEL_US
from dipfast.bench.machine import machine_info, machine_label
from dipfast.fit_io import START_UP_PARTS

SCHEMA = "dipfast-bench/1"
STEMS = {
    "throughput": "throughput",
    "time-to-psnr": "time_to_psnr",
    "quality": "quality",
    "profile": "profile",
    "floor": "floor",
    "batch": "batch",
    "early-stop": "early_stop",
}


def _clean(x):
    """JSON-safe: NaN and infinities become None, numpy scalars Python numbers, tuples lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy scalars
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def finish(report: dict, device) -> dict:
    """The report with its schema, time stamp and machine first."""
    return {
        "schema": SCHEMA,
        "suite": report["suite"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        **{k: v for k, v in report.items() if k != "suite"},
    }


def write(report: dict, out: Path, markdown: str) -> dict[str, Path]:
    """Write the suite's <stem>.json and <stem>.md into out; returns the paths."""
    return _write_files(out, STEMS[report["suite"]], report, markdown)


def save_and_print(out: Path, stem: str, report: dict, markdown: str) -> None:
    """A bench/ script's report: <stem>.json and <stem>.md in out, the markdown printed too."""
    _write_files(out, stem, report, markdown)
    print(markdown)


def _write_files(out: Path, stem: str, report: dict, markdown: str) -> dict[str, Path]:
    """<stem>.json (the report, JSON-safe) and <stem>.md in out, made if absent; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown)
    return paths


def _f(x, fmt="{:.2f}", none="-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return ("inf" if x > 0 else "-inf") if isinstance(x, float) and math.isinf(x) else fmt.format(x)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _header(report: dict, title: str) -> str:
    m = report["machine"]
    return f"## {title}\n\nMachine: {machine_label(m)}; device {m['device']}. Created {report['created']}.\n\n"


# ---------------------------------------------------------------- throughput


def _memory(r: dict) -> str:
    growth = r.get("memory_growth_mib")
    return _f(r["peak_memory_mib"], "{:.0f}") + ("" if growth is None else f" (+{growth:.0f})")


def throughput_markdown(report: dict) -> str:
    s = report["settings"]
    text = _header(report, "Throughput")
    text += (
        f"Denoising preset, net '{s['net']}'; {s['unit']}: median of {s['repeats']} repeats x {s['rounds']} "
        f"round(s) of {s['iters_per_repeat']} iterations after {s['warmup_iters']} warm-up iterations. "
        f"Timing: {s['timing']}.\n\n"
    )
    rows = []
    for r in report["rows"]:
        note = {"single": "", "sequential": f"{r['batch']} sequential fits", "batched": "batched"}[r["batch_mode"]]
        if r["status"] != "ok":
            rows.append(
                [
                    r["size"],
                    r["batch"],
                    r["method"],
                    r["precision"],
                    f"{r['status'].upper()}",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{note + '; ' if note else ''}{r['reason']}",
                ]
            )
            continue
        rows.append(
            [
                r["size"],
                r["batch"],
                r["method"],
                r["precision"],
                _f(r["its_median"]),
                f"{_f(r['its_min'])}-{_f(r['its_max'])}",
                _f(r["spread_pct"], "{:.0f}%"),
                _f(r["ms_per_iter"], "{:.1f}"),
                _memory(r),
                _f(r["ratio_vs_original_loop"], "{:.2f}x"),
                note,
            ]
        )
    text += table(
        [
            "size",
            "batch",
            "method",
            "precision",
            "it/s",
            "min-max",
            "spread",
            "ms/it",
            "peak MiB (growth)",
            "vs original-loop",
            "note",
        ],
        rows,
    )
    kinds = sorted({r["memory_kind"] for r in report["rows"] if r.get("memory_kind")})
    if kinds:
        text += f"\nPeak memory: {'; '.join(kinds)}."
        if any(k.startswith("cpu") for k in kinds):
            text += (
                " The growth (+) counts pages new to the process during the block: memory the allocator kept"
                " from earlier blocks is reused, so it can understate the block's working set, even to 0."
            )
        text += "\n"
    text += f"\n{s['batch_note']}.\n"
    return text


def plot_throughput(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    groups = sorted({(r["size"], r["batch"]) for r in ok})
    series = sorted({(r["method"], r["precision"]) for r in ok})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * max(len(series), 1) / 2 + 2), 4))
    width = 0.8 / max(len(series), 1)
    for k, (method, precision) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for g, (size, batch) in enumerate(groups):
            r = next(
                (
                    r
                    for r in ok
                    if (r["size"], r["batch"], r["method"], r["precision"]) == (size, batch, method, precision)
                ),
                None,
            )
            if r is None:
                continue
            xs.append(g + (k - (len(series) - 1) / 2) * width)
            ys.append(r["its_median"])
            lo.append(r["its_median"] - r["its_min"])
            hi.append(r["its_max"] - r["its_median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{method} {precision}")
    ax.set_xticks(range(len(groups)), [f"{s}px, batch {b}" for s, b in groups])
    ax.set_ylabel("image-iterations / s (median, min-max)")
    ax.set_title(f"DIP throughput, net '{report['settings']['net']}'\n{machine_label(report['machine'])}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- time to PSNR


def _reach(row: dict) -> str:
    raw = "not reached" if row["psnr_seconds"] is None else f"{row['psnr_seconds']:.2f} s (it {row['psnr_iteration']})"
    ema = "not reached" if row["ema_seconds"] is None else f"{row['ema_seconds']:.2f} s (it {row['ema_iteration']})"
    return f"{raw} / {ema}"


def _best(b: dict | None) -> str:
    return "-" if b is None else f"{b['psnr']:.2f} (it {b['iteration']}, {b['seconds']:.2f} s)"


def time_to_psnr_markdown(report: dict) -> str:
    s = report["settings"]
    text = _header(report, "Time to PSNR")
    text += (
        f"Wall seconds from the restore() call; output / EMA. Resolution: {s['resolution']}. First step: seconds "
        "from the call to the end of the first iteration (set-up, compilation, autotune, graph capture). "
        f"Runs: {', '.join(s['modes'])} "
        f"(cold: a fresh process; warm: after a {s['warmup_iters']}-iteration warm-up fit). "
        f"{s['iters']} iterations at most" + (f", {s['time_limit_s']} s at most" if s["time_limit_s"] else "") + ".\n"
    )
    for c in report["cases"]:
        text += (
            f"\n### {c['case']} ({c['source']}; input PSNR {c['input_psnr']:.2f} dB; targets: {c['targets_from']})\n\n"
        )
        headers = (
            ["method", "precision", "run"]
            + [f"to {t:.2f} dB" for t in c["targets"]]
            + ["best PSNR", "best EMA PSNR", "final PSNR / EMA", "iters", "read-back", "first step"]
        )
        rows = []
        for r in c["runs"]:
            rows.append(
                [r["method"], r["precision"] or "-", r["mode"]]
                + [_reach(x) for x in r["time_to_target"]]
                + [
                    _best(r["best_psnr"]),
                    _best(r["best_ema_psnr"]),
                    f"{_f(r['final_psnr'])} / {_f(r['final_ema_psnr'])}",
                    r["iterations"],
                    "-"
                    if not r["resolution_iters"]
                    else f"{r['resolution_iters']} it"
                    + (f", {r['resolution_seconds']:.3f} s" if r["resolution_seconds"] else ""),
                    start_up(r),
                ]
            )
        text += table(headers, rows)
        for u in c["unsupported"]:
            text += f"\n- not run: {u['method']} {u['precision'] or ''} ({u['mode']}): {u['reason']}"
        if c["unsupported"]:
            text += "\n"
    return text


def start_up(r: dict) -> str:
    """Start-up: set-up + the first iteration, then its parts where restore() timed them (the warm-up's
    iterations and the capture come after the first: a part can exceed the first step)."""
    seconds = r.get("first_step_seconds")
    if seconds is None:
        return "-"
    extras = r.get("extras") or {}
    parts = [f"{name} {extras[key]:.2f}" for name, key in START_UP_PARTS.items() if extras.get(key) is not None]
    return f"{seconds:.2f} s" + (f" ({' / '.join(parts)})" if parts else "")


def case_slug(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", case).strip("_")


def _at_read_backs(t: dict, key: str) -> tuple[list[float], list[float]]:
    """The value at each read-back (the last row it brought): what the host saw, and when."""
    last: dict[float, float] = {}
    for sec, value in zip(t["seconds"], t[key]):
        if value is not None:
            last[sec] = value
    return list(last), list(last.values())


def plot_psnr_vs_time(report: dict, entry: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dip = [r for r in entry["runs"] if r["iterations"]]
    names = sorted({(r["method"], r["precision"]) for r in dip})
    for r in dip:
        color = colors[names.index((r["method"], r["precision"])) % len(colors)]
        label = f"{r['method']} {r['precision']} {r['mode']}"
        style = {"alpha": 0.5, "lw": 0.8} if r["mode"] == "cold" else {"lw": 1.4}
        for key, ls, what in (("psnr", "-", "output"), ("ema_psnr", "--", "EMA")):
            xs, ys = _at_read_backs(r["trajectory"], key)
            if ys:
                ax.plot(xs, ys, color=color, ls=ls, label=f"{label} ({what})", **style)
    for k, r in enumerate(r for r in entry["runs"] if not r["iterations"]):
        ax.plot([r["seconds"]], [r["final_psnr"]], marker="os^D"[k % 4], ls="none", color="black", label=r["method"])
    ax.axhline(entry["input_psnr"], color="gray", lw=0.8, ls=":", label="input")
    for target in entry["targets"]:
        ax.axhline(target, color="gray", lw=0.5, alpha=0.4)
    ax.set_xscale("log")
    ax.set(xlabel="wall seconds from the restore() call (log)", ylabel="PSNR vs ground truth (dB)")
    ax.set_title(f"{entry['case']}: PSNR against wall time\n{machine_label(report['machine'])}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- quality


def _metric_cells(task: str, metrics: dict) -> list[str]:
    from dipfast.bench.quality import PRIMARY

    key = PRIMARY[task]
    other = []
    if "masked_psnr" in metrics:
        other.append(f"masked {metrics['masked_psnr']:.2f}")
    if "psnr_rgb" in metrics:
        other.append(f"RGB {metrics['psnr_rgb']:.2f}")
    return [
        _f(metrics.get(key)),
        _f(metrics.get("ema_" + key)),
        _f(metrics.get("psnr_avg2")),
        _f(metrics.get("ema_psnr_avg2")),
        ", ".join(other) or "-",
    ]


def quality_markdown(report: dict) -> str:
    s = report["settings"]
    text = _header(report, "Quality (paper protocols)")
    text += (
        f"Iterations: {s['iters']}; net: {s['net']}; denoising: {s['runs_denoise']} runs (seeds from {s['seed']}). "
        "PSNR in dB: " + "; ".join(f"{k}: {v}" for k, v in s["protocols"].items()) + ".\n\n"
    )
    headers = ["image", "task", "method", "iters", "seconds", "PSNR", "EMA PSNR", "2-run avg", "2-run avg EMA", "other"]
    rows = [
        [
            r["image"],
            r["bench_task"],
            r["method"] + (f" {r['precision']}" if r["precision"] else ""),
            r["iterations"] or "-",
            _f(r["seconds"], "{:.1f}"),
        ]
        + _metric_cells(r["bench_task"], r["metrics"])
        for r in report["rows"]
    ]
    text += "### Per image\n\n" + table(headers, rows)
    rows = [
        [a["bench_task"], a["method"] + (f" {a['precision']}" if a["precision"] else ""), a["images"]]
        + _metric_cells(a["bench_task"], a["metrics"])
        for a in report["averages"]
    ]
    text += "\n### Averages over images\n\n" + table(
        ["task", "method", "images", "PSNR", "EMA PSNR", "2-run avg", "2-run avg EMA", "other"], rows
    )
    for u in report["unsupported"]:
        text += f"\n- not run: {u['method']} {u['precision'] or ''} on {u['case']}: {u['reason']}"
    return text + ("\n" if report["unsupported"] else "")


# ---------------------------------------------------------------- profile


# the profile table's numeric columns: the op's field and its format
_PROFILE_CELLS = (
    ("calls_per_iter", "{:.1f}"),
    ("ms_per_iter", "{:.3f}"),
    ("cpu_ms_per_iter", "{:.3f}"),
    ("share_pct", "{:.1f} %"),
)


def profile_markdown(report: dict) -> str:
    st = report["settings"]
    parts = [
        _header(report, "Profile"),
        f"Throughput input, net '{st['net']}', {st['size']} x {st['size']}, batch {st['batch']}: one block of "
        f"{st['iters']} iterations under torch.profiler after {st['warmup']} warm-up iterations. Times are per "
        "image-iteration; 'share' is of the total self time on the device that does the work.\n",
    ]
    for e in report["entries"]:
        title = f"### {e['method']} {e['precision']}\n\n"
        if e["status"] != "ok":
            parts.append(title + f"{e['status']}: {e['reason']}\n")
            continue
        rows = [[op["name"], *(_f(op[k], fmt) for k, fmt in _PROFILE_CELLS)] for op in e["ops"]]
        parts.append(
            title
            + f"{e['time_kind']}: {e['total_ms_per_iter']:.2f} ms per iteration in all{_launches(e)}; the profiled "
            f"block's wall time {e['wall_ms_per_iter']:.2f} ms per iteration.\n\n"
            + table(["op", "calls", "ms", "CPU ms", "share"], rows)
            + _floor_ratio_table(e)
        )
    return parts[0] + "\n".join(parts[1:])


def _launches(entry: dict) -> str:
    """', N kernel launches (M of them launch-bound, averaging under 5 us: X ms)' (CUDA profiles only)."""
    if "launches_per_iter" not in entry:
        return ""
    return (
        f", {entry['launches_per_iter']:.0f} kernel launches ({entry['short_launches_per_iter']:.0f} of them averaging "
        f"under {SHORT_KERNEL_US:g} us, {entry['short_ms_per_iter']:.2f} ms)"
    )


def _floor_ratio_table(entry: dict) -> str:
    """The kernel time and launches of each op group beside its floor (CUDA profiles only)."""
    if "groups" not in entry:
        return ""
    gpu = entry["floor_gpu"]
    where = f"the floor model on {gpu}" if gpu else "no floor: this GPU is not in dipfast.bench.floor.GPUS"
    rows = [
        [
            g["group"],
            _f(g["ms_per_iter"], "{:.3f}"),
            _f(g["floor_ms"], "{:.3f}"),
            _f(g["ratio"], "{:.1f}x"),
            _f(g.get("launches_per_iter"), "{:.0f}"),
        ]
        for g in entry["groups"]
    ]
    return f"\nKernel time by op group against {where} (ms per iteration):\n\n" + table(
        ["group", "ms", "floor ms", "ratio", "launches"], rows
    )


# ---------------------------------------------------------------- floor


def _si(x: float, unit: str) -> str:
    return f"{x / 1e9:.3f} G{unit}" if x >= 1e8 else f"{x / 1e6:.3f} M{unit}"


def floor_markdown(report: dict, rows: int = 25) -> str:
    s, gpu = report["settings"], report["gpu"]
    size = f"{s['size']} x {s['size']}"
    if tuple(s["working_size"]) != (s["size"], s["size"]):
        size += f" (the net runs at {s['working_size'][0]} x {s['working_size'][1]})"
    text = (
        f"## Floor (a model, not a measurement)\n\n"
        f"Net '{s['net']}', {size}, batch {s['batch']}, {s['precision']}, one iteration of the denoising step "
        f"(forward, backward, Adam, EMA, input noise, backtracking) on {gpu['name']}: bf16 {gpu['bf16_tflops']:g}, "
        f"TF32 {gpu['tf32_tflops']:g}, FP32 {gpu['fp32_tflops']:g} TFLOP/s dense, {gpu['bandwidth_tbs']:g} TB/s "
        f"({gpu['source']}). Each op's floor is max(FLOPs / peak, bytes / bandwidth); the iteration's is their "
        f"sum, each op as its own kernel (fusion can go below it).\n\n"
        f"**{report['total_flops'] / 1e9:.1f} GFLOP, {report['total_bytes'] / 1e9:.2f} GB, floor "
        f"{report['floor_ms']:.3f} ms** (compute alone {report['compute_ms']:.3f} ms, memory alone "
        f"{report['memory_ms']:.3f} ms).\n\n"
    )
    total = report["floor_ms"]
    group_rows = [
        [
            g,
            v["ops"],
            _si(v["flops"], "FLOP"),
            _si(v["bytes"], "B"),
            f"{v['floor_ms']:.3f}",
            f"{v['floor_ms'] / total:.1%}",
        ]
        for g, v in report["groups"].items()
    ]
    text += table(["group", "ops", "FLOPs", "bytes", "floor ms", "share"], group_rows)
    top = sorted(report["ops"], key=lambda r: -r["floor_ms"])[:rows]
    op_rows = [
        [
            r["group"],
            r["name"],
            r["op"],
            r["shape"],
            _si(r["flops"], "FLOP"),
            _si(r["bytes"], "B"),
            _f(r["floor_ms"], "{:.4f}"),
        ]
        for r in top
    ]
    text += f"\nThe {len(top)} ops with the highest floor (of {len(report['ops'])}; all in floor.json):\n\n"
    return text + table(["group", "where", "op", "shape (C x H x W)", "FLOPs", "bytes", "floor ms"], op_rows)


# ---------------------------------------------------------------- summary


def summary(out: Path) -> str:
    """The short table of the JSON files in `out` (bench/gpu_quick.sh's summary.md)."""
    lines = []
    tp = out / "throughput.json"
    if tp.is_file():
        rep = json.loads(tp.read_text())
        lines.append(f"throughput ({machine_label(rep['machine'])}), image-iterations/s:")
        for r in rep["rows"]:
            if r["status"] == "ok":
                ratio = f"{r['ratio_vs_original_loop']:.2f}x" if r["ratio_vs_original_loop"] else "-"
                lines.append(
                    f"  {r['method']:<14} {r['precision']:<5} b{r['batch']} {r['size']:>4}px "
                    f"{r['its_median']:9.2f} it/s  [{r['its_min']:.2f}-{r['its_max']:.2f}]  "
                    f"{ratio:>7} vs original-loop  peak {r['peak_memory_mib']:.0f} MiB"
                    + ("  (sequential)" if r["batch_mode"] == "sequential" else "")
                )
            else:
                lines.append(
                    f"  {r['method']:<14} {r['precision']:<5} b{r['batch']} {r['size']:>4}px  "
                    f"{r['status']}: {r['reason']}"
                )
    ttp = out / "time_to_psnr.json"
    if ttp.is_file():
        rep = json.loads(ttp.read_text())
        lines.append("time to PSNR (seconds from the call, output/EMA; '-' not reached):")
        for c in rep["cases"]:
            lines.append(f"  {c['case']}: targets {c['targets']}")
            for r in c["runs"]:
                reach = "  ".join(
                    f"{x['target']:.1f}dB {_f(x['psnr_seconds'], '{:.1f}s')}/{_f(x['ema_seconds'], '{:.1f}s')}"
                    for x in r["time_to_target"]
                )
                best = "/".join(_f(b and b["psnr"]) for b in (r["best_psnr"], r["best_ema_psnr"]))
                lines.append(f"    {r['method']:<14} {r['mode']:<5} best {best} dB  {reach}")
    q = out / "quality.json"
    if q.is_file():
        rep = json.loads(q.read_text())
        from dipfast.bench.quality import PRIMARY

        lines.append("quality (averages, primary protocol):")
        for a in rep["averages"]:
            lines.append(
                f"  {a['bench_task']:<8} {a['method']:<14} {_f(a['metrics'].get(PRIMARY[a['bench_task']]))} dB"
            )
    pr = out / "profile.json"
    if pr.is_file():
        rep = json.loads(pr.read_text())
        lines.append(f"profile ({machine_label(rep['machine'])}), top ops, ms per iteration:")
        for e in rep["entries"]:
            if e["status"] != "ok":
                lines.append(f"  {e['method']:<14} {e['precision']:<5} {e['status']}: {e['reason']}")
                continue
            top = ", ".join(f"{op['name'][:40]} {op['ms_per_iter']:.2f}" for op in e["ops"][:4])
            lines.append(f"  {e['method']:<14} {e['precision']:<5} {e['total_ms_per_iter']:7.2f} ms: {top}")
    fl = out / "floor.json"
    if fl.is_file():
        rep = json.loads(fl.read_text())
        s = rep["settings"]
        lines.append(
            f"floor (a model): net {s['net']} {s['size']}px b{s['batch']} {s['precision']} on {s['gpu']}: "
            f"{rep['total_flops'] / 1e9:.1f} GFLOP, {rep['total_bytes'] / 1e9:.2f} GB, {rep['floor_ms']:.3f} ms"
        )
    return "\n".join(lines) if lines else f"no results in {out}"
