"""Generator networks: the original's skip(), hourglass, UNet and ResNet, and their inputs.

A spec (frozen dataclass) describes a network once; ``build`` makes the reference modules.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dipfast.nets.inputs import INPUT_KINDS, meshgrid_input, noise_input
from dipfast.nets.original_layout import load_original_state_dict, original_keys
from dipfast.nets.resnet import ResNet, ResNetSpec
from dipfast.nets.skip import Skip, SkipSpec, skip
from dipfast.nets.unet import UNet, UNetSpec

NetSpec = SkipSpec | UNetSpec | ResNetSpec

__all__ = [
    "INPUT_KINDS",
    "NetSpec",
    "ResNet",
    "ResNetSpec",
    "Skip",
    "SkipSpec",
    "UNet",
    "UNetSpec",
    "build",
    "hourglass",
    "input_only_convolved",
    "load_original_state_dict",
    "meshgrid_input",
    "noise_input",
    "original_keys",
    "skip",
    "working_size",
]


def hourglass(input_depth: int, n_channels: int = 3, **kwargs) -> Skip:
    """skip() without skip connections: channels_skip all 0."""
    depth = len(kwargs.get("channels_down", kwargs.get("num_channels_down", SkipSpec.channels_down)))
    return skip(input_depth, n_channels, channels_skip=(0,) * depth, **kwargs)


def input_only_convolved(spec: NetSpec) -> bool:
    """Whether the net reads its input only as convolutions' input (so under autocast only in autocast's dtype):
    Skip's first level feeds it to its skip and down convs alone."""
    return isinstance(spec, SkipSpec)


def build(spec: NetSpec, input_depth: int, n_channels: int) -> nn.Module:
    if isinstance(spec, SkipSpec):
        return Skip(input_depth, n_channels, spec)
    if isinstance(spec, UNetSpec):
        return UNet(input_depth, n_channels, spec)
    if isinstance(spec, ResNetSpec):
        return ResNet(input_depth, n_channels, spec)
    raise TypeError(f"net must be a SkipSpec, UNetSpec or ResNetSpec; got {type(spec).__name__}")


@functools.lru_cache(maxsize=16)
def _meta_net(spec: NetSpec, input_depth: int) -> nn.Module:
    with torch.device("meta"):
        return build(spec, input_depth, 1)


@functools.lru_cache(maxsize=1024)
def _fits(spec: NetSpec, input_depth: int, h: int, w: int) -> bool:
    """Whether an h x w input runs through the net and comes out at least h x w."""
    net = _meta_net(spec, input_depth)
    try:
        out = net(torch.empty(1, input_depth, h, w, device="meta"))
    except (RuntimeError, ValueError):  # a pad wider than the map, a kernel larger than it, 1-value BN
        return False
    return out.shape[-2] >= h and out.shape[-1] >= w


def working_size(spec: NetSpec, input_depth: int, h: int, w: int) -> tuple[int, int]:
    """The smallest (H', W') >= (h, w) the net accepts: (h, w) itself whenever it can.

    The original runs at the image size and lets Concat crop odd sizes (barbara's 514 works);
    a side too small for the depth (a reflection pad wider than the deepest map) or one the
    net would shrink (UNet with odd sizes) grows until it fits, and the output is cropped back.
    Pads, kernels and strides act on each side alone, so each side is grown alone (a square
    probe); norm layers also need more than one value per channel, which couples the sides
    (a zero-padded net takes 1 x 40 but not 1 x 1), so (h, w) itself and the sizes with one
    side kept are tried first.
    """
    if _fits(spec, input_depth, h, w):
        return h, w

    def fit(side: int) -> int:
        for candidate in range(side, side + 4096):
            if _fits(spec, input_depth, candidate, candidate):
                return candidate
        raise ValueError(f"no working size >= {side} found for this network")

    grown = fit(h), fit(w)
    candidates = [(h, grown[1]), (grown[0], w), grown]
    return min((c for c in candidates if _fits(spec, input_depth, *c)), key=lambda c: (c[0] * c[1], c), default=grown)
