"""bench/sm90_codegen.py: the triton backend's GEMM kernels compiled for Hopper here, with no GPU. In channels_last
(the backend's bf16 layout on CUDA) every operand tile of the conv_bn_lrelu kernels is loaded in vectors by
asynchronous copies and nothing spills; NCHW still issues one-element loads (the reflection index hides its rows'
contiguity), which is what the layout change was for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dipfast.kernels.conv_bn_lrelu import _HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]
CONV_KERNELS = ("_conv_bn_lrelu_fwd_kernel", "_conv_wgrad_kernel", "_conv_dgrad_kernel")

pytestmark = pytest.mark.skipif(not _HAS_TRITON, reason="compiles with Triton's sm_90 backend")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[tuple[str, str, str], dict]:
    out = tmp_path_factory.mktemp("codegen")
    # its own process: it records the launches under the interpreter and compiles them in another
    done = subprocess.run([sys.executable, str(ROOT / "bench/sm90_codegen.py"), "--size", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "sm90_codegen.json").read_text())
    lines = (out / "sm90_codegen.md").read_text().splitlines()
    assert sum(line.startswith(("| conv |", "| conv-s2 |", "| merge |")) for line in lines) == len(report["rows"])
    return {(r["op"], r["kernel"], r["layout"]): r for r in report["rows"]}


def test_every_gemm_kernel_is_compiled_in_both_layouts(rows):
    conv = {k for op, k, _ in rows if op == "conv"}
    merge = {k for op, k, _ in rows if op == "merge"}
    assert conv == {k for op, k, _ in rows if op == "conv-s2"} == set(CONV_KERNELS)
    assert merge == {"_merge_conv_fwd_kernel", "_merge_wgrad_kernel", "_conv_dgrad_kernel"}
    assert {layout for *_, layout in rows} == {"nchw", "channels_last"}
    for row in rows.values():
        assert row["wgmma"] > 0 and row["registers"] > 0, row  # Hopper's tensor-core instructions, and a real count
        assert row["tiles"]["BLOCK_M"] >= 64, row  # the GPU's tiles, not the interpreter's (64 x 16 x 16)


@pytest.mark.parametrize("op", ("conv", "conv-s2"))
@pytest.mark.parametrize("kernel", CONV_KERNELS)
def test_channels_last_conv_kernels_load_vectors_through_the_pipeline_and_do_not_spill(rows, op, kernel):
    """Stride 2 too: its dgrad loops over one phase's taps per program (a runtime trip count, a phase-strided
    store), which must not cost the vectors or the pipeline."""
    cl, nchw = rows[op, kernel, "channels_last"], rows[op, kernel, "nchw"]
    assert cl["scalar_loads"] == 0 and cl["cp_async"] > 0 and cl["spill_bytes"] == 0, cl
    assert nchw["scalar_loads"] > 0, nchw  # the activations' loads, one element each: the tool sees the difference


@pytest.mark.parametrize("kernel", ("_merge_conv_fwd_kernel", "_merge_wgrad_kernel"))
def test_channels_last_merge_kernels_pipeline_the_deeper_branch_and_do_not_spill(rows, kernel):
    """The merge's K chunks each read one source: the deeper branch's 128 channels come through the pipeline; the
    skip's 4 channels (8 bytes a pixel), gathered as flattened (tap, channel) columns, stay one-element loads."""
    cl = rows["merge", kernel, "channels_last"]
    assert cl["cp_async"] > 0 and cl["spill_bytes"] == 0, cl


def test_the_merge_input_gradient_compiles_as_the_conv_s_dgrad(rows):
    """conv_bn_lrelu's dgrad on the merge's 4 + 128 channels, one launch per source: the weight's rows padded to 16
    channels (weight_rows) and d(merged)'s channels too (padded_gradient), the group offset 0 for one group, so its
    deeper launch loads and stores in vectors like the plain conv's dgrad (before: 32 one-element loads, then 212
    bytes spilled on the 132-channel stores)."""
    merge = rows["merge", "_conv_dgrad_kernel", "channels_last"]
    assert merge["scalar_loads"] == 0 and merge["cp_async"] > 0 and merge["spill_bytes"] == 0, merge


@pytest.mark.parametrize("op", ("conv", "conv-s2", "merge"))
def test_channels_last_dgrad_leaves_room_for_two_programs_an_sm(rows, op):
    """At most 128 registers a thread: two programs of 8 warps fit an SM's 65536. The conv's dgrad stores each pixel
    off the frame straight into dx, the rest into the padded gradient, through one pointer chosen per pixel: the
    two masked stores that did it first took 255 registers in bf16 and 162 in fp32. The merge's dgrad stores every
    pixel into its padded gradient."""
    row = rows[op, "_conv_dgrad_kernel", "channels_last"]
    assert row["registers"] * 32 * row["options"]["num_warps"] * 2 <= 65536, row
