"""_error_map.describe_dx_errors: the GPU localising test's description of where dx is wrong, checked on a map made
by hand (the GPU test itself runs on CUDA only)."""

import pytest
import torch
from _error_map import describe_dx_errors

pytestmark = pytest.mark.parity


def test_description_names_rows_columns_borders_channels_and_tiles():
    bad = torch.zeros(1, 4, 6, 7, dtype=torch.bool)
    bad[0, 3, 0, 3] = True  # a top border row (pad 1), channel tile 1 of 2 channels
    bad[0, 1, 3, 2] = True  # interior (rows 0, 1 and 4, 5 of 6 take the fold's mirrors at pad 1), channel tile 0
    err = bad.double() * torch.linspace(0.1, 0.2, bad.numel()).reshape(bad.shape)
    text = describe_dx_errors(bad, err, pad=1, block_m=16, block_n=2, groups=1)
    assert text.startswith("2 of 168 dx elements wrong")
    assert "rows [0, 3]" in text and "columns [2, 3]" in text
    assert "border row (within pad 1 of an edge) 1, border column 0, neither 1" in text
    assert "channels [1, 3] (channel tiles of 2: [0, 1])" in text
    # padded pixels (0 + 1) * 9 + 3 + 1 = 13 and (3 + 1) * 9 + 2 + 1 = 39 in a 9-wide padded row: tiles 0 and 2
    assert "dgrad pixel tiles of 16: [0, 2]" in text
    assert "at [0, 3, 0, 3]" in text  # the worst: err grows with the flat index
    assert describe_dx_errors(torch.zeros_like(bad), err, 1, 16, 2, 1) == ""


def test_stride_2_tiles_count_within_each_phase():
    """The stride-2 dgrad's programs take one phase (row and column parity of the padded pixel) each: 8 x 9 padded
    pixels make phases of 4 x 5 at most, 20 pixels in 2 tiles of 16, phase-major."""
    bad = torch.zeros(1, 1, 6, 7, dtype=torch.bool)
    bad[0, 0, 0, 0] = True  # padded (1, 1): phase 3, its pixel 0 -> tile 3 * 2 + 0
    bad[0, 0, 5, 6] = True  # padded (6, 7): phase 1, its pixel 3 * 5 + 3 = 18 -> tile 1 * 2 + 1
    text = describe_dx_errors(bad, bad.double(), pad=1, block_m=16, block_n=16, groups=1, stride=2)
    assert "dgrad pixel tiles of 16: [3, 6]" in text


def test_long_lists_are_cut_with_their_count():
    bad = torch.zeros(1, 1, 20, 3, dtype=torch.bool)
    bad[0, 0, :, 1] = True
    text = describe_dx_errors(bad, bad.double(), pad=1, block_m=64, block_n=16, groups=1)
    assert "rows [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (20 in all)]" in text
