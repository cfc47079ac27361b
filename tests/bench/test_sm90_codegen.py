"""bench/sm90_codegen.py: dipfast's Triton kernels compiled for Hopper here, with no GPU. The triton backend's GEMM
kernels: in channels_last (the backend's bf16 layout on CUDA) every operand tile of the conv_bn_lrelu kernels is
loaded in vectors by asynchronous copies and nothing spills; NCHW still issues one-element loads (the reflection
index hides its rows' contiguity), which is what the layout change was for. --step, the native CUDA step's kernels:
the BatchNorm passes move aligned planes in 16-byte vectors, with one thread layout per tile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dipfast.kernels.batch_norm_act import _INTERPRET
from dipfast.kernels.conv_bn_lrelu import _HAS_TRITON

from ._suites import bench_script

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


def test_no_gemm_kernel_serializes_its_wgmma(rows):
    """ptxas's C7515: each wgmma waited for before the next, the tensor cores idle through the loads. It took the
    merge forward in both layouts (and under triton 3.6 too) while the skip's dots ran before the deeper branch's
    pipelined loop on the same accumulator."""
    serialized = [key for key, row in rows.items() if row["wgmma_serialized"]]
    assert not serialized, serialized


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


# ---- --step: every Triton kernel of the native CUDA step ---------------------------------------------------------

BATCH_NORM = ("_batch_norm_stats_kernel", "_batch_norm_act_pad_kernel", "_batch_norm_act_bwd_sums_kernel",
              "_batch_norm_act_bwd_apply_kernel")  # fmt: skip


@pytest.fixture(scope="module")
def step_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("step-codegen")
    # 64 px: levels of 64 to 2 pixels, so planes whose rows are 16-aligned and planes whose rows are not
    done = subprocess.run([sys.executable, str(ROOT / "bench/sm90_codegen.py"), "--step", "--size", "64", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "sm90_step_codegen.json").read_text())
    lines = (out / "sm90_step_codegen.md").read_text().splitlines()
    assert sum(line.startswith("| _") for line in lines) == len(report["rows"])
    return report["rows"]


def _aligned(row: dict) -> bool:
    """Every pointer 16-byte aligned and every int Triton specializes a multiple of 16 (or 1)."""
    return all(
        a["aligned"] if a["type"].startswith("*") else a.get("one") or a.get("div16") or not a.get("specialized")
        for a in row["args"].values()
    )


def test_step_records_every_triton_kernel_of_the_native_cuda_step(step_rows):
    kernels = {r["kernel"] for r in step_rows}
    assert kernels == {*BATCH_NORM, "_chan_finalize_kernel", "_column_sums_kernel", "_upsample_kernel",
                       "_transpose_kernel", "_reflection_pad_kernel", "_reflection_fold_kernel",
                       "_rules_pixels_kernel", "_rules_scalars_kernel", "_copy_rows_kernel"}  # fmt: skip
    for row in step_rows:
        assert row["launches"] >= 1 and row["registers"] > 0 and row["load_bytes"], row
    # the default net's 30 BatchNorms, each one statistics pass forward and one gradient-sums pass backward
    for kernel in ("_batch_norm_stats_kernel", "_batch_norm_act_bwd_sums_kernel"):
        assert sum(r["launches"] for r in step_rows if r["kernel"] == kernel) == 30


@pytest.mark.parametrize("kernel", BATCH_NORM)
def test_batch_norm_kernels_move_an_aligned_unpadded_plane_in_16_byte_vectors(step_rows, kernel):
    """An NCHW plane whose rows are 16-aligned, read (and, unpadded, written) in vectors of 8 bf16. Before, the
    width was left unspecialised, so Triton could not prove a tile's mask uniform over 8 columns: every element
    was its own 2-byte load; and the forward's reflected index read the tile one element a thread across channels,
    then moved it through shared memory to store it."""
    rows = [r for r in step_rows if r["kernel"] == kernel and r["constexprs"].get("PAD", 0) == 0 and _aligned(r)]
    assert rows, kernel
    for row in rows:
        assert "2" not in row["load_bytes"] and row["load_bytes"].get("16", 0) >= 1, row
        if kernel in ("_batch_norm_act_pad_kernel", "_batch_norm_act_bwd_apply_kernel"):
            assert set(row["store_bytes"]) == {"16"}, row


def test_batch_norm_kernels_keep_one_thread_layout_for_their_tiles(step_rows):
    """Padded too: the pad columns are (BLOCK_C,) loads by the tiles that hold them, not tile-wide gathers in a
    layout of their own (before: one conversion in the forward, five and six in the backward's two passes)."""
    rows = [r for r in step_rows if r["kernel"] in BATCH_NORM]
    assert any(r["constexprs"]["PAD"] == 1 for r in rows if "PAD" in r["constexprs"])
    assert all(r["tile_conversions"] == 0 for r in rows), [r for r in rows if r["tile_conversions"]]


def test_the_tool_counts_one_element_accesses_where_alignment_is_not_provable(step_rows):
    """A padded row starts one column off its source's alignment, and a level 8 pixels wide has unaligned rows:
    both still move 2-byte elements, and the counts say so."""
    padded = [r for r in step_rows if r["kernel"] == "_batch_norm_act_pad_kernel" and r["constexprs"]["PAD"] == 1]
    assert padded and all(r["store_bytes"].get("2", 0) > 0 for r in padded)
    narrow = [r for r in step_rows if r["kernel"] == "_batch_norm_stats_kernel" and not _aligned(r)]
    assert narrow and all(r["load_bytes"].get("2", 0) > 0 for r in narrow)


@pytest.mark.parametrize("kernel", ("_upsample_kernel", "_transpose_kernel"))
def test_the_upsample_stores_aligned_rows_four_columns_at_a_time(step_rows, kernel):
    """Its loads are gathers (2-byte in bf16); its stores run along the row. Before: one column a thread, W
    unspecialised, so every store moved one element."""
    rows = [r for r in step_rows if r["kernel"] == kernel and _aligned(r)]
    assert rows, kernel
    assert all(set(r["store_bytes"]) == {"8"} for r in rows), rows


@pytest.fixture(scope="module")
def channels_last_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("step-codegen-cl")
    done = subprocess.run([sys.executable, str(ROOT / "bench/sm90_codegen.py"), "--step", "--channels-last", "--size",
                           "64", "--out", str(out)], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "sm90_step_codegen.json").read_text())["rows"]


