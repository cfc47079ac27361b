"""The original's UNet (models/unet.py): conv3-norm-ReLU x2 blocks, max-pool down, upsample up.

filters = [64, 128, 256, 512, 1024] // feature_scale. The up path upsamples (or transposes),
concatenates the skip cropped to the upsampled size, and runs conv3-ReLU x2 without norm.
The original's unused AvgPool pyramid of the input, and its crashing more_layers >= 2, are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dipfast.nets.layers import UPSAMPLE_MODES, PadConv

NORMS = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d, "none": None}


@dataclass(frozen=True)
class UNetSpec:
    """Defaults: get_net(..., 'UNet', 'reflection', 'bilinear'), i.e. BatchNorm and feature_scale 4."""

    feature_scale: int = 4
    upsample_mode: str = "bilinear"  # 'deconv', 'bilinear' or 'nearest'
    pad: str = "reflection"
    norm: str = "batch"  # 'batch', 'instance' or 'none'
    need_sigmoid: bool = True
    need_bias: bool = True

    def __post_init__(self):
        if self.upsample_mode not in ("deconv", *UPSAMPLE_MODES):
            raise ValueError(f"unknown UNet upsample_mode {self.upsample_mode!r}; valid: deconv, nearest, bilinear")
        if self.norm not in NORMS:
            raise ValueError(f"unknown UNet norm {self.norm!r}; valid: {list(NORMS)}")


class UNetConv(nn.Sequential):
    def __init__(self, in_ch, out_ch, norm, bias, pad):
        layers = [PadConv(in_ch, out_ch, 3, bias=bias, pad=pad)]
        if norm is not None:
            layers.append(norm(out_ch))
        layers += [nn.ReLU(), PadConv(out_ch, out_ch, 3, bias=bias, pad=pad)]
        if norm is not None:
            layers.append(norm(out_ch))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class UNetDown(nn.Sequential):
    def __init__(self, in_ch, out_ch, norm, bias, pad):
        super().__init__(nn.MaxPool2d(2, 2), UNetConv(in_ch, out_ch, norm, bias, pad))


class UNetUp(nn.Module):
    def __init__(self, out_ch, mode, bias, pad):
        super().__init__()
        if mode == "deconv":
            self.up = nn.ConvTranspose2d(2 * out_ch, out_ch, 4, stride=2, padding=1)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode=mode), PadConv(2 * out_ch, out_ch, 3, bias=bias, pad=pad)
            )
        self.conv = UNetConv(2 * out_ch, out_ch, None, bias, pad)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(deep)
        dh, dw = (skip.shape[2] - up.shape[2]) // 2, (skip.shape[3] - up.shape[3]) // 2
        skip = skip[:, :, dh : dh + up.shape[2], dw : dw + up.shape[3]]
        return self.conv(torch.cat([up, skip], 1))


class UNet(nn.Module):
    def __init__(self, input_depth: int, n_channels: int, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        f = [c // spec.feature_scale for c in (64, 128, 256, 512, 1024)]
        norm, bias, pad = NORMS[spec.norm], spec.need_bias, spec.pad
        self.start = UNetConv(input_depth, f[0], norm, bias, pad)
        self.downs = nn.ModuleList(UNetDown(f[i], f[i + 1], norm, bias, pad) for i in range(4))
        self.ups = nn.ModuleList(UNetUp(f[i], spec.upsample_mode, bias, pad) for i in reversed(range(4)))
        self.final = PadConv(f[0], n_channels, 1, bias=bias, pad=pad)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        skips = [self.start(z)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        x = self.final(x)
        return torch.sigmoid(x) if self.spec.need_sigmoid else x
