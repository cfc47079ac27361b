"""Recorded autotune of the fused conv blocks' GEMM tiles on a GPU; writes kernels/tuned_tiles.json.

    python3 bench/ops/tune_conv_bn_lrelu.py [--size 512] [--levels 0 1] [--precisions bf16 fp32]
        [--families conv dgrad wgrad] [--record bench/results/<run>/tune.jsonl] [--table kernels/tuned_tiles.json]

For each of the default net's fused blocks at --size (net_shapes: every level's skip, down, conv, merge and 1x1
convs), each kernel family (conv: the forward GEMM; dgrad: the input gradient; wgrad: the weight gradient) and
precision, every candidate config (candidates()) runs the op with that family forced to it (configs.forced_tiles) and
the others at their table configs. A candidate whose result (y for conv, dx for dgrad, dW for wgrad) differs from
the table config's by more than AGREE[precision] of its max is rejected untimed; the rest are timed with
triton.testing.do_bench on the op's launch (the forward op for conv, the backward op for dgrad and wgrad, so a
family's time includes the launches it shares with the others, the same for every candidate). The fastest becomes
the table's entry for (GPU name, op, family, shape, precision) when it beats the table config by MIN_GAIN; else the
key keeps the default (no entry). Every timing goes to --record (one JSON line per candidate), and the table is
merged into --table: entries of other GPUs, shapes and families are kept. It refuses to run without CUDA; its logic
(candidates, choose, merge_table, tune_one with any timer) is tested on the CPU in
tests/parity/test_tune_conv_bn_lrelu.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dipfast.kernels import configs

conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.conv_bn_lrelu")
concat_bn_conv_bn_lrelu_module = importlib.import_module("dipfast.kernels.concat_bn_conv_bn_lrelu")

SMEM_BYTES = 227 * 1024  # an H100 / H200 block's shared memory
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}
# a candidate's result against the table config's, relative to the max: the same sums in another order, so a few
# roundings in each precision (fp32: 2^-24 per add over K <= 1188 products; TF32 and bf16 round their operands and
# bf16 stores its result); a wrong config is off by O(1)
AGREE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 3e-2}
MIN_GAIN = 0.03  # a tuned entry must be at least this much faster than the default, or the default stays


def candidates(family: str, precision: str) -> list[configs.GemmTiles]:
    """The configs tried for a family in a precision: Inductor's conv template configs and a few smaller ones
    (notes/kernels.md, section 1.1), the table's default first (wgrad's with FILL_SMS splits), those over shared
    memory left out; wgrad with split_k 1, 2, 4 and 8 too."""
    block_k = (32, 64) if precision == "bf16" else (16, 32)
    shapes = [(128, 128), (64, 128), (128, 64), (64, 64), (256, 64), (64, 256), (32, 64)]
    found = [configs.HOPPER[family, precision]]
    for (m, n), k, stages in ((mn, k, s) for mn in shapes for k in block_k for s in (2, 3, 4)):
        warps = 8 if m * n >= 128 * 128 else 4
        for split in (1, 2, 4, 8) if family == "wgrad" else (1,):
            config = configs.GemmTiles(m, n, k, stages, warps, split_k=split)
            smem = DTYPE_BYTES[precision] * (m * k + n * k) * stages
            if smem <= SMEM_BYTES and config not in found:
                found.append(config)
    return found


@dataclass(frozen=True)
class Block:
    """One fused block of the net: its op ('conv_bn_lrelu' or 'concat_bn_conv_bn_lrelu') and dimensions."""

    name: str
    op: str
    n: int
    c_in: int  # conv_bn_lrelu: input channels; merge: the deeper source's (the skip's are c_skip)
    h: int
    c_out: int
    k: int
    stride: int = 1
    c_skip: int = 0

    def inputs(self, precision: str, device: torch.device) -> tuple[list[torch.Tensor], dict]:
        """The block's operands in the layout the triton backend runs `precision` in on CUDA: channels_last for bf16
        (Backend.channels_last_bf16), NCHW otherwise; so a tuned entry is for that layout (TileKey has none)."""
        gen = torch.Generator(device).manual_seed(0)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        layout = torch.channels_last if precision == "bf16" else torch.contiguous_format

        def rand(*shape, scale=1.0, shift=0.0):
            t = torch.rand(*shape, generator=gen, device=device) * scale + shift
            return t.contiguous(memory_format=layout) if t.dim() == 4 else t

        c_in = self.c_in + self.c_skip
        weight = rand(self.c_out, c_in, self.k, self.k, scale=2, shift=-1) * (c_in * self.k**2) ** -0.5
        tail = [rand(self.c_out, scale=0.2, shift=-0.1), rand(self.c_out, shift=0.5), rand(self.c_out, shift=-0.5)]
        if self.op == conv_bn_lrelu_module.OP:
            x = rand(self.n, self.c_in, self.h, self.h)
            return [x.to(dtype), weight.to(dtype), *tail], dict(stride=self.stride, groups=1)
        skip, deeper = rand(self.n, self.c_skip, self.h, self.h), rand(self.n, self.c_in, self.h, self.h)
        merge = [rand(c_in, shift=0.5), rand(c_in, shift=-0.5)]
        return [skip.to(dtype), deeper.to(dtype), *merge, weight.to(dtype), *tail], dict(groups=1)

    def shape(self, tensors: list[torch.Tensor]) -> str:
        if self.op == conv_bn_lrelu_module.OP:
            return conv_bn_lrelu_module.conv_shape(tensors[0], tensors[1], self.stride, 1)
        return concat_bn_conv_bn_lrelu_module.merge_shape(tensors[0], tensors[1], tensors[4], 1)


def net_shapes(size: int, levels, input_depth: int = 32, width: int = 128, skip: int = 4) -> list[Block]:
    """The default net's fused blocks (dipfast.nets.skip.SkipSpec's defaults) at a size x size input, per level."""
    blocks = []
    for level in levels:
        h, c_in = size >> level, input_depth if level == 0 else width
        blocks += [
            Block(f"L{level}-skip", conv_bn_lrelu_module.OP, 1, c_in, h, skip, 1),
            Block(f"L{level}-down", conv_bn_lrelu_module.OP, 1, c_in, h, width, 3, stride=2),
            Block(f"L{level}-conv", conv_bn_lrelu_module.OP, 1, width, h // 2, width, 3),
            Block(f"L{level}-merge", concat_bn_conv_bn_lrelu_module.OP, 1, width, h, width, 3, c_skip=skip),
            Block(f"L{level}-1x1", conv_bn_lrelu_module.OP, 1, width, h, width, 1),
        ]
    return blocks


def _launcher(block: Block, family: str, precision: str, tensors, kw):
    """A no-argument function running the op's launch that holds the family's kernel: the forward op for conv, the
    backward op (on the forward's saved tensors) for dgrad and wgrad."""
    tf32 = precision == "tf32"
    if block.op == conv_bn_lrelu_module.OP:
        x, weight, bias, gamma, beta = tensors
        args = (x, weight, bias, gamma, beta, kw["stride"], 1, 1e-5, 0.2, tf32)
        fwd, bwd = conv_bn_lrelu_module._conv_bn_lrelu_fwd, conv_bn_lrelu_module._conv_bn_lrelu_bwd
        out, *saved = fwd(*args)  # y, mean, rstd
        bwd_args = (x, weight, *saved, gamma, beta, kw["stride"], 1, 0.2, tf32, True)
    else:
        skip, deeper, mg, mb, weight, bias, gamma, beta = tensors
        args = (skip, deeper, mg, mb, weight, bias, gamma, beta, 1, 1e-5, 0.2, tf32)
        fwd, bwd = (
            concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_fwd,
            concat_bn_conv_bn_lrelu_module._concat_bn_conv_bn_lrelu_bwd,
        )
        out, y, mean, rstd, mmean, mrstd = fwd(*args)
        bwd_args = (skip, deeper, mg, mb, weight, y, mean, rstd, gamma, beta, mmean, mrstd, 1, 0.2, tf32, True)
    if family == "conv":
        return lambda: fwd(*args)
    grad = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device)
    grad = grad.to(out.dtype).contiguous(memory_format=conv_bn_lrelu_module.memory_format(out))
    return lambda: bwd(grad, *bwd_args)


