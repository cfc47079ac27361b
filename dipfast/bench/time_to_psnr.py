"""Time-to-PSNR: wall seconds from the restore() call until the output first reaches a target PSNR.

For each case (an image with a ground truth) and each method, both tracked outputs are followed:
the raw output of each iteration ('psnr') and the EMA of the outputs ('ema_psnr'). Runs:
- cold: the first fit in a fresh process (worker.run_cold): CUDA context, autotune, compile included;
- warm: a fit in this process after a short warm-up fit of the same method on the same case.
Also the best PSNR reached and when, and the final output's PSNR. Classical baselines are one
point each: their output's PSNR at their run time.

Resolution: a time is the host read-back at or after the iteration that reached the target:
every `report_every` iterations for restore() backends, every iteration for the original loop,
so it is an upper bound by at most one read-back interval (reported per run in seconds).
A higher target is never reached earlier: each time is the first crossing of one trajectory.
"""

from __future__ import annotations

import itertools
import math
import statistics

from dipfast.bench import baselines, runs
from dipfast.bench.data import Case
from dipfast.bench.runs import Run

DEFAULT_OFFSETS = (1.0, 2.0, 4.0, 6.0, 8.0)  # dB above the input's PSNR, when no --targets


def first_reach(trajectory: dict, key: str, target: float) -> tuple[float | None, int | None]:
    """(seconds, iteration) of the first trajectory point with trajectory[key] >= target, or (None, None)."""
    for it, sec, value in zip(trajectory["iteration"], trajectory["seconds"], trajectory[key]):
        if value is not None and value >= target:
            return sec, it
    return None, None


def best(trajectory: dict, key: str) -> dict | None:
    """The highest value of trajectory[key] and when it came (the first time it did)."""
    points = [
        (v, it, s) for it, s, v in zip(trajectory["iteration"], trajectory["seconds"], trajectory[key]) if v is not None
    ]
    if not points:
        return None
    top = max(v for v, _, _ in points)
    v, it, s = next(p for p in points if p[0] == top)
    return {"psnr": v, "iteration": it, "seconds": s}


def first_step_seconds(run: Run) -> float | None:
    """The start-up: seconds from the call to the end of the first iteration (restore(): its set-up, compilation,
    autotune and graph capture; the original loop: its set-up and first iteration, its first trajectory point)."""
    if run.extras.get("first_step_seconds") is not None:
        return run.extras["first_step_seconds"]
    t = run.trajectory
    return t["seconds"][0] if t["iteration"] and t["iteration"][0] == 1 else None


def analyse(run: Run, targets: list[float]) -> dict:
    """The run's time-to-target for each target and output, its best PSNRs and its read-back interval."""
    t = run.trajectory
    seconds = t["seconds"]
    reads = sorted(set(seconds))
    interval = statistics.median([b - a for a, b in itertools.pairwise(reads)]) if len(reads) > 1 else None
    rows = []
    for target in targets:
        ps, pi = first_reach(t, "psnr", target)
        es, ei = first_reach(t, "ema_psnr", target)
        rows.append(
            {"target": target, "psnr_seconds": ps, "psnr_iteration": pi, "ema_seconds": es, "ema_iteration": ei}
        )
    return {
        "method": run.method,
        "precision": run.precision,
        "mode": run.mode,
        "seed": run.seed,
        "iterations": run.iterations,
        "seconds": run.seconds,
        "stop_reason": run.stop_reason,
        "resolution_iters": run.resolution,
        "resolution_seconds": interval,
        "final_psnr": run.psnr,
        "final_ema_psnr": run.ema_psnr,
        "best_psnr": best(t, "psnr"),
        "best_ema_psnr": best(t, "ema_psnr"),
        "time_to_target": rows,
        "first_step_seconds": first_step_seconds(run),
        "trajectory": t,
        "extras": run.extras,
    }


def case_targets(case: Case, targets: list[float] | None, offsets=DEFAULT_OFFSETS) -> tuple[list[float], str]:
    if targets:
        return sorted(float(x) for x in targets), "given"
    base = case.input_psnr()
    return [round(base + o, 2) for o in offsets], f"input PSNR {base:.2f} dB + {list(offsets)} dB"


