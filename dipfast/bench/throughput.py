"""Throughput: iterations per second and peak memory per method x precision x batch x image size.

Each measurement is one fit of the denoising preset (its target given, so the reference computes
its PSNRs on the device and the original loop its three CPU PSNRs, as the notebook) run for
warm-up + repeats x K iterations. The clock is read at every K-th iteration, at the host
read-back that the loop does anyway (restore(report_every=K)'s metrics sync; the original loop
syncs every iteration), after torch.cuda.synchronize() on CUDA, with time.perf_counter. A repeat
is the K iterations between two reads; the warm-up blocks before them (cuDNN autotune, allocator
growth, compile for later backends) are not counted. Figures: the median over repeats (and
rounds) with min, max and the spread, in image-iterations per second.

Batch N > 1: the backends of api.BATCHED_BACKENDS train the N networks in one step ("batched":
restore() of a list of N images, image-iterations/s = N K / block time); the others run N fits one
after another ("sequential": a repeat's time is the sum of the N fits' K-iteration blocks).
Rounds > 1 run every configuration once per round, interleaved, so that a shared machine's drift
hits every method alike; the samples of all rounds are pooled.

Configurations: methods x precisions (the pairs no method runs left out: each original loop has one
precision), or given (method, precision) pairs, so that one run puts side by side exactly the paths a
GPU window has time for. on_partial(report) after each configuration hands over the report so far
(the rows not yet measured say 'pending'), so that a run cut short by a time limit leaves its figures.
A configuration that fails is a row with its error; where the error leaves the process's CUDA context
unusable, the configurations after it run in a fresh process (dipfast.bench.lost_context).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import astuple, dataclass, field

from dipfast import api
from dipfast.bench import lost_context, runs
from dipfast.bench.data import Case, throughput_case
from dipfast.bench.memory import PeakMemory
from dipfast.errors import InputError
from dipfast.presets import apply_overrides
from dipfast.tasks import preset_for

TIMING = (
    "time.perf_counter at the host read-back every K iterations (after torch.cuda.synchronize on CUDA); "
    "median over repeats after warm-up"
)


@dataclass(frozen=True)
class Config:
    method: str  # a backend of dipfast.api.BACKENDS, a variant of one (runs.NATIVE_EAGER, ...) or an original loop
    precision: str
    batch: int
    size: int


def batch_mode(method: str, batch: int) -> str:
    """'single', 'batched' (N networks in one step) or 'sequential' (N fits one after another)."""
    if batch == 1:
        return "single"
    return "batched" if runs.backend_of(method) in api.BATCHED_BACKENDS else "sequential"


def restore_in_blocks(
    case: Case, method: str, precision: str, *, blocks: int, iters: int, net, device, seed, on_block, images: int = 1,
    early_stop=None,
):  # fmt: skip
    """One restore() of `images` copies of the case for `blocks` x `iters` iterations, calling on_block() at
    each K-iteration read-back (after torch.cuda.synchronize on CUDA): the clock of every block-timed suite.
    early_stop: an EarlyStopSpec to run (stop='auto') instead of the case's fixed count. Returns restore()'s
    Result (a list of them for images > 1)."""
    stop = {"stop": "auto", "early_stop": early_stop} if early_stop is not None else {}

    def callback(_progress) -> None:
        runs.cuda_sync(device)
        on_block()

    with runs.method_context(method):
        return api.restore(
            case.observed if images == 1 else [case.observed] * images,
            **{**case.restore_kwargs(), **stop},
            iters=blocks * iters,
            seed=seed,
            device=device,
            precision=precision,
            backend=runs.backend_of(method),
            progress=False,
            callback=callback,
            report_every=iters,
            **runs.net_overrides(net, case.preset),
        )


class _BlockClock:
    """Called at the end of each block: its time. on_warm() runs at the warm-up's last block, before that block's
    time is taken, so it is in no timed block."""

    def __init__(self, warm_blocks: int, on_warm=None):
        self.warm_blocks, self.on_warm, self.stamps = warm_blocks, on_warm, []

    def __call__(self) -> None:
        if self.on_warm is not None and len(self.stamps) == self.warm_blocks - 1:
            self.on_warm()
        self.stamps.append(time.perf_counter())

    def durations(self) -> list[float]:
        """The blocks after the warm-up, in seconds."""
        timed = self.stamps[self.warm_blocks - 1 :]
        return [b - a for a, b in zip(timed, timed[1:])]


def _blocks_reference(
    case: Case, config: Config, *, iters, warm_blocks, repeats, net, device, seed, images: int = 1, on_warm=None
) -> tuple[list[float], float]:
    """Block durations (s) of one restore() call (of `images` copies of the case in one step), and restore()'s
    memory estimate of its step (MiB). on_warm() at the end of the warm-up blocks."""
    clock = _BlockClock(warm_blocks, on_warm)
    result = restore_in_blocks(
        case,
        config.method,
        config.precision,
        blocks=warm_blocks + repeats,
        iters=iters,
        net=net,
        device=device,
        seed=seed,
        images=images,
        on_block=clock,
    )
    first = result[0] if isinstance(result, list) else result
    return clock.durations(), first.extras["memory_estimate_mib"]


def _blocks_original(
    case: Case, config: Config, *, iters, warm_blocks, repeats, net, device, seed, on_warm=None
) -> tuple[list[float], None]:
    """Block durations (s) of the original loop (no memory estimate: it is not restore()'s step)."""
    from dipfast.bench.original_loop import OriginalLoop

    if not runs.applies(config.method, config.precision):
        raise InputError(
            f"{config.method} runs precision {runs.ORIGINAL_LOOPS[config.method]!r} only; "
            f"precision {config.precision!r} does not apply"
        )
    preset = apply_overrides(preset_for(case.task, case.preset), runs.net_overrides(net, case.preset))
    loop = OriginalLoop(
        case.task,
        preset,
        case.observed,
        case.target,
        device=device,
        seed=seed,
        tf32=config.method == runs.ORIGINAL_LOOP_TF32,
    )
    clock = _BlockClock(warm_blocks, on_warm)

    def on_step(done: int) -> bool:
        if done % iters == 0:
            runs.cuda_sync(device)
            clock()
        return False

    loop.run((warm_blocks + repeats) * iters, on_step)
    loop.close()
    return clock.durations(), None


def measure(
    config: Config, case: Case, *, iters: int, repeats: int, warmup: int, net: str, device, seed: int = 0
) -> dict:
    """Samples (image-iterations/s, one per repeat), the peak memory of one configuration (of the whole fit, and
    after its warm-up where one fit runs) and restore()'s estimate of it."""
    warm_blocks = max(1, math.ceil(warmup / iters))
    common = dict(iters=iters, warm_blocks=warm_blocks, repeats=repeats, net=net, device=device)
    mode = batch_mode(config.method, config.batch)
    with PeakMemory(device) as mem:
        on_warm = mem.steady if mode != "sequential" else None  # N fits in turn: each warms up after the first
        if mode == "batched":  # one restore() of N images
            one, estimate = _blocks_reference(case, config, seed=seed, images=config.batch, on_warm=on_warm, **common)
            samples = [config.batch * iters / t for t in one]
        else:  # one fit, or N fits one after another
            blocks = _blocks_original if config.method in runs.ORIGINAL_LOOPS else _blocks_reference
            fits = [blocks(case, config, seed=seed + k, on_warm=on_warm, **common) for k in range(config.batch)]
            samples = [config.batch * iters / sum(fit[r] for fit, _ in fits) for r in range(repeats)]
            estimate = fits[0][1]
    return {"samples": samples, "memory": {**mem.result(), "estimate_mib": estimate}}


def _summary(samples: list[float]) -> dict:
    med = statistics.median(samples)
    return {
        "its_median": med,
        "its_min": min(samples),
        "its_max": max(samples),
        "spread_pct": 100 * (max(samples) - min(samples)) / med if med > 0 else math.nan,
        "ms_per_iter": 1000 / med if med > 0 else math.nan,
        "its_samples": samples,
    }


def run_throughput(
    methods,
    precisions,
    batches,
    sizes,
    *,
    pairs=None,
    net: str = "default",
    iters: int = 10,
    repeats: int = 5,
    warmup: int = 5,
    rounds: int = 1,
    device="auto",
    seed: int = 0,
    progress: bool = True,
    on_partial=None,
) -> dict:
    """Measure every configuration; the report's rows hold the figures (see report.throughput_markdown).

    pairs: (method, precision) configurations instead of methods x precisions; on_partial(report): called
    after each configuration with the report so far."""
    from tqdm.auto import tqdm

    dev = api.resolve_device(device)
    if pairs is None:
        pairs = [(m, p) for p in precisions for m in methods]
    pairs = list(pairs)
    configs = [Config(m, p, b, s) for s in sizes for b in batches for m, p in pairs]
    settings = {
        "task": "denoise",
        "net": net,
        "sizes": list(sizes),
        "batches": list(batches),
        "methods": list(dict.fromkeys(m for m, _ in pairs)),
        "precisions": list(dict.fromkeys(p for _, p in pairs)),
        "pairs": [list(pair) for pair in pairs],
        "iters_per_repeat": iters,
        "repeats": repeats,
        "warmup_iters": max(1, math.ceil(warmup / iters)) * iters,
        "rounds": rounds,
        "device": str(dev),
        "seed": seed,
        "timing": TIMING,
        "unit": "image-iterations per second",
        "batch_note": "batch > 1 with batch_mode 'sequential': restore() takes one image, so N fits "
        "run one after another and the figure is N x K / (sum of their K-iteration blocks)",
    }
    schedule = [c for _ in range(rounds) for c in configs]
    with tqdm(total=len(schedule), disable=not progress, desc="throughput", unit="config") as bar:

        def show_next() -> None:
            if bar.n < len(schedule):
                c = schedule[bar.n]
                bar.set_postfix_str(f"{c.method} {c.precision} b{c.batch} {c.size}px")

        def on_config(measured: Measured, finished: int) -> None:
            bar.update(finished)
            show_next()
            if on_partial is not None:
                on_partial(_report(configs, measured, net, settings))

        show_next()
        measured = measure_schedule(
            schedule, Measured(), iters=iters, repeats=repeats, warmup=warmup, net=net, device=dev, seed=seed,
            on_config=on_config,
        )  # fmt: skip
    return _report(configs, measured, net, settings)


@dataclass
class Measured:
    """What a run has measured so far, by configuration: a fresh process takes it over whole, and hands it back."""

    samples: dict[Config, list[float]] = field(default_factory=dict)  # image-iterations/s, one per repeat
    memory: dict[Config, dict] = field(default_factory=dict)  # of the round with the highest peak
    failed: dict[Config, tuple[str, str]] = field(default_factory=dict)  # (status, reason): never measured again
    done: set[Config] = field(default_factory=set)

    def to_json(self) -> list[dict]:
        return [
            {
                "config": astuple(c),
                "samples": self.samples.get(c, []),
                "memory": self.memory.get(c),
                "failed": self.failed.get(c),
                "done": c in self.done,
            }
            for c in {**self.samples, **self.memory, **self.failed, **dict.fromkeys(self.done)}
        ]

    @classmethod
    def from_json(cls, entries: list[dict]) -> Measured:
        measured = cls()
        for e in entries:
            c = Config(*e["config"])
            if e["samples"]:
                measured.samples[c] = e["samples"]
            if e["memory"] is not None:
                measured.memory[c] = e["memory"]
            if e["failed"] is not None:
                measured.failed[c] = tuple(e["failed"])
            if e["done"]:
                measured.done.add(c)
        return measured


def measure_schedule(
    schedule: list[Config], measured: Measured, *, iters, repeats, warmup, net, device, seed, on_config
) -> Measured:
    """Measure each configuration of the schedule in turn, adding to `measured`; on_config(measured, 1) after each.
    A CUDA error that leaves this process's context unusable (an illegal address: every CUDA call after it fails the
    same way) is that configuration's row, and the rest of the schedule runs in a fresh process."""
    cases = {}
    for position, c in enumerate(schedule):
        if c not in measured.failed:
            try:
                if c.size not in cases:
                    cases[c.size] = throughput_case(c.size, seed)
                m = measure(
                    c, cases[c.size], iters=iters, repeats=repeats, warmup=warmup, net=net, device=device, seed=seed
                )
                measured.samples.setdefault(c, []).extend(m["samples"])
                if c not in measured.memory or m["memory"]["peak_mib"] > measured.memory[c]["peak_mib"]:
                    measured.memory[c] = m["memory"]
            except InputError as e:  # restore() refused the combination: a row says so
                measured.failed[c] = ("unsupported", str(e))
            except Exception as e:  # noqa: BLE001  (out of memory, a Triton kernel that fails to compile: a row)
                first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                reason, lost = lost_context.noted(first, device)
                measured.failed[c] = ("error", reason)
                if lost:
                    measured.done.add(c)
                    on_config(measured, 1)
                    settings = {"iters": iters, "repeats": repeats, "warmup": warmup, "net": net, "seed": seed}
                    return _measure_in_fresh_process(
                        schedule[position + 1 :], measured, {**settings, "device": str(device)}, on_config
                    )
        measured.done.add(c)
        on_config(measured, 1)
    return measured


def _measure_in_fresh_process(schedule: list[Config], measured: Measured, settings: dict, on_config) -> Measured:
    """measure_schedule() of the rest in a fresh process (main() below), which continues `measured`."""
    job = {"settings": settings, "schedule": [astuple(c) for c in schedule], "measured": measured.to_json()}

    def on_state(state: dict, finished: int) -> None:
        nonlocal measured
        measured = Measured.from_json(state["measured"])
        on_config(measured, finished)

    finished, status = lost_context.continue_in_fresh_process("dipfast.bench.throughput", job, on_state)
    if finished < len(schedule):  # it died before the end: the rest are rows that say so
        reason = f"the fresh process after a lost CUDA context ended (exit {status}) before measuring it"
        for c in schedule[finished:]:
            measured.failed.setdefault(c, ("error", reason))
            measured.done.add(c)
        on_config(measured, len(schedule) - finished)
    return measured


def main(argv: list[str]) -> int:
    """python -m dipfast.bench.throughput JOB: the rest of a run whose process lost its CUDA context."""
    job = lost_context.read_job(argv[0])
    finished = 0

    def on_config(measured: Measured, n: int) -> None:
        nonlocal finished
        finished += n
        lost_context.write_state(job["state"], finished, measured=measured.to_json())

    schedule = [Config(*c) for c in job["schedule"]]
    measure_schedule(schedule, Measured.from_json(job["measured"]), on_config=on_config, **job["settings"])
    return 0


def _report(configs, measured: Measured, net, settings) -> dict:
    """The report of the configurations measured so far; the rest are rows with status 'pending'."""
    rows = []
    for c in configs:
        row = {
            "method": c.method,
            "precision": c.precision,
            "batch": c.batch,
            "size": c.size,
            "net": net,
            "batch_mode": batch_mode(c.method, c.batch),
            "status": "ok",
            "reason": None,
        }
        if c in measured.failed:
            row["status"], row["reason"] = measured.failed[c]
        elif c not in measured.done or not measured.samples.get(c):
            row["status"], row["reason"] = "pending", "not measured yet"
        else:
            row.update(_summary(measured.samples[c]))
            mem = measured.memory[c]
            row.update(peak_memory_mib=mem["peak_mib"], memory_growth_mib=mem["growth_mib"], memory_kind=mem["kind"])
            row.update(steady_peak_memory_mib=mem["steady_peak_mib"], memory_estimate_mib=mem["estimate_mib"])
        rows.append(row)
    for row in rows:  # the headline: each method against each original loop at the same size and batch
        for loop, key in (
            (runs.ORIGINAL_LOOP, "ratio_vs_original_loop"),
            (runs.ORIGINAL_LOOP_TF32, "ratio_vs_original_loop_tf32"),
        ):
            base = next(
                (
                    r
                    for r in rows
                    if r["method"] == loop
                    and r["size"] == row["size"]
                    and r["batch"] == row["batch"]
                    and r["status"] == "ok"
                ),
                None,
            )
            ok = row["status"] == "ok" and base is not None
            row[key] = row["its_median"] / base["its_median"] if ok else None
    return {"suite": "throughput", "settings": settings, "rows": rows}


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # what it measured is written already
        sys.exit(130)