@pytest.mark.parametrize("kernel", BATCH_NORM)
def test_channels_last_single_source_planes_move_16_byte_vectors(channels_last_rows, kernel):
    """native-cl's BatchNorm passes on 128-channel planes: the channels run at unit stride, and with the tile whole
    along them (EVEN_C) and no merge mapping on a single source, their loads and stores move 8 bf16 at a time.
    Before, the channel mask's unspecialised count left every access 2-byte (bench/results/2026-12-05-cpu-channels-
    last-codegen/); the merges' branch still is, so the counts hold both."""

    def whole_aligned_plane(r: dict) -> bool:
        return r["constexprs"]["EVEN_C"] and r["constexprs"]["BLOCK_C"] == 128 and _aligned(r)

    rows = [r for r in channels_last_rows if r["kernel"] == kernel and whole_aligned_plane(r)]
    assert rows, kernel
    for row in rows:
        assert row["load_bytes"].get("16", 0) >= 1, row
        if kernel in ("_batch_norm_act_pad_kernel", "_batch_norm_act_bwd_apply_kernel"):
            assert row["store_bytes"].get("16", 0) >= 1, row
        if kernel == "_batch_norm_act_bwd_sums_kernel" and row["constexprs"]["PAD"] == 0:
            assert row["registers"] <= 128, row  # 168 before: 3 programs an SM, 5 now


@pytest.mark.skipif(not _INTERPRET, reason="records launches in Triton's interpreter (a CPU session's build)")
def test_step_channels_last_records_the_nhwc_step():
    """--channels-last: the step of the harness's native-cl, whose BatchNorm tiles run along the channels (128 of
    them at once on a 128-channel plane) where NCHW's run along each row (256 columns at every level)."""
    tool = bench_script("sm90_codegen")

    def tiles(launches: dict) -> set[tuple[int, int]]:
        return {(launch["constexprs"]["BLOCK_W"], launch["constexprs"]["BLOCK_C"])
                for launch in launches.values() if launch["name"] == "_batch_norm_stats_kernel"}  # fmt: skip

    nchw, nhwc = tiles(tool.record_step(64, "bf16")), tiles(tool.record_step(64, "bf16", channels_last=True))
    assert {w for w, _ in nchw} == {256}
    assert (8, 128) in nhwc and all(c >= w for w, c in nhwc if c > 4)
