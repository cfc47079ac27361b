"""Floor: a cost model of one DIP iteration, op by op, and the least time a GPU could take for it.

The ops are not listed by hand: the net (dipfast.nets.build of its spec) runs forward and backward
on the meta device under a dispatch mode that records every ATen call with its tensors, the module
that made it and, in the backward, the forward op it differentiates (autograd's current node). So
the list is what eager PyTorch runs for that net: each conv's forward, input gradient (absent where
the input needs none: the convs that read z), weight and bias gradients; BatchNorm statistics,
apply and backward; LeakyReLU, sigmoid, reflection pad (none before a 1x1 conv: PadConv skips a
zero-width pad), upsample and concat (crop) forward and backward; the gradient sums where a tensor
feeds two branches; the fp32 output cast and the MSE. For bf16 the traced net is bf16 throughout
(autocast keeps BatchNorm's per-channel parameters fp32: bytes too few to matter).
The step around the net follows fast_step.FastStep and the denoising preset (the profile's and the
throughput table's input): the input noise draw and z + noise, the bf16 copy of the weights and of
their gradients, Adam per parameter, the output copy and EMA, backtracking's two selects. PSNR
metrics (only with a known target) and launch overheads are not in the model.

Cost of an op: FLOPs (2 per multiply-add for convs; a small per-element count, _FLOPS_PER_ELEMENT,
for everything else) and bytes moved: each tensor it reads and writes once, at its dtype: bf16
activations 2 bytes, fp32 4; master weights, gradients and Adam's moments fp32. BatchNorm reads its
input twice (statistics, apply) and its backward reads dy and x twice (reduce, then apply): the
passes of an unfused kernel. The floor of an op is max(FLOPs / peak, bytes / bandwidth) on a named
GPU: convs at the tensor-core peak of the precision (IEEE fp32 at the non-tensor peak), the rest at
the fp32 non-tensor peak (they are bound by bandwidth anyway). The iteration's floor is the sum
over ops: each op as its own kernel at the hardware's pace, so fusion (one pass for BN + LeakyReLU
+ pad) can go below it and everything else is above it. N networks (batch) cost N times one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dipfast import nets
from dipfast.errors import InputError
from dipfast.nets import NetSpec
from dipfast.presets import PRESETS, TaskPreset

PRECISIONS = ("fp32", "tf32", "bf16")
GROUPS = (
    "conv",
    "batch_norm",
    "activation",
    "pad",
    "upsample",
    "concat",
    "loss",
    "cast",
    "elementwise",
    "input_noise",
    "adam",
    "ema",
    "backtracking",
)


@dataclass(frozen=True)
class GPU:
    """Dense peaks in TFLOP/s (no sparsity) and HBM bandwidth in TB/s, from the vendor's datasheet."""

    name: str
    bf16_tflops: float  # tensor cores, dense
    tf32_tflops: float  # tensor cores, dense
    fp32_tflops: float  # CUDA cores (no tensor cores): IEEE fp32 convs and all elementwise work
    bandwidth_tbs: float
    source: str

    def matmul_peak(self, precision: str) -> float:
        """FLOP/s of a conv in `precision` ('fp32' is IEEE: no tensor cores)."""
        return 1e12 * {"bf16": self.bf16_tflops, "tf32": self.tf32_tflops, "fp32": self.fp32_tflops}[precision]


# H100's and H200's datasheets give tensor-core figures with 2:4 sparsity; dense is half of them.
GPUS = {
    "h100": GPU(
        "NVIDIA H100 SXM5 80GB",
        989.0,
        494.5,
        67.0,
        3.35,
        "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): SXM, BF16 1,979 and "
        "TF32 989 TFLOPS with sparsity, FP32 67 TFLOPS, HBM3 3.35 TB/s",
    ),
    "h200": GPU(
        "NVIDIA H200 SXM 141GB",
        989.0,
        494.5,
        67.0,
        4.8,
        "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): SXM, BF16 1,979 and "
        "TF32 989 TFLOPS with sparsity, FP32 67 TFLOPS, HBM3e 4.8 TB/s",
    ),
    "a100": GPU(
        "NVIDIA A100 SXM4 80GB",
        312.0,
        156.0,
        19.5,
        2.039,
        "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): SXM 80GB, BF16 312 and "
        "TF32 156 TFLOPS dense, FP32 19.5 TFLOPS, HBM2e 2,039 GB/s",
    ),
}

