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


def test_the_peak_after_steady_leaves_the_warm_up_out():
    """steady() marks a fit's warm-up's end: its transients count in the block's peak, not in the steady one."""
    with PeakMemory("cpu") as mem:
        warm_up = torch.ones(64 * 2**20)  # 256 MiB: cuDNN's search, say, handed back
        del warm_up
        mem.steady()
        held = torch.ones(16 * 2**20)  # 64 MiB
        del held
    r = mem.result()
    if r["growth_mib"] is None:  # no VmHWM to reset (not Linux): no steady peak
        assert r["steady_peak_mib"] is None
        return
    assert r["peak_mib"] > r["steady_peak_mib"] + 150
    assert r["steady_peak_mib"] > 64
