"""An interpreter instrument for accesses outside a launch's tensors.

memory_bounds(monkeypatch): within the block, every interpreted launch records the storages of its tensor arguments,
and a load, store or atomic of an active lane (its mask true) at an address outside all of them fails the launch with
AssertionError, naming the kernel and its source lines. The lanes outside are masked off before the access, so the
process never touches a wild address (an int32 offset that wrapped points gigabytes away).

On a GPU such a read usually returns garbage that a mask discards later, and faults only where it lands on unmapped
memory; on the CPU, a few bytes past a small allocation never fault: neither shows it, this does.
"""

from __future__ import annotations

import contextlib
import traceback

import numpy as np
from _program_order import hooked_accesses
from triton.runtime import interpreter


@contextlib.contextmanager
def memory_bounds(monkeypatch):
    launch = {"ranges": [], "outside": []}

    def inside(kind, ptrs, mask):
        """The mask of the lanes active and inside a tensor; the others recorded."""
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        end = addresses + np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        ok = np.zeros(addresses.shape, bool)
        for lo, hi in launch["ranges"]:
            ok |= (addresses >= lo) & (end <= hi)
        active = np.broadcast_to(mask.data if mask is not None else True, addresses.shape).astype(bool)
        if (active & ~ok).any():
            lines = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[:-2] if "kernels" in f.filename]
            launch["outside"].append((kind, int((active & ~ok).sum()), lines[-3:]))
        return interpreter.TensorHandle(np.asarray(active & ok), interpreter.tl.int1)

    def checked(kernel, tensors, run):
        storages = [t.untyped_storage() for t in tensors]
        launch.update(outside=[], ranges=[(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages])
        result = run()
        assert not launch["outside"], f"{kernel}: accesses outside its tensors: {launch['outside'][:4]}"
        return result

    with hooked_accesses(monkeypatch, inside, checked):
        yield
