"""Shared fixtures: every test starts from the same seeds, and randomness comes from `rng`."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
