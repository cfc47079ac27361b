"""The step's own conv calls, recorded in one eager step and replayed alone: which of them runs cuDNN's legacy kernels.

    python bench/step_convs.py --device cuda --size 512 --precision bf16 --out DIR     # gpu_quick's step-convs step

On the H200 the native bf16 step (bench/results/2026-12-04-h200-222367b4a8/call1/profile) spent about 1.4 ms of
its 9.0 in cuDNN's legacy kernels (dgrad_engine, precomputed_convolve_sgemm) on one conv per level, yet each of
the net's convs alone, with the net's shapes, dtype and layout (bench/conv_layouts.py), ran cuDNN's sm90 kernels.
So what differs is how the step calls a conv: the vectorised step's vmap turns each conv into another call
(grouped over the networks, its bias added apart), its weights are views of one flat bf16 buffer (18 of 26
started 8 bytes off a 16-byte boundary until dipfast.flat_parameters.SLOT_ALIGN_BYTES), and the padded BatchNorm
kernels and the concat hand it operands whose strides, storage offsets and alignment are their own.

This runs restore() for a few iterations with the step eager (no CUDA graph: the graph replays kernels with no
op around them) under a TorchDispatchMode that records every aten.convolution and aten.convolution_backward
call as the dispatcher sees it (below vmap and autocast): each tensor operand's shape, strides, storage offset,
dtype and the alignment of its data pointer, and the other arguments. Each distinct call is then replayed alone
with operands of exactly that description (as_strided into a fresh buffer at the same alignment), under the
step's conv precision with cudnn.benchmark on (as the step's capture runs), timed as a CUDA graph replay, and
its kernels listed, a legacy kernel flagged. A call whose replay runs no legacy kernel while the profile shows
them points at what a replay does not copy (the values, the benchmark cache's state).

On a CPU the same runs record and replay through oneDNN, wall clock (gpu_quick --tiny: the script's check).
Writes step_convs.json and step_convs.md in --out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conv_layouts beside this file

from conv_layouts import conv_parser, cuda_missing, time_call, write_report  # noqa: E402

from dipfast import backends  # noqa: E402
from dipfast.bench.data import throughput_case  # noqa: E402
from dipfast.bench.throughput import restore_in_blocks  # noqa: E402

aten = torch.ops.aten
CONV_OPS = {aten.convolution.default: "forward", aten.convolution_backward.default: "backward"}
# cuDNN's pre-Hopper implicit-GEMM and FFT/Winograd engines: what the sm90 step should not be running
LEGACY = re.compile(r"dgrad_engine|wgrad_alg|precomputed_convolve_sgemm|implicit_convolve_sgemm|fft|winograd", re.I)
_MAX_ALIGN = 256  # bytes: past this no kernel cares


def alignment(pointer: int) -> int:
    """The largest power of two (bytes, at most 256) that divides a data pointer."""
    return min(pointer & -pointer, _MAX_ALIGN) if pointer else _MAX_ALIGN


def describe_tensor(t: torch.Tensor) -> dict:
    return {
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "offset": t.storage_offset(),
        "dtype": str(t.dtype).removeprefix("torch."),
        "align": alignment(t.data_ptr()),
        "requires_grad": t.requires_grad,
    }


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": describe_tensor(value)}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return value


class ConvRecorder(TorchDispatchMode):
    """Records each conv call that reaches the dispatcher (after vmap's batching rules and autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []
        self.recording = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.recording and func in CONV_OPS:
            self.calls.append({"op": CONV_OPS[func], "args": _describe(list(args)),
                               "tf32": torch.backends.cudnn.allow_tf32})  # fmt: skip
        return func(*args, **kwargs)


@contextlib.contextmanager
def eager_step():
    """restore()'s plans with the CUDA graph off, inside: the recorder sees the step's ops as they run."""
    resolve = backends.resolve
    backends.resolve = lambda *args: dataclasses.replace(resolve(*args), cuda_graph=False)
    try:
        yield
    finally:
        backends.resolve = resolve


def record_step(method: str, precision: str, *, size: int, net: str, iters: int, device: torch.device) -> list[dict]:
    """The distinct conv calls of `iters` iterations of the throughput input's fit (a block after a warm-up block,
    as the profile takes it: no set-up or final output), with how often each came per iteration."""
    recorder = ConvRecorder()

    def on_block() -> None:  # the read-backs: the second block is recorded
        recorder.recording = not recorder.recording

    with eager_step(), recorder:
        restore_in_blocks(throughput_case(size), method, precision, blocks=2, iters=iters, net=net, device=device,
                          seed=0, on_block=on_block)  # fmt: skip
    distinct: dict[str, dict] = {}
    for call in recorder.calls:
        key = json.dumps(call, sort_keys=True)
        distinct.setdefault(key, {**call, "count": 0})["count"] += 1
    rows = list(distinct.values())
    for row in rows:
        row["per_iteration"] = row.pop("count") / iters
    return rows


def materialize(desc: dict, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A tensor of exactly desc's shape, strides and pointer alignment (as_strided into a fresh buffer), random."""
    dtype = getattr(torch, desc["dtype"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(desc["shape"], desc["stride"])) if all(desc["shape"]) else 0
    room = 2 * _MAX_ALIGN // itemsize
    base = torch.randn(room + extent, generator=generator).to(device, dtype)
    # a 256-byte boundary, then the recorded alignment past it: a pointer aligned to exactly that
    lead = (-base.data_ptr() % _MAX_ALIGN + desc["align"]) // itemsize
    return base.as_strided(desc["shape"], desc["stride"], lead)


def _arguments(value, device, generator):
    if isinstance(value, dict) and "tensor" in value:
        return materialize(value["tensor"], device, generator)
    if isinstance(value, list):
        return [_arguments(v, device, generator) for v in value]
    return value


def replay(row: dict, device: torch.device, repeats: int) -> dict:
    """One recorded call alone with operands of its description: ms (median), timing kind, kernels, legacy ones."""
    generator = torch.Generator().manual_seed(11)
    args = _arguments(row["args"], device, generator)
    op = aten.convolution.default if row["op"] == "forward" else aten.convolution_backward.default

    def run():
        op(*args)

    with torch.no_grad(), backends.conv_precision(tf32=row["tf32"], cudnn_benchmark=True):
        result = time_call(run, device, repeats)
    return {**result, "legacy": [name for name, _ in result["kernels"] if LEGACY.search(name)]}


def _operand(desc: dict) -> str:
    t = desc["tensor"]
    layout = "x".join(map(str, t["shape"]))
    return f"{layout} {t['dtype']} stride {tuple(t['stride'])} +{t['offset']} @{t['align']}B"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"## The step's conv calls, each replayed alone ({s['method']} {s['precision']}, {s['net']} net, "
             f"{s['size']} px, {report['machine']})\n",
             "Operands: shape, dtype, strides, storage offset, pointer alignment. Legacy: cuDNN's pre-sm90 "
             "kernels among those the call launched.\n",
             "| op | per it | operands (forward: input, weight, bias; backward: grad_output, input, weight) | groups "
             "| ms | legacy kernels | longest kernel |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(report["rows"], key=lambda r: -r["replay"]["ms"] * r["per_iteration"]):
        args = r["args"]
        tensors = [a for a in args[:3] if isinstance(a, dict) and "tensor" in a]
        groups = args[8] if r["op"] == "forward" else args[9]
        op = r["op"] if r["op"] == "forward" else "backward " + "".join("dwb"[i] for i, on in enumerate(args[10]) if on)
        longest = r["replay"]["kernels"][0][0][:60] if r["replay"]["kernels"] else "-"
        lines.append(f"| {op} | {r['per_iteration']:g} | {'; '.join(_operand(t) for t in tensors)} | {groups} | "
                     f"{r['replay']['ms']:.3f} | {', '.join(k[:40] for k in r['replay']['legacy']) or '-'} | "
                     f"{longest} |")  # fmt: skip
    legacy = [r for r in report["rows"] if r["replay"]["legacy"]]
    total = sum(r["replay"]["ms"] * r["per_iteration"] for r in legacy)
    lines.append(f"\n{len(legacy)} of {len(report['rows'])} distinct calls ran legacy kernels alone "
                 f"({total:.3f} ms per iteration).")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = conv_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", default="native", help="a restore() backend or a harness variant")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--iters", type=int, default=2, help="recorded iterations")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if cuda_missing("step_convs", device):
        return 2
    rows = record_step(args.method, args.precision, size=args.size, net=args.net, iters=args.iters, device=device)
    for row in rows:
        row["replay"] = replay(row, device, args.repeats)
    write_report("step_convs", args, device, rows, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