def run_time_to_psnr(
    cases: list[Case],
    methods,
    precisions,
    *,
    iters: int,
    report_every: int = 10,
    targets: list[float] | None = None,
    cold: bool = True,
    warm: bool = True,
    baseline_names=("nlm", "bm3d", "bicubic"),
    device="auto",
    net: str | None = None,
    time_limit: float | None = None,
    seed: int = 0,
    warmup_iters: int | None = None,
    progress: bool = True,
    pairs=None,
    on_partial=None,
) -> dict:
    """pairs: (method, precision) runs instead of methods x precisions (the pairs no method runs left out);
    on_partial(report): called after each run with the report so far."""
    from tqdm.auto import tqdm

    from dipfast import api
    from dipfast.bench.worker import run_cold
    from dipfast.errors import InputError

    dev = api.resolve_device(device)
    warmup_iters = warmup_iters or min(iters, 2 * report_every)
    kwargs = {
        "iters": iters,
        "seed": seed,
        "device": str(dev),
        "report_every": report_every,
        "net": net,
        "time_limit": time_limit,
    }
    combos = list(pairs) if pairs is not None else runs.combinations(methods, precisions)
    modes = [m for m, on in (("cold", cold), ("warm", warm)) if on]
    settings = {
        "methods": list(dict.fromkeys(m for m, _ in combos)),
        "precisions": list(dict.fromkeys(p for _, p in combos)),
        "iters": iters,
        "report_every": report_every,
        "warmup_iters": warmup_iters,
        "modes": modes,
        "device": str(dev),
        "net": net or "preset",
        "time_limit_s": time_limit,
        "seed": seed,
        "baselines": list(baseline_names),
        "clock": "time.perf_counter from the restore() call (original loop: from its set-up)",
        "resolution": f"restore() backends: the read-back every {report_every} iterations; original loop: "
        "every iteration; a time is the read-back at or after the crossing (an upper bound)",
    }
    out_cases = []
    total = len(cases) * len(combos) * len(modes)
    with tqdm(total=total, disable=not progress, desc="time-to-psnr", unit="run") as bar:
        for case in cases:
            case_t, how = case_targets(case, targets)
            entry = {
                "case": case.key,
                **case.meta(),
                "input_psnr": case.input_psnr(),
                "targets": case_t,
                "targets_from": how,
                "runs": [],
                "unsupported": [],
            }
            for mode in modes:
                for method, precision in combos:
                    bar.set_postfix_str(f"{case.key} {method} {precision} {mode}")
                    try:
                        if mode == "cold":
                            run = run_cold(case, method, precision, **kwargs)
                        else:
                            runs.run_dip(
                                case, method, precision, **{**kwargs, "iters": warmup_iters, "time_limit": None}
                            )
                            run = runs.run_dip(case, method, precision, mode="warm", progress=progress, **kwargs)
                        entry["runs"].append(analyse(run, case_t))
                    except InputError as e:  # restore() refused the combination: reported, not dropped
                        entry["unsupported"].append(
                            {"method": method, "precision": precision, "mode": mode, "reason": str(e)}
                        )
                    bar.update(1)
                    if on_partial is not None:
                        on_partial({"suite": "time-to-psnr", "settings": settings, "cases": [*out_cases, entry]})
            for name in baseline_names:
                if not baselines.applies(name, case.bench_task):
                    continue
                reason = baselines.unavailable(name)
                if reason is not None:
                    entry["unsupported"].append({"method": name, "precision": None, "mode": "first", "reason": reason})
                    continue
                entry["runs"].append(analyse(runs.run_baseline(case, name), case_t))
            out_cases.append(entry)
    return {"suite": "time-to-psnr", "settings": settings, "cases": out_cases}


def is_monotone(entry_run: dict) -> bool:
    """A higher target is never reached earlier (nor a lower one later), for both outputs."""
    rows = sorted(entry_run["time_to_target"], key=lambda r: r["target"])
    for key in ("psnr_seconds", "ema_seconds"):
        reached = [r[key] for r in rows]
        seen_none = False
        last = -math.inf
        for sec in reached:
            if sec is None:
                seen_none = True
                continue
            if seen_none or sec < last:
                return False
            last = sec
    return True
