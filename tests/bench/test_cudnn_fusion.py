"""bench/cudnn_fusion.py, gpu_quick's cudnn step: on a CPU its ATen rows run against the fp32 references the cuDNN
rows are checked with, and the cuDNN rows say why they did not run; the references themselves are checked here
against float64."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from ._suites import bench_script

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fusion():
    return bench_script("cudnn_fusion")


ROW = {"c_in": 6, "c_out": 5, "kernel": 3, "stride": 2, "h": 11, "w": 9}  # odd sizes, stride 2: the ambiguous shape


def test_the_references_are_the_conv_its_prologue_and_gradients_in_float64(fusion):
    o = fusion.Operands(ROW, CPU)
    x, w, dy, pre = (t.double() for t in (o.x, o.w, o.dy, o.pre))
    act = F.leaky_relu(x * o.scale.double() + o.bias.double(), fusion.SLOPE)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xg, wg, stride=2).backward(dy)
    actg = act.clone().requires_grad_()
    F.conv2d(actg, w, stride=2).backward(dy)
    ag = torch.autograd.grad(F.conv2d(act, wg, stride=2), wg, dy)[0]
    expected = {
        "y_ref": F.conv2d(x, w, stride=2),
        "y_sba_ref": F.conv2d(act, w, stride=2),
        "dx_ref": xg.grad,
        "dw_ref": wg.grad,
        "dw_sba_ref": ag,
        "dx_act_ref": xg.grad * torch.where(pre > 0, 1.0, fusion.SLOPE),
    }
    for name, value in expected.items():
        got = getattr(o, name)
        assert got.shape == value.shape, name
        assert fusion.relative_error(got.double(), value) < 1e-6, name  # fp32 against float64
    assert o.x.is_contiguous(memory_format=torch.channels_last) and o.x.dtype == torch.bfloat16


def test_relative_error_sees_a_layout_mistake(fusion):
    o = fusion.Operands(ROW, CPU)
    assert fusion.relative_error(o.y_ref.bfloat16(), o.y_ref) < 2**-8
    scrambled = o.y_ref.permute(0, 1, 3, 2).reshape(o.y_ref.shape)  # the values in another pixel order
    assert fusion.relative_error(scrambled, o.y_ref) > fusion.TOLERANCE


@pytest.mark.parametrize("name", ["aten-nchw", "aten-cl sba", "aten-cl bwd"])
def test_the_aten_probes_compute_what_their_references_say(fusion, name):
    o = fusion.Operands(ROW, CPU)
    run, checks = fusion.aten_probe(name, o)
    assert checks and all(fusion.relative_error(*pair) < 1e-2 for pair in checks.values())
    run()  # rerunnable: the timing loop's call


def test_forward_gflop_counts_one_pass_of_the_conv(fusion):
    rows = fusion.net_convs("default", 512)
    merge = rows[0]
    assert (merge["c_in"], merge["c_out"], merge["h"], merge["input_grad"]) == (132, 128, 514, True)
    assert fusion.forward_gflop(merge) == pytest.approx(2 * 132 * 128 * 9 * 512 * 512 / 1e9)  # 2 FLOP a MAC
    first = next(r for r in rows if not r["input_grad"])  # a conv reading z: no dgrad
    h_out = (first["h"] - first["kernel"]) // first["stride"] + 1
    w_out = (first["w"] - first["kernel"]) // first["stride"] + 1
    macs = first["c_in"] * first["c_out"] * first["kernel"] ** 2 * h_out * w_out
    assert fusion.forward_gflop(first) == pytest.approx(2 * macs / 1e9)


def test_without_the_cudnn_module_the_reason_names_the_package(fusion, monkeypatch):
    monkeypatch.setitem(sys.modules, "cudnn", None)  # import cudnn raises ImportError
    reason = fusion.cudnn_state(torch.device("cuda"))
    assert isinstance(reason, str) and "pip install nvidia-cudnn-frontend" in reason
    assert fusion.probe("fprop", None, CPU, 1, 1.0, reason) == {"supported": False, "reason": reason}


def test_on_a_cpu_it_writes_the_aten_rows_and_why_the_cudnn_rows_did_not_run(fusion, tmp_path):
    assert fusion.main(["--device", "cpu", "--net", "tiny", "--size", "16", "--top", "2", "--repeats", "1",
                        "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "cudnn_fusion.json").read_text())
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert set(row["probes"]) == set(fusion.PROBES)
        for name, p in row["probes"].items():
            if name.startswith("aten"):
                assert p["supported"] and p["ok"] and p["ms"] > 0, name
            else:
                assert p == {"supported": False, "reason": "the cuDNN graph API needs CUDA"}, name
    assert "not run: the cuDNN graph API needs CUDA" in (tmp_path / "cudnn_fusion.md").read_text()
