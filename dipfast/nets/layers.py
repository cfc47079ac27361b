"""The original's building blocks (models/common.py), as plain eager modules.

These are the reference implementations of the few block ops every backend implements:
reflect-pad + conv (+ downsampler) + BN + activation, concat + BN, upsample, output head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dipfast.nets.aligned_channels import aligned_conv2d
from dipfast.nets.blocks import REFERENCE
from dipfast.operators import lanczos_kernel

PADS = ("reflection", "zero")
DOWNSAMPLE_MODES = ("stride", "avg", "max", "lanczos2", "lanczos3")
UPSAMPLE_MODES = ("nearest", "bilinear")
ACTIVATIONS = ("LeakyReLU", "Swish", "ELU", "none")


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def activation(name: str) -> nn.Module:
    if name == "LeakyReLU":
        return nn.LeakyReLU(0.2)  # the original's inplace=True changes nothing numerically
    if name == "Swish":
        return Swish()
    if name == "ELU":
        return nn.ELU()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; valid: {list(ACTIVATIONS)}")


class LanczosDownsampler(nn.Module):
    """The original's Downsampler(n_planes, factor, kernel_type, phase=0.5, preserve_size=True).

    A dense C -> C conv whose weight starts as the Lanczos kernel on the diagonal and zeros
    elsewhere; inside a generator it is an ordinary trainable layer, exactly as in the original.
    """

    def __init__(self, n_planes: int, factor: int, kernel_type: str):
        super().__init__()
        support = {"lanczos2": 2, "lanczos3": 3}[kernel_type]
        kernel = torch.from_numpy(lanczos_kernel(factor, support).astype(np.float32))
        self.pad = (kernel.shape[0] - factor) // 2
        self.downsampler = nn.Conv2d(n_planes, n_planes, kernel.shape, stride=factor, padding=0)
        with torch.no_grad():
            self.downsampler.weight.zero_()
            self.downsampler.bias.zero_()
            for c in range(n_planes):
                self.downsampler.weight[c, c] = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsampler(F.pad(x, (self.pad,) * 4, mode="replicate"))


class PadConv(nn.Module):
    """The original conv(): [ReflectionPad2d((k-1)//2)] -> Conv2d -> [downsampler].

    With downsample_mode other than 'stride', a strided conv runs at stride 1 and a pool or
    Lanczos downsampler follows. A 1x1 conv's zero-width reflection pad is skipped: it is a copy.
    channel_multiple > 1 pads the conv's channels for tensor cores (dipfast.nets.aligned_channels).
    """

    channel_multiple = 1  # dipfast.nets.aligned_channels.align_conv_channels sets a backend's

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, bias=True, pad="zero", downsample_mode="stride"):
        super().__init__()
        if pad not in PADS:
            raise ValueError(f"unknown pad {pad!r}; valid: {list(PADS)}")
        if downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"unknown downsample_mode {downsample_mode!r}; valid: {list(DOWNSAMPLE_MODES)}")
        self.downsample = None
        if stride != 1 and downsample_mode != "stride":
            if downsample_mode == "avg":
                self.downsample = nn.AvgPool2d(stride, stride)
            elif downsample_mode == "max":
                self.downsample = nn.MaxPool2d(stride, stride)
            else:
                self.downsample = LanczosDownsampler(out_ch, stride, downsample_mode)
            stride = 1
        self.reflection_pad = (kernel_size - 1) // 2 if pad == "reflection" else 0  # width, in pixels
        zero_pad = (kernel_size - 1) // 2 if pad == "zero" else 0
        self.conv2d = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=zero_pad, bias=bias)

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        if self.reflection_pad:
            x = F.pad(x, (self.reflection_pad,) * 4, mode="reflect")
        return self.from_padded(x, bias)

    def from_padded(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The conv (and downsampler) on x already reflection-padded by self.reflection_pad.

        bias=False leaves the conv's bias out: for a block whose BatchNorm cancels it
        (dipfast.nets.fusable.conv_bias_cancels), it costs an add and a gradient's sum for nothing.
        """
        conv = self.conv2d
        if self.channel_multiple != 1:
            x = aligned_conv2d(conv, x, self.channel_multiple, bias)
        else:
            x = conv(x) if bias else conv._conv_forward(x, conv.weight, None)
        return self.downsample(x) if self.downsample is not None else x


class ConvBNAct(nn.Module):
    """conv -> BatchNorm2d (always training statistics in DIP) -> activation, computed by block_ops."""

    block_ops = REFERENCE  # dipfast.nets.blocks.use_block_ops installs a backend's

    def __init__(
        self, in_ch, out_ch, kernel_size, stride=1, bias=True, pad="zero", downsample_mode="stride", act="LeakyReLU"
    ):
        super().__init__()
        self.conv = PadConv(in_ch, out_ch, kernel_size, stride, bias, pad, downsample_mode)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_ops.conv_bn_act(self, x)


def centre_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x[..., H, W] cropped to size (h, w) at offset ((H - h) // 2, (W - w) // 2): the original's crops. x itself where
    it has that size: a slice, even of everything, has a backward that zero-fills x's shape and copies into it."""
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    dh, dw = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., dh : dh + h, dw : dw + w]


def crop_to_smallest(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor centre-cropped to the smallest H and W among them (views)."""
    size = min(t.shape[-2] for t in tensors), min(t.shape[-1] for t in tensors)
    return [centre_crop(t, size) for t in tensors]


def concat_cropped(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The original Concat: crop every input to the smallest H and W at offset (size - min) // 2."""
    return torch.cat(crop_to_smallest(tensors), dim=1)


def upsample(mode: str) -> nn.Upsample:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample_mode {mode!r}; valid: {list(UPSAMPLE_MODES)}")
    if mode == "bilinear":
        # The original leaves align_corners unset, which means False since PyTorch 0.4.
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    return nn.Upsample(scale_factor=2, mode="nearest")
