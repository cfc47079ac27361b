"""Does cuDNN's fused conv + BatchNorm graph pay on this GPU? (issue 12; ../shared/notes/gpu-step.md, fix 5)

    python bench/cudnn_fusion.py --device cuda --size 512 --top 4 --out DIR      # gpu_quick's cudnn step

The native bf16 step on the H200 spent 3.4 ms in cuDNN's convs through ATen (5x their floor, 1.4 ms of it in
cuDNN's legacy kernels), 1.2 ms in cuDNN's NCHW <-> NHWC conversions and 1.3 ms in the Triton BatchNorm kernels
around them (bench/results/2026-12-04-h200-222367b4a8). cuDNN's graph API (PyPI nvidia-cudnn-frontend) runs a
conv in NHWC with its output's per-channel sum and sum of squares in the epilogue (genstats) and the previous
block's BatchNorm + LeakyReLU in its prologue (scale, bias, activation on load), and the weight gradient with the
same prologue. Whether its engines take LeakyReLU in bf16 on Hopper, and what they cost, only a GPU can say; this
probe asks, for the default net's costliest convs (as conv_layouts lists them: pre-padded input, no conv padding):

    aten-nchw, aten-cl    F.conv2d (cudnn.benchmark on) + torch.var_mean of its output; the backward is
                          aten.convolution_backward (input and weight gradients), in NCHW and channels_last
    aten-cl sba           the same forward after torch's scale, bias and LeakyReLU: what the prologue saves
    fprop                 cuDNN graph: conv_fprop alone, NHWC
    fprop+stats           conv_fprop + genstats
    sba+fprop+stats       scale, bias, LeakyReLU(0.2) on load, conv_fprop, genstats: the whole forward block
    dgrad, wgrad          conv_dgrad, conv_wgrad alone
    sba+wgrad             conv_wgrad with the input's scale, bias and LeakyReLU recomputed on load
    dgrad+dact            conv_dgrad, then LeakyReLU's backward at the previous block's pre-activation

Each runs once and its outputs are checked against torch's in fp32 (TF32 off) on the same bf16 operands:
error = max |out - ref| / max |ref|, `ok` within 2e-2 (bf16 operands and output: 2^-8 rounding each, summed
over the conv's taps). Then it is timed as conv_layouts times a call (CUDA graph replay between CUDA events,
median of --repeats; its kernels listed). A graph cuDNN does not support records check_support's message.
On a CPU the aten rows run (oneDNN, wall clock: the plumbing's check in gpu_quick --tiny) and the cuDNN rows say
why they did not; without the `cudnn` module (pip install nvidia-cudnn-frontend; gpu_quick installs a wheel
carried in .gpu-data/wheels) likewise. Writes cudnn_fusion.json and cudnn_fusion.md in --out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conv_layouts beside this file

from conv_layouts import conv_parser, cuda_missing, net_convs, time_call, write_report  # noqa: E402

from dipfast import backends  # noqa: E402

SLOPE = 0.2  # the net's LeakyReLU
TOLERANCE = 2e-2
FORWARD = ("aten-nchw", "aten-cl", "aten-cl sba", "fprop", "fprop+stats", "sba+fprop+stats")
BACKWARD = ("aten-nchw bwd", "aten-cl bwd", "dgrad", "wgrad", "sba+wgrad", "dgrad+dact")
PROBES = FORWARD + BACKWARD

# (run, {output name: (computed, fp32 reference)}): run() recomputes the outputs in place
Built = tuple[Callable[[], None], dict[str, tuple[torch.Tensor, torch.Tensor]]]


class Operands:
    """One conv's bf16 operands in channels_last (NCHW copies for the aten-nchw rows) and their fp32 references."""

    def __init__(self, row: dict, device: torch.device):
        g = torch.Generator().manual_seed(row["c_in"] * 1000 + row["c_out"] + row["h"])
        c_in, c_out, k = row["c_in"], row["c_out"], row["kernel"]
        self.stride = row["stride"]
        cl = torch.channels_last

        def draw(*shape, scale=1.0, offset=0.0):
            t = torch.randn(shape, generator=g) * scale + offset
            return t.to(device, torch.bfloat16).contiguous(memory_format=cl)

        self.x = draw(1, c_in, row["h"], row["w"])
        self.w = draw(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5)
        self.scale = draw(1, c_in, 1, 1, scale=0.2, offset=1.0)  # a BatchNorm's gamma * rstd
        self.bias = draw(1, c_in, 1, 1, scale=0.2)  # its beta - mean * gamma * rstd
        self.pre = draw(1, c_in, row["h"], row["w"])  # the previous block's pre-activation (dgrad+dact)
        h_out = (row["h"] - k) // self.stride + 1
        w_out = (row["w"] - k) // self.stride + 1
        self.dy = draw(1, c_out, h_out, w_out)
        f = {name: getattr(self, name).float() for name in ("x", "w", "scale", "bias", "pre", "dy")}
        with backends.conv_precision(tf32=False, cudnn_benchmark=False):  # the references in IEEE fp32
            self.act = F.leaky_relu(f["x"] * f["scale"] + f["bias"], SLOPE)
            self.y_ref = F.conv2d(f["x"], f["w"], stride=self.stride)
            self.y_sba_ref = F.conv2d(self.act, f["w"], stride=self.stride)
            self.dx_ref, self.dw_ref = self.backward(f["dy"], f["x"], f["w"])
            _, self.dw_sba_ref = self.backward(f["dy"], self.act, f["w"])
            self.dx_act_ref = self.dx_ref * torch.where(f["pre"] > 0, 1.0, SLOPE)

    def backward(self, dy, x, w) -> tuple[torch.Tensor, torch.Tensor]:
        """aten's input and weight gradients of the conv at (x, w)."""
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, w, None, [self.stride] * 2, [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]
        )
        return dx, dw