# the family's result in its launch's output: y of the forward op; dx (dskip for the merge) and dW of the backward
RESULT_INDEX = {
    ("conv_bn_lrelu", "conv"): 1, ("conv_bn_lrelu", "dgrad"): 0, ("conv_bn_lrelu", "wgrad"): 1,
    ("concat_bn_conv_bn_lrelu", "conv"): 1, ("concat_bn_conv_bn_lrelu", "dgrad"): 0,
    ("concat_bn_conv_bn_lrelu", "wgrad"): 4,
}  # fmt: skip


def choose(default: configs.GemmTiles, timings: dict, min_gain: float = MIN_GAIN) -> configs.GemmTiles | None:
    """The entry for a key from {config: ms or None (rejected)}: the fastest config if it beats default's time by
    min_gain, else None (the default stays). The default must have been timed."""
    timed = {c: ms for c, ms in timings.items() if ms is not None}
    best = min(timed, key=timed.get)
    return best if best != default and timed[best] <= (1 - min_gain) * timed[default] else None


def tune_one(block: Block, family: str, precision: str, device: torch.device, timer, configs_to_try=None) -> dict:
    """Time every candidate for one (block, family, precision): {'key', 'default', 'timings', 'chosen'}.

    timer(fn) -> ms runs fn (triton.testing.do_bench on a GPU). The default is run first; a candidate whose result
    is off by more than AGREE[precision] of the default's max is recorded as rejected (None)."""
    tensors, kw = block.inputs(precision, device)
    shape = block.shape(tensors)
    default = configs.gemm_tiles(block.op, family, precision, shape, device)
    timings, errors = {}, {}
    reference_result = None
    for config in [default, *(c for c in (configs_to_try or candidates(family, precision)) if c != default)]:
        with configs.forced_tiles({(family, precision): config}):
            run = _launcher(block, family, precision, tensors, kw)
            result = run()[RESULT_INDEX[block.op, family]].float()
            if reference_result is None:
                reference_result = result
            errors[config] = ((result - reference_result).abs().max() / reference_result.abs().max()).item()
            timings[config] = timer(run) if errors[config] <= AGREE[precision] else None
    gpu = configs.gpu_name(device.index or 0) if device.type == "cuda" else device.type
    key = configs.TileKey(gpu, block.op, family, shape, precision)
    return dict(key=key, block=block.name, default=default, timings=timings, errors=errors,
                chosen=choose(default, timings))  # fmt: skip