# FLOPs per element of the largest tensor an op touches (they never decide a floor: these ops are
# bound by bandwidth), so that total_flops counts the whole iteration and not the convs alone.
_FLOPS_PER_ELEMENT = {
    "batch_norm statistics": 3,  # x and x^2 summed
    "batch_norm apply": 2,  # one multiply-add with the folded scale and shift
    "batch_norm backward": 8,  # two sums, then dx from dy, x and the two sums
    "upsample_bilinear2d": 8,  # four taps
    "upsample_bilinear2d_backward": 8,
    "sigmoid": 4,
    "sigmoid_backward": 3,
    "mse_loss": 3,
    "mse_loss_backward": 3,
    "normal": 10,  # Box-Muller and the scale
    "adam": 12,  # two moment updates, the bias corrections, sqrt, the step
    "ema": 3,
}
_ADAM_BYTES_PER_PARAM = 7 * 4  # reads p, g, m, v and writes p, m, v, all fp32

# op name -> group; the first match wins; an op matching none is 'elementwise'
_OP_GROUPS = (
    ("batch_norm", r"batch_norm"),
    ("pad", r"reflection_pad|replication_pad|constant_pad"),
    ("upsample", r"upsample"),
    ("concat", r"^cat$|^slice_backward$"),
    ("activation", r"leaky_relu|sigmoid|^relu|threshold_backward|^elu|silu|gelu"),
    ("loss", r"mse_loss"),
    ("cast", r"^_to_copy$"),
)
# arguments an op reads only for their shape (the pad backward takes the forward's input to size dx)
_SHAPE_ONLY_ARGS = {
    "reflection_pad1d_backward": {1},
    "reflection_pad2d_backward": {1},
    "reflection_pad3d_backward": {1},
    "replication_pad2d_backward": {1},
}


@dataclass(frozen=True)
class Op:
    """One op of the iteration, for one network."""

    group: str
    name: str  # where: the module path (L<i> for the i-th nested skip level) or the step's part
    op: str  # what: 'forward', 'input grad', 'statistics', 'leaky_relu_backward', 'adam', ...
    shape: str
    flops: float
    bytes: float
    matmul: bool = False  # runs at the tensor-core (or, in IEEE fp32, FMA) peak of the precision

    def compute_s(self, gpu: GPU, precision: str) -> float:
        return self.flops / (gpu.matmul_peak(precision) if self.matmul else 1e12 * gpu.fp32_tflops)

    def floor_s(self, gpu: GPU, precision: str) -> float:
        return max(self.compute_s(gpu, precision), self.bytes / (1e12 * gpu.bandwidth_tbs))


# ---------------------------------------------------------------- tracing the net


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _dims(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape[1:])  # the batch axis is 1: one network


@dataclass
class _Call:
    func: object
    args: tuple
    out: object
    where: str
    phase: str  # 'forward' or 'backward'
    of: int | None = None  # backward: the index of the forward call it differentiates


class _Recorder(TorchDispatchMode):
    """Every ATen call with its arguments, result and the module path it ran in."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.calls: list[_Call] = []
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.backward:
            node = torch._C._current_autograd_node()
            if node is None or "AccumulateGrad" in node.name():
                return out  # set_to_none gradients: autograd hands the new gradient over, no copy
            of = node.metadata.get("dipfast_floor_call")
            where = self.calls[of].where if of is not None else "step"
            self.calls.append(_Call(func, args, out, where, "backward", of))
        else:
            self.calls.append(_Call(func, args, out, self.where(), "forward"))
        return out

    def tag_forward_nodes(self) -> None:
        """Mark each forward op's autograd node with the op's index, so that its backward ops can name it."""
        for i, call in enumerate(self.calls):
            for t in _tensors(call.out):
                if t.grad_fn is not None and "dipfast_floor_call" not in t.grad_fn.metadata:
                    t.grad_fn.metadata["dipfast_floor_call"] = i


def _short_path(path: str) -> str:
    """'level.inner.inner.up.conv' -> 'L2.up.conv': the skip net's nesting as a level number."""
    match = re.match(r"^level((?:\.inner)*)(.*)$", path)
    if match is None:
        return path or "net"
    return f"L{match.group(1).count('.inner')}{match.group(2)}"


