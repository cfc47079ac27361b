"""Profile: where a method's step spends its time, op by op (kernel by kernel on CUDA).

One restore() of the throughput input per method x precision, the same call the throughput table
times: warm-up blocks of K iterations, then one block of K iterations under torch.profiler, started
and stopped at the K-iteration read-backs (after torch.cuda.synchronize on CUDA). The table ranks the
ops by self time on the device that does the work: CUDA kernel time on a GPU (the kernels replayed by
a CUDA graph included, as CUPTI reports them), CPU self time on a CPU. Every figure is per
iteration, so methods compare row by row; a profiled block runs slower than a timed one, so its wall
time is for the shares, and throughput is the harness's speed figure.

On CUDA every kernel is also put in an op group by its name (kernel_groups.kernel_group) and each
group's time is printed beside its floor on this GPU (dipfast.bench.floor: the same net, size and
precision) and their ratio, so one profile says which op group is how far from the hardware's pace.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dipfast import api
from dipfast.bench import floor, kernel_groups, lost_context, runs
from dipfast.bench.data import throughput_case
from dipfast.bench.throughput import restore_in_blocks
from dipfast.errors import InputError
from dipfast.presets import PRESETS


def _device_time_us(event) -> float:
    """Self device time of a key_averages() row (torch renamed the field from self_cuda_time_total)."""
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


@contextlib.contextmanager
def _stopped_on_error(prof, stamps: list):
    """A fit that fails inside the profiled block leaves no profiler running behind it."""
    try:
        yield
    finally:
        if len(stamps) == 1:
            prof.stop()


def floor_by_group(net: str, size: int, precision: str, gpu: str) -> dict[str, float]:
    """The floor model's ms per image-iteration of the profiled case (the denoising preset on an RGB size x size
    image, `net` as the bench's --net names it), folded into the profile's kernel groups."""
    overrides = runs.net_overrides(net, "denoise")
    spec = overrides.get("net", PRESETS["denoise"].net)
    depth = overrides.get("input_depth", PRESETS["denoise"].input_depth)
    report = floor.floor_report(spec, size=size, precision=precision, gpu=gpu, input_depth=depth, n_channels=3)
    return kernel_groups.profile_floor_ms(report["groups"])


def floor_ratio_rows(kernels: list[tuple[str, float]], device_name: str, *, net: str, size: int,
                     precision: str) -> tuple[str | None, list[dict]]:  # fmt: skip
    """[(kernel name, ms per iteration)] on a GPU named device_name -> (its GPUS key or None, each kernel group's
    ms beside its floor and the ratio; no floors for a GPU not in the table)."""
    gpu = floor.gpu_of_device_name(device_name)
    floors = floor_by_group(net, size, precision, gpu) if gpu is not None else {}
    return gpu, kernel_groups.floor_ratios(kernel_groups.group_times(kernels), floors)


def profile_one(method: str, precision: str, *, size: int, batch: int, net: str, iters: int, warmup: int,
                device: torch.device, seed: int = 0, rows: int = 25) -> dict:  # fmt: skip
    """One method x precision: its top `rows` ops by self time, per iteration, and the profiled block's wall time."""
    case = throughput_case(size, seed)
    warm_blocks = max(1, math.ceil(warmup / iters))
    cuda = device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
    blocks, stamps = [0], []

    def on_block() -> None:
        blocks[0] += 1
        if blocks[0] == warm_blocks:
            prof.start()
            stamps.append(time.perf_counter())
        elif blocks[0] == warm_blocks + 1:
            stamps.append(time.perf_counter())
            prof.stop()

    with _stopped_on_error(prof, stamps):
        restore_in_blocks(case, method, precision, blocks=warm_blocks + 1, iters=iters, net=net, device=device,
                          seed=seed, images=batch, on_block=on_block)  # fmt: skip
    events = prof.key_averages()
    if cuda:  # the kernels alone: an ATen op's row also carries its kernels' time, which would count it twice
        events = [e for e in events if e.device_type != DeviceType.CPU]
    on_device = [_device_time_us(e) for e in events] if cuda else [float(e.self_cpu_time_total) for e in events]
    total = sum(on_device)
    ranked = sorted(zip(events, on_device), key=lambda pair: -pair[1])[:rows]
    per_iter = iters * batch  # image-iterations in the profiled block
    groups = {}
    if cuda:
        kernels = [(e.key, t / 1e3 / per_iter) for e, t in zip(events, on_device) if t > 0]
        name = torch.cuda.get_device_name(device)
        gpu, by_group = floor_ratio_rows(kernels, name, net=net, size=size, precision=precision)
        launches = kernel_groups.launch_summary(
            [(e.key, e.count / per_iter, t / 1e3 / per_iter) for e, t in zip(events, on_device) if t > 0]
        )
        for row in by_group:  # each group's launches beside its time: the total's are all of them
            row["launches_per_iter"] = launches["launches_by_group"].get(row["group"], 0.0)
        by_group[-1]["launches_per_iter"] = launches["launches_per_iter"]
        groups = {"floor_gpu": gpu, "groups": by_group, **launches}
    return {
        **groups,
        "wall_ms_per_iter": 1e3 * (stamps[1] - stamps[0]) / per_iter,
        "time_kind": "CUDA kernel self time" if cuda else "CPU self time",
        "total_ms_per_iter": total / 1e3 / per_iter,
        "ops": [
            {
                "name": e.key,
                "calls_per_iter": e.count / per_iter,
                "ms_per_iter": t / 1e3 / per_iter,
                "cpu_ms_per_iter": e.self_cpu_time_total / 1e3 / per_iter,
                "share_pct": 100 * t / total if total else math.nan,
            }
            for e, t in ranked
        ],
    }