def records(result: dict) -> list[dict]:
    """The JSON lines of one tune_one result: one per candidate."""
    return [
        {**asdict(result["key"]), "block": result["block"], "tiles": asdict(config), "ms": ms,
         "error_vs_default": result["errors"][config], "default": config == result["default"],
         "chosen": config == result["chosen"]}
        for config, ms in result["timings"].items()
    ]  # fmt: skip


def merge_table(existing: dict[configs.TileKey, dict], results: list[dict]) -> list[dict]:
    """The table's new entries: existing ({key: entry}) with each result's key replaced by its choice, or removed
    where the default won."""
    table = dict(existing)
    for r in results:
        table.pop(r["key"], None)
        if r["chosen"] is not None:
            ms = r["timings"]
            table[r["key"]] = {
                "key": r["key"],
                "tiles": r["chosen"],
                "ms": ms[r["chosen"]],
                "default_ms": ms[r["default"]],
            }
    return list(table.values())


def _read_table(path: Path) -> dict[configs.TileKey, dict]:
    if not path.exists():
        return {}
    table = {}
    for e in json.loads(path.read_text())["entries"]:
        key = configs.TileKey(**e["key"])
        table[key] = {**e, "key": key, "tiles": configs.GemmTiles(**e["tiles"])}
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--levels", type=int, nargs="+", default=[0])
    parser.add_argument("--precisions", nargs="+", default=list(configs.PRECISIONS), choices=configs.PRECISIONS)
    parser.add_argument("--families", nargs="+", default=list(configs.FAMILIES), choices=configs.FAMILIES)
    parser.add_argument("--blocks", nargs="*", help="only these blocks of net_shapes (e.g. L0-merge)")
    parser.add_argument("--record", type=Path, required=True, help="JSON lines of every timing (bench/results/...)")
    parser.add_argument("--table", type=Path, default=configs.TUNED_PATH)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_conv_bn_lrelu: needs a CUDA GPU (the timings are the GPU's); nothing written", file=sys.stderr)
        return 2
    import triton.testing

    device = torch.device("cuda", torch.cuda.current_device())

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=5, rep=20)

    blocks = [b for b in net_shapes(args.size, args.levels) if not args.blocks or b.name in args.blocks]
    results = []
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with args.record.open("a") as record:
        for block in blocks:
            for precision in args.precisions:
                for family in args.families:
                    result = tune_one(block, family, precision, device, timer)
                    for line in records(result):
                        record.write(json.dumps(line) + "\n")
                    record.flush()
                    results.append(result)
                    chosen = result["chosen"]
                    print(f"{block.name} {family} {precision}: {chosen or 'default'} "
                          f"({result['timings'][chosen or result['default']]:.3f} ms)", flush=True)  # fmt: skip
    args.table.write_text(configs.tuned_table_to_json(merge_table(_read_table(args.table), results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
