"""Shared fixtures: every test starts from the same seeds, and randomness comes from `rng`."""

import numpy as np
import pytest
import torch
from _helpers import make_rng, torch_threads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def np_rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test id."""
    return make_rng(request.node.nodeid)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module (restored afterwards)."""
    with torch_threads(1):
        yield
