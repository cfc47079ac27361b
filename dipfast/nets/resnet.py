"""The ResNet generator as the original describes it (models/resnet.py).

conv3 + act, then num_blocks residual blocks [conv3-norm-act-conv3-norm] + identity, then
conv3 + norm, then conv3 -> n_channels and a sigmoid. The block convs are zero-padded and
bias-free, as in the original. The original's get_net('ResNet') passes its arguments in the
wrong positions and raises a TypeError; this builds the network the class describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dipfast.nets.layers import PadConv, activation
from dipfast.nets.unet import NORMS


@dataclass(frozen=True)
class ResNetSpec:
    num_blocks: int = 8
    channels: int = 32
    need_residual: bool = True
    act: str = "LeakyReLU"
    need_sigmoid: bool = True
    norm: str = "batch"
    pad: str = "reflection"

    def __post_init__(self):
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"unknown ResNet norm {self.norm!r}; valid: batch, instance")


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm, act: str, residual: bool):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            norm(channels, affine=True),
            activation(act),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            norm(channels, affine=True),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x if self.residual else self.body(x)


class ResNet(nn.Module):
    def __init__(self, input_depth: int, n_channels: int, spec: ResNetSpec):
        super().__init__()
        self.spec = spec
        norm, c = NORMS[spec.norm], spec.channels
        self.body = nn.Sequential(
            PadConv(input_depth, c, 3, pad=spec.pad),
            activation(spec.act),
            *(ResidualBlock(c, norm, spec.act, spec.need_residual) for _ in range(spec.num_blocks)),
            nn.Conv2d(c, c, 3, 1, 1),
            norm(c, affine=True),
            PadConv(c, n_channels, 3, pad=spec.pad),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.body(z)
        return torch.sigmoid(x) if self.spec.need_sigmoid else x
