"""dipfast.bench.memory: the peak-memory reading sees a block's allocation."""

from __future__ import annotations

import pytest
import torch

from dipfast.bench.memory import PeakMemory

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_peak_memory_sees_a_block_allocation():
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * 2**20)  # 256 MiB, above glibc's mmap threshold: fresh pages
        del block
    r = mem.result()
    assert r["peak_mib"] > 256
    if r["growth_mib"] is not None:  # Linux: VmHWM reset before the block
        assert "VmHWM" in r["kind"] and r["growth_mib"] > 200
    else:
        assert "ru_maxrss" in r["kind"]
