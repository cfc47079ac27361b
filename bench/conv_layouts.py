"""Each conv of the net, alone, forward + backward, in four layouts: which convs cuDNN runs slowly, and why.

    python bench/conv_layouts.py --device cuda --size 512 --precision bf16 --out DIR     # gpu_quick's convs step

The H200's bf16 step (bench/results/2026-12-04-h200-504226cc86/profile) spent 3.2 ms in convolutions, 1.3 of
them in cuDNN's legacy kernels on four calls, and 1.2 ms more in cuDNN's NCHW <-> NHWC conversions; in
channels_last the same step ran 2.74x slower. Its profile cannot say which conv is which: the CUDA graph
replays kernels with no op around them. Here every distinct conv of the net (its shape as the step runs it:
input channels, output channels, kernel, stride, the padded input's H x W; no input gradient where it reads
the net's input z) runs alone, forward + backward, once per variant:

    nchw          NCHW activations and weights (auto's layout on CUDA since that run)
    nchw-aligned  NCHW, channels zero-padded to the tensor cores' multiple (dipfast.nets.aligned_channels)
    cl            channels_last
    cl-aligned    channels_last and aligned

On CUDA each call is timed with CUDA events around a CUDA graph's replay of it (as the step runs its convs: no
launch gaps), after a cudnn.benchmark warm-up (the step's own algorithm choice), median of --repeats, and the
kernels it launches are listed (one profiled call), so a legacy kernel is named. The totals weight each conv
by its count in the net: the step's conv time in that layout, conversions included, BatchNorm and pads not.
On a CPU the same runs time oneDNN, wall clock (--tiny in gpu_quick: the script's check).

Writes conv_layouts.json and conv_layouts.md in --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dipfast import backends, nets
from dipfast.bench import runs
from dipfast.bench.report import save_and_print
from dipfast.nets.aligned_channels import aligned_conv2d, channel_multiple

VARIANTS = ("nchw", "nchw-aligned", "cl", "cl-aligned")
DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}


def net_convs(net: str, size: int) -> list[dict]:
    """The net's distinct convs as the step runs them (traced on the meta device), with their counts."""
    overrides = runs.net_overrides(net, "denoise")
    spec, depth = overrides["net"], overrides.get("input_depth", 32)
    h, w = nets.working_size(spec, depth, size, size)
    with torch.device("meta"):
        module = nets.build(spec, depth, 3)
    z = torch.empty(1, depth, h, w, device="meta")  # needs no gradient: nor do the convs that read it
    seen: dict[tuple, dict] = {}

    def record(name):
        def hook(conv: nn.Conv2d, args):
            x = args[0]
            key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   *x.shape[-2:], x.requires_grad)  # fmt: skip
            entry = seen.setdefault(key, {"convs": [], "count": 0})
            entry["convs"].append(name)
            entry["count"] += 1

        return hook

    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(record(name))
    module(z)
    rows = []
    for (c_in, c_out, k, stride, padding, h_in, w_in, dgrad), entry in seen.items():
        h_out, w_out = (h_in + 2 * padding - k) // stride + 1, (w_in + 2 * padding - k) // stride + 1
        macs = c_in * c_out * k * k * h_out * w_out
        rows.append({
            "c_in": c_in, "c_out": c_out, "kernel": k, "stride": stride, "padding": padding, "h": h_in, "w": w_in,
            "input_grad": dgrad, "count": entry["count"], "convs": entry["convs"],
            "gflop": 2 * macs * (3 if dgrad else 2) / 1e9,  # forward, weight gradient[, input gradient]
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["gflop"] * r["count"])


def _conv(row: dict, dtype, device) -> nn.Conv2d:
    g = torch.Generator().manual_seed(row["c_in"] * 1000 + row["c_out"])
    conv = nn.Conv2d(row["c_in"], row["c_out"], row["kernel"], row["stride"], row["padding"])
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return conv.to(device=device, dtype=dtype)


def _step(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, multiple: int):
    def run():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        y = aligned_conv2d(conv, x, multiple) if multiple > 1 else conv(x)
        y.backward(grad)

    return run


def time_variant(row: dict, variant: str, precision: str, device: torch.device, repeats: int) -> dict:
    dtype = DTYPES[precision]
    fmt = torch.channels_last if variant.startswith("cl") else torch.contiguous_format
    multiple = channel_multiple(dtype) if variant.endswith("aligned") else 1
    conv = _conv(row, dtype, device).to(memory_format=fmt)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, row["c_in"], row["h"], row["w"], generator=g).to(device, dtype).contiguous(memory_format=fmt)
    x.requires_grad_(row["input_grad"])
    with torch.no_grad():
        y = conv(x)
    grad = torch.randn(y.shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    run = _step(conv, x, grad, multiple)
    with backends.conv_precision(tf32=precision == "tf32", cudnn_benchmark=True):
        result = time_call(run, device, repeats)
    ms = result["ms"]
    return {**result, "tflops": row["gflop"] / ms if ms > 0 else None}


def time_call(run, device: torch.device, repeats: int) -> dict:
    """run's median ms over `repeats` after a warm-up (cudnn.benchmark's search, in the caller's context): a CUDA
    graph's replay between CUDA events on CUDA (eager where it cannot be captured), wall clock on a CPU; and on CUDA
    the kernels one call launches."""
    cuda = device.type == "cuda"
    for _ in range(3):  # cudnn.benchmark's search, then warm
        run()
    timed, timing = (graphed(run), "cuda-graph replay") if cuda else (run, "wall")
    if timed is None:  # not capturable: eager calls, launch gaps included
        timed, timing = run, "eager"
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            timed()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            timed()
            samples.append(1e3 * (time.perf_counter() - t0))
    return {"ms": statistics.median(samples), "timing": timing, "kernels": kernels_of(run) if cuda else []}


def graphed(run):
    """run captured in a CUDA graph, as the step runs its convs (no launch gaps between them); None if it cannot be."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except RuntimeError:
        return None
    return graph.replay


def kernels_of(run) -> list[list]:
    """[name, ms] of the kernels one call launches, longest first (CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type != DeviceType.CPU]
    found = [[e.key[:110], getattr(e, "self_device_time_total", 0.0) / 1e3] for e in events]
    return sorted(found, key=lambda k: -k[1])[:6]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"## Each conv alone: forward + backward, ms ({s['net']} net, {s['size']} px, {s['precision']}, "
             f"{s['device']}: {report['machine']})\n"]  # fmt: skip
    timings = sorted({v["timing"] for r in report["rows"] for v in r["variants"].values()})
    lines.append(f"Timed: {', '.join(timings)}; median of {s['repeats']}.\n")
    head = "| conv (count) | C_in -> C_out, k, stride | input | GFLOP | " + " | ".join(VARIANTS) + " | best |"
    lines += [head, "|" + "---|" * (5 + len(VARIANTS))]
    totals = dict.fromkeys(VARIANTS, 0.0)
    for r in report["rows"]:
        cells = []
        for v in VARIANTS:
            ms = r["variants"][v]["ms"]
            totals[v] += ms * r["count"]
            cells.append(f"{ms:.3f}")
        best = min(VARIANTS, key=lambda v: r["variants"][v]["ms"])
        lines.append(f"| {r['convs'][0]} ({r['count']}) | {r['c_in']} -> {r['c_out']}, {r['kernel']}, {r['stride']} "
                     f"| {r['h']} x {r['w']}{'' if r['input_grad'] else ', no dgrad'} | {r['gflop']:.3g} | "
                     + " | ".join(cells) + f" | {best} |")  # fmt: skip
    sums = " | ".join(f"**{totals[v]:.2f}**" for v in VARIANTS)
    lines.append(f"| **the net's convs, weighted by count** | | | | {sums} | {min(totals, key=totals.get)} |")
    kernels = [(r, v) for r in report["rows"] for v in VARIANTS if r["variants"][v]["kernels"]]
    if kernels:
        lines.append("\n### The kernels of each call (CUDA; the three longest)\n")
        for r, v in kernels:
            names = "; ".join(f"{k} {ms:.3f}" for k, ms in r["variants"][v]["kernels"][:3])
            lines.append(f"- {r['c_in']} -> {r['c_out']} k{r['kernel']} s{r['stride']} {r['h']}px {v}: {names}")
    return "\n".join(lines) + "\n"