def _module_paths(net: torch.nn.Module):
    """Hooks that keep a stack of the module paths being run; returns (current(), handles)."""
    stack: list[str] = []

    def enter(path: str):
        return lambda module, args: stack.append(path)  # None: the hook leaves the input alone

    def leave(module, args, output) -> None:
        stack.pop()

    handles = []
    for path, module in net.named_modules():
        if path:
            handles += [module.register_forward_pre_hook(enter(path)), module.register_forward_hook(leave)]
    return (lambda: _short_path(stack[-1]) if stack else "net"), handles


def _trace(spec: NetSpec, input_depth: int, n_channels: int, hw: tuple[int, int], out_hw: tuple[int, int], dtype):
    """The calls of one network's forward + MSE + backward on the meta device; the net (for its parameters)."""
    with torch.device("meta"):
        net = nets.build(spec, input_depth, n_channels).to(dtype)
    where, handles = _module_paths(net)
    z = torch.empty(1, input_depth, *hw, device="meta", dtype=dtype)
    y = torch.empty(1, n_channels, *out_hw, device="meta")
    rec = _Recorder(where)
    try:
        with rec:
            out = nets.layers.centre_crop(net(z).float(), out_hw)  # fast_step's fp32 loss on the cropped output
            loss = F.mse_loss(out, y)
            rec.tag_forward_nodes()
            rec.backward = True
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return rec.calls, net


def _group(opname: str) -> str:
    return next((g for g, pattern in _OP_GROUPS if re.search(pattern, opname)), "elementwise")