def _stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """genstats' outputs in torch: the per-channel sum and sum of squares, (1, C, 1, 1) fp32."""
    y = y.float()
    return y.sum((0, 2, 3), keepdim=True), y.square().sum((0, 2, 3), keepdim=True)


def aten_probe(name: str, o: Operands) -> Built:
    fmt = torch.contiguous_format if name.startswith("aten-nchw") else torch.channels_last
    x, w, dy = (t.contiguous(memory_format=fmt) for t in (o.x, o.w, o.dy))
    out: dict[str, torch.Tensor] = {}
    if name.endswith("bwd"):

        def run():
            out["dx"], out["dw"] = o.backward(dy, x, w)

        run()
        return run, {"dx": (out["dx"], o.dx_ref), "dw": (out["dw"], o.dw_ref)}
    sba = name.endswith("sba")

    def run():
        source = F.leaky_relu(x * o.scale + o.bias, SLOPE) if sba else x
        out["y"] = F.conv2d(source, w, stride=o.stride)
        torch.var_mean(out["y"], dim=(0, 2, 3))

    run()
    return run, {"y": (out["y"], o.y_sba_ref if sba else o.y_ref)}


class Graph:
    """A cuDNN frontend graph over torch tensors: bf16 in and out, fp32 inside; run() executes it on torch's
    current stream (so that a CUDA graph capture records it)."""

    def __init__(self, cudnn, handle):
        self.cudnn, self.handle = cudnn, handle
        self.types = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float32: cudnn.data_type.FLOAT}
        self.g = cudnn.pygraph(
            io_data_type=cudnn.data_type.BFLOAT16,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
            handle=handle,
        )
        self.pack: dict = {}

    def input(self, t: torch.Tensor, name: str):
        node = self.g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=self.types[t.dtype])
        self.pack[node] = t
        return node

    def output(self, node, like: torch.Tensor) -> torch.Tensor:
        """A bf16 channels_last buffer for node, shaped as `like` (a stride-2 conv's input shape is ambiguous)."""
        t = torch.empty(like.shape, dtype=torch.bfloat16, device=like.device, memory_format=torch.channels_last)
        node.set_output(True).set_dim(list(t.shape)).set_stride(list(t.stride())).set_data_type(self.types[t.dtype])
        self.pack[node] = t
        return t

    def statistic(self, node, like: torch.Tensor) -> torch.Tensor:
        """An fp32 buffer for one of genstats' (1, C, 1, 1) outputs, their shape as the graph infers it."""
        t = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        node.set_output(True).set_data_type(self.types[torch.float32])
        self.pack[node] = t
        return t

    def prologue(self, o: Operands):
        """LeakyReLU(x * scale + bias), computed on load."""
        x = self.g.scale(input=self.input(o.x, "x"), scale=self.input(o.scale, "scale"))
        x = self.g.bias(input=x, bias=self.input(o.bias, "bias"))
        return self.g.leaky_relu(input=x, negative_slope=SLOPE)

    def conv_args(self, o: Operands) -> dict:
        return dict(padding=[0, 0], stride=[o.stride] * 2, dilation=[1, 1], compute_data_type=self.types[torch.float32])

    def build(self) -> Callable[[], None]:
        cudnn = self.cudnn
        self.g.validate()
        self.g.build_operation_graph()
        self.g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.g.check_support()
        self.g.build_plans()
        device = next(iter(self.pack.values())).device
        workspace = torch.empty(max(self.g.get_workspace_size(), 1), dtype=torch.uint8, device=device)

        def run():
            cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
            self.g.execute(self.pack, workspace, handle=self.handle)

        run()
        return run


