"""dipfast.kernels.configs: every kernel family has a config in every precision, and each config is launchable."""

from dataclasses import replace

import pytest
import torch

from dipfast.kernels import configs

pytestmark = pytest.mark.parity

GEMM_FAMILIES = ("conv", "dgrad", "wgrad")
SMEM_BYTES = 227 * 1024  # an H100 / H200 block's shared memory limit
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}


@pytest.mark.parametrize("table", [configs.HOPPER, configs.INTERPRETER], ids=["hopper", "interpreter"])
def test_every_family_and_precision_has_a_config(table):
    expected = {(f, p) for f in (*GEMM_FAMILIES, "pass", "pass-cl", "plane") for p in configs.PRECISIONS}
    assert set(table) == expected


@pytest.mark.parametrize("key", sorted(configs.HOPPER))
def test_hopper_configs_are_launchable(key):
    """Power-of-two blocks, tl.dot's 16 at least, and the pipelined operand tiles within shared memory."""
    family, precision = key
    c = configs.HOPPER[key]
    if family in ("pass", "pass-cl"):
        assert c.block & (c.block - 1) == 0 and c.block_c & (c.block_c - 1) == 0
        return
    if family == "plane":  # batch_norm_act.py's tiles: power-of-two sides within the element budget
        for size in (c.elements, c.max_w, c.max_c):
            assert size & (size - 1) == 0
        assert c.max_w <= c.elements and c.max_c <= c.elements
        return
    for block in (c.block_m, c.block_n, c.block_k):
        assert block >= 16 and block & (block - 1) == 0
    # Inductor's estimate (template_heuristics/triton.py, get_shared_memory_estimation), per pipeline stage
    smem = DTYPE_BYTES[precision] * (c.block_m * c.block_k + c.block_n * c.block_k) * c.num_stages
    assert smem <= SMEM_BYTES, f"{key}: {smem} bytes of shared memory"


def test_fitted_shrinks_to_small_problems_only():
    big = configs.GemmTiles(128, 128, 64, 3, 8)
    assert configs.fitted(big, 4096, 128, 132) == big
    # a 4-channel skip conv on an 8 x 8 level: 64 pixels, 4 output channels, 128 input channels per tap
    assert configs.fitted(big, 64, 4, 128) == configs.GemmTiles(64, 16, 64, 3, 8)
    assert configs.fitted(big, 1, 3, 5) == configs.GemmTiles(16, 16, 16, 3, 8)  # never under tl.dot's 16


def test_fitted_caps_split_k_at_one_split_per_chunk():
    wgrad = configs.GemmTiles(64, 64, 32, 3, 4, split_k=8)
    assert configs.fitted(wgrad, 128, 1188, 512 * 512).split_k == 8
    assert configs.fitted(wgrad, 128, 1188, 100).split_k == 4  # 100 pixels: 4 chunks of 32
    assert configs.fitted(wgrad, 128, 1188, 3).split_k == 1


def test_fill_sms_splits_a_small_wgrad_grid_until_every_sm_has_two_programs():
    fill = configs.GemmTiles(64, 64, 64, 3, 4, configs.FILL_SMS)
    assert configs.fitted(fill, 128, 1152, 512 * 512).split_k == configs.FILL_SMS  # left to the launch
    # 128 -> 128 3x3: 2 x 18 = 36 output tiles; 2 x 132 programs want 8 splits, 4096 chunks of 64 pixels allow them
    assert configs.wgrad_splits(fill, 36, 512 * 512, 132) == 8
    assert configs.wgrad_splits(fill, 264, 512 * 512, 132) == 1  # the grid fills the GPU already
    assert configs.wgrad_splits(fill, 1, 512 * 512, 132) == configs.MAX_SPLITS
    # 16 x 16 pixels: 4 chunks, fewer than one split's MIN_CHUNKS_PER_SPLIT
    assert configs.wgrad_splits(fill, 36, 16 * 16, 132) == 1
    assert configs.wgrad_splits(fill, 36, 64 * 64, 132) == 8  # 64 chunks: 8 per split
    assert configs.wgrad_splits(fill, 36, 32 * 32, 132) == 2  # 16 chunks
    assert configs.wgrad_splits(replace(fill, split_k=3), 36, 512 * 512, 132) == 3  # a table's or tuned count


