"""bench/step_launches.py: what one iteration of the native CUDA step launches, counted on the CPU (PaddedBlocks
under Triton's interpreter, nothing run, the CUDA graph's branches)."""

from __future__ import annotations

import json

import pytest

from dipfast.kernels.batch_norm_act import _HAS_TRITON, _INTERPRET

from ._suites import bench_script

pytestmark = pytest.mark.skipif(
    not (_HAS_TRITON and _INTERPRET), reason="records launches in Triton's interpreter (a CPU session's build)"
)


def test_one_iteration_of_the_default_net_launches_no_zero_filled_gradient(tmp_path):
    """Six Triton launches per BatchNorm (30), the level inputs' pads and the upsamples; one conv and one conv backward
    per conv (26). No fill but the backward's seed and a zero gradient per flat parameter buffer: the conv biases
    a BatchNorm cancels each had one (25), the output's crop and its per-network slice a zero-filled copy each. The
    rules after the backward in three launches (dipfast.kernels.fused_rules): some 48 ATen ops before, Adam's two
    left (backtracking's four masked copies of the parameters are one launch now), none of the metrics' float64
    casts."""
    tool = bench_script("step_launches")
    assert tool.main(["--size", "64", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step_launches.json").read_text())
    triton, aten = report["triton"], report["aten"]
    forward = ("_batch_norm_stats_kernel", "_chan_finalize_kernel", "_batch_norm_act_pad_kernel")
    backward = ("_batch_norm_act_bwd_sums_kernel", "_column_sums_kernel", "_batch_norm_act_bwd_apply_kernel")
    batch_norm = forward + backward
    assert {name: triton[name] for name in batch_norm} == dict.fromkeys(batch_norm, 30)
    assert triton["_upsample_kernel"] == triton["_transpose_kernel"] == triton["_reflection_pad_kernel"] == 5
    assert triton["_rules_pixels_kernel"] == triton["_rules_scalars_kernel"] == triton["_copy_rows_kernel"] == 1
    assert report["triton_launches"] == sum(triton.values()) <= 202  # measured 202
    assert aten["convolution"] == aten["convolution_backward"] == 26
    assert aten["zeros"] <= 2 and report["fills"] <= 3  # a tail per buffer (fp32, bf16); the backward's ones_like
    assert not {"slice_backward", "select_backward"} & set(aten)
    rules = {"log10", "reciprocal", "remainder", "index_copy_", "bitwise_and", "bitwise_not", "eq", "gt", "pow", "mean"}
    assert not rules & set(aten), rules & set(aten)
    assert "where" not in aten
    # the bf16 weights' cast, the output's to fp32, and their backward's: no float64 copy, and no cast of the net's
    # input by each of the two convs that read it (it is fed in bf16)
    assert aten["_to_copy"] <= 4
    assert "stack" not in aten  # one network: its output and loss are views, not stacks of one
    # measured 75 (161 before the fills went, 127 before the rules were fused, 79 before the input came in bf16)
    assert report["aten_ops"] == sum(aten.values()) <= 75
    md = (tmp_path / "step_launches.md").read_text()
    assert "| _batch_norm_stats_kernel | 30 |" in md and "| convolution_backward | 26 |" in md


def test_with_early_stopping_the_criterion_adds_two_launches_and_no_aten_op(tmp_path):
    """stop='auto' (denoising's default): ES-WMV's window, criterion and kept output in two more Triton launches
    (some 60 ATen ops before); the freeze of stopped networks (parameters and Adam's moments of the two flat
    buffers) one copy_rows launch before the optimizer step and one after (twelve masked copies before)."""
    tool = bench_script("step_launches")
    assert tool.main(["--size", "64", "--stop", "auto", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step_launches.json").read_text())
    triton, aten = report["triton"], report["aten"]
    assert report["settings"]["stop"] == "auto"
    fused = ("_rules_pixels_kernel", "_early_stop_scalars_kernel", "_early_stop_outputs_kernel",
             "_rules_scalars_kernel")  # fmt: skip
    assert {name: triton[name] for name in fused} == dict.fromkeys(fused, 1)
    assert triton["_copy_rows_kernel"] == 3  # the freeze's save and restore, backtracking's
    criterion = {"avg_pool2d", "index_select", "index_copy_", "logical_or_", "clamp_min", "div", "pow", "mean", "lt"}
    assert not criterion & set(aten), criterion & set(aten)
    assert "where" not in aten  # the freeze's 12 and backtracking's 4 before
    assert report["aten_ops"] == sum(aten.values()) <= 75  # measured 75 (203 with the criterion's torch ops)
    assert "stop=auto" in (tmp_path / "step_launches.md").read_text()


@pytest.mark.parametrize("variant", ["native", "native-pdl"])
def test_every_launch_of_the_step_is_a_dependent_launch_where_the_plan_says(monkeypatch, variant):
    """native-pdl: every Triton launch of the native CUDA step (the forward's, the backward's, which autograd's device
    thread makes on CUDA, and the rules' after it, early stopping's included) passes the kernels' PDL and Triton's
    launch_pdl; native: none does. The GPU's support is faked: the launches are recorded, not run."""
    from dipfast import backends
    from dipfast.bench import runs
    from dipfast.kernels import dependent_launch

    tool = bench_script("step_launches")
    monkeypatch.setattr(dependent_launch, "supported", lambda device: True)
    launches = []
    record = lambda jit, args, kwargs: launches.append((jit.fn.__name__, kwargs["PDL"], kwargs["launch_pdl"]))  # noqa: E731
    fields = runs.FIELD_VARIANTS[variant][1](backends.BACKEND_TABLE["native"]) if variant != "native" else {}
    with backends.variant("native", **fields), tool.graph_safe_step():  # on the CPU as on CUDA: native_step_launches
        tool.native_step_launches(64, "bf16", "default", 2, record, early_stop=tool.census_rule("auto"))
    kernels = {name for name, *_ in launches}
    assert {"_batch_norm_stats_kernel", "_batch_norm_act_bwd_apply_kernel", "_column_sums_kernel", "_transpose_kernel",
            "_reflection_fold_kernel", "_rules_pixels_kernel", "_early_stop_scalars_kernel",
            "_early_stop_outputs_kernel", "_rules_scalars_kernel", "_copy_rows_kernel"} <= kernels  # fmt: skip
    on = variant == "native-pdl"
    assert {(pdl, launch) for _, pdl, launch in launches} == {(on, on)}
    assert not dependent_launch._enabled  # off again after the step


def _census(tmp_path, *argv) -> dict:
    tool = bench_script("step_launches")
    assert tool.main(["--size", "64", *argv, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "step_launches.json").read_text())


def test_with_the_finalize_folded_each_batch_norm_launches_four_kernels(tmp_path):
    """native-folded-finalize: each BatchNorm's statistics and gradient sums finalize in their last program, so neither
    finalize kernel launches: 60 launches an iteration fewer, the ATen ops as native's."""
    from dipfast.kernels import channel_sums

    report = _census(tmp_path, "--method", "native-folded-finalize")
    triton = report["triton"]
    assert report["settings"]["method"] == "native-folded-finalize"
    assert "_chan_finalize_kernel" not in triton and "_column_sums_kernel" not in triton
    assert triton["_batch_norm_stats_kernel"] == triton["_batch_norm_act_bwd_sums_kernel"] == 30
    assert report["triton_launches"] <= 202 - 60 and report["aten_ops"] <= 75  # measured 142 and 75
    assert not channel_sums._folded  # off again after the step
    assert "native-folded-finalize, 1 image(s)" in (tmp_path / "step_launches.md").read_text()


def test_a_batch_launches_once_a_layer_vmapped_and_once_a_network_one_after_another(tmp_path):
    """Two images in one step, as CUDA runs them (vmapped: one grouped conv and one BatchNorm launch set a layer, a
    copy of each of the 86 weights and BatchNorm parameters the batching rules reshape) and as native-per-network
    runs them (each network's launches in turn: twice the convs and the Triton kernels, no copies)."""
    vmapped = _census(tmp_path / "vmapped", "--images", "2")
    each = _census(tmp_path / "each", "--images", "2", "--method", "native-per-network")
    assert vmapped["aten"]["convolution"] == vmapped["aten"]["convolution_backward"] == 26
    assert each["aten"]["convolution"] == each["aten"]["convolution_backward"] == 52
    assert vmapped["aten"]["clone"] == 86 and "clone" not in each["aten"]
    assert vmapped["triton"]["_batch_norm_stats_kernel"] == 30 and each["triton"]["_batch_norm_stats_kernel"] == 60
    assert vmapped["triton_launches"] <= 202 < 2 * 202 - 10 <= each["triton_launches"]  # the rules once a step