def run_profile(
    methods,
    precisions,
    *,
    size: int,
    batch: int = 1,
    net: str = "default",
    iters: int = 5,
    warmup: int = 5,
    rows: int = 25,
    device="auto",
    seed: int = 0,
    progress: bool = True,
    pairs=None,
    on_entry=None,
) -> dict:
    """Profile every method x precision, or the given (method, precision) pairs; failures (a refused combination,
    out of memory) become entries that say so, and after one that leaves the CUDA context unusable the rest are
    profiled in a fresh process (dipfast.bench.lost_context). on_entry(entries): after each pair."""
    pairs = list(pairs) if pairs is not None else [(m, p) for m in methods for p in precisions]
    if any(m in runs.ORIGINAL_LOOPS for m, _ in pairs):
        raise InputError("profile runs restore()'s methods; the original loop is the throughput table's baseline")
    dev = api.resolve_device(device)
    settings = {"size": size, "batch": batch, "net": net, "iters": iters, "warmup": warmup, "rows": rows}
    entries = []
    for position, (method, precision) in enumerate(pairs):
        if progress:
            print(f"profile: {method} {precision} b{batch} {size}px", flush=True)
        entry = {"method": method, "precision": precision, "status": "ok", "reason": None}
        lost = False
        try:
            entry.update(profile_one(method, precision, device=dev, seed=seed, **settings))
        except InputError as e:
            entry.update(status="unsupported", reason=str(e))
        except Exception as e:  # noqa: BLE001  (out of memory, a Triton kernel that fails to compile: an entry)
            reason, lost = lost_context.noted(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", dev)
            entry.update(status="error", reason=reason)
        entries.append(entry)
        if on_entry is not None:
            on_entry(entries)
        if lost:
            rest = pairs[position + 1 :]
            entries = _profile_in_fresh_process(rest, entries, {**settings, "device": str(dev), "seed": seed}, on_entry)
            break
    return {"suite": "profile", "settings": settings, "entries": entries}


def _profile_in_fresh_process(pairs: list, entries: list[dict], settings: dict, on_entry) -> list[dict]:
    """run_profile() of the rest in a fresh process (main() below); `entries` and what it profiled."""
    job = {"pairs": pairs, "settings": settings}
    theirs: list[dict] = []

    def on_state(state: dict, _finished: int) -> None:
        theirs[:] = state["entries"]
        if on_entry is not None:
            on_entry(entries + theirs)

    _, status = lost_context.continue_in_fresh_process("dipfast.bench.profile", job, on_state)
    for method, precision in pairs[len(theirs) :]:  # it died before the end: the rest are entries that say so
        reason = f"the fresh process after a lost CUDA context ended (exit {status}) before profiling it"
        theirs.append({"method": method, "precision": precision, "status": "error", "reason": reason})
    return entries + theirs


def main(argv: list[str]) -> int:
    """python -m dipfast.bench.profile JOB: the rest of a profile run whose process lost its CUDA context."""
    job = lost_context.read_job(argv[0])

    def on_entry(entries: list[dict]) -> None:
        lost_context.write_state(job["state"], len(entries), entries=entries)

    run_profile([], [], pairs=[tuple(p) for p in job["pairs"]], progress=False, on_entry=on_entry, **job["settings"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # what it profiled is written already
        sys.exit(130)
