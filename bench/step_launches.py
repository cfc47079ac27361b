"""What one iteration of the native CUDA step launches: its Triton kernels and the ATen ops that run kernels, counted.

    python bench/step_launches.py --size 512 --precision bf16 [--stop auto] [--method M] [--images N] --out DIR

A step of a few milliseconds is bounded by its launches as much as by its bytes: even replayed as a CUDA graph each
kernel holds the stream a few microseconds, and the H200's native step ran some 900 a 512 px iteration
(bench/results/2026-12-04-h200-222367b4a8/call1/profile: its top 25 kernels alone 560-650). This runs the throughput
input's fit on the CPU with the native step's CUDA block ops (PaddedBlocks, Hopper's tiles, under Triton's
interpreter, nothing run: triton_specializations.native_step_launches) and its CUDA graph's branches (no host
reads: graph_safe_step) inside a dispatch mode, with the fixed count or (--stop auto) denoising's early stopping,
restore()'s default there, for the native backend or one of the harness's variants of it (--method: its CUDA
choices, e.g. native-folded-finalize's finalize in the last program), for one image or N in one step (--images: as
CUDA runs them, vmapped, or one after another under native-per-network), and counts per iteration (the difference of
two runs, so set-up and the first iteration's lazy work cancel out):

- each Triton kernel's launches;
- each ATen op that runs a kernel: views, metadata and profiler marks left out, and the dipfast ops, whose kernels
  are the Triton rows. One op is not always one kernel (cuDNN's convolution and its backward run several, with
  layout conversions; a CPU op may be a no-op on CUDA), so this is a census of the step's structure, not the
  profiler's count: the zero fills, casts and small elementwise ops it lists are the ones to fuse or remove.

Writes step_launches.json and .md in --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_specializations beside this file
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton_specializations import native_step_launches  # noqa: E402  (sets TRITON_INTERPRET before the kernels)

from dipfast import early_stop, fast_step  # noqa: E402
from dipfast.bench import runs  # noqa: E402
from dipfast.bench.report import save_and_print  # noqa: E402

# ops that run no kernel: profiler marks, and views that the dispatcher does not mark as views (_unsafe_view: a
# reshape's result, vmap's after each clone it makes)
UNLAUNCHED = {"_record_function_enter_new", "_record_function_exit", "lift_fresh", "_to_copy_view", "_unsafe_view"}
FILLS = {"zeros", "zeros_like", "zero_", "fill_", "full", "full_like", "new_zeros", "ones", "ones_like"}


class _Ops(TorchDispatchMode):
    """Counts the ATen ops that run a kernel, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not func.is_view and name not in UNLAUNCHED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def graph_safe_step():
    """FastStep with the CUDA graph's branches inside (backtracking and the freeze without host reads), as CUDA runs
    it, where the CPU would take its own (fast_step.FastStep's graph_safe)."""
    init = fast_step.FastStep.__init__

    def graph_safe(self, *args, **kwargs):
        init(self, *args, **{"graph_safe": True, **kwargs})

    fast_step.FastStep.__init__ = graph_safe
    try:
        yield
    finally:
        fast_step.FastStep.__init__ = init


def census_rule(stop: str):
    """The early-stopping rule a census fits with: denoising's (stop='auto', restore()'s default there) with a
    window the census's few iterations fill and a patience they never reach, or None (the fixed count)."""
    if stop == "iterations":
        return None
    return dataclasses.replace(early_stop.calibrated("denoise"), window=1, patience=1000)


# native and the harness's variants of it (runs.FIELD_VARIANTS): the methods a census can count
METHODS = ("native", *(name for name, (backend, _) in runs.FIELD_VARIANTS.items() if backend == "native"))


def _run(size, precision, net, iters, stop, method, images) -> tuple[collections.Counter, collections.Counter]:
    triton = collections.Counter()
    with runs.method_context(method), graph_safe_step(), _Ops() as mode:
        native_step_launches(size, precision, net, iters, lambda jit, args, kwargs: triton.update([jit.fn.__name__]),
                             early_stop=census_rule(stop), images=images)  # fmt: skip
    return triton, mode.ops


def count(
    size: int, precision: str, net: str = "default", stop: str = "iterations", method: str = "native", images: int = 1
) -> dict:
    """{"triton": {kernel: launches}, "aten": {op: calls}} per iteration, most first, and their totals."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}")
    setting = (size, precision, net)
    _run(*setting, 1, stop, method, images)  # lazy work of a first call anywhere in the process (caches, imports)
    counted = [_run(*setting, iters, stop, method, images) for iters in (2, 4)]
    per_iteration = {}
    for k, kind in enumerate(("triton", "aten")):
        short, long = counted[0][k], counted[1][k]
        counts = {name: (long[name] - short[name]) / 2 for name in long | short}
        per_iteration[kind] = dict(sorted(((n, c) for n, c in counts.items() if c), key=lambda nc: (-nc[1], nc[0])))
    return {
        **per_iteration,
        "triton_launches": sum(per_iteration["triton"].values()),
        "aten_ops": sum(per_iteration["aten"].values()),
        "fills": sum(c for n, c in per_iteration["aten"].items() if n in FILLS),
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    rows = lambda counts: "".join(f"| {name} | {c:g} |\n" for name, c in counts.items())  # noqa: E731
    return (
        f"## One iteration of the native CUDA step: launches ({s['net']} net, {s['size']} px, {s['precision']}, "
        f"stop={s.get('stop', 'iterations')}, {s.get('method', 'native')}, {s.get('images', 1)} image(s), "
        f"PaddedBlocks)\n\n{report['triton_launches']:g} Triton launches and "
        f"{report['aten_ops']:g} ATen ops that run kernels ({report['fills']:g} of them fills) per iteration; an ATen "
        "op may run more than one kernel (cuDNN's conv and its backward) or none on CUDA.\n\n"
        "| Triton kernel | launches |\n|---|---|\n"
        + rows(report["triton"])
        + "\n| ATen op | calls |\n|---|---|\n"
        + rows(report["aten"])
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--net", default="default", help="'default', 'tiny' or a preset's name")
    parser.add_argument(
        "--stop",
        choices=early_stop.STOPS,
        default="iterations",
        help="'auto': with denoising's early stopping (restore()'s default there), its window 1",
    )
    parser.add_argument("--method", choices=METHODS, default="native", help="native or a harness variant of it")
    parser.add_argument("--images", type=int, default=1, help="images fitted in one step (vmapped as on CUDA)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1; got {args.images}")
    settings = {"size": args.size, "precision": args.precision, "net": args.net, "stop": args.stop,
                "method": args.method, "images": args.images}  # fmt: skip
    report = {"settings": settings, **count(args.size, args.precision, args.net, args.stop, args.method, args.images)}
    save_and_print(args.out, "step_launches", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
