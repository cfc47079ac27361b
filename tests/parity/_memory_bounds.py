"""An interpreter instrument for accesses outside a launch's tensors.

memory_bounds(monkeypatch): within the block, every interpreted launch records the extent of each of its tensor
arguments (from its first element to its last, by its sizes and strides), and fails with AssertionError, naming the
kernel and its source lines, where a load, store or atomic has an active lane (its mask true) outside all of them, or
active lanes in no one tensor together: one access is one pointer block built from one argument, so lanes that run
past that tensor into the next one (its neighbour in the allocator's memory, or in one storage) are outside too. The
lanes outside are masked off before the access, so the process never touches a wild address (an int32 offset that
wrapped points gigabytes away).

On a GPU such a read usually returns garbage that a mask discards later, and faults only where it lands on unmapped
memory; on the CPU, a few bytes past a small allocation never fault: neither shows it, this does.
"""

from __future__ import annotations

import contextlib
import traceback

import numpy as np
import torch
from _program_order import hooked_accesses
from triton.runtime import interpreter


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, past the last byte] of the elements t's sizes and strides reach (strides are never negative)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _kernel_lines() -> list[str]:
    """The kernel source lines (function:line) of the access being checked, innermost last."""
    return [f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[:-3] if "kernels" in f.filename][-3:]


@contextlib.contextmanager
def memory_bounds(monkeypatch):
    launch = {"ranges": [], "outside": []}

    def inside(kind, ptrs, mask):
        """The mask of the lanes active and inside a tensor; the others recorded."""
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        end = addresses + np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        # (tensors, lanes): which tensor's extent holds each lane (no tensor argument: none)
        within = np.stack([(addresses >= lo) & (end <= hi) for lo, hi in launch["ranges"]] or [addresses < 0])
        ok = within.any(axis=0)
        active = np.broadcast_to(mask.data if mask is not None else True, addresses.shape).astype(bool)
        live = active & ok
        if (active & ~ok).any():
            launch["outside"].append((kind, int((active & ~ok).sum()), _kernel_lines()))
        elif live.any() and not within[:, live].all(axis=1).any():  # inside tensors, but no one tensor holds them all
            launch["outside"].append((f"{kind} across tensors", int(live.sum()), _kernel_lines()))
        return interpreter.TensorHandle(np.asarray(live), interpreter.tl.int1)

    def checked(kernel, tensors, run):
        launch.update(outside=[], ranges=[_extent(t) for t in tensors])
        result = run()
        assert not launch["outside"], f"{kernel}: accesses outside its tensors: {launch['outside'][:4]}"
        return result

    with hooked_accesses(monkeypatch, inside, checked):
        yield
