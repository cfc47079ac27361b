"""`dipfast bench <suite>`: the command line of the harness (the suites: SUITES below).

add_bench_parser(subparsers) adds `bench` to the `dipfast` command; run_bench(args) runs it
and returns the exit status (2 for bad input, with one line on stderr). `python -m dipfast.bench`
runs the same suites without the `dipfast` command (main() below).

Defaults that depend on the machine ('auto'): on CPU, small images and few iterations so that
every suite finishes in minutes with no arguments; on CUDA, the paper's sizes and iterations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dipfast.cli_args import EXIT_BAD_INPUT, OneLineErrorParser, positive_int
from dipfast.errors import InputError

SUITES = ("throughput", "time-to-psnr", "quality", "profile", "floor", "batch", "early-stop", "summary")

# 'auto' defaults: (CPU, CUDA)
AUTO = {
    "throughput": {"size": ([64, 128], [512]), "iters": (10, 20), "warmup": (5, 20)},
    "time-to-psnr": {"size": (64, None), "iters": (100, None)},
    "quality": {"size": (64, None), "iters": (50, None)},
    "profile": {"size": (128, 512), "iters": (5, 20), "warmup": (5, 20)},
    "batch": {"size": (32, 256), "iters": (10, 200), "ref_iters": (5, 50)},
    "early-stop": {"size": (32, 256), "iters": (800, 3000)},
}


def _size(text: str) -> int | str:
    return "full" if text == "full" else positive_int(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        nargs="+",
        metavar="NAME",
        help="DIP methods: the backends restore() accepts, 'native-eager' (native without its C++ ops), "
        "'native-nchw' (native with NCHW activations), 'native-cl' (native with channels_last activations under "
        "bf16), 'native-reference-blocks' (native with the reference BatchNorm, LeakyReLU and pad ops on CUDA), "
        "'native-aligned' (native with conv channels padded for tensor cores), 'native-packed-parameters' (native "
        "with its parameters packed, not 16-byte aligned), 'native-unfused-rules' (native with the rules after the "
        "backward as torch ops on CUDA, not fused), 'native-pdl' (native with its Triton kernels as programmatic "
        "dependent launches on Hopper), 'native-folded-finalize' (native with the BatchNorm kernels' finalize in "
        "their last program, not a launch of its own), 'native-parallel-compile' (native with its Triton kernels "
        "compiled side by side before the first step), 'native-per-network' (native with the networks of a batch one "
        "after another, not vmapped, on CUDA), 'compile-forced-layout' (compile with Inductor's layout optimisation "
        "on the backward graph too), 'compile-nchw' (compile with NCHW activations and convolutions), 'triton-nchw' "
        "(triton with NCHW activations), 'triton-eager' (triton without torch.compile), 'original-loop' (the "
        "notebooks' loop in IEEE fp32, as the paper ran it), 'original-loop-tf32' (the same under today's PyTorch "
        "default, TF32 convolutions), or 'all'. "
        "Default: all on CUDA; on a CPU all but compile, triton and their variants, original-loop-tf32, native-cl, "
        "native-reference-blocks, native-aligned, native-packed-parameters, native-unfused-rules, native-pdl, "
        "native-folded-finalize, native-parallel-compile and native-per-network (said when left out)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        metavar="P",
        help="precisions restore() accepts, or 'all'; original-loop runs fp32 only, original-loop-tf32 tf32. "
        "Default: all on CUDA; on a CPU all but tf32, which a CPU computes as fp32",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--out",
        default="bench-out",
        help="folder for the JSON, Markdown and plots (default: bench-out); "
        "files of the same suite there are overwritten",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges around the step phases (for nsys)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _configs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="METHOD:PRECISION",
        help="exactly these method x precision pairs (e.g. native:bf16 original-loop-tf32:tf32), in this order, "
        "instead of --backend x --precision",
    )


def _images(p: argparse.ArgumentParser, what: str) -> None:
    from dipfast.bench.data import TASKS

    p.add_argument("--data", help="the paper's image folder (e.g. ../shared/data/dip); default: scikit-image's images")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=[*TASKS, "all"],
        metavar="TASK",
        help=f"of {list(TASKS)} or 'all' (default: {what})",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        help="centre-crop images to at most SIZE x SIZE, or 'full' (default: 64 on CPU, full on CUDA)",
    )
    p.add_argument(
        "--net", default="preset", help="'preset' (each task's own net, default), 'default', 'tiny' or a preset's name"
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        default=["all"],
        metavar="NAME",
        help="bicubic, nlm, bm3d, 'all' (default: those that apply) or 'none'",
    )


def _add_suites(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="{" + ",".join(SUITES) + "}")
    t = sub.add_parser(
        "throughput",
        help="iterations/s and peak memory",
        description=(
            "Iterations per second and peak memory per method x precision x batch x size, after warm-up, "
            "median of repeats with the spread."
        ),
    )
    _common(t)
    t.add_argument("--size", type=positive_int, nargs="+", help="image sides (default: 64 128 on CPU, 512 on CUDA)")
    t.add_argument(
        "--batch",
        type=positive_int,
        nargs="+",
        default=[1],
        help="batch sizes; N > 1 runs N sequential fits while restore() takes one image",
    )
    t.add_argument("--iters", type=positive_int, help="iterations per timed repeat (default: 10 on CPU, 20 on CUDA)")
    t.add_argument("--repeats", type=positive_int, default=5)
    t.add_argument("--warmup", type=positive_int, help="warm-up iterations (default: 5 on CPU, 20 on CUDA)")
    t.add_argument("--rounds", type=positive_int, default=1, help="interleaved rounds over all configurations")
    t.add_argument("--net", default="default", help="'default' (the default DIP net), 'tiny' or a preset's name")
    _configs(t)

    p = sub.add_parser(
        "time-to-psnr",
        help="wall time until a target PSNR, cold and warm",
        description=(
            "Wall time from the restore() call until the output (and its EMA) first reaches target PSNRs, "
            "cold (a fresh process) and warm; best PSNR and when."
        ),
    )
    _common(p)
    _images(p, "denoise")
    p.add_argument("--iters", type=positive_int, help="iterations per fit (default: 100 on CPU, the preset's on CUDA)")
    p.add_argument("--report-every", type=positive_int, default=10, help="read-back interval: the time resolution")
    p.add_argument("--targets", type=float, nargs="+", help="target PSNRs in dB (default: input PSNR + 1, 2, 4, 6, 8)")
    p.add_argument("--time-limit", type=float, help="stop each fit after this many seconds")
    p.add_argument("--no-cold", action="store_true", help="skip the cold (fresh-process) runs")
    p.add_argument("--no-warm", action="store_true", help="skip the warm runs")
    _configs(p)

    q = sub.add_parser(
        "quality",
        help="the paper's protocols, per image and averaged",
        description=(
            "Denoising (sigma 25, 1 run and 2-run average, output and EMA), SR x4/x8 (Y PSNR, shave 4/5), "
            "restoration (50% pixels), inpainting (given mask), with bicubic/NLM/BM3D baselines."
        ),
    )
    _common(q)
    _images(q, "all")
    q.add_argument("--iters", type=positive_int, help="iterations per fit (default: 50 on CPU, each preset's on CUDA)")
    q.add_argument("--runs", type=positive_int, default=2, help="denoising runs to average (default: 2, the paper's)")

    f = sub.add_parser(
        "profile",
        help="each method's top ops (CUDA kernels on a GPU) per iteration",
        description=(
            "One block of iterations per method x precision under torch.profiler, after warm-up: the ops ranked by "
            "self time on the device (CUDA kernel time on a GPU, CPU time on a CPU), per iteration."
        ),
    )
    _common(f)
    f.add_argument("--size", type=positive_int, help="image side (default: 128 on CPU, 512 on CUDA)")
    f.add_argument("--batch", type=positive_int, default=1, help="images trained side by side (default: 1)")
    f.add_argument("--iters", type=positive_int, help="profiled iterations (default: 5 on CPU, 20 on CUDA)")
    f.add_argument("--warmup", type=positive_int, help="warm-up iterations (default: 5 on CPU, 20 on CUDA)")
    f.add_argument("--rows", type=positive_int, default=25, help="ops listed per method (default: 25)")
    f.add_argument("--net", default="default", help="'default' (the default DIP net), 'tiny' or a preset's name")
    _configs(f)

    fl = sub.add_parser(
        "floor",
        help="a cost model of one iteration: FLOPs, bytes and the least time on a named GPU",
        description=(
            "Every op of one iteration (the net traced on the meta device: convs' forward and gradients, BatchNorm, "
            "activations, pad, upsample, concat, loss, Adam, EMA) with its FLOPs, bytes moved and floor time "
            "max(FLOPs / peak, bytes / bandwidth) on a GPU of the table (dipfast.bench.floor.GPUS). A model: "
            "nothing runs on a GPU."
        ),
    )
    fl.add_argument("--size", type=positive_int, default=512, help="image side (default: 512)")
    fl.add_argument("--batch", type=positive_int, default=1, help="networks trained side by side (default: 1)")
    fl.add_argument("--precision", default="bf16", help="fp32 (IEEE), tf32 or bf16 (default)")
    fl.add_argument("--gpu", default="h100", help="h100 (default), h200 or a100")
    fl.add_argument("--net", default="default", help="'default' (the default DIP net), 'tiny' or a preset's name")
    fl.add_argument("--rows", type=positive_int, default=25, help="ops listed in the Markdown (default: 25)")
    fl.add_argument("--out", default="bench-out", help="folder for floor.json and floor.md (default: bench-out)")

    b = sub.add_parser(
        "batch",
        help="images/hour of dipfast batch: local, 1 and 2 Ray workers; Ray's overhead per task",
        description=(
            "restore_many() over the same synthetic images in this process and on local Ray clusters of 1 and 2 "
            "workers (one CPU, one thread each): images per hour, and Ray's round trip per task set against one "
            "task's time at the default settings."
        ),
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--out", default="bench-out", help="folder for batch.json and batch.md (default: bench-out)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--images", type=positive_int, default=8, help="images per configuration (default: 8)")
    b.add_argument("--size", type=positive_int, help="image side (default: 32 on CPU, 256 on CUDA)")
    b.add_argument("--iters", type=positive_int, help="iterations per image (default: 10 on CPU, 200 on CUDA)")
    b.add_argument("--net", default="tiny", help="'tiny' (default), 'default' or a preset's name")
    b.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2], help="Ray worker counts (default: 1 2)")
    b.add_argument("--batch", type=positive_int, default=4, help="networks per step on a GPU (default: 4)")
    b.add_argument(
        "--ref-size", type=positive_int, default=128, help="image side of the task Ray's overhead is set against"
    )
    b.add_argument(
        "--ref-iters", type=positive_int, help="iterations timed for that task's rate (default: 5 CPU, 50 CUDA)"
    )
    b.add_argument("--round-trips", type=positive_int, default=50, help="Ray round trips timed (default: 50)")

    _add_early_stop(sub)

    s = sub.add_parser("summary", help="print the short table of the results in a folder")
    s.add_argument("folder", nargs="?", default="bench-out")


def _add_early_stop(sub) -> None:
    from dipfast.bench.early_stop import TASKS
    from dipfast.early_stop import METHODS, RETURNS

    e = sub.add_parser(
        "early-stop",
        help="stop='auto' against the oracle and the fixed count",
        description=(
            "Per image: one long fit, recorded every iteration; the best PSNR of any iteration (the oracle), "
            "the PSNR at the preset's fixed count, and the early-stop criterion replayed on the record: the "
            "PSNR of the output it returns, the iteration it detected and the iterations saved."
        ),
    )
    e.add_argument("--data", help="the paper's image folder (e.g. ../shared/data/dip); default: scikit-image's")
    e.add_argument(
        "--tasks",
        nargs="+",
        default=["denoise"],
        choices=[*TASKS, "all"],
        metavar="TASK",
        help=f"of {list(TASKS)} or 'all' (default: denoise)",
    )
    e.add_argument("--size", type=positive_int, help="centre crops of SIZE x SIZE (default: 32 on CPU, 256 on CUDA)")
    e.add_argument(
        "--iters", type=positive_int, help="iterations recorded per image (default: 800 on CPU, 3000 on CUDA)"
    )
    e.add_argument("--limit", type=positive_int, help="at most this many images per task")
    e.add_argument(
        "--images",
        nargs="+",
        metavar="NAME",
        help="only these images (e.g. F16 kate): a set recorded in parts into one --cache replays whole",
    )
    e.add_argument("--sigma", type=float, help="the denoise task's noise sigma in 8-bit units (default: 25)")
    e.add_argument("--cache", help="a folder for the records (read if there, else written): replays are instant")
    e.add_argument("--net", default="preset", help="'preset' (each task's own net, default), 'default' or 'tiny'")
    e.add_argument("--backend", default="native", help="restore()'s backend (default: native)")
    e.add_argument("--precision", default="auto", help="restore()'s precision (default: auto)")
    e.add_argument(
        "--calibrate",
        action="store_true",
        help="also search the rule's settings per task (calibration.json: every candidate, best first)",
    )
    e.add_argument("--method", choices=METHODS, help="the rule, for every task (default: each task's calibrated one)")
    e.add_argument("--window", type=positive_int)
    e.add_argument("--patience", type=positive_int)
    e.add_argument("--alpha", type=float)
    e.add_argument("--threshold", type=float)
    e.add_argument("--start", type=int)
    e.add_argument("--returns", choices=RETURNS)
    e.add_argument(
        "--tolerance", type=float, help="keep the latest output within (1 + tolerance) x VAR's minimum (0: its own)"
    )
    e.add_argument(
        "--noise-gate",
        type=float,
        help="no minimum counts before the loss is within NOISE_GATE x the estimated noise variance (0: off)",
    )
    e.add_argument(
        "--cost",
        type=positive_int,
        metavar="SIZE",
        help="also time the criterion's update against a default-net step at SIZE px",
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument(
        "--out", default="bench-out", help="folder for early_stop.json/.md and the plots (default: bench-out)"
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (with its suites) to the `dipfast` command's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark harness: throughput, time-to-psnr, quality, profile, floor",
        description=(
            "Measure dipfast: iterations/s, time to a target PSNR, paper-protocol quality, where the step's time "
            "goes; and model it: the floor of one iteration on a named GPU."
        ),
    )
    _add_suites(p)
    return p


def _pick(given: list[str], valid: list[str], what: str) -> list[str]:
    if given == ["all"]:
        return list(valid)
    unknown = [g for g in given if g not in valid]
    if unknown:
        raise InputError(f"unknown {what} {unknown[0]!r}; valid: {valid} or 'all'")
    return list(dict.fromkeys(given))


def methods_and_precisions(args, device_type: str) -> tuple[list[str], list[str], str | None]:
    """--backend and --precision as lists ('all': every one); where one is not given, the device's defaults
    (runs.NOT_BY_DEFAULT), with a line saying what they leave out and how to run it (None: nothing left out)."""
    from dipfast.bench import runs

    if args.backend is not None:
        methods = _pick(args.backend, runs.dip_methods(), "backend")
    else:
        methods = runs.default_methods(device_type)
    if args.precision is not None:
        precisions = _pick(args.precision, runs.api_precisions(), "precision")
    else:
        precisions = runs.default_precisions(device_type)
    left = [m for m in runs.dip_methods() if m not in methods and args.backend is None]
    left += [f"precision {p}" for p in runs.api_precisions() if p not in precisions and args.precision is None]
    if not left:
        return methods, precisions, None
    flags = " ".join(
        f for f, given in (("--backend all", args.backend), ("--precision all", args.precision)) if not given
    )
    line = (
        f"on {device_type}, left out: {', '.join(left)} (torch.compile and Triton's interpreter take minutes a run "
        "here; on a CPU tf32 is fp32, native-cl, native-reference-blocks, native-unfused-rules, native-pdl, "
        "native-folded-finalize, native-parallel-compile and native-per-network are native, and the aligned and "
        "packed variants are about CUDA's tensor cores); "
        f"add {flags} to run them, or name them"
    )
    return methods, precisions, line


def _pairs(args) -> list[tuple[str, str]] | None:
    """--configs as (method, precision) pairs, checked; None where not given (methods x precisions run)."""
    from dipfast.bench import runs

    given = getattr(args, "configs", None)
    if not given:
        return None
    if args.backend is not None or args.precision is not None:
        raise InputError("give either --configs or --backend/--precision, not both")
    pairs = []
    for text in given:
        method, sep, precision = text.partition(":")
        if not sep:
            raise InputError(f"--configs takes METHOD:PRECISION pairs; got {text!r}")
        _pick([method], runs.dip_methods(), "backend")
        _pick([precision], runs.api_precisions(), "precision")
        if not runs.applies(method, precision):
            raise InputError(f"{method} runs precision {runs.ORIGINAL_LOOPS[method]!r} only; got {text!r}")
        pairs.append((method, precision))
    return list(dict.fromkeys(pairs))


def _baselines(given: list[str]) -> list[str]:
    from dipfast.bench.baselines import BASELINES

    if given == ["none"]:
        return []
    return _pick(given, list(BASELINES), "baseline")


def _auto(suite: str, key: str, value, is_cuda: bool):
    return value if value is not None else AUTO[suite][key][1 if is_cuda else 0]


def run_bench(args) -> int:
    try:
        return _run(args)
    except InputError as e:
        print(f"dipfast bench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args) -> int:
    if getattr(args, "suite", None) is None:
        raise InputError(f"give a suite: {', '.join(SUITES[:-1])} or {SUITES[-1]} (see --help)")
    if args.suite == "summary":
        from dipfast.bench.report import summary

        print(summary(Path(args.folder)))
        return 0
    if args.suite == "floor":
        return _floor(args)

    import torch

    from dipfast import api, nvtx_ranges
    from dipfast.bench import report

    if args.suite == "early-stop":
        return _early_stop(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder")
    if args.suite == "batch":
        return _batch(args, api.resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nvtx and not nvtx_ranges.enable():
        print("dipfast bench: the nvtx package is not installed; running without NVTX ranges", file=sys.stderr)
    dev = api.resolve_device(args.device)
    methods, precisions, left_out = methods_and_precisions(args, dev.type)
    common = {
        "methods": methods,
        "precisions": precisions,
        "device": dev,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    pairs = _pairs(args)
    if pairs is not None:
        common["pairs"] = pairs
    elif left_out:
        print(f"dipfast bench: {left_out}", file=sys.stderr)
    suite = {"throughput": _throughput, "time-to-psnr": _time_to_psnr, "quality": _quality, "profile": _profile}[
        args.suite
    ]
    markdown, plots = {
        "throughput": (report.throughput_markdown, _throughput_plots),
        "time-to-psnr": (report.time_to_psnr_markdown, _time_to_psnr_plots),
        "quality": (report.quality_markdown, None),
        "profile": (report.profile_markdown, None),
    }[args.suite]
    if args.suite in ("throughput", "time-to-psnr"):  # long suites leave their figures so far on disk

        def on_partial(partial: dict) -> None:
            finished = report.finish(partial, dev)
            report.write(finished, out, markdown(finished))

        common["on_partial"] = on_partial
    rep = report.finish(suite(args, dev.type == "cuda", **common), dev)
    text = markdown(rep)
    paths = list(report.write(rep, out, text).values()) + (plots(rep, out) if plots else [])
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _throughput(args, cuda: bool, **common) -> dict:
    from dipfast.bench import runs
    from dipfast.bench.throughput import run_throughput

    if args.net not in runs.NET_CHOICES or args.net == "preset":
        raise InputError(f"unknown net {args.net!r}; valid: {[n for n in runs.NET_CHOICES if n != 'preset']}")
    return run_throughput(
        batches=args.batch,
        sizes=_auto("throughput", "size", args.size, cuda),
        net=args.net,
        iters=_auto("throughput", "iters", args.iters, cuda),
        repeats=args.repeats,
        warmup=_auto("throughput", "warmup", args.warmup, cuda),
        rounds=args.rounds,
        **common,
    )


def _batch(args, dev) -> int:
    from dipfast.bench import report, runs
    from dipfast.bench.batch import batch_markdown, run_batch_bench

    if args.net not in runs.NET_CHOICES or args.net == "preset":
        raise InputError(f"unknown net {args.net!r}; valid: {[n for n in runs.NET_CHOICES if n != 'preset']}")
    cuda = dev.type == "cuda"
    rep = run_batch_bench(
        images=args.images,
        size=_auto("batch", "size", args.size, cuda),
        iters=_auto("batch", "iters", args.iters, cuda),
        net=args.net,
        workers=args.workers,
        batch=args.batch,
        ref_size=args.ref_size,
        ref_iters=_auto("batch", "ref_iters", args.ref_iters, cuda),
        round_trips=args.round_trips,
        device=dev,
        seed=args.seed,
        progress=not args.quiet,
    )
    rep = report.finish(rep, dev)
    text = batch_markdown(rep)
    paths = report.write(rep, Path(args.out), text)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _profile(args, cuda: bool, **common) -> dict:
    from dipfast.bench import runs
    from dipfast.bench.profile import run_profile

    if args.net not in runs.NET_CHOICES or args.net == "preset":
        raise InputError(f"unknown net {args.net!r}; valid: {[n for n in runs.NET_CHOICES if n != 'preset']}")
    if args.backend in (None, ["all"]):  # restore()'s methods: the original loops are not
        common["methods"] = [m for m in common["methods"] if m not in runs.ORIGINAL_LOOPS]
    return run_profile(
        size=_auto("profile", "size", args.size, cuda),
        batch=args.batch,
        net=args.net,
        iters=_auto("profile", "iters", args.iters, cuda),
        warmup=_auto("profile", "warmup", args.warmup, cuda),
        rows=args.rows,
        **common,
    )


def _floor(args) -> int:
    import torch

    from dipfast.bench import floor, report, runs
    from dipfast.presets import PRESETS

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder")
    if args.net not in runs.NET_CHOICES or args.net == "preset":
        raise InputError(f"unknown net {args.net!r}; valid: {[n for n in runs.NET_CHOICES if n != 'preset']}")
    floor.check_precision(args.precision)
    floor.gpu_named(args.gpu)
    overrides = runs.net_overrides(args.net, "denoise")
    rep = floor.floor_report(
        overrides["net"],
        size=args.size,
        batch=args.batch,
        precision=args.precision,
        gpu=args.gpu,
        input_depth=overrides.get("input_depth", PRESETS["denoise"].input_depth),
        net=args.net,
    )
    rep = report.finish(rep, torch.device("cpu"))
    text = report.floor_markdown(rep, rows=args.rows)
    paths = report.write(rep, out, text)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _throughput_plots(rep: dict, out: Path) -> list[Path]:
    from dipfast.bench import report

    return [report.plot_throughput(rep, out / "throughput.png")]


def _cases(args, cuda: bool, default_tasks: list[str]) -> tuple[list, list[str]]:
    """The suite's cases, and the paper's images the --data folder lacks (announced on stderr)."""
    from dipfast.bench import data, runs

    if args.net not in runs.NET_CHOICES:
        raise InputError(f"unknown net {args.net!r}; valid: {list(runs.NET_CHOICES)}")
    tasks = default_tasks if args.tasks is None else list(data.TASKS) if "all" in args.tasks else args.tasks
    size = _auto(args.suite, "size", args.size, cuda)
    cases = data.load_cases(args.data, tasks, None if size == "full" else size, args.seed)
    missing = data.missing_images(args.data, tasks) if args.data else []
    for task, rel in missing:
        print(f"dipfast bench: {args.data} has no {rel}: left out of {task}", file=sys.stderr)
    return cases, [f"{task}: {rel}" for task, rel in missing]


def _time_to_psnr(args, cuda: bool, **common) -> dict:
    from dipfast.bench.time_to_psnr import run_time_to_psnr
    from dipfast.tasks import preset_for

    if args.no_cold and args.no_warm:
        raise InputError("--no-cold and --no-warm leave nothing to run")
    cases, missing = _cases(args, cuda, ["denoise"])
    iters = _auto(args.suite, "iters", args.iters, cuda)
    if iters is None:  # CUDA default: the longest preset among the cases
        iters = max(preset_for(c.task, c.preset, c.scale).iterations for c in cases)
    rep = run_time_to_psnr(
        cases,
        iters=iters,
        report_every=args.report_every,
        targets=args.targets,
        cold=not args.no_cold,
        warm=not args.no_warm,
        baseline_names=_baselines(args.baselines),
        net=args.net,
        time_limit=args.time_limit,
        **common,
    )
    rep["settings"]["missing_images"] = missing
    return rep


def _time_to_psnr_plots(rep: dict, out: Path) -> list[Path]:
    from dipfast.bench import report

    return [
        report.plot_psnr_vs_time(rep, entry, out / f"psnr_vs_time_{report.case_slug(entry['case'])}.png")
        for entry in rep["cases"]
    ]


def _quality(args, cuda: bool, **common) -> dict:
    from dipfast.bench import data
    from dipfast.bench.quality import run_quality

    cases, missing = _cases(args, cuda, list(data.TASKS))
    rep = run_quality(
        cases,
        iters=_auto(args.suite, "iters", args.iters, cuda),
        runs_denoise=args.runs,
        baseline_names=_baselines(args.baselines),
        net=args.net,
        **common,
    )
    rep["settings"]["missing_images"] = missing
    return rep


def _early_stop(args) -> int:
    import dataclasses
    import json

    import torch

    from dipfast import api
    from dipfast.bench import early_stop, report
    from dipfast.early_stop import calibrated

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = api.resolve_device(args.device)
    cuda = dev.type == "cuda"
    tasks = list(early_stop.TASKS) if "all" in args.tasks else list(dict.fromkeys(args.tasks))
    iters = _auto("early-stop", "iters", args.iters, cuda)
    settings = ("method", "window", "patience", "alpha", "threshold", "start", "returns", "tolerance", "noise_gate")
    given = {k: getattr(args, k) for k in settings}
    given = {k: v for k, v in given.items() if v is not None}
    specs = {task: dataclasses.replace(calibrated(early_stop.RESTORE_TASK[task]), **given) for task in tasks}
    for spec in specs.values():
        spec.validate(iters)
    size = _auto("early-stop", "size", args.size, cuda)
    sigma = None if args.sigma is None else args.sigma / 255
    cases = early_stop.load_cases(args.data, tasks, size, args.seed, args.limit, sigma, args.images)
    cache = Path(args.cache) if args.cache else None
    run = {"device": dev, "precision": args.precision, "backend": args.backend, "seed": args.seed}
    records = early_stop.record_cached(cases, iters, cache, progress=not args.quiet, net=args.net, **run)
    rep = early_stop.run_early_stop(cases, iters=iters, specs=specs, records=records, **run)
    if args.cost:
        rep["cost"] = early_stop.criterion_cost(
            args.cost, [specs[t] for t in tasks], device=dev, precision=args.precision, backend=args.backend
        )
    rep = report.finish(rep, dev)
    text = early_stop.markdown(rep)
    paths = list(report.write(rep, out, text).values())
    paths += [
        early_stop.plot(rep, row, out / f"early_stop_{report.case_slug(row['key'])}.png") for row in rep["images"]
    ]
    if args.calibrate:
        found = {}
        for task in tasks:
            members = [c for c in cases if early_stop.task_of(c) == task]
            preset_iterations = rep["tasks"][task]["preset_iterations"]
            found[task] = early_stop.calibrate(members, records, preset_iterations)
        path = out / "calibration.json"
        path.write_text(json.dumps(report._clean(found), indent=1, allow_nan=False) + "\n")
        paths.append(path)
        for task, ranked in found.items():
            print(f"{task}: best {ranked[0]['spec']} -> {ranked[0]['summary']}")
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="python -m dipfast.bench", description=("The dipfast benchmark harness (the same as `dipfast bench`).")
    )
    _add_suites(parser)
    args = parser.parse_args(argv)
    if args.suite is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return run_bench(args)
    except KeyboardInterrupt:
        print("dipfast bench: interrupted", file=sys.stderr)
        return 130
