"""The skip() encoder-decoder of the original (models/skip.py), with its exact layer order.

Level i, on an input of C_in channels at H x W (notes/reference_dip.md, section 2):

    skip   : conv_fs(C_in -> skip[i]) -> BN -> act                               (if skip[i] > 0)
    deeper : conv_fd(C_in -> down[i], stride 2) -> BN -> act
             conv_fd(down[i] -> down[i]) -> BN -> act
             level i + 1 (absent at the last level) -> upsample x2
    merge  : concat(skip, deeper), skip channels first, cropped to the smaller size
             -> BN(skip[i] + k) -> conv_fu(-> up[i]) -> BN -> act [-> conv1x1 -> BN -> act]

k = up[i + 1] below the last level, down[i] at it. A 1x1 head conv and a sigmoid close the net.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from dipfast.nets.blocks import REFERENCE
from dipfast.nets.layers import ConvBNAct, PadConv, concat_cropped, upsample

# The original's keyword names, accepted as aliases so that notebook calls port unchanged.
ORIGINAL_KEYWORDS = {
    "num_input_channels": "input_depth",
    "num_output_channels": "n_channels",
    "num_channels_down": "channels_down",
    "num_channels_up": "channels_up",
    "num_channels_skip": "channels_skip",
    "act_fun": "act",
}


@dataclass(frozen=True)
class SkipSpec:
    """Everything skip() takes but the input depth and output channels.

    Defaults: the default DIP net of get_net(32, 'skip', 'reflection', 'bilinear', 128, 128, 4, 5),
    not the bare original skip()'s (zero padding, nearest, [16, 32, 64, 128, 128]).
    """

    channels_down: tuple[int, ...] = (128,) * 5
    channels_up: tuple[int, ...] = (128,) * 5
    channels_skip: tuple[int, ...] = (4,) * 5
    filter_size_down: int | tuple[int, ...] = 3
    filter_size_up: int | tuple[int, ...] = 3
    filter_skip_size: int = 1
    upsample_mode: str | tuple[str, ...] = "bilinear"
    downsample_mode: str | tuple[str, ...] = "stride"
    pad: str = "reflection"
    act: str = "LeakyReLU"
    need1x1_up: bool = True
    need_sigmoid: bool = True
    need_bias: bool = True

    def __post_init__(self):
        for name in ("channels_down", "channels_up", "channels_skip"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.channels_down)
        if n == 0 or len(self.channels_up) != n or len(self.channels_skip) != n:
            raise ValueError(
                "channels_down, channels_up and channels_skip must be non-empty and of equal length; "
                f"got {len(self.channels_down)}, {len(self.channels_up)}, {len(self.channels_skip)}"
            )
        for name in ("filter_size_down", "filter_size_up", "upsample_mode", "downsample_mode"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                if len(value) != n:
                    raise ValueError(f"{name} has {len(value)} entries for {n} levels")
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.filter_skip_size, int):
            raise ValueError(f"filter_skip_size must be one int (as in the original); got {self.filter_skip_size!r}")

    @property
    def depth(self) -> int:
        return len(self.channels_down)

    def per_level(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.depth


class SkipLevel(nn.Module):
    block_ops = REFERENCE  # the deeper pair, merge and upsample; dipfast.nets.blocks.use_block_ops installs a backend's

    def __init__(self, spec: SkipSpec, i: int, in_ch: int):
        super().__init__()
        down, up, skip = spec.channels_down[i], spec.channels_up[i], spec.channels_skip[i]
        fd, fu = spec.per_level("filter_size_down")[i], spec.per_level("filter_size_up")[i]
        common = dict(bias=spec.need_bias, pad=spec.pad, act=spec.act)
        last = i == spec.depth - 1
        k = down if last else spec.channels_up[i + 1]

        self.skip = ConvBNAct(in_ch, skip, spec.filter_skip_size, **common) if skip else None
        self.down = ConvBNAct(in_ch, down, fd, stride=2, downsample_mode=spec.per_level("downsample_mode")[i], **common)
        self.conv = ConvBNAct(down, down, fd, **common)
        self.inner = None if last else SkipLevel(spec, i + 1, down)
        self.upsample = upsample(spec.per_level("upsample_mode")[i])
        self.merge_bn = nn.BatchNorm2d(skip + k)
        self.up = ConvBNAct(skip + k, up, fu, **common)
        self.up1x1 = ConvBNAct(up, up, 1, **common) if spec.need1x1_up else None

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The original's Concat of [skip, deeper] (or deeper alone): the merge's input before its BatchNorm."""
        return concat_cropped(parts) if len(parts) > 1 else parts[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deeper = self.block_ops.conv_bn_act_pair(self.down, self.conv, x)
        if self.inner is not None:
            deeper = self.inner(deeper)
        deeper = self.block_ops.upsample(self.upsample, deeper)
        parts = [self.skip(x), deeper] if self.skip is not None else [deeper]
        y = self.block_ops.merge(self, parts)
        return self.up1x1(y) if self.up1x1 is not None else y


class Skip(nn.Module):
    """The skip() generator: nested SkipLevels, a 1x1 head conv and an optional sigmoid."""

    def __init__(self, input_depth: int, n_channels: int, spec: SkipSpec):
        super().__init__()
        self.spec = spec
        self.input_depth = input_depth
        self.n_channels = n_channels
        self.level = SkipLevel(spec, 0, input_depth)
        self.head = PadConv(spec.channels_up[0], n_channels, 1, bias=spec.need_bias, pad=spec.pad)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.head(self.level(z))
        return torch.sigmoid(x) if self.spec.need_sigmoid else x


def skip(input_depth: int = None, n_channels: int = 3, **kwargs) -> Skip:
    """Build the original skip() network. Keyword names follow the issue's spelling or the original's.

    >>> net = skip(32)  # the default DIP net: down = up = [128] * 5, skip = [4] * 5, bilinear, reflection
    >>> sum(p.numel() for p in net.parameters())
    2217831
    """
    for old, new in ORIGINAL_KEYWORDS.items():
        if old in kwargs:
            value = kwargs.pop(old)
            if new == "input_depth":
                input_depth = value
            elif new == "n_channels":
                n_channels = value
            else:
                kwargs[new] = value
    valid = {f.name for f in fields(SkipSpec)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"skip() got unknown keyword(s) {unknown}; valid: {sorted(valid)}")
    if input_depth is None:
        raise TypeError("skip() needs input_depth (the number of input channels)")
    return Skip(input_depth, n_channels, SkipSpec(**kwargs))
