"""The moves of the ops' vmap rules: the vmapped axis folded into an axis the op already keeps independent.

The engine trains N networks as torch.func.vmap over functional_call with stacked parameters (DESIGN.md,
principle 4). A custom op is opaque to vmap, so each dipfast op registers a rule (torch.library.register_vmap)
that runs the op once, on the physical tensors, with the vmapped axis B folded in:
  into the channels, for the conv ops: x (B, N, C, H, W) -> (N, B * C, H, W), weight (B, C_out, C_in / g, k, k)
    -> (B * C_out, C_in / g, k, k), per-channel vectors (B, C) -> (B * C,), groups -> B * groups. A grouped conv
    mixes no groups and BatchNorm's statistics are per channel, so the B networks stay independent.
  into the batch, for the per-image ops (Lanczos2): x (B, N, C, H, W) -> (B * N, C, H, W).
For a network of batch N = 1 (DIP's case) the folds and unfolds are views, so a chain of fused blocks under vmap
copies nothing. An input that is not vmapped (in_dim None: the same z for every network, say) is expanded to B
copies; its gradient then sums over them, which is what vmap means for a shared input.

The rules are registered on the forward ops and on the backward ops. The backward of a vmapped forward needs none
of them: the forward's rule calls the op on the folded tensors, so autograd records that call and its backward
runs on the folded tensors too. The backward ops' rules serve a backward that is itself run under vmap.
"""

from __future__ import annotations

import torch


def batch_first(t: torch.Tensor | None, bdim: int | None, size: int) -> torch.Tensor | None:
    """t with its vmapped axis first; an unbatched t expanded to `size` copies (no copy yet); None stays None."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def fold_into_channels(t: torch.Tensor) -> torch.Tensor:
    """(B, N, C, ...) -> (N, B * C, ...): network b's channels at [b * C, (b + 1) * C)."""
    return t.movedim(0, 1).reshape(t.shape[1], -1, *t.shape[3:])


def unfold_channels(t: torch.Tensor, size: int) -> torch.Tensor:
    """(N, B * C, ...) -> (N, B, C, ...), a view whose vmapped axis is 1."""
    return t.view(t.shape[0], size, -1, *t.shape[2:])


def fold_into_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(B, R, ...) -> (B * R, ...): weights and per-channel vectors (rows) or images (the batch)."""
    return None if t is None else t.reshape(-1, *t.shape[2:])


def unfold_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """(B * R, ...) -> (B, R, ...), a view whose vmapped axis is 0."""
    return t.view(size, t.shape[0] // size, *t.shape[1:])  # not -1: an empty t (a gradient not asked for) too


def channel_folding_rule(op):
    """The vmap rule of an op of one (N, C, H, W) tensor that maps each channel on its own (an upsample, a pad), its
    other arguments not vmapped: the B networks as B * C channels, one launch."""

    def rule(info, in_dims, t, *args):
        b = info.batch_size
        return unfold_channels(op(fold_into_channels(batch_first(t, in_dims[0], b)), *args), b), 1

    return rule
