"""dipfast.kernels.configs: every kernel family has a config in every precision, and each config is launchable."""

import pytest

from dipfast.kernels import configs

pytestmark = pytest.mark.parity

GEMM_FAMILIES = ("conv", "dgrad", "wgrad")
SMEM_BYTES = 227 * 1024  # an H100 / H200 block's shared memory limit
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}


@pytest.mark.parametrize("table", [configs.HOPPER, configs.INTERPRETER], ids=["hopper", "interpreter"])
def test_every_family_and_precision_has_a_config(table):
    expected = {(f, p) for f in (*GEMM_FAMILIES, "pass") for p in configs.PRECISIONS}
    assert set(table) == expected


@pytest.mark.parametrize("key", sorted(configs.HOPPER))
def test_hopper_configs_are_launchable(key):
    """Power-of-two blocks, tl.dot's 16 at least, and the pipelined operand tiles within shared memory."""
    family, precision = key
    c = configs.HOPPER[key]
    if family == "pass":
        assert c.block & (c.block - 1) == 0 and c.block_c & (c.block_c - 1) == 0
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