def conv_parser(description: str) -> argparse.ArgumentParser:
    """The flags the conv scripts share (this one, step_convs.py, cudnn_fusion.py); each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--net", default="default", help="'default', 'tiny' or a preset's name")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench-out")
    return parser


def cuda_missing(suite: str, device: torch.device) -> bool:
    """Whether --device asks for CUDA on a machine without it (said on stderr, under the suite's name)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{suite}: --device cuda, but CUDA is not available here", file=sys.stderr)
        return True
    return False


def write_report(suite: str, args: argparse.Namespace, device: torch.device, rows: list[dict], markdown) -> None:
    """The suite's report in args.out: <suite>.json (machine, torch, settings, rows) and <suite>.md, printed too."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = {"suite": suite, "machine": machine, "torch": torch.__version__,
              "settings": {**vars(args), "device": str(device)}, "rows": rows}  # fmt: skip
    save_and_print(Path(args.out), suite, report, markdown(report))


def main(argv=None) -> int:
    parser = conv_parser(__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if cuda_missing("conv_layouts", device):
        return 2
    rows = net_convs(args.net, args.size)
    for row in rows:
        row["variants"] = {v: time_variant(row, v, args.precision, device, args.repeats) for v in VARIANTS}
    write_report("conv_layouts", args, device, rows, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
