"""A test-only port of the original Deep Image Prior code (models/skip.py, models/common.py,
models/downsampler.py at the notes' snapshot): the oracle the weight-parity and Lanczos tests
compare dipfast against. Nested Sequentials whose `add` appends under 1-based keys (the
original monkey-patches torch.nn.Module.add; a subclass does it here without touching torch).
"""

import numpy as np
import torch
from torch import nn


class Seq(nn.Sequential):
    def add(self, module):  # the original's monkey-patched Module.add
        self.add_module(str(len(self) + 1), module)


class Concat(nn.Module):
    def __init__(self, dim, *args):
        super().__init__()
        self.dim = dim
        for idx, module in enumerate(args):
            self.add_module(str(idx), module)

    def forward(self, input):
        inputs = [module(input) for module in self._modules.values()]
        shapes2 = [x.shape[2] for x in inputs]
        shapes3 = [x.shape[3] for x in inputs]
        if np.all(np.array(shapes2) == min(shapes2)) and np.all(np.array(shapes3) == min(shapes3)):
            inputs_ = inputs
        else:
            t2, t3 = min(shapes2), min(shapes3)
            inputs_ = []
            for inp in inputs:
                d2 = (inp.size(2) - t2) // 2
                d3 = (inp.size(3) - t3) // 2
                inputs_.append(inp[:, :, d2 : d2 + t2, d3 : d3 + t3])
        return torch.cat(inputs_, dim=self.dim)

    def __len__(self):
        return len(self._modules)


def get_kernel_lanczos(factor, kernel_width, support):
    kernel = np.zeros([kernel_width - 1, kernel_width - 1])  # phase 0.5
    center = (kernel_width + 1) / 2.0
    for i in range(1, kernel.shape[0] + 1):
        for j in range(1, kernel.shape[1] + 1):
            di = abs(i + 0.5 - center) / factor
            dj = abs(j + 0.5 - center) / factor
            val = 1
            if di != 0:
                val = val * support * np.sin(np.pi * di) * np.sin(np.pi * di / support)
                val = val / (np.pi * np.pi * di * di)
            if dj != 0:
                val = val * support * np.sin(np.pi * dj) * np.sin(np.pi * dj / support)
                val = val / (np.pi * np.pi * dj * dj)
            kernel[i - 1][j - 1] = val
    kernel /= kernel.sum()
    return kernel


class Downsampler(nn.Module):
    """Downsampler(n_planes, factor, kernel_type, phase=0.5, preserve_size=True), lanczos kinds only."""

    def __init__(self, n_planes, factor, kernel_type):
        super().__init__()
        support = {"lanczos2": 2, "lanczos3": 3}[kernel_type]
        self.kernel = get_kernel_lanczos(factor, 2 * support * factor + 1, support)
        downsampler = nn.Conv2d(n_planes, n_planes, kernel_size=self.kernel.shape, stride=factor, padding=0)
        downsampler.weight.data[:] = 0
        downsampler.bias.data[:] = 0
        kernel_torch = torch.from_numpy(self.kernel)
        for i in range(n_planes):
            downsampler.weight.data[i, i] = kernel_torch
        self.downsampler_ = downsampler
        if self.kernel.shape[0] % 2 == 1:
            pad = int((self.kernel.shape[0] - 1) / 2.0)
        else:
            pad = int((self.kernel.shape[0] - factor) / 2.0)
        self.padding = nn.ReplicationPad2d(pad)

    def forward(self, input):
        return self.downsampler_(self.padding(input))


def conv(in_f, out_f, kernel_size, stride=1, bias=True, pad="zero", downsample_mode="stride"):
    downsampler = None
    if stride != 1 and downsample_mode != "stride":
        if downsample_mode == "avg":
            downsampler = nn.AvgPool2d(stride, stride)
        elif downsample_mode == "max":
            downsampler = nn.MaxPool2d(stride, stride)
        elif downsample_mode in ["lanczos2", "lanczos3"]:
            downsampler = Downsampler(out_f, stride, downsample_mode)
        else:
            raise AssertionError(downsample_mode)
        stride = 1
    padder = None
    to_pad = int((kernel_size - 1) / 2)
    if pad == "reflection":
        padder = nn.ReflectionPad2d(to_pad)
        to_pad = 0
    convolver = nn.Conv2d(in_f, out_f, kernel_size, stride, padding=to_pad, bias=bias)
    layers = filter(lambda x: x is not None, [padder, convolver, downsampler])
    return nn.Sequential(*layers)