H100 = "NVIDIA H100 80GB HBM3"
TUNED_WGRAD = configs.GemmTiles(64, 128, 32, 4, 4, split_k=4)


@pytest.fixture
def on_an_h100(monkeypatch):
    """configs as on an H100 (the lookup never touches CUDA: its name and the tuned table are stubbed) with one
    tuned entry: conv_bn_lrelu's fp32 wgrad at one shape."""
    shape = configs.shape_key(n=1, c_in=132, h=512, w=512, c_out=128, k=3, stride=1, groups=1)
    key = configs.TileKey(H100, "conv_bn_lrelu", "wgrad", shape, "fp32")
    monkeypatch.setattr(configs, "_INTERPRET", False)
    monkeypatch.setattr(configs, "gpu_name", lambda index: H100)
    monkeypatch.setattr(configs, "tuned_table", lambda: {key: TUNED_WGRAD})
    return shape


def test_lookup_takes_forced_then_tuned_then_the_table(on_an_h100):
    cuda = torch.device("cuda", 0)
    shape = on_an_h100
    assert configs.gemm_tiles("conv_bn_lrelu", "wgrad", "fp32", shape, cuda) == TUNED_WGRAD
    # another precision, family, op, shape or GPU: the table's default
    default = configs.HOPPER["wgrad", "fp32"]
    assert configs.gemm_tiles("conv_bn_lrelu", "wgrad", "bf16", shape, cuda) == configs.HOPPER["wgrad", "bf16"]
    assert configs.gemm_tiles("conv_bn_lrelu", "dgrad", "fp32", shape, cuda) == configs.HOPPER["dgrad", "fp32"]
    assert configs.gemm_tiles("concat_bn_conv_bn_lrelu", "wgrad", "fp32", shape, cuda) == default
    assert configs.gemm_tiles("conv_bn_lrelu", "wgrad", "fp32", "n2", cuda) == default
    forced = configs.GemmTiles(32, 32, 32, 1, 4)
    with configs.forced_tiles({("wgrad", "fp32"): forced}):
        assert configs.gemm_tiles("conv_bn_lrelu", "wgrad", "fp32", shape, cuda) == forced
    assert configs.gemm_tiles("conv_bn_lrelu", "wgrad", "fp32", shape, cuda) == TUNED_WGRAD  # restored


def test_the_table_is_never_read_off_a_gpu(on_an_h100):
    assert (
        configs.gemm_tiles("conv_bn_lrelu", "wgrad", "fp32", on_an_h100, torch.device("cpu"))
        == (configs.HOPPER["wgrad", "fp32"])
    )


def test_tuned_table_round_trips_through_json():
    key = configs.TileKey(H100, "conv_bn_lrelu", "wgrad", "n1-c_in132", "bf16")
    text = configs.tuned_table_to_json([{"key": key, "tiles": TUNED_WGRAD, "ms": 0.5}])
    assert configs.tuned_table_from_json(text) == {key: TUNED_WGRAD}
    assert '"ms": 0.5' in text  # the record travels with the entry


def test_committed_tuned_table_is_valid():
    """Every entry of tuned_tiles.json names a known op, family and precision and is launchable (as HOPPER's)."""
    table = configs.tuned_table_from_json(configs.TUNED_PATH.read_text())
    for key, c in table.items():
        assert key.op in ("conv_bn_lrelu", "concat_bn_conv_bn_lrelu"), key
        assert key.family in configs.FAMILIES and key.precision in configs.PRECISIONS, key
        for block in (c.block_m, c.block_n, c.block_k):
            assert block >= 16 and block & (block - 1) == 0, key
        assert c.split_k >= 1 and (c.split_k == 1 or key.family == "wgrad"), key
        smem = DTYPE_BYTES[key.precision] * (c.block_m * c.block_k + c.block_n * c.block_k) * c.num_stages
        assert smem <= SMEM_BYTES, key


def test_shape_key_keeps_the_callers_order():
    assert configs.shape_key(n=1, c_in=132, h=512) == "n1-c_in132-h512"
