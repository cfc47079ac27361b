"""The few block ops every backend implements (DESIGN.md, principle 1), and how a net is switched to them.

A generator is described once, by its spec and the reference modules of dipfast.nets. Its modules
do not compute their blocks themselves: they hand them to a BlockOps object, the reference one
unless a backend installs another with ``use_block_ops``. A backend overrides only the blocks it
makes faster and inherits the rest, so every fast path runs the same layers with the same
parameters, and falls back per block (an unsupported kernel size, pad or activation) to the
reference computation.

    conv_bn_act(m, x)                ConvBNAct: [reflect pad] -> conv [-> downsampler] -> BatchNorm -> activation
    conv_bn_act_pair(first, second, x)   second(first(x)), two ConvBNAct in a row (a level's deeper branch)
    merge(level, parts)              SkipLevel: level.concat(parts) -> BatchNorm -> level.up (a ConvBNAct)
    upsample(m, x)                   the x2 upsample between levels

m is a ConvBNAct (dipfast.nets.layers) and level a SkipLevel (dipfast.nets.skip); those modules import
this one for their default ops, so the ops here reach them through their attributes only. The pair and the
merge name the block that reads their result, so a backend can hand it its input already padded (the
native ops write the reflection pad with the BatchNorm, in one buffer).

Fused implementations do not update BatchNorm's running statistics, which DIP never reads (it
always normalises with the batch statistics); only the reference ops keep them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class BlockOps:
    """The reference block ops: plain eager modules, the parity oracle. Subclass to replace some."""

    name = "reference"

    def conv_bn_act(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.act(m.bn(m.conv(x)))

    def conv_bn_act_pair(self, first: nn.Module, second: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return second(first(x))

    def merge(self, level: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
        return level.up(level.merge_bn(level.concat(parts)))

    def unread_parameters(self, net: nn.Module) -> frozenset[str]:
        """The names of net's parameters these ops never read (the reference reads them all): the flat parameter
        buffers keep them apart (dipfast.flat_parameters), so that their zero gradients cost one fill."""
        return frozenset()

    def upsample(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # In x's dtype: CUDA's autocast runs upsample_bilinear2d in fp32, and with it every op of the merge
        # after it (concat, BatchNorm, LeakyReLU, pad) and casts both ways: over 1.5 of the 11.9 ms of a bf16
        # step on an H200 (bench/results/2026-12-04-h200-504226cc86/profile). Outside autocast nothing changes.
        with autocast_off(x.device.type):
            return m(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


REFERENCE = BlockOps()


# read once, outside any trace: torch.compile of torch 2.11 cannot trace torch.amp.is_autocast_available (a graph
# break, and an error under fullgraph=True)
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))


def autocast_off(device_type: str):
    """Autocast switched off inside where it is on for device_type (ops then run in their inputs' dtype); else
    nothing."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def use_block_ops(net: nn.Module, ops: BlockOps) -> nn.Module:
    """Route every block of `net` through `ops` (in place); returns `net`. REFERENCE undoes it."""
    if not isinstance(ops, BlockOps):
        raise TypeError(f"ops must be a dipfast.nets.blocks.BlockOps; got {type(ops).__name__}")
    for module in net.modules():
        if hasattr(module, "block_ops"):
            module.block_ops = ops
    return net


def block_ops_of(net: nn.Module) -> set[str]:
    """The names of the block ops a net's modules use (one name after use_block_ops)."""
    return {m.block_ops.name for m in net.modules() if hasattr(m, "block_ops")}
