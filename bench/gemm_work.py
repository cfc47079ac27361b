"""Tensor-core work the triton backend's GEMM kernels execute, against the work their convolutions need.

    python bench/gemm_work.py --size 64 --out DIR

Runs one forward + backward of each of the level ops of DIP's default net under Triton's interpreter with the
Hopper tile table, bf16 in channels_last: conv_bn_lrelu 128 -> 128 3x3 at stride 1 and at stride 2 (a level's
downsampling conv) and the skip level's merge (concat_bn_conv_bn_lrelu, 4 + 128 -> 128, 3x3). Every tl.dot the
kernels execute adds its tile's 2 M N K FLOPs to its kernel; the needed FLOPs are the convolution's, 2 x (output
pixels) x C_out x C_in x k^2 per direction (the dgrad's over its input pixels: the same count). The ratio is
the masked and padded work a GPU would do too: tiles past an edge, chunks of a few channels, taps a stride skips.
Writes gemm_work.json and gemm_work.md in --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are built

import torch  # noqa: E402

import dipfast.kernels  # noqa: E402  (built for the interpreter)
from dipfast.bench.report import save_and_print  # noqa: E402
from dipfast.kernels import configs  # noqa: E402

KERNELS = ("_conv_bn_lrelu_fwd_kernel", "_conv_wgrad_kernel", "_conv_dgrad_kernel", "_merge_conv_fwd_kernel",
           "_merge_wgrad_kernel")  # fmt: skip
DIRECTION = {"_conv_bn_lrelu_fwd_kernel": "forward", "_merge_conv_fwd_kernel": "forward",
             "_conv_wgrad_kernel": "weight gradient", "_merge_wgrad_kernel": "weight gradient",
             "_conv_dgrad_kernel": "input gradient"}  # fmt: skip


@contextlib.contextmanager
def counting_dots(flops: collections.Counter):
    """Each interpreted tl.dot adds 2 M N K to flops[the launching kernel's name]."""
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

    run, dot = InterpretedFunction.run, InterpreterBuilder.create_dot
    current = []

    def launch(self, *args, **kwargs):
        current.append(self.fn.__name__)
        try:
            return run(self, *args, **kwargs)
        finally:
            current.pop()

    def counted(self, a, b, d, *args):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        flops[current[-1]] += 2 * m * n * k
        return dot(self, a, b, d, *args)

    InterpretedFunction.run, InterpreterBuilder.create_dot = launch, counted
    try:
        yield flops
    finally:
        InterpretedFunction.run, InterpreterBuilder.create_dot = run, dot


def measure(size: int) -> list[dict]:
    cl, bf16 = torch.channels_last, dict(dtype=torch.bfloat16)
    torch.manual_seed(0)

    def act(c, h):
        return torch.randn(1, c, h, h, **bf16).contiguous(memory_format=cl).requires_grad_(True)

    def param(*shape):
        return (torch.randn(*shape, **bf16) * 0.05).contiguous(memory_format=cl).requires_grad_(True)

    ones = torch.ones(128, requires_grad=True)

    def merge():
        merge_bn = torch.ones(132), torch.zeros(132)
        weight = param(128, 132, 3, 3)
        return dipfast.kernels.concat_bn_conv_bn_lrelu(
            act(4, size), act(128, size), *merge_bn, weight, None, ones, ones
        )

    ops = {
        "conv 128 -> 128, stride 1": (
            lambda: dipfast.kernels.conv_bn_lrelu(act(128, size), param(128, 128, 3, 3), None, ones, ones),
            2 * size * size * 128 * 128 * 9,
        ),
        "conv 128 -> 128, stride 2": (
            lambda: dipfast.kernels.conv_bn_lrelu(act(128, size), param(128, 128, 3, 3), None, ones, ones, stride=2),
            2 * ((size - 1) // 2 + 1) ** 2 * 128 * 128 * 9,  # P = Q = (H - 1) // 2 + 1
        ),
        "merge 4 + 128 -> 128": (merge, 2 * size * size * 128 * 132 * 9),
    }
    rows = []
    for op, (run, needed) in ops.items():
        flops: collections.Counter = collections.Counter()
        with configs.forced_tiles(configs.HOPPER), counting_dots(flops):
            out = run()
            out.backward(torch.randn_like(out))
        for kernel, executed in sorted(flops.items()):
            rows.append({"op": op, "kernel": kernel, "direction": DIRECTION[kernel], "executed_flops": executed,
                         "needed_flops": needed, "ratio": executed / needed})  # fmt: skip
    return rows


def markdown(rows: list[dict], size: int) -> str:
    lines = [
        f"## Tensor-core work executed / needed (bf16, channels_last, Hopper tiles, {size} px)",
        "",
        "| op | kernel | direction | executed GFLOP | needed GFLOP | executed / needed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['kernel']} | {r['direction']} | {r['executed_flops'] / 1e9:.3g} | "
                     f"{r['needed_flops'] / 1e9:.3g} | {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = measure(args.size)
    save_and_print(args.out, "gemm_work", {"size": args.size, "rows": rows}, markdown(rows, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
