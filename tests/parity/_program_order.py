"""Two interpreter instruments for races between the programs of one Triton launch, and the hook on the interpreter's
memory accesses that memory_conflicts shares with _memory_bounds.py's instrument (hooked_accesses).

The interpreter runs a launch's programs one after another, x-major (triton/runtime/interpreter.py,
GridExecutor.__call__), so a kernel that reads what another program of the same launch writes, or whose programs
store to one element, computes there exactly as if the GPU had run its programs in that order, and a parity test
passes while the GPU, which runs them concurrently in no set order, may not.

programs_in_order(order): the launch's programs visit their ids in another order ('reversed', 'shuffled'), by
remapping the ids the interpreter's builder hands out (set_grid_idx) through a permutation drawn at each launch
(set_grid_dim). An order-dependent kernel then computes something else.

memory_conflicts(): records the addresses every program loads, stores and updates atomically (the builder's
create_masked_load / create_masked_store / create_atomic_*; unmasked loads and stores go through the masked ones)
and, when each launch ends, raises AssertionError naming the kernel if two programs store to one address, or one
program loads or atomically updates an address that another program stores (a read-after-write or
write-after-read between programs). Atomic updates of one address by many programs are allowed. This is stricter
than reordering: it also finds conflicts that every order happens to compute alike.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from triton.runtime import interpreter

ORDERS = ("reversed", "shuffled")


def _permutation(total: int, order: str, rng: np.random.Generator) -> np.ndarray:
    if order == "reversed":
        return np.arange(total)[::-1]
    if order == "shuffled":
        return rng.permutation(total)
    raise ValueError(f"order must be one of {ORDERS}; got {order!r}")


@contextlib.contextmanager
def programs_in_order(monkeypatch, order: str, seed: int = 0):
    """Within the block, every interpreted launch runs its programs in `order` (a fresh shuffle per launch)."""
    builder = interpreter.interpreter_builder
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
    rng = np.random.default_rng(seed)
    state = {}

    def new_launch(nx, ny, nz):
        set_grid_dim(nx, ny, nz)
        state["perm"] = _permutation(nx * ny * nz, order, rng)

    def permuted(x, y, z):
        _, ny, nz = builder.grid_dim
        i = int(state["perm"][(x * ny + y) * nz + z])
        set_grid_idx(i // (ny * nz), (i // nz) % ny, i % nz)

    with monkeypatch.context() as patch:
        patch.setattr(builder, "set_grid_dim", new_launch)
        patch.setattr(builder, "set_grid_idx", permuted)
        yield


class _Launch:
    """The addresses one launch touched, per program (linear id)."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.accesses = {"load": [], "store": [], "atomic": []}

    def record(self, kind: str, ptrs, mask, program: int) -> None:
        # as bool: the interpreter holds a vector condition & a scalar one (batch_norm_act's (w < width) &
        # (row < n_rows)) as int32, which as an index would pick rows 0 and 1 instead of the active lanes
        mask = np.broadcast_to(np.asarray(mask.data, dtype=bool) if mask is not None else True, ptrs.data.shape)
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[mask]
        self.accesses[kind].append((np.unique(addresses), program))

    def _flat(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = self.accesses[kind]
        if not pairs:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        addresses = np.concatenate([a for a, _ in pairs])
        programs = np.concatenate([np.full(a.size, p, np.int64) for a, p in pairs])
        unique = np.unique(np.stack([addresses, programs.astype(np.uint64)]), axis=1)  # (address, program) pairs
        return unique[0], unique[1].astype(np.int64)

    def conflicts(self, tensors: list[torch.Tensor]) -> list[str]:
        """What conflicts, each with the launch's tensor arguments (by position) that hold the addresses."""
        found = []
        stored, writers = self._flat("store")
        shared, counts = np.unique(stored, return_counts=True)
        if (counts > 1).any():
            bad = shared[counts > 1]
            programs = sorted(set(writers[np.isin(stored, bad)].tolist()))[:8]
            found.append(
                f"{bad.size} addresses stored by more than one program (programs {programs}, ...; "
                f"tensors {_holders(bad, tensors)})"
            )
        updated, updaters = self._flat("atomic")
        for kind, (addresses, programs), (w_addresses, w_programs) in (
            ("load", self._flat("load"), (np.concatenate([stored, updated]), np.concatenate([writers, updaters]))),
            ("atomic update", (updated, updaters), (stored, writers)),
        ):
            pairs, bad = _cross_program(addresses, programs, w_addresses, w_programs)
            if pairs:
                found.append(
                    f"{len(pairs)} {kind}s of addresses another program writes (reader, writer: {pairs[:8]}; "
                    f"tensors {_holders(bad, tensors)})"
                )
        return found


def _holders(addresses: np.ndarray, tensors: list[torch.Tensor]) -> list[int]:
    """The positions, among the launch's tensor arguments, of those whose storage holds any of the addresses."""
    held = []
    for i, t in enumerate(tensors):
        lo = t.untyped_storage().data_ptr()
        if ((addresses >= lo) & (addresses < lo + t.untyped_storage().nbytes())).any():
            held.append(i)
    return held


def _cross_program(addresses, programs, w_addresses, w_programs) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(program, another program writing that address) for each access of `addresses` some other program writes, and
    those addresses."""
    if not addresses.size or not w_addresses.size:
        return [], np.empty(0, np.uint64)
    order = np.argsort(w_addresses, kind="stable")
    w_addresses, w_programs = w_addresses[order], w_programs[order]
    unique, first = np.unique(w_addresses, return_index=True)
    lowest = np.minimum.reduceat(w_programs, first)
    highest = np.maximum.reduceat(w_programs, first)
    hit = np.isin(addresses, unique)
    where = np.searchsorted(unique, addresses[hit])
    readers = programs[hit]
    other = (lowest[where] != readers) | (highest[where] != readers)
    writer = np.where(lowest[where] != readers, lowest[where], highest[where])
    return sorted(set(zip(readers[other].tolist(), writer[other].tolist()))), addresses[hit][other]


@contextlib.contextmanager
def hooked_accesses(monkeypatch, on_access, on_launch):
    """Within the block, every load, store and atomic update of an interpreted launch (the builder's create_masked_load,
    create_masked_store, create_atomic_*; unmasked loads and stores go through the masked ones) first calls
    on_access(kind, ptrs, mask), kind 'load', 'store' or 'atomic', and runs with the mask it returns; and every launch
    runs as on_launch(kernel name, tensors among its arguments, run), run() being the launch itself."""
    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
    launch = interpreter.GridExecutor.__call__

    def hooked_load(ptrs, mask, *args):
        return load(ptrs, on_access("load", ptrs, mask), *args)

    def hooked_store(ptrs, value, mask, *args):
        return store(ptrs, value, on_access("store", ptrs, mask), *args)

    def hooked_rmw(op, ptrs, value, mask, *args):
        return rmw(op, ptrs, value, on_access("atomic", ptrs, mask), *args)

    def hooked_cas(ptrs, compare, value, *args):  # unmasked: seen, not masked
        on_access("atomic", ptrs, None)
        return cas(ptrs, compare, value, *args)

    def hooked_launch(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return on_launch(self.fn.__name__, tensors, lambda: launch(self, *args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(builder, "create_masked_load", hooked_load)
        patch.setattr(builder, "create_masked_store", hooked_store)
        patch.setattr(builder, "create_atomic_rmw", hooked_rmw)
        patch.setattr(builder, "create_atomic_cas", hooked_cas)
        patch.setattr(interpreter.GridExecutor, "__call__", hooked_launch)
        yield


@contextlib.contextmanager
def memory_conflicts(monkeypatch):
    """Within the block, every interpreted launch fails with AssertionError if its programs' accesses conflict."""
    builder = interpreter.interpreter_builder
    launches: list[_Launch] = []

    def recorded(kind, ptrs, mask):
        x, y, z = builder.grid_idx
        _, ny, nz = builder.grid_dim
        launches[-1].record(kind, ptrs, mask, (x * ny + y) * nz + z)
        return mask

    def checked(kernel, tensors, run):
        launches.append(_Launch(kernel))
        result = run()
        problems = launches[-1].conflicts(tensors)
        launches[-1].accesses.clear()  # checked: keep the kernel's name only
        assert not problems, f"{kernel}: programs of one launch conflict: " + "; ".join(problems)
        return result

    with hooked_accesses(monkeypatch, recorded, checked):
        yield launches
