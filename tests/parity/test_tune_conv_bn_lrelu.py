"""bench/ops/tune_conv_bn_lrelu.py's logic on the CPU (its timings need a GPU): the candidates, the choice, the table
merge, and one tuning pass under the interpreter with a stand-in timer."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dipfast.kernels import configs

pytestmark = pytest.mark.parity

_PATH = Path(__file__).parents[2] / "bench" / "ops" / "tune_conv_bn_lrelu.py"
_spec = importlib.util.spec_from_file_location("tune_conv_bn_lrelu", _PATH)
tune = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tune  # dataclasses look their module up there
_spec.loader.exec_module(tune)

A, B, C = (configs.GemmTiles(m, 64, 32, 3, 4) for m in (128, 64, 32))


@pytest.mark.parametrize("family", configs.FAMILIES)
@pytest.mark.parametrize("precision", configs.PRECISIONS)
def test_candidates_start_at_the_default_and_fit_shared_memory(family, precision):
    found = tune.candidates(family, precision)
    assert found[0] == configs.HOPPER[family, precision] and len(set(found)) == len(found) > 10
    for c in found[1:]:
        assert tune.DTYPE_BYTES[precision] * (c.block_m + c.block_n) * c.block_k * c.num_stages <= tune.SMEM_BYTES
    splits = {c.split_k for c in found}
    assert splits == ({configs.FILL_SMS, 1, 2, 4, 8} if family == "wgrad" else {1})  # the default fills the SMs


def test_choose_takes_the_fastest_only_when_it_beats_the_default_clearly():
    assert tune.choose(A, {A: 1.0, B: 0.9, C: 0.95}) == B
    assert tune.choose(A, {A: 1.0, B: 0.98}) is None  # within MIN_GAIN: the default stays
    assert tune.choose(A, {A: 1.0, B: None, C: 0.99}) is None  # B was rejected (its result disagreed)
    assert tune.choose(A, {A: 0.5, B: 0.9}) is None


def test_merge_table_replaces_and_removes_only_the_tuned_keys():
    key = configs.TileKey("NVIDIA H100 80GB HBM3", "conv_bn_lrelu", "wgrad", "n1", "bf16")
    other = configs.TileKey("NVIDIA H200", "conv_bn_lrelu", "wgrad", "n1", "bf16")
    existing = {key: {"key": key, "tiles": C}, other: {"key": other, "tiles": C}}
    won = {"key": key, "default": A, "timings": {A: 1.0, B: 0.5}, "chosen": B}
    assert tune.merge_table(existing, [won]) == [
        {"key": other, "tiles": C},
        {"key": key, "tiles": B, "ms": 0.5, "default_ms": 1.0},
    ]
    lost = dict(won, chosen=None)
    assert tune.merge_table(existing, [lost]) == [{"key": other, "tiles": C}]


def test_the_written_table_reads_back(tmp_path):
    key = configs.TileKey("NVIDIA H100 80GB HBM3", "conv_bn_lrelu", "wgrad", "n1", "bf16")
    won = {"key": key, "default": A, "timings": {A: 1.0, B: 0.5}, "chosen": B}
    path = tmp_path / "tuned_tiles.json"
    path.write_text(configs.tuned_table_to_json(tune.merge_table({}, [won])))
    assert configs.tuned_table_from_json(path.read_text()) == {key: B}
    assert tune._read_table(path) == {key: {"key": key, "tiles": B, "ms": 0.5, "default_ms": 1.0}}


def test_net_shapes_are_the_default_nets_blocks():
    blocks = {b.name: b for b in tune.net_shapes(512, [0, 1])}
    assert len(blocks) == 10
    merge = blocks["L0-merge"]
    assert (merge.op, merge.c_skip + merge.c_in, merge.c_out, merge.h, merge.k) == (
        "concat_bn_conv_bn_lrelu", 132, 128, 512, 3,
    )  # fmt: skip
    assert (blocks["L0-down"].c_in, blocks["L0-down"].stride) == (32, 2)  # the input depth
    assert (blocks["L1-conv"].c_in, blocks["L1-conv"].h) == (128, 128)


@pytest.mark.parametrize(
    "block, family",
    [
        (tune.Block("tiny-conv", "conv_bn_lrelu", 1, 5, 6, 18, 3), "wgrad"),
        (tune.Block("tiny-merge", "concat_bn_conv_bn_lrelu", 1, 3, 5, 6, 3, c_skip=2), "dgrad"),
    ],
    ids=["conv-wgrad", "merge-dgrad"],
)
def test_tune_one_times_every_agreeing_candidate_and_records_the_choice(block, family):
    """Under the interpreter, with a timer that runs the launch and reports a made-up time: each candidate ran
    (its result agrees with the default's), the fastest made-up time is chosen and every timing is recorded."""
    tried = [configs.GemmTiles(16, 16, 16, 1, 4), configs.GemmTiles(16, 16, 16, 1, 4, split_k=2)]
    made_up = iter([1.0, 0.8, 0.5])  # default first

    def timer(run):
        run()
        return next(made_up)

    result = tune.tune_one(block, family, "fp32", torch.device("cpu"), timer, configs_to_try=tried)
    default = configs.gemm_tiles(block.op, family, "fp32", result["key"].shape, torch.device("cpu"))
    assert result["default"] == default and list(result["timings"]) == [default, *tried]
    assert all(e <= tune.AGREE["fp32"] for e in result["errors"].values())
    assert result["chosen"] == tried[1]
    assert (result["key"].gpu, result["key"].op, result["key"].family) == ("cpu", block.op, family)
    lines = tune.records(result)
    assert [line["ms"] for line in lines] == [1.0, 0.8, 0.5] and [line["chosen"] for line in lines] == [0, 0, 1]
    json.dumps(lines)  # JSON-serialisable as recorded


def test_main_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: main would tune")
    table, record = tmp_path / "table.json", tmp_path / "tune.jsonl"
    assert tune.main(["--record", str(record), "--table", str(table)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not table.exists() and not record.exists()