def cudnn_probe(name: str, o: Operands, cudnn, handle) -> Built:
    graph = Graph(cudnn, handle)
    checks = {}
    if name in ("fprop", "fprop+stats", "sba+fprop+stats"):
        source = graph.prologue(o) if name.startswith("sba") else graph.input(o.x, "x")
        y_node = graph.g.conv_fprop(image=source, weight=graph.input(o.w, "w"), **graph.conv_args(o))
        ref = o.y_sba_ref if name.startswith("sba") else o.y_ref
        checks["y"] = (graph.output(y_node, ref), ref)
        if name.endswith("stats"):
            total, squares = graph.g.genstats(input=y_node)
            ref_sum, ref_squares = _stats(ref)
            checks["sum"] = (graph.statistic(total, ref_sum), ref_sum)
            checks["sum of squares"] = (graph.statistic(squares, ref_squares), ref_squares)
    elif name in ("dgrad", "dgrad+dact"):
        dx = graph.g.conv_dgrad(loss=graph.input(o.dy, "dy"), filter=graph.input(o.w, "w"), **graph.conv_args(o))
        if name == "dgrad":
            checks["dx"] = (graph.output(dx, o.dx_ref), o.dx_ref)
        else:
            dx.set_dim(list(o.x.shape)).set_stride(list(o.x.stride()))  # virtual, but stride 2's shape is ambiguous
            act = graph.g.leaky_relu_backward(loss=dx, input=graph.input(o.pre, "pre"), negative_slope=SLOPE)
            checks["dx"] = (graph.output(act, o.dx_act_ref), o.dx_act_ref)
    elif name in ("wgrad", "sba+wgrad"):
        source = graph.prologue(o) if name.startswith("sba") else graph.input(o.x, "x")
        dw = graph.g.conv_wgrad(image=source, loss=graph.input(o.dy, "dy"), **graph.conv_args(o))
        ref = o.dw_sba_ref if name.startswith("sba") else o.dw_ref
        checks["dw"] = (graph.output(dw, ref), ref)
    else:
        raise ValueError(f"unknown probe {name!r}")
    return graph.build(), checks


