"""The floor model (dipfast/bench/floor.py) and `dipfast bench floor`: op list, FLOPs, bytes, floor times, command.

Everything runs on the meta device: a trace of the default net costs a second or two, no matter the size.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import TINY_NET
from torch.utils.flop_counter import FlopCounterMode

from dipfast import nets
from dipfast.bench import floor, kernel_groups, profile
from dipfast.bench.cli import main
from dipfast.bench.report import profile_markdown, summary
from dipfast.nets.layers import PadConv

DEFAULT = nets.SkipSpec()
ACTIVATION_GROUPS = ("batch_norm", "activation", "upsample", "concat")  # tensors of the net's maps alone


def _ops(spec=DEFAULT, size=64, precision="fp32", depth=32):
    return floor.iteration_ops(spec, size=size, precision=precision, input_depth=depth)[0]


def _flop_counter(spec, depth: int, size: int) -> dict[str, int]:
    """torch.utils.flop_counter's count of one forward + MSE + backward on the meta device, by ATen op."""
    with torch.device("meta"):
        net = nets.build(spec, depth, 3)
    z = torch.empty(1, depth, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = net(z)
        F.mse_loss(out, torch.empty_like(out)).backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def _status(argv: list[str]) -> int:
    """The command's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _sum(ops, *, group=None, op=None, field="flops"):
    return sum(getattr(o, field) for o in ops if (group is None or o.group == group) and (op is None or o.op == op))


# the total's bound over flop_counter's: the default net's convs are 99.3 % of its FLOPs at 64 px; the tiny
# net's 8-channel convs are so small that the per-element work adds 15 % (17 px)
@pytest.mark.parametrize(
    "spec, depth, size, total_bound",
    [(DEFAULT, 32, 64, 1.02), (TINY_NET, 4, 17, 1.2)],
    ids=["default-64", "tiny-odd-17"],
)
def test_flops_match_torch_flop_counter(spec, depth, size, total_bound):
    """The convs' FLOPs equal flop_counter's exactly, forward and backward apart (both count 2 per multiply-add
    of the same shapes; the backward also tells which input gradients autograd skips, e.g. the first conv's on z).
    The total is above it by the model's few FLOPs per element of BatchNorm, activations, pad, upsample, loss,
    Adam and EMA, which flop_counter does not count (it counts convs and matmuls)."""
    counted = _flop_counter(spec, depth, size)
    ops = _ops(spec, size, depth=depth)
    assert _sum(ops, op="forward") == counted["aten.convolution"]
    backward = sum(_sum(ops, group="conv", op=op) for op in ("input grad", "weight grad"))
    assert backward == counted["aten.convolution_backward"]
    total = sum(o.flops for o in ops)
    assert 1.0 < total / sum(counted.values()) <= total_bound


def test_the_largest_conv_is_the_level0_merge():
    """132 -> 128 channels, 3x3, at full size: 2 * 128 * 132 * 9 * H * W FLOPs each for forward, dx and dW."""
    size = 64
    ops = [o for o in _ops(size=size) if o.name == "L0.up.conv.conv2d"]
    assert {o.op for o in ops} == {"forward", "input grad", "weight grad", "bias grad"}
    for o in ops:
        if o.op != "bias grad":
            assert o.flops == 2 * 128 * 132 * 9 * size * size
            assert o.shape == f"132x{size + 2}x{size + 2} -> 128x{size}x{size}, 3x3"
    assert max(o.flops for o in _ops(size=size)) == 2 * 128 * 132 * 9 * size * size


def test_ops_follow_the_module_tree():
    """One forward row per Conv2d and, but for the two convs that read z (it needs no gradient), one input
    gradient; BatchNorm statistics, apply and backward per BatchNorm2d; a pad (and its backward) only where a
    conv's kernel is wider than 1; nothing for a 1x1 conv's zero-width pad."""
    ops = _ops(size=64)
    with torch.device("meta"):
        net = nets.build(DEFAULT, 32, 3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    padded = [m for m in net.modules() if isinstance(m, PadConv) and m.reflection_pad > 0]
    count = {(g, op): sum(o.group == g and o.op == op for o in ops) for g, op in {(o.group, o.op) for o in ops}}
    assert count["conv", "forward"] == count["conv", "weight grad"] == len(convs) == 26
    assert count["conv", "input grad"] == len(convs) - 2  # level 0's skip and down convs read z
    assert count["batch_norm", "statistics"] == count["batch_norm", "apply"] == count["batch_norm", "backward"]
    assert count["batch_norm", "backward"] == len(bns) == 30
    assert count["pad", "reflection_pad2d"] == len(padded) == 15
    assert count["pad", "reflection_pad2d_backward"] == len(padded) - 1  # the pad of z needs no gradient
    assert count["adam", "adam"] == len(list(net.parameters()))
    assert count["elementwise", "gradient sum"] == 4  # levels 1-4 feed their skip and down convs; level 0 is z


def test_the_op_list_changes_with_the_net():
    """No skip branches: no concat and no skip convs; no 1x1 up: fewer convs; other nets trace too."""
    no_skip = nets.SkipSpec(channels_down=(8, 8), channels_up=(8, 8), channels_skip=(0, 0))
    assert not [o for o in _ops(no_skip, 32, depth=4) if o.group == "concat"]
    with_1x1, without = (
        _ops(TINY_NET, 32, depth=4),
        _ops(nets.SkipSpec(**{**vars(TINY_NET), "need1x1_up": False}), 32, depth=4),
    )
    assert _sum(with_1x1, op="forward") > _sum(without, op="forward")
    assert sum(o.op == "forward" for o in with_1x1) - sum(o.op == "forward" for o in without) == 2
    for spec in (nets.UNetSpec(), nets.ResNetSpec(num_blocks=2)):
        ops = _ops(spec, 32, depth=4)
        assert _sum(ops, group="conv") > 0 and all(o.bytes >= 0 for o in ops)


def test_bytes_and_floor_scale_with_batch_size_and_precision():
    base = floor.floor_report(TINY_NET, size=32, precision="fp32", gpu="h100", input_depth=4)
    triple = floor.floor_report(TINY_NET, size=32, batch=3, precision="fp32", gpu="h100", input_depth=4)
    for key in ("total_flops", "total_bytes", "floor_ms"):
        assert triple[key] == pytest.approx(3 * base[key], rel=1e-12)  # N networks: N times one, no overhead modelled

    fp32_64, fp32_128 = _ops(size=64), _ops(size=128)
    assert _sum(fp32_128, group="conv", op="forward") == 4 * _sum(fp32_64, group="conv", op="forward")
    for g in ACTIVATION_GROUPS:  # maps scale with H * W; the parameters (Adam) do not
        assert _sum(fp32_128, group=g, field="bytes") == 4 * _sum(fp32_64, group=g, field="bytes")
    assert _sum(fp32_128, group="adam", field="bytes") == _sum(fp32_64, group="adam", field="bytes")
    assert _sum(fp32_64, group="adam", field="bytes") == 28 * 2217831  # p, g, m, v read; p, m, v written; fp32

    bf16 = _ops(size=64, precision="bf16")
    for g in (*ACTIVATION_GROUPS, "pad"):  # bf16 maps: half the bytes of fp32's
        assert _sum(bf16, group=g, field="bytes") == _sum(fp32_64, group=g, field="bytes") / 2
    assert _sum(bf16, group="adam", field="bytes") == _sum(fp32_64, group="adam", field="bytes")  # fp32 master
    assert _sum(bf16, group="conv") == _sum(fp32_64, group="conv")

    h100, h200 = floor.GPUS["h100"], floor.GPUS["h200"]
    floors = {p: sum(o.floor_s(h100, p) for o in (bf16 if p == "bf16" else fp32_64)) for p in floor.PRECISIONS}
    assert floors["bf16"] < floors["tf32"] < floors["fp32"]
    memory_bound = [o for o in bf16 if not o.matmul]  # the same peak on both: only the bandwidth differs
    for o in memory_bound:
        assert o.floor_s(h200, "bf16") == pytest.approx(o.floor_s(h100, "bf16") * 3.35 / 4.8, rel=1e-12)
    assert sum(o.floor_s(h200, "bf16") for o in bf16) < floors["bf16"]


def test_a_floor_is_the_slower_of_compute_and_memory():
    gpu = floor.GPUS["h100"]
    conv = floor.Op("conv", "x", "forward", "", flops=1e12, bytes=1e6, matmul=True)
    copy = floor.Op("cast", "x", "copy", "", flops=1e6, bytes=3.35e9)
    assert conv.floor_s(gpu, "bf16") == pytest.approx(1 / 989)
    assert conv.floor_s(gpu, "tf32") == pytest.approx(1 / 494.5)
    assert conv.floor_s(gpu, "fp32") == pytest.approx(1 / 67)  # IEEE fp32: no tensor cores
    assert copy.floor_s(gpu, "bf16") == copy.floor_s(gpu, "fp32") == pytest.approx(1e-3)
    for card in floor.GPUS.values():
        assert card.source and card.bf16_tflops == 2 * card.tf32_tflops and card.bandwidth_tbs > 1


def test_an_unfitting_size_runs_at_the_working_size():
    """A side the net cannot take runs at the next one it can (as restore() does); loss and EMA at the image's."""
    ops, hw = floor.iteration_ops(DEFAULT, size=20, precision="fp32")
    assert hw == nets.working_size(DEFAULT, 32, 20, 20) and hw != (20, 20)
    ema = next(o for o in ops if o.op == "ema update")
    assert ema.shape == "3x20x20"


def test_floor_command_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["floor", "--size", "64", "--net", "tiny", "--precision", "tf32", "--gpu", "a100", "--batch", "2"]
    assert main([*args, "--rows", "5", "--out", str(out)]) == 0
    rep = json.loads((out / "floor.json").read_text())
    assert rep["suite"] == "floor" and rep["schema"] == "dipfast-bench/1" and rep["machine"]["commit"] is not None
    assert rep["settings"] == {
        **rep["settings"],
        "size": 64,
        "batch": 2,
        "precision": "tf32",
        "gpu": "a100",
        "net": "tiny",
    }
    rows = rep["ops"]
    assert rep["total_flops"] == pytest.approx(sum(r["flops"] for r in rows), rel=1e-12)
    assert rep["total_bytes"] == pytest.approx(sum(r["bytes"] for r in rows), rel=1e-12)
    assert rep["floor_ms"] == pytest.approx(sum(r["floor_ms"] for r in rows), rel=1e-12)
    assert rep["floor_ms"] == pytest.approx(sum(g["floor_ms"] for g in rep["groups"].values()), rel=1e-12)
    assert max(rep["compute_ms"], rep["memory_ms"]) <= rep["floor_ms"] * (1 + 1e-12)
    assert rep["floor_ms"] <= rep["compute_ms"] + rep["memory_ms"]
    assert set(rep["groups"]) <= set(floor.GROUPS) and {"conv", "adam", "ema"} <= set(rep["groups"])
    one = floor.floor_report(TINY_NET, size=64, precision="tf32", gpu="a100", input_depth=4)
    assert rep["total_flops"] == pytest.approx(2 * one["total_flops"], rel=1e-12)
    markdown = (out / "floor.md").read_text()
    assert "a model, not a measurement" in markdown and "NVIDIA A100" in markdown
    assert markdown.count("| conv |") >= 1 and "The 5 ops with the highest floor" in markdown
    assert "floor.json" in capsys.readouterr().out
    assert "floor (a model): net tiny 64px b2 tf32 on a100" in summary(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "v100"], "unknown gpu 'v100'; valid: ['h100', 'h200', 'a100']"),
        (["--precision", "fp16"], "unknown precision 'fp16'"),
        (["--net", "huge"], "unknown net 'huge'"),
        (["--size", "0"], "--size: expected a positive integer"),
        (["--batch", "-1"], "--batch: expected a positive integer"),
    ],
)
def test_floor_command_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert _status(["floor", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_floor_command_refuses_a_file_as_out(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["floor", "--net", "tiny", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_library_calls_check_their_arguments():
    for call in (
        lambda: floor.iteration_ops(size=0, precision="bf16"),
        lambda: floor.iteration_ops(size=64.0, precision="bf16"),
        lambda: floor.floor_report(size=64, precision="bf16", gpu="h100", batch=0),
        lambda: floor.floor_report(size=64, precision="int8", gpu="h100"),
    ):
        with pytest.raises(ValueError):
            call()
    assert floor.gpu_of_device_name("NVIDIA H100 80GB HBM3") == "h100"
    assert floor.gpu_of_device_name("NVIDIA H200") == "h200"
    assert floor.gpu_of_device_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert floor.gpu_of_device_name("NVIDIA GeForce RTX 4090") is None


# ---------------------------------------------------------------- the profile's floor ratios


def test_profile_floor_is_the_floor_models_folded_into_kernel_groups():
    folded = profile.floor_by_group("tiny", 32, "bf16", "h100")
    rep = floor.floor_report(TINY_NET, size=32, precision="bf16", gpu="h100", input_depth=4)
    assert sum(folded.values()) == pytest.approx(rep["floor_ms"], rel=1e-12)
    assert set(folded) <= set(kernel_groups.PROFILE_GROUPS) and "layout" not in folded
    assert folded["copy"] == pytest.approx(rep["groups"]["cast"]["floor_ms"])
    ema_like = sum(rep["groups"][g]["floor_ms"] for g in ("elementwise", "input_noise", "ema", "backtracking"))
    assert folded["elementwise"] == pytest.approx(ema_like)


def test_profile_rows_put_synthetic_kernels_beside_the_floor_of_the_named_gpu():
    kernels = [("sm90_xmma_fprop_implicit_gemm_bf16_cudnn", 0.5), ("_bn_lrelu_bwd_kernel", 0.25),
               ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>", 0.125)]  # fmt: skip
    gpu, rows = profile.floor_ratio_rows(kernels, "NVIDIA H200", net="tiny", size=32, precision="bf16")
    by = {r["group"]: r for r in rows}
    folded = profile.floor_by_group("tiny", 32, "bf16", "h200")
    assert gpu == "h200" and by["conv"]["floor_ms"] == folded["conv"]
    assert by["conv"]["ratio"] == pytest.approx(0.5 / folded["conv"])
    assert by["batch_norm"]["ms_per_iter"] == 0.25 and by["layout"]["floor_ms"] is None
    assert by["pad"]["ms_per_iter"] == 0 and by["pad"]["floor_ms"] == folded["pad"]  # a group no kernel ran
    assert by["total"]["ms_per_iter"] == 0.875 and by["total"]["floor_ms"] == pytest.approx(sum(folded.values()))
    gpu, rows = profile.floor_ratio_rows(kernels, "NVIDIA GeForce RTX 4090", net="tiny", size=32, precision="bf16")
    assert gpu is None and all(r["floor_ms"] is None and r["ratio"] is None for r in rows)


def test_profile_markdown_prints_floor_ratios_only_when_measured_on_cuda():
    ops = [{"name": "k", "calls_per_iter": 1.0, "ms_per_iter": 1.0, "cpu_ms_per_iter": 0.0, "share_pct": 100.0}]
    entry = {"method": "native", "precision": "bf16", "status": "ok", "reason": None, "ops": ops,
             "time_kind": "CUDA kernel self time", "total_ms_per_iter": 1.0, "wall_ms_per_iter": 1.2}  # fmt: skip
    report = {"machine": {"device": "cuda:0", "gpu": "NVIDIA H100", "cpu": "x", "torch": "2"}, "created": "now",
              "settings": {"net": "tiny", "size": 32, "batch": 1, "iters": 2, "warmup": 2}}  # fmt: skip
    cpu = profile_markdown({**report, "entries": [entry]})
    assert "floor" not in cpu
    groups = kernel_groups.floor_ratios({"conv": 0.5, "layout": 0.25}, {"conv": 0.125, "pad": 0.125})
    cuda = profile_markdown({**report, "entries": [{**entry, "floor_gpu": "h100", "groups": groups}]})
    assert "against the floor model on h100" in cuda
    assert "| conv | 0.500 | 0.125 | 4.0x |" in cuda and "| layout | 0.250 | - | - |" in cuda
    assert "| total | 0.750 | 0.250 | 3.0x |" in cuda and "| pad | 0.000 | 0.125 | 0.0x |" in cuda
    assert "kernel launches" not in cuda  # a profile from before the launches were counted
    # the launches: in all and launch-bound in the sentence, per group in the table
    launches = kernel_groups.launch_summary([("sm90_xmma_fprop", 2.0, 0.5), ("nchwToNhwcKernel", 60.0, 0.12)])
    counted = [{**g, "launches_per_iter": launches["launches_by_group"].get(g["group"], 0.0)} for g in groups]
    counted[-1]["launches_per_iter"] = launches["launches_per_iter"]
    entry = {**entry, "floor_gpu": "h100", "groups": counted, **launches}
    cuda = profile_markdown({**report, "entries": [entry]})
    assert "1.00 ms per iteration in all, 62 kernel launches (60 of them averaging under 5 us, 0.12 ms)" in cuda
    assert "| conv | 0.500 | 0.125 | 4.0x | 2 |" in cuda and "| layout | 0.250 | - | - | 60 |" in cuda
    assert "| total | 0.750 | 0.250 | 3.0x | 62 |" in cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: kernel names and their times need a GPU")
def test_profile_on_cuda_puts_the_kernels_in_groups_beside_their_floor(tmp_path):
    args = ["--net", "tiny", "--size", "32", "--quiet", "--device", "cuda", "--iters", "2", "--warmup", "2"]
    assert main(["profile", *args, "--backend", "native", "--precision", "bf16", "--out", str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "profile.json").read_text())["entries"][0]
    groups = {g["group"]: g for g in entry["groups"]}
    assert groups["conv"]["ms_per_iter"] > 0 and groups["batch_norm"]["ms_per_iter"] > 0
    assert math.isclose(groups["total"]["ms_per_iter"], entry["total_ms_per_iter"], rel_tol=1e-6)
    assert groups["total"]["launches_per_iter"] == entry["launches_per_iter"] >= entry["short_launches_per_iter"] > 0
    if entry["floor_gpu"] is not None:
        assert groups["conv"]["ratio"] > 1  # nothing beats the hardware's peak
