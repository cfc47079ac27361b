"""bench/step_convs.py, gpu_quick's step-convs step: it records the conv calls the step really makes (below vmap and
autocast: the grouped, bias-less calls of the vectorised step, the flat buffer's weight views) and replays each
alone with operands of exactly the recorded shapes, strides and pointer alignment."""

from __future__ import annotations

import pytest
import torch

from ._suites import bench_script

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def step_convs():
    return bench_script("step_convs")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_it_records_each_conv_of_the_step_forward_and_backward(step_convs, precision):
    rows = step_convs.record_step("native", precision, size=16, net="tiny", iters=2, device=CPU)
    per_iteration = {op: sum(r["per_iteration"] for r in rows if r["op"] == op) for op in ("forward", "backward")}
    assert per_iteration == {"forward": 11, "backward": 11}  # 2 levels x (skip, down, conv, up, up1x1) + head
    dtype = "bfloat16" if precision == "bf16" else "float32"
    forwards = [r for r in rows if r["op"] == "forward"]
    assert {r["args"][1]["tensor"]["dtype"] for r in forwards} == {dtype}  # the weights as the conv gets them
    # the flat buffer's weight views start 16-byte aligned (dipfast.flat_parameters.SLOT_ALIGN_BYTES)
    assert min(r["args"][1]["tensor"]["align"] for r in forwards) >= 16


def test_the_packed_parameters_variant_records_unaligned_weights(step_convs):
    rows = step_convs.record_step("native-packed-parameters", "bf16", size=16, net="tiny", iters=1, device=CPU)
    assert min(r["args"][1]["tensor"]["align"] for r in rows if r["op"] == "forward") < 16


@pytest.mark.parametrize(
    ("shape", "stride", "dtype", "align"),
    [
        ((1, 5, 7, 9), (315, 63, 9, 1), "float32", 4),
        ((2, 3, 4, 4), (48, 1, 12, 3), "bfloat16", 2),
        ((4, 128, 1, 1), (128, 1, 1, 1), "bfloat16", 8),
        ((3, 2, 5, 5), (100, 50, 10, 2), "float32", 256),
    ],  # fmt: skip
)
def test_materialize_makes_a_tensor_of_exactly_the_description(step_convs, shape, stride, dtype, align):
    desc = {"shape": list(shape), "stride": list(stride), "offset": 0, "dtype": dtype, "align": align,
            "requires_grad": False}  # fmt: skip
    t = step_convs.materialize(desc, CPU, torch.Generator().manual_seed(0))
    got = step_convs.describe_tensor(t)
    assert {k: got[k] for k in ("shape", "stride", "dtype", "align")} == {
        k: desc[k] for k in ("shape", "stride", "dtype", "align")
    }
    assert t.float().abs().sum() > 0  # random values, not zeros


def test_a_replay_runs_the_recorded_call_alone(step_convs):
    rows = step_convs.record_step("native", "fp32", size=16, net="tiny", iters=1, device=CPU)
    backward = next(r for r in rows if r["op"] == "backward")
    result = step_convs.replay(backward, CPU, repeats=2)
    assert result["ms"] > 0 and result["timing"] == "wall" and result["kernels"] == [] == result["legacy"]
    text = step_convs.markdown({"settings": {"method": "native", "precision": "fp32", "net": "tiny", "size": 16},
                                "machine": "CPU", "rows": [{**backward, "replay": result}]})  # fmt: skip
    assert "| backward" in text and "0 of 1 distinct calls ran legacy kernels alone" in text


def test_the_legacy_pattern_names_cudnns_pre_hopper_kernels(step_convs):
    legacy = step_convs.LEGACY
    assert legacy.search("void dgrad_engine<__nv_bfloat16, 128, 6, 7, 3, 3, 5, false>(int, int")
    assert legacy.search("void precomputed_convolve_sgemm<__nv_bfloat16, 128, 6, 7, 3, 3, 5, 1, false>")
    assert not legacy.search("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64")
    assert not legacy.search("nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_NTT")
