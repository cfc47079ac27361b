"""What Hopper's compiler makes of dipfast's Triton kernels, on a machine with no GPU.

    python bench/sm90_codegen.py --size 512 --out DIR          the triton backend's GEMM kernels
    python bench/sm90_codegen.py --step --size 512 --out DIR   every Triton kernel of the native CUDA step
    python bench/sm90_codegen.py --step --channels-last ...     the same step with NHWC activations (native-cl)

The triton backend ran 0.38x compile's speed on an H100 (bench/results/2026-11-26-h100-f6a7824f76/) and its conv
kernels were never profiled there. This records the launches of one conv_bn_lrelu forward + backward (the default
net's 128 -> 128 3x3 conv at --size) and one merge (concat_bn_conv_bn_lrelu: 4 + 128 -> 128, 3x3) in bf16, in NCHW
and in channels_last, under Triton's interpreter without running them (as bench/triton_specializations.py records
a step's launches), then compiles each GEMM kernel as the GPU would specialize that launch (an int equal to 1 a
constant, an int divisible by 16 and each 16-byte-aligned pointer marked so, do_not_specialize respected; the
launch's warps, stages and constexprs, with bf16 dot operands where the interpreter feeds fp32 ones) for sm_90 with
Triton's PTX backend, and assembles it with its ptxas -v. Per kernel and layout: registers, bytes spilled, shared
memory, global loads issued one element at a time, asynchronous copies (cp.async: what the software pipeline
overlaps with the dots) and wgmma instructions.

--step does the same for the native backend's CUDA step (PaddedBlocks: the BatchNorm + LeakyReLU kernels that write
the next conv's pad, their statistics and backward, the level inputs' pad, the upsample), NCHW (--channels-last:
NHWC, the harness's native-cl), --precision: each
kernel specialization that one iteration of the throughput input's fit launches, compiled as above, with its
launches per iteration, its global loads and stores by width (an elementwise kernel wants 16-byte vectors: 8 bf16)
and its tile-wide layout conversions (a round trip through shared memory, where a load's thread layout is not its
store's).

No timing: a spill, a scalar load or a missing pipeline is a fact of the code, and these are the ones that need no
GPU to see. Writes sm90_codegen.json and sm90_codegen.md (--step: sm90_step_codegen.*) in --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels record their launches; the compile runs apart

import torch  # noqa: E402

import dipfast.kernels  # noqa: E402  (built for the interpreter)
from dipfast.bench.report import save_and_print  # noqa: E402
from dipfast.kernels import configs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts beside this file
from triton_specializations import intercepted, launch_key, native_step_launches, not_specialized  # noqa: E402

GEMM_KERNELS = ("_conv_bn_lrelu_fwd_kernel", "_conv_wgrad_kernel", "_conv_dgrad_kernel",
                "_merge_conv_fwd_kernel", "_merge_wgrad_kernel")  # fmt: skip
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _argument(value, specialize: bool = True) -> dict:
    """A launch argument as the compile needs it: its Triton type and its specialization (none for an int in the
    kernel's do_not_specialize)."""
    if isinstance(value, torch.Tensor):
        dtype = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64", torch.int64: "i64",
                 torch.bool: "i1"}[value.dtype]  # fmt: skip
        return {"type": f"*{dtype}", "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"type": "i1"}
    if isinstance(value, int):
        return {"type": "i32", "one": specialize and value == 1, "div16": specialize and value % 16 == 0,
                "specialized": specialize}  # fmt: skip
    return {"type": "fp32"}


def _constexpr(value):
    """A constexpr as JSON: numbers and bools as they are, a dtype (DOT_DTYPE) or a string by its name."""
    return value if isinstance(value, (bool, int, float)) else str(value)


def _launch(jit, args: tuple, kwargs: dict) -> dict:
    """One launch of an interpreted kernel `jit` as the sm_90 compile needs it: its module and name, each argument's
    specialization, its constexprs and its warps and stages."""
    params = list(inspect.signature(jit.fn).parameters.values())
    values = {**dict(zip([p.name for p in params], args, strict=False)), **kwargs}
    constexpr = {p.name for p in params if "constexpr" in str(p.annotation)}
    fixed = not_specialized(jit)
    return {
        "module": jit.fn.__module__,
        "name": jit.fn.__name__,
        "args": {p.name: _argument(values[p.name], p.name not in fixed) for p in params if p.name not in constexpr},
        "constexprs": {p.name: _constexpr(values[p.name]) for p in params if p.name in constexpr},
        "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs},
    }


def record(size: int, layout: str) -> dict[tuple[str, str], dict]:
    """{(op, kernel): its last launch's arguments} for one forward + backward of each op ('conv': conv_bn_lrelu,
    'conv-s2': the same at stride 2, 'merge': concat_bn_conv_bn_lrelu, which runs conv_bn_lrelu's dgrad too), bf16,
    in `layout`."""
    launches: dict[tuple[str, str], dict] = {}
    op = "conv"

    def capture(jit, args, kwargs) -> None:
        if jit.fn.__name__ in GEMM_KERNELS:  # the last launch of each (the merge's dgrad: the skip's part, then the
            launches[op, jit.fn.__name__] = _launch(jit, args, kwargs)  # deeper's)

    fmt = LAYOUTS[layout]
    bf16 = dict(dtype=torch.bfloat16)
    x = torch.zeros(1, 128, size, size, **bf16).contiguous(memory_format=fmt).requires_grad_(True)
    skip = torch.zeros(1, 4, size, size, **bf16).contiguous(memory_format=fmt).requires_grad_(True)
    weight = torch.zeros(128, 128, 3, 3, **bf16).contiguous(memory_format=fmt).requires_grad_(True)
    merge_weight = torch.zeros(128, 132, 3, 3, **bf16).contiguous(memory_format=fmt).requires_grad_(True)
    ones, ones_merge = torch.ones(128, requires_grad=True), torch.ones(132, requires_grad=True)
    with intercepted(capture), configs.forced_tiles(configs.HOPPER):  # the GPU's tiles, not the interpreter's
        # unwritten outputs may upset what follows a launch: each op's launches are recorded by then
        with contextlib.suppress(Exception):
            out = dipfast.kernels.conv_bn_lrelu(x, weight, None, ones, ones)
            out.backward(torch.zeros_like(out))
        op = "conv-s2"  # the level's downsampling conv: its dgrad loops over each phase's taps
        with contextlib.suppress(Exception):
            out = dipfast.kernels.conv_bn_lrelu(x, weight, None, ones, ones, stride=2)
            out.backward(torch.zeros_like(out))
        op = "merge"
        with contextlib.suppress(Exception):
            out = dipfast.kernels.concat_bn_conv_bn_lrelu(skip, x, ones_merge, ones_merge, merge_weight, None,
                                                          ones, ones)  # fmt: skip
            out.backward(torch.zeros_like(out))
    return launches


_COMPILE = textwrap.dedent(
    """
    import importlib, json, re, subprocess, sys, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16}
    out = {}
    for key, launch in json.loads(sys.stdin.read()).items():
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        bf16 = any(a["type"] == "*bf16" for a in launch["args"].values())
        constexprs, signature, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                v = launch["constexprs"][p.name]
                if p.name == "DOT_DTYPE":  # the interpreter's bf16 dot is wrong, so it was fed fp32 operands
                    v = "bf16" if bf16 else v
                signature[p.name] = "constexpr"
                constexprs[p.name] = DTYPES[v] if p.name == "DOT_DTYPE" else v
                continue
            a = launch["args"][p.name]
            if a.get("one"):
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = a["type"]
            if a.get("aligned") or a.get("div16"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=launch["options"])
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        verbose = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", f.name,
                                  "-o", "/dev/null"], capture_output=True, text=True).stderr
        loads = re.findall(r"ld\\.global[\\w.:]*", ptx)

        def widths(ops):  # {bytes an instruction moves: instructions}, e.g. ld.global.v4.b32: 16
            sizes = [int((re.search(r"\\.v(\\d)", op) or [0, 1])[1]) * int(re.search(r"(\\d+)$", op)[1]) // 8
                     for op in ops]
            return {str(b): sizes.count(b) for b in sorted(set(sizes))}

        out[key] = {
            "registers": int(re.search(r"Used (\\d+) registers", verbose).group(1)),
            "spill_bytes": int(re.search(r"(\\d+) bytes spill stores", verbose).group(1)),
            "shared_bytes": kernel.metadata.shared,
            "scalar_loads": sum(1 for op in loads if not re.search(r"\\.v[248]", op)),
            "cp_async": len(re.findall(r"cp\\.async\\.c[ag]", ptx)),
            "wgmma": ptx.count("wgmma.mma_async"),
            # ptxas's C7515: it waits for each wgmma before the next (non-wgmma code defines their accumulator in a
            # pipeline stage), so the tensor cores idle while the loads and the conversions run
            "wgmma_serialized": "C7515" in verbose,
            "load_bytes": widths(loads),
            "store_bytes": widths(re.findall(r"st\\.global[\\w.:]*", ptx)),
            # a tile changing thread layout (2-D or more: a per-channel vector's are a few registers)
            "tile_conversions": len(re.findall(r"ttg\\.convert_layout [^:]*: tensor<\\d+x\\d+", kernel.asm["ttgir"])),
            "tiles": {k: launch["constexprs"].get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
            "options": launch["options"],
        }
    print(json.dumps(out))
    """
)


def compile_sm90(launches: dict[str, dict]) -> dict[str, dict]:
    """Each recorded launch compiled for sm_90 in a fresh process (this one built the kernels for the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(launches), env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"the sm_90 compile failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def codegen(size: int) -> list[dict]:
    launches, keys = {}, {}
    for layout in LAYOUTS:
        for (op, name), launch in record(size, layout).items():
            key = f"{op}/{name}/{layout}"
            launches[key], keys[key] = {**launch, "name": name}, {"op": op, "kernel": name, "layout": layout}
    stats = compile_sm90(launches)
    return [{**keys[key], **stats[key]} for key in launches]


def record_step(size: int, precision: str, channels_last: bool = False) -> dict[str, dict]:
    """{key: launch} for each kernel specialization one iteration of the native CUDA step launches (PaddedBlocks,
    NCHW or channels_last, Hopper's tiles; the first, up to its read-back: no final output), with its launch count.
    The kernels record their launches under the interpreter and run none of them."""
    launches: dict[tuple, dict] = {}
    counts: collections.Counter = collections.Counter()
    recording = [True]

    def capture(jit, args, kwargs) -> None:
        if recording[0]:
            key = (jit.fn.__name__, launch_key(jit.fn, args, kwargs, not_specialized(jit)))
            counts[key] += 1
            launches.setdefault(key, _launch(jit, args, kwargs))

    def on_block() -> None:  # the first read-back
        recording[0] = False

    native_step_launches(size, precision, "default", 1, capture, on_block, channels_last=channels_last)
    return {f"{name}/{i}": {**launches[name, k], "launches": counts[name, k]} for i, (name, k) in enumerate(launches)}


def step_codegen(size: int, precision: str, channels_last: bool = False) -> list[dict]:
    launches = record_step(size, precision, channels_last)
    stats = compile_sm90(launches)
    return [{"kernel": launch["name"], **launch, **stats[key]} for key, launch in launches.items()]


def _specialization(row: dict) -> str:
    """What tells a kernel's specializations apart: its constexprs but the tiles, its tensors' dtypes, and the
    arguments Triton cannot take as 16-aligned (pointers, and the ints it specializes: a row's stride, the width)."""
    tiles = {"BLOCK", "BLOCK_W", "BLOCK_C", "BLOCK_T"}
    parts = [f"{k}={v}" for k, v in row["constexprs"].items() if k not in tiles]
    dtypes = sorted({a["type"].lstrip("*") for a in row["args"].values() if a["type"].startswith("*")})
    unaligned = [
        name
        for name, a in row["args"].items()
        if (a["type"].startswith("*") and not a["aligned"]) or (a.get("specialized") and not (a["one"] or a["div16"]))
    ]
    return ", ".join(parts + ["/".join(dtypes)] + ([f"not 16-aligned: {' '.join(unaligned)}"] if unaligned else []))


def _widths(histogram: dict) -> str:
    return ", ".join(f"{n} x {b} B" for b, n in sorted(histogram.items(), key=lambda kv: -int(kv[0]))) or "-"


def step_markdown(rows: list[dict], size: int, precision: str, layout: str = "NCHW") -> str:
    lines = [
        f"## sm_90 code of the native CUDA step's Triton kernels (default net, {size} px, {precision}, {layout})",
        "",
        "Per kernel specialization: launches in one iteration, and the global memory instructions of its code (bytes "
        "each moves x count; 16 B is a vector of 8 bf16 or 4 fp32).",
        "",
        "| kernel | specialization | launches | tiles, warps | registers | global loads | global stores | "
        "tile layout conversions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tiles = " x ".join(str(v) for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        lines.append(
            f"| {r['kernel']} | {_specialization(r)} | {r['launches']} | {tiles}, {r['options'].get('num_warps', 4)} | "
            f"{r['registers']} | {_widths(r['load_bytes'])} | {_widths(r['store_bytes'])} | {r['tile_conversions']} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], size: int) -> str:
    lines = [
        f"## sm_90 code of the triton backend's GEMM kernels (bf16, 128 -> 128 3x3 at {size} px; merge 4 + 128 -> 128)",
        "",
        "| op | kernel | layout | tiles (M, N, K), warps, stages | registers | spilled bytes | shared KiB | "
        "one-element global loads | cp.async | wgmma | wgmma serialized |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, o = r["tiles"], r["options"]
        lines.append(
            f"| {r['op']} | {r['kernel']} | {r['layout']} | "
            f"{t.get('BLOCK_M')} x {t.get('BLOCK_N')} x {t.get('BLOCK_K')}, "
            f"{o.get('num_warps')}, {o.get('num_stages')} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes'] / 1024:g} | {r['scalar_loads']} | {r['cp_async']} | {r['wgmma']} | "
            f"{'yes' if r['wgmma_serialized'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--step", action="store_true", help="the native CUDA step's kernels, not the GEMM kernels")
    parser.add_argument("--precision", default="bf16", help="--step's precision (default bf16)")
    parser.add_argument("--channels-last", action="store_true", help="--step with NHWC activations (native-cl)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.precision != "bf16" and not args.step:
        parser.error("--precision applies to --step (the GEMM kernels are compiled in bf16)")
    if args.channels_last and not (args.step and args.precision == "bf16"):
        parser.error("--channels-last applies to --step in bf16 (the precision that runs NHWC activations)")
    if args.step:
        rows = step_codegen(args.size, args.precision, args.channels_last)
        layout = "channels_last" if args.channels_last else "NCHW"
        report = {"size": args.size, "precision": args.precision, "layout": layout, "rows": rows}
        save_and_print(args.out, "sm90_step_codegen", report, step_markdown(rows, args.size, args.precision, layout))
        return 0
    rows = codegen(args.size)
    save_and_print(args.out, "sm90_codegen", {"size": args.size, "rows": rows}, markdown(rows, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