def _conv_macs(out_or_dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> int:
    per_output = math.prod(weight.shape[1:])  # (C_in / groups) * kh * kw; transposed: (C_out / groups) * kh * kw
    return (x.numel() if transposed else out_or_dy.numel()) * per_output


def _conv_rows(call: _Call) -> list[tuple]:
    name = call.func._opname
    if name == "convolution":
        x, weight, bias = call.args[:3]
        transposed, out = call.args[6], call.out
        flops = 2 * _conv_macs(out, x, weight, transposed)
        shape = f"{_dims(x)} -> {_dims(out)}, {'x'.join(map(str, weight.shape[2:]))}"
        return [("conv", "forward", shape, flops, _nbytes([x, weight, out] + _tensors(bias)), True)]
    dy, x, weight = call.args[:3]
    transposed, mask = call.args[7], call.args[10]
    dx, dw, db = call.out
    flops = 2 * _conv_macs(dy, x, weight, transposed)
    shape = f"{_dims(x)} -> {_dims(dy)}, {'x'.join(map(str, weight.shape[2:]))}"
    rows = []
    if mask[0]:
        rows.append(("conv", "input grad", shape, flops, _nbytes([dy, weight, dx]), True))
    if mask[1]:
        rows.append(("conv", "weight grad", shape, flops, _nbytes([dy, x, dw]), True))
    if mask[2]:
        rows.append(("conv", "bias grad", shape, dy.numel(), _nbytes([dy, db]), False))
    return rows


def _batch_norm_rows(call: _Call) -> list[tuple]:
    x = call.args[1] if call.phase == "backward" else call.args[0]
    n, shape = x.numel(), _dims(x)
    if call.phase == "backward":
        dy, dx = call.args[0], call.out[0]
        per = _FLOPS_PER_ELEMENT["batch_norm backward"]
        return [("batch_norm", "backward", shape, per * n, 2 * _nbytes([dy, x]) + _nbytes(_tensors(dx)), False)]
    y = call.out[0]
    stats, apply = _FLOPS_PER_ELEMENT["batch_norm statistics"], _FLOPS_PER_ELEMENT["batch_norm apply"]
    return [
        ("batch_norm", "statistics", shape, stats * n, _nbytes([x]), False),
        ("batch_norm", "apply", shape, apply * n, _nbytes([x, y]), False),
    ]


def _generic_rows(call: _Call) -> list[tuple]:
    name = call.func._opname
    skip = _SHAPE_ONLY_ARGS.get(name, set())
    reads = [t for i, a in enumerate(call.args) if i not in skip for t in _tensors(a)]
    writes = _tensors(call.out)
    largest = max(reads + writes, key=torch.Tensor.numel)
    flops = _FLOPS_PER_ELEMENT.get(name, 1) * largest.numel()
    label = "gradient sum" if name == "add" and call.phase == "backward" else name
    return [(_group(name), label, _dims(largest), flops, _nbytes(reads + writes), False)]


def _costs_nothing(call: _Call) -> bool:
    """Views, allocations and 0-dim bookkeeping (BN's num_batches_tracked, the loss's seed gradient)."""
    if call.func.is_view or call.func._opname in ("detach", "alias", "empty", "empty_like", "new_empty_strided"):
        return True
    if call.func._opname.startswith("mse_loss"):
        return False
    return all(t.numel() <= 1 for t in _tensors(call.out))


def net_ops(spec: NetSpec, input_depth: int, n_channels: int, hw: tuple[int, int], out_hw: tuple[int, int],
            dtype: torch.dtype) -> tuple[list[Op], list[tuple[str, int]]]:  # fmt: skip
    """One network's forward + loss + backward ops at an hw working size, and its (name, numel) parameters."""
    calls, net = _trace(spec, input_depth, n_channels, hw, out_hw, dtype)
    ops = []
    for call in calls:
        if _costs_nothing(call):
            continue
        name = call.func._opname
        if name in ("convolution", "convolution_backward"):
            rows = _conv_rows(call)
        elif "batch_norm" in name:
            rows = _batch_norm_rows(call)
        else:
            rows = _generic_rows(call)
        ops += [Op(g, call.where, op, shape, float(fl), float(by), mm) for g, op, shape, fl, by, mm in rows]
    return ops, [(_short_path(n), p.numel()) for n, p in net.named_parameters()]


# ---------------------------------------------------------------- the step around the net


def step_ops(params: list[tuple[str, int]], preset: TaskPreset, input_depth: int, n_channels: int,
             hw: tuple[int, int], out_hw: tuple[int, int], precision: str) -> list[Op]:  # fmt: skip
    """What fast_step.FastStep does besides the net's forward and backward, for one network."""
    f32, total = 4, sum(n for _, n in params)
    z = input_depth * hw[0] * hw[1]
    out = n_channels * out_hw[0] * out_hw[1]
    zs, outs = f"{input_depth}x{hw[0]}x{hw[1]}", f"{n_channels}x{out_hw[0]}x{out_hw[1]}"
    ops = []
    if preset.reg_noise_std > 0:
        ops += [
            Op("input_noise", "step", "normal", zs, _FLOPS_PER_ELEMENT["normal"] * z, f32 * z),
            Op("input_noise", "step", "z + noise", zs, z, 3 * f32 * z),
        ]
    if precision == "bf16":  # autocast's copies, made once per step from the flat fp32 buffers
        ops += [
            Op("cast", "step", "z to bf16", zs, z, (f32 + 2) * z),
            Op("cast", "step", "weights to bf16", f"{total} params", total, (f32 + 2) * total),
            Op("cast", "step", "weight grads to fp32", f"{total} params", total, (f32 + 2) * total),
        ]
    ops += [
        Op("adam", name, "adam", f"{n} params", _FLOPS_PER_ELEMENT["adam"] * n, _ADAM_BYTES_PER_PARAM * n)
        for name, n in params
    ]
    ops += [
        Op("ema", "step", "output copy", outs, 0, 2 * f32 * out),
        Op("ema", "step", "ema update", outs, _FLOPS_PER_ELEMENT["ema"] * out, 3 * f32 * out),
    ]
    if preset.backtracking is not None:  # two selects over the parameters: save the accepted, restore the saved
        ops += [Op("backtracking", "step", op, f"{total} params", total, 3 * f32 * total) for op in ("save", "restore")]
    return ops


# ---------------------------------------------------------------- the model and its report


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")


def gpu_named(name: str) -> GPU:
    if name not in GPUS:
        raise InputError(f"unknown gpu {name!r}; valid: {list(GPUS)}")
    return GPUS[name]


def gpu_of_device_name(device_name: str) -> str | None:
    """The GPUS key of a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'h100'), None for a GPU not in the table."""
    return next((key for key in GPUS if key in device_name.lower()), None)


def iteration_ops(
    spec: NetSpec | None = None,
    *,
    size: int,
    precision: str,
    input_depth: int = 32,
    n_channels: int = 3,
    preset: TaskPreset | None = None,
) -> tuple[list[Op], tuple[int, int]]:
    """Every op of one network's iteration on a size x size image, and the working size the net runs at
    (nets.working_size: the image size, or the next size the net accepts, the output cropped back)."""
    check_precision(precision)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise InputError(f"size must be a positive integer (pixels per side); got {size!r}")
    spec = nets.SkipSpec() if spec is None else spec
    preset = PRESETS["denoise"] if preset is None else preset
    try:
        hw = nets.working_size(spec, input_depth, size, size)
    except ValueError as e:
        raise InputError(f"size {size}: {e}") from None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ops, params = net_ops(spec, input_depth, n_channels, hw, (size, size), dtype)
    return ops + step_ops(params, preset, input_depth, n_channels, hw, (size, size), precision), hw


def group_sums(ops: list[Op], gpu: GPU, precision: str, batch: int = 1) -> dict[str, dict]:
    """{group: {flops, bytes, floor_ms, ops}} for `batch` networks, groups in GROUPS order."""
    sums = {}
    for g in GROUPS:
        mine = [o for o in ops if o.group == g]
        if mine:
            sums[g] = {
                "flops": batch * sum(o.flops for o in mine),
                "bytes": batch * sum(o.bytes for o in mine),
                "floor_ms": 1e3 * batch * sum(o.floor_s(gpu, precision) for o in mine),
                "ops": len(mine),
            }
    return sums


def floor_report(spec: NetSpec | None = None, *, size: int, batch: int = 1, precision: str, gpu: str,
                 input_depth: int = 32, n_channels: int = 3, net: str = "default") -> dict:  # fmt: skip
    """The suite's report: totals, per-group sums and per-op rows for `batch` networks (JSON-ready)."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise InputError(f"batch must be a positive integer (networks trained side by side); got {batch!r}")
    card = gpu_named(gpu)
    ops, hw = iteration_ops(spec, size=size, precision=precision, input_depth=input_depth, n_channels=n_channels)
    flops = batch * sum(o.flops for o in ops)
    nbytes = batch * sum(o.bytes for o in ops)
    scaled = {"flops": lambda o: batch * o.flops, "bytes": lambda o: batch * o.bytes,
              "floor_ms": lambda o: 1e3 * batch * o.floor_s(card, precision)}  # fmt: skip
    rows = [{**asdict(o), **{k: f(o) for k, f in scaled.items()}} for o in ops]
    settings = {"net": net, "size": size, "working_size": list(hw), "batch": batch, "precision": precision}
    compute_s = sum(o.compute_s(card, precision) for o in ops)
    return {
        "suite": "floor",
        "settings": {**settings, "gpu": gpu, "input_depth": input_depth, "n_channels": n_channels, "preset": "denoise"},
        "gpu": asdict(card),
        "total_flops": flops,
        "total_bytes": nbytes,
        "floor_ms": sum(r["floor_ms"] for r in rows),
        "compute_ms": 1e3 * batch * compute_s,
        "memory_ms": 1e3 * nbytes / (1e12 * card.bandwidth_tbs),
        "groups": group_sums(ops, card, precision, batch),
        "ops": rows,
    }
