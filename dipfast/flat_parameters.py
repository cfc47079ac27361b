"""FlatParameters: N networks' parameters in one or two (N, P) fp32 buffers instead of ~100 tensors each.

Adam, the backtracking rule and the gradient are elementwise over the parameters, so they do not care
how the parameters are cut into tensors; the per-tensor way costs ~10 small ops per tensor and step
(select and its backward, autocast's cast and its backward, gradient accumulation, Adam, backtracking's
where and copy): about 1100 ops a step for the default net, whatever the image size.
Here each of those is one op on a buffer, and every step the generator gets views of it:

    buffer (N, P) fp32  --to(bf16), only the conv group-->  unbind(0) per network, or vmap's (N, ...)
                        --split(sizes + gaps + padding)--> view(shape) [permuted channels_last]  -->  functional_call

The parameters the forward never reads (the conv biases a BatchNorm cancels, which the fast block ops leave out)
sit last in each row, in one piece with its tail: the split's backward fills one zero gradient for them all.

The buffers are the leaves that Adam updates. Each row is its network's parameters, each starting
SLOT_ALIGN_BYTES-aligned in the dtype the forward reads it in, then zero padding up to a multiple of
ROW_ALIGN elements, so that an elementwise kernel cuts every row alike, whatever the row's index and N:
Adam updates a network to the same bits alone or in a group of any size (with the per-network forward,
the whole fit is: tests/test_group_invariance.py). The aligned starts are for the convs that read the
views: packed, every conv weight after a 4-element skip bias started 8 bytes off a 16-byte boundary in
bf16 (18 of the default net's 26), where cuDNN's sm90 kernels read 16-byte aligned operands; whether that
is what sent part of the H200's step to cuDNN's legacy kernels, bench/step_convs.py and the harness's
native-packed-parameters measure. The padding, between the parameters and after them, stays zero: no
view reads it, so its gradient is zero, and Adam (no weight decay) and backtracking keep a zero with a
zero gradient at zero.

Under bf16 autocast the parameters autocast would cast for a conv (its weight and bias) sit in their
own buffer, cast once per step: the same bf16 weights and, through the cast's backward, the same fp32
gradients as the per-tensor casts give, bit for bit. The rest (BatchNorm's affine parameters) stays
fp32, as under autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# A row's length is a multiple of this many elements. CPU elementwise kernels (fused Adam among them)
# run a vector body over 8 (AVX2), 16 (AVX-512) or up to 64 (SVE-2048) fp32 lanes and finish a tensor
# with a scalar loop that rounds differently (fused Adam's exp_avg_sq * beta2 + ...: one FMA in the
# scalar loop, a rounded product then an add in the vector body). Unpadded, which of a network's
# elements fall in that tail depends on N and on its row; padded, none do.
ROW_ALIGN = 64
# Each parameter starts this aligned in the dtype the forward reads it in (8 elements in bf16, 4 in fp32): the
# alignment cuDNN's sm90 kernels read their operands at (TMA). ROW_ALIGN elements are a multiple of it, so every
# row starts aligned too. In fp32 the default net's parameters need no gap at all; in bf16 the skip biases do.
SLOT_ALIGN_BYTES = 16


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]  # one network's
    channels_last: bool  # a 4-D weight stored (O, kh, kw, I) and viewed as channels_last

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def view(self, piece: torch.Tensor) -> torch.Tensor:
        """piece: (..., numel) -> (..., *shape), in this slot's layout."""
        lead = piece.shape[:-1]
        if not self.channels_last:
            return piece.view(*lead, *self.shape)
        o, i, kh, kw = self.shape
        k = len(lead)
        return piece.view(*lead, o, kh, kw, i).permute(*range(k), k, k + 3, k + 1, k + 2)


class _Group:
    """One buffer: its slots in order, and the dtype its parameters are cast to in the forward (or None).

    unread: the names of parameters the forward never reads (FlatParameters'): they go last, in one piece with
    the row's tail, so that the split's backward fills one zero gradient for all of them, not one each."""

    def __init__(self, slots: list[_Slot], stacked: dict[str, torch.Tensor], cast: torch.dtype | None, device,
                 aligned: bool, unread: frozenset[str] = frozenset()):  # fmt: skip
        self.slots = [s for s in slots if s.name not in unread] + [s for s in slots if s.name in unread]
        self.dtype = cast
        itemsize = torch.empty((), dtype=cast or torch.float32).element_size()
        slot_align = SLOT_ALIGN_BYTES // itemsize if aligned else 1
        self.used = sum(s.numel for s in self.slots)  # a row's parameters; the rest of the row is padding
        # Each slot's start in the row: aligned, after a gap of zeros where the last slot ended unaligned. The
        # row is cut into pieces: each read slot's, each gap after one, and the rest: the unread slots, their
        # gaps and the tail to ROW_ALIGN. _where[i]: slot i's piece, and its offset in that piece.
        self._pieces: list[int] = []
        self._where: list[tuple[int, int]] = []
        end = 0
        for slot in self.slots:
            start = end + -end % slot_align
            if slot.name not in unread:
                if start > end:
                    self._pieces.append(start - end)
                self._where.append((len(self._pieces), 0))
                self._pieces.append(slot.numel)
            else:
                rest = sum(self._pieces)
                self._where.append((len(self._pieces), start - rest))
            end = start + slot.numel
        row = end + -end % ROW_ALIGN
        if row > sum(self._pieces):
            self._pieces.append(row - sum(self._pieces))
        self.padding = row - self.used  # the zeros of a row, between the slots and after them
        n = next(iter(stacked.values())).shape[0]
        self.buffer = torch.zeros(n, self.used + self.padding, device=device)
        with torch.no_grad():
            for slot, piece in zip(self.slots, self._slot_views(self.buffer)):
                slot.view(piece).copy_(stacked[slot.name])
        self.buffer.requires_grad_()

    def _slot_views(self, rows: torch.Tensor) -> list[torch.Tensor]:
        pieces = rows.split(self._pieces, dim=-1)
        # a read slot is its piece (narrowing it would put a zero-filling slice backward on every parameter)
        return [
            pieces[i] if pieces[i].shape[-1] == slot.numel else pieces[i].narrow(-1, offset, slot.numel)
            for slot, (i, offset) in zip(self.slots, self._where)
        ]

    @property
    def padding_mask(self) -> torch.Tensor:
        """(row length,) bool: True where a row holds padding, not a parameter."""
        mask = torch.ones(self.used + self.padding, dtype=torch.bool)
        for piece in self._slot_views(mask):
            piece.fill_(False)
        return mask

    def cast(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer if self.dtype is None else buffer.to(self.dtype)

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """rows: (..., P) -> {name: (..., *shape)}; the padding (the gaps and the tail) is left out."""
        return {slot.name: slot.view(piece) for slot, piece in zip(self.slots, self._slot_views(rows))}


def _cast_by_autocast(module: nn.Module) -> set[str]:
    """The parameters autocast casts to its lower precision: those of convolutions and linear layers."""
    lowered = (nn.modules.conv._ConvNd, nn.Linear)
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, m in module.named_modules()
        if isinstance(m, lowered)
        for name, _ in m.named_parameters(recurse=False)
    }