def bn(num_features):
    return nn.BatchNorm2d(num_features)


def act(act_fun="LeakyReLU"):
    if act_fun == "LeakyReLU":
        return nn.LeakyReLU(0.2, inplace=True)
    if act_fun == "ELU":
        return nn.ELU()
    if act_fun == "none":
        return nn.Sequential()
    raise AssertionError(act_fun)


def original_skip(
    num_input_channels=2,
    num_output_channels=3,
    num_channels_down=(16, 32, 64, 128, 128),
    num_channels_up=(16, 32, 64, 128, 128),
    num_channels_skip=(4, 4, 4, 4, 4),
    filter_size_down=3,
    filter_size_up=3,
    filter_skip_size=1,
    need_sigmoid=True,
    need_bias=True,
    pad="zero",
    upsample_mode="nearest",
    downsample_mode="stride",
    act_fun="LeakyReLU",
    need1x1_up=True,
):
    assert len(num_channels_down) == len(num_channels_up) == len(num_channels_skip)
    n_scales = len(num_channels_down)
    if not isinstance(upsample_mode, (list, tuple)):
        upsample_mode = [upsample_mode] * n_scales
    if not isinstance(downsample_mode, (list, tuple)):
        downsample_mode = [downsample_mode] * n_scales
    if not isinstance(filter_size_down, (list, tuple)):
        filter_size_down = [filter_size_down] * n_scales
    if not isinstance(filter_size_up, (list, tuple)):
        filter_size_up = [filter_size_up] * n_scales
    last_scale = n_scales - 1

    model = Seq()
    model_tmp = model
    input_depth = num_input_channels
    for i in range(len(num_channels_down)):
        deeper = Seq()
        skip_ = Seq()
        if num_channels_skip[i] != 0:
            model_tmp.add(Concat(1, skip_, deeper))
        else:
            model_tmp.add(deeper)
        model_tmp.add(bn(num_channels_skip[i] + (num_channels_up[i + 1] if i < last_scale else num_channels_down[i])))

        if num_channels_skip[i] != 0:
            skip_.add(conv(input_depth, num_channels_skip[i], filter_skip_size, bias=need_bias, pad=pad))
            skip_.add(bn(num_channels_skip[i]))
            skip_.add(act(act_fun))

        deeper.add(
            conv(
                input_depth,
                num_channels_down[i],
                filter_size_down[i],
                2,
                bias=need_bias,
                pad=pad,
                downsample_mode=downsample_mode[i],
            )
        )
        deeper.add(bn(num_channels_down[i]))
        deeper.add(act(act_fun))

        deeper.add(conv(num_channels_down[i], num_channels_down[i], filter_size_down[i], bias=need_bias, pad=pad))
        deeper.add(bn(num_channels_down[i]))
        deeper.add(act(act_fun))

        deeper_main = Seq()
        if i == len(num_channels_down) - 1:
            k = num_channels_down[i]
        else:
            deeper.add(deeper_main)
            k = num_channels_up[i + 1]

        deeper.add(nn.Upsample(scale_factor=2, mode=upsample_mode[i]))  # align_corners left unset, as the original

        model_tmp.add(conv(num_channels_skip[i] + k, num_channels_up[i], filter_size_up[i], 1, bias=need_bias, pad=pad))
        model_tmp.add(bn(num_channels_up[i]))
        model_tmp.add(act(act_fun))

        if need1x1_up:
            model_tmp.add(conv(num_channels_up[i], num_channels_up[i], 1, bias=need_bias, pad=pad))
            model_tmp.add(bn(num_channels_up[i]))
            model_tmp.add(act(act_fun))

        input_depth = num_channels_down[i]
        model_tmp = deeper_main

    model.add(conv(num_channels_up[0], num_output_channels, 1, bias=need_bias, pad=pad))
    if need_sigmoid:
        model.add(nn.Sigmoid())
    return model
