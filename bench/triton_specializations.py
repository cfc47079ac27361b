"""How many Triton compilations one step of a fit launches: the cold-cache part of its start-up.

    TRITON_INTERPRET=1 python bench/triton_specializations.py --size 512 --precision bf16 --out DIR

Triton compiles a @triton.jit kernel once per specialization: its constexpr values, its launch options and, for each
int argument not in do_not_specialize, whether it is 1 or divisible by 16 (each pointer: whether it is 16-byte
aligned). A cold cache (a fresh machine or container, a new Triton) pays each compilation on the first step: 0.06 to
0.2 s per kernel for sm_90 on a Xeon core (tests/parity/test_hopper_compile.py's compile, timed). On the H200 the
native run's first read-back came 9.97 s after the call (bench/results/2026-12-04-h200-222367b4a8/call2/time-to-psnr).

This runs a few iterations of the throughput input's fit on the CPU, with the native step's CUDA block ops
(PaddedBlocks) under Triton's interpreter and the Hopper tile table, and records each kernel launch's specialization
key instead of running it (the kernels' outputs are left unwritten: the step's control flow does not read them, up
to the read-back after the recorded iterations, which may find the loss NaN). Writes
triton_specializations.json and .md in --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are built

import torch  # noqa: E402

import dipfast.kernels  # noqa: E402, F401  (built for the interpreter)
from dipfast import backends  # noqa: E402
from dipfast.bench.data import throughput_case  # noqa: E402
from dipfast.bench.report import save_and_print  # noqa: E402
from dipfast.bench.throughput import restore_in_blocks  # noqa: E402
from dipfast.errors import NumericalError  # noqa: E402
from dipfast.kernels import configs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_convs beside this file
from step_convs import eager_step  # noqa: E402


def argument_key(v):
    """What Triton's specialization sees of one non-constexpr argument."""
    if isinstance(v, torch.Tensor):
        return f"*{str(v.dtype).removeprefix('torch.')}" + ("/16" if v.data_ptr() % 16 == 0 else "")
    if isinstance(v, bool):
        return f"bool:{v}"
    if isinstance(v, int):
        return "1" if v == 1 else "16k" if v % 16 == 0 else "int"
    return type(v).__name__  # floats and None: one type each


def launch_key(fn, args, kwargs, do_not_specialize) -> tuple:
    """The specialization key of fn[grid](*args, **kwargs)."""
    params = list(inspect.signature(fn).parameters.values())
    bound = {**dict(zip([p.name for p in params], args, strict=False)), **kwargs}
    key = []
    for p in params:
        if p.name not in bound:
            continue
        value = bound[p.name]
        if "constexpr" in str(p.annotation):
            key.append((p.name, repr(value)))
        elif p.name in do_not_specialize:
            key.append((p.name, type(value).__name__))
        else:
            key.append((p.name, argument_key(value)))
    key += [(k, repr(v)) for k, v in kwargs.items() if k in ("num_warps", "num_stages")]
    return tuple(key)


def not_specialized(jit) -> set[str]:
    """The argument names a @triton.jit kernel leaves unspecialised (its do_not_specialize, by name or index)."""
    params = list(inspect.signature(jit.fn).parameters)
    return {params[n] if isinstance(n, int) else n for n in jit.kwargs.get("do_not_specialize") or ()}


@contextlib.contextmanager
def intercepted(launch):
    """Every interpreted kernel launch calls launch(jit, args, kwargs) instead of running."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launch(self, args, kwargs)

    InterpretedFunction.run = record
    try:
        yield
    finally:
        InterpretedFunction.run = run


def padded_blocks_on_cpu(channels_last: bool = False):
    """The native backend as it stands (a harness variant's, inside runs.method_context) with every CUDA choice on the
    CPU too: its CUDA block ops (PaddedBlocks), NCHW (channels_last: NHWC under bf16, the harness's native-cl), its
    rules after the backward (fused or not), a batch vmapped or not, and the rest: the step CUDA runs."""
    layout = frozenset({"cpu"}) if channels_last else frozenset()
    return backends.variant("native", **{**backends.cuda_choices_on_cpu("native"), "channels_last_bf16": layout})


def native_step_launches(
    size: int, precision: str, net: str, iters: int, launch, on_block=lambda: None, early_stop=None,
    channels_last: bool = False, images: int = 1,
) -> None:  # fmt: skip
    """`iters` iterations of the throughput input's fit with the native step's CUDA block ops (PaddedBlocks, NCHW;
    channels_last: NHWC under bf16) on the CPU and the GPU's tiles (BLOCK_W, BLOCK_C), not the interpreter's: every
    Triton launch calls launch(jit, args, kwargs) instead of running; on_block at the read-back after them.
    early_stop: an EarlyStopSpec to fit with (stop='auto') instead of the fixed count. images: that many copies of the
    input fitted in one step."""
    hopper = configs.forced_tiles(configs.HOPPER)
    blocks = padded_blocks_on_cpu(channels_last)
    with blocks, eager_step(), hopper, intercepted(launch), contextlib.suppress(NumericalError):
        # unwritten outputs can make the loss NaN, which the read-back after the recorded iterations refuses
        restore_in_blocks(throughput_case(size), "native", precision, blocks=1, iters=iters, net=net,
                          device=torch.device("cpu"), seed=0, on_block=on_block, early_stop=early_stop,
                          images=images)  # fmt: skip


def count(size: int, precision: str, net: str = "default", iters: int = 2) -> dict[str, dict]:
    """{kernel: {"specializations": k, "launches": n, "varying": {argument: [keys]}}} for `iters` iterations."""
    keys: dict[str, collections.Counter] = {}

    def record(jit, args, kwargs) -> None:
        key = launch_key(jit.fn, args, kwargs, not_specialized(jit))
        keys.setdefault(jit.fn.__name__, collections.Counter())[key] += 1

    native_step_launches(size, precision, net, iters, record)
    out = {}
    for name, launches in sorted(keys.items()):
        distinct = list(launches)
        varying = {
            arg: sorted({k[i][1] for k in distinct})
            for i, (arg, _) in enumerate(distinct[0])
            if len({k[i][1] for k in distinct}) > 1
        }
        out[name] = {"specializations": len(distinct), "launches": sum(launches.values()), "varying": varying}
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    rows = "".join(
        f"| {name} | {k['specializations']} | {k['launches']} | "
        f"{'; '.join(f'{a}: {v}' for a, v in k['varying'].items()) or '-'} |\n"
        for name, k in report["kernels"].items()
    )
    return (
        f"## Triton specializations of one step ({s['net']} net, {s['size']} px, {s['precision']}, PaddedBlocks)\n\n"
        f"{report['total']} compilations on a cold cache, {s['iters']} iterations recorded.\n\n"
        "| kernel | specializations | launches | what differs between them |\n|---|---|---|---|\n" + rows
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--net", default="default", help="'default', 'tiny' or a preset's name")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    kernels = count(args.size, args.precision, args.net, args.iters)
    settings = {"size": args.size, "precision": args.precision, "net": args.net, "iters": args.iters}
    report = {"settings": settings, "total": sum(k["specializations"] for k in kernels.values()), "kernels": kernels}
    save_and_print(args.out, "triton_specializations", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