def relative_error(computed: torch.Tensor, reference: torch.Tensor) -> float:
    """max |computed - reference| / max |reference|, in fp32."""
    reference = reference.float()
    return float((computed.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def probe(name: str, o: Operands, device: torch.device, repeats: int, gflop: float, cudnn_state) -> dict:
    """One row: supported or why not, each output's error against the fp32 reference, and its time."""
    if name.startswith("aten"):
        build = lambda: aten_probe(name, o)  # noqa: E731
    elif isinstance(cudnn_state, str):
        return {"supported": False, "reason": cudnn_state}
    else:
        build = lambda: cudnn_probe(name, o, *cudnn_state)  # noqa: E731
    try:
        with backends.conv_precision(tf32=False, cudnn_benchmark=True):
            run, checks = build()
            errors = {key: relative_error(*pair) for key, pair in checks.items()}
            timed = time_call(run, device, repeats)
    except Exception as error:  # noqa: BLE001  (cudnnGraphNotSupportedError, RuntimeError, ...): recorded
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return {"supported": False, "reason": f"{type(error).__name__}: {first}"}
    ms = timed["ms"]
    return {
        "supported": True,
        "errors": errors,
        "ok": all(e <= TOLERANCE for e in errors.values()),
        **timed,
        "tflops": gflop / ms if ms > 0 else None,
    }


def cudnn_state(device: torch.device):
    """(cudnn module, handle), or why the cuDNN rows cannot run here (a str)."""
    if device.type != "cuda":
        return "the cuDNN graph API needs CUDA"
    try:
        import cudnn
    except ImportError as error:
        return f"no cudnn module ({error}): pip install nvidia-cudnn-frontend"
    try:
        return cudnn, cudnn.create_handle()
    except Exception as error:  # noqa: BLE001
        return f"cudnn.create_handle() failed: {type(error).__name__}: {error}"


def forward_gflop(row: dict) -> float:
    """One pass of the conv: conv_layouts' GFLOP counts the forward, the weight gradient and (where it runs) the
    input gradient, each the same multiply-adds."""
    return row["gflop"] / (3 if row["input_grad"] else 2)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"## cuDNN's fused graphs against ATen, per conv ({s['net']} net, {s['size']} px, bf16, {s['device']}: "
        f"{report['machine']}; cudnn frontend {s.get('cudnn_frontend') or '-'}, backend "
        f"{s.get('cudnn_backend') or '-'})\n",
        f"Error: max |out - fp32 reference| / max |reference|, ok within {TOLERANCE:g}. Median of {s['repeats']}.\n",
    ]
    for row in report["rows"]:
        lines.append(
            f"### {row['convs'][0]} (x{row['count']}): {row['c_in']} -> {row['c_out']}, k{row['kernel']}, "
            f"s{row['stride']}, input {row['h']} x {row['w']}\n"
        )
        lines += ["| probe | ms | TFLOP/s | error | first kernel |", "|---|---|---|---|---|"]
        for name in PROBES:
            p = row["probes"][name]
            if not p["supported"]:
                lines.append(f"| {name} | - | - | - | not run: {p['reason']} |")
                continue
            errors = ", ".join(f"{k} {v:.1e}" for k, v in p["errors"].items())
            kernel = p["kernels"][0][0] if p.get("kernels") else p["timing"]
            flops = f"{p['tflops']:.3g}" if p["tflops"] else "-"
            lines.append(f"| {name} | {p['ms']:.3f} | {flops} | {errors}{'' if p['ok'] else ' **FAIL**'} | {kernel} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = conv_parser(__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=4, help="the convs costing the most in the step (GFLOP x count)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if cuda_missing("cudnn_fusion", device):
        return 2
    state = cudnn_state(device)
    if not isinstance(state, str):  # recorded in the report's settings
        args.cudnn_frontend, args.cudnn_backend = getattr(state[0], "__version__", None), state[0].backend_version()
    rows = []
    try:  # gpu_quick's time limit sends SIGINT: the convs probed so far are written
        for row in net_convs(args.net, args.size)[: args.top]:
            gflop = forward_gflop(row)
            operands = Operands(row, device)
            row["probes"] = {}
            for name in PROBES:
                row["probes"][name] = probe(
                    name, operands, device, args.repeats, gflop * (1 + name.endswith("bwd")), state
                )
            rows.append(row)
    except KeyboardInterrupt:
        print(f"cudnn_fusion: interrupted; writing the {len(rows)} convs probed", file=sys.stderr)
    write_report("cudnn_fusion", args, device, rows, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