class FlatParameters:
    """The stacked parameters {name: (N, ...)} of N copies of `module`, in flat fp32 buffers.

    cast: autocast's lower precision (torch.bfloat16) or None; channels_last: store 4-D weights NHWC;
    aligned: each parameter's first element SLOT_ALIGN_BYTES-aligned in its forward dtype (False packs them, the
    harness's native-packed-parameters). unread: the names of the parameters the forward never reads (the conv
    biases a BatchNorm cancels, which the fast block ops leave out: BlockOps.unread_parameters); each aligned row
    keeps them after the others, in the one piece with its tail, whose zero gradient is one fill (one each, they
    and the gaps after the skip biases were 30 of the default net's step's launches). A packed row keeps the
    module's order: the old layout, which put 18 of the default net's conv weights 8 bytes off in bf16.
    """

    def __init__(
        self,
        stacked: dict[str, torch.Tensor],
        module: nn.Module,
        device: torch.device,
        cast: torch.dtype | None = None,
        channels_last: bool = False,
        aligned: bool = True,
        unread: frozenset[str] = frozenset(),
    ):
        slots = [_Slot(name, tuple(t.shape[1:]), channels_last and t.dim() == 5) for name, t in stacked.items()]
        lowered = _cast_by_autocast(module) if cast is not None else set()
        grouped = [([s for s in slots if s.name in lowered], cast), ([s for s in slots if s.name not in lowered], None)]
        unread = unread if aligned else frozenset()  # packed: the layout before either, in the module's order
        self.groups = [_Group(group, stacked, dtype, device, aligned, unread) for group, dtype in grouped if group]
        self.n = next(iter(stacked.values())).shape[0]

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The leaves Adam updates and backtracking saves: (N, P_group) fp32 each, P_group a multiple of
        ROW_ALIGN (the group's parameters at aligned starts, zero padding between and after them)."""
        return [g.buffer for g in self.groups]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """{name: (N, ...)} fp32 views of the buffers, outside autograd: edits change the buffers."""
        return {k: v for g in self.groups for k, v in g.views(g.buffer.detach()).items()}

    def stacked(self, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: (N, ...)} in the forward's precision, differentiable in `buffers` (self.buffers, passed
        in so that a compiled caller sees them as inputs): the parameters vmap takes."""
        return {k: v for g, b in zip(self.groups, buffers) for k, v in g.views(g.cast(b)).items()}

    def per_network(self, buffers: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """One {name: (...)} per network in the forward's precision, differentiable in `buffers`.

        unbind (its backward is one stack; for one network a squeeze, free) rather than indexing (a
        zero-filled buffer per network)."""
        rows = [(g.cast(b).squeeze(0),) if self.n == 1 else g.cast(b).unbind(0) for g, b in zip(self.groups, buffers)]
        return [{k: v for g, r in zip(self.groups, rows) for k, v in g.views(r[i]).items()} for i in range(self.n)]


class ModuleSlots:
    """Where each named parameter and buffer of a module is stored, to put other tensors there.

    functional_call walks the module tree and swaps every tensor in and back out on each call, a
    cost per tensor whatever the image size. A module that only ever runs
    with swapped-in tensors (FastStep's) can instead keep the tensors of the last load: each load
    is one dict store per tensor. Eager only: under torch.compile use functional_call, which
    dynamo traces as a pure function of its inputs.
    """

    def __init__(self, module: nn.Module):
        self.slots: dict[str, tuple[dict, str]] = {}
        for prefix, m in module.named_modules():
            for table in (m._parameters, m._buffers):
                for name in table:
                    self.slots[f"{prefix}.{name}" if prefix else name] = (table, name)

    def load(self, *tensors: dict[str, torch.Tensor]) -> None:
        for named in tensors:
            for key, tensor in named.items():
                table, name = self.slots[key]
                table[name] = tensor
