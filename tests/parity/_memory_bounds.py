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
import torch
from triton.runtime import interpreter


@contextlib.contextmanager
def memory_bounds(monkeypatch):
    builder = interpreter.interpreter_builder
    launch = {"kernel": None, "ranges": [], "outside": []}

    def inside(ptrs, mask, nbytes: int):
        """The mask of the lanes that are active and inside a tensor; the others recorded."""
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        ok = np.zeros(addresses.shape, bool)
        for lo, hi in launch["ranges"]:
            ok |= (addresses >= lo) & (addresses + np.uint64(nbytes) <= hi)
        active = np.broadcast_to(mask.data if mask is not None else True, addresses.shape).astype(bool)
        if (active & ~ok).any():
            lines = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[:-2] if "kernels" in f.filename]
            launch["outside"].append((int((active & ~ok).sum()), lines[-3:]))
        return interpreter.TensorHandle(np.asarray(active & ok), interpreter.tl.int1)

    def nbytes(ptrs) -> int:
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
    run = interpreter.GridExecutor.__call__

    def checked_run(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        storages = [t.untyped_storage() for t in tensors]
        launch.update(kernel=self.fn.__name__, outside=[],
                      ranges=[(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages])  # fmt: skip
        result = run(self, *args, **kwargs)
        assert not launch["outside"], f"{launch['kernel']}: accesses outside its tensors: {launch['outside'][:4]}"
        return result

    def checked_load(ptrs, mask, other, *args):
        return load(ptrs, inside(ptrs, mask, nbytes(ptrs)), other, *args)

    def checked_store(ptrs, value, mask, *args):
        return store(ptrs, value, inside(ptrs, mask, nbytes(ptrs)), *args)

    def checked_rmw(op, ptrs, value, mask, *args):
        return rmw(op, ptrs, value, inside(ptrs, mask, nbytes(ptrs)), *args)

    def checked_cas(ptrs, compare, value, *args):  # unmasked: recorded, not masked
        inside(ptrs, None, nbytes(ptrs))
        return cas(ptrs, compare, value, *args)

    with monkeypatch.context() as patch:
        patch.setattr(builder, "create_masked_load", checked_load)
        patch.setattr(builder, "create_masked_store", checked_store)
        patch.setattr(builder, "create_atomic_rmw", checked_rmw)
        patch.setattr(builder, "create_atomic_cas", checked_cas)
        patch.setattr(interpreter.GridExecutor, "__call__", checked_run)
        yield
