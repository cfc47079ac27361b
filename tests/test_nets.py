"""dipfast.nets: the original skip() net, its variants, UNet, ResNet, inputs and working sizes.

Parameter counts are the notes' table (notes/reference_dip.md, section 5); `_expected_params`
recounts them from section 2's layer list, independently of the code under test.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dipfast.nets import (
    ResNet,
    ResNetSpec,
    SkipSpec,
    UNet,
    UNetSpec,
    build,
    hourglass,
    meshgrid_input,
    noise_input,
    skip,
    working_size,
)
from dipfast.nets.layers import ConvBNAct, LanczosDownsampler, PadConv, Swish, activation, concat_cropped, upsample
from dipfast.presets import PRESETS

THIN = {"channels_down": (4, 6, 8), "channels_up": (4, 6, 8), "channels_skip": (2, 2, 2)}  # 3 levels, few channels


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _levels(net):
    level = net.level
    while level is not None:
        yield level
        level = level.inner


def _per_level(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _expected_params(in_depth, n_out, down, up, skip_ch, fd=3, fu=3, fs=1, need1x1_up=True, lanczos_taps=0):
    """Section 2 of the notes, counted by hand: conv weights + biases, BN gamma + beta (2 per channel)."""
    n = len(down)
    fd, fu = _per_level(fd, n), _per_level(fu, n)
    total, c_in = 0, in_depth
    for i in range(n):
        d, u, s = down[i], up[i], skip_ch[i]
        k = up[i + 1] if i < n - 1 else d
        if s:
            total += c_in * s * fs * fs + s + 2 * s  # skip conv + BN
        total += c_in * d * fd[i] ** 2 + d + 2 * d  # stride-2 conv + BN
        if lanczos_taps:
            total += d * d * lanczos_taps**2 + d  # the trainable dense Downsampler conv
        total += d * d * fd[i] ** 2 + d + 2 * d  # second down conv + BN
        total += 2 * (s + k)  # BN after the concat
        total += (s + k) * u * fu[i] ** 2 + u + 2 * u  # up conv + BN
        if need1x1_up:
            total += u * u + u + 2 * u  # 1x1 conv + BN
        c_in = d
    return total + up[0] * n_out + n_out  # head 1x1 conv


# (name, skip() kwargs in the original's spelling where the notebook uses it, preset, input depth, n_out, count)
LIB = [16, 32, 64, 128, 128, 128]
NOTEBOOK_NETS = [
    ("default", {}, "denoise", 32, 3, 2_217_831),
    ("inpainting kate", {"num_channels_skip": [128] * 5, "upsample_mode": "nearest"}, "inpaint", 32, 3, 3_002_627),
    (
        "inpainting vase",
        {"num_channels_skip": [0] * 5, "upsample_mode": "nearest"},
        "inpaint-meshgrid",
        2,
        3,
        2_157_955,
    ),
    (
        "inpainting library",
        {
            "num_channels_down": LIB,
            "num_channels_up": LIB,
            "num_channels_skip": [0] * 6,
            "filter_size_down": 5,
            "filter_size_up": 3,
            "upsample_mode": "nearest",
            "need1x1_up": False,
        },
        "inpaint-deep",
        1,
        3,
        2_996_467,
    ),
    ("barbara 1 channel", {}, "restore", 32, 1, 2_217_573),
    (
        "restoration kate",
        {
            "num_channels_down": [16, 32, 64, 128, 128],
            "num_channels_up": [16, 32, 64, 128, 128],
            "num_channels_skip": [0] * 5,
            "downsample_mode": "avg",
        },
        "restore-sparse",
        32,
        3,
        1_027_379,
    ),
    (
        "flash-no-flash",
        {"num_channels_skip": [4] * 5, "upsample_mode": ["nearest", "nearest", "bilinear", "bilinear", "bilinear"]},
        "flash",
        3,
        3,
        2_184_307,
    ),
    (
        "snail",
        {
            "num_channels_down": [8, 16, 32, 64, 128],
            "num_channels_up": [8, 16, 32, 64, 128],
            "num_channels_skip": [0, 0, 0, 4, 4],
        },
        "jpeg",
        3,
        3,
        572_827,
    ),
]


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, preset, depth, n_out, count", NOTEBOOK_NETS, ids=[n[0] for n in NOTEBOOK_NETS])
def test_param_count_direct(name, kwargs, preset, depth, n_out, count):
    net = skip(depth, n_out, **kwargs)
    assert _n_params(net) == count
    s = net.spec
    assert (
        _expected_params(
            depth,
            n_out,
            s.channels_down,
            s.channels_up,
            s.channels_skip,
            s.filter_size_down,
            s.filter_size_up,
            s.filter_skip_size,
            s.need1x1_up,
        )
        == count
    )


@pytest.mark.parametrize("name, kwargs, preset, depth, n_out, count", NOTEBOOK_NETS, ids=[n[0] for n in NOTEBOOK_NETS])
def test_param_count_preset(name, kwargs, preset, depth, n_out, count):
    p = PRESETS[preset]
    assert p.input_depth == depth  # z32, meshgrid (2), 1-ch noise, the 3-ch flash image / snail noise
    net = build(p.net, p.input_depth, n_out)
    assert _n_params(net) == count
    assert p.net == skip(depth, n_out, **kwargs).spec  # the preset is exactly the notebook's call


def test_default_net_structure():
    net = skip(32)
    params = list(net.parameters())
    assert len(params) == 112
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 26
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 30
    pads = [m.reflection_pad for m in net.modules() if isinstance(m, PadConv)]
    assert sorted(pads) == [0] * 11 + [1] * 15  # 15 real ReflectionPad2d(1); the 11 1x1 pads are no-ops
    assert net.spec.upsample_mode == "bilinear" and net.spec.pad == "reflection"
    assert all(
        isinstance(m.act, nn.LeakyReLU) and m.act.negative_slope == 0.2
        for m in net.modules()
        if isinstance(m, ConvBNAct)
    )


def test_default_net_bn_is_pytorch_default():
    bns = [m for m in skip(32).modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and m.momentum == 0.1 and m.affine and m.track_running_stats for m in bns)


# --- up/down-sampling, padding, activations --------------------------------------------------------


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_modes(mode, rng):
    net = skip(3, 3, upsample_mode=mode, **THIN)
    assert all(level.upsample.mode == mode for level in _levels(net))
    x = torch.rand(1, 2, 5, 7, generator=rng)
    expected = (
        x.repeat_interleave(2, 2).repeat_interleave(2, 3)
        if mode == "nearest"
        else F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    )
    torch.testing.assert_close(upsample(mode)(x), expected, rtol=0, atol=1e-7)  # same kernel, fp32 rounding only
    z = torch.rand(1, 3, 40, 24, generator=rng)
    assert net(z).shape == (1, 3, 40, 24)


def test_bilinear_is_not_align_corners(rng):
    x = torch.rand(1, 1, 4, 4, generator=rng)
    aligned = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    assert not torch.allclose(upsample("bilinear")(x), aligned)  # PyTorch >= 0.4 semantics, as the notes say


def _lanczos_1d(factor, support):
    k = 2 * support * factor
    d = np.abs(np.arange(1, k + 1) - (k + 1) / 2) / factor
    taps = support * np.sin(np.pi * d) * np.sin(np.pi * d / support) / (np.pi**2 * d**2)
    return taps / taps.sum()


@pytest.mark.parametrize("mode", ["stride", "avg", "max", "lanczos2", "lanczos3"])
def test_downsample_modes_pad_conv(mode, rng):
    torch.manual_seed(1)
    layer = PadConv(3, 4, 3, stride=2, pad="reflection", downsample_mode=mode)
    x = torch.rand(1, 3, 21, 26, generator=rng)
    w, b = layer.conv2d.weight, layer.conv2d.bias
    xp = nn.ReflectionPad2d(1)(x)
    if mode == "stride":
        expected = F.conv2d(xp, w, b, stride=2)
    else:
        full = F.conv2d(xp, w, b)
        if mode == "avg":
            expected = F.avg_pool2d(full, 2)
        elif mode == "max":
            expected = F.max_pool2d(full, 2)
        else:
            support = int(mode[-1])
            kernel = torch.from_numpy(np.outer(*[_lanczos_1d(2, support)] * 2)).float()
            dense = torch.zeros(4, 4, *kernel.shape)
            for c in range(4):
                dense[c, c] = kernel
            pad = (kernel.shape[0] - 2) // 2
            expected = F.conv2d(nn.ReplicationPad2d(pad)(full), dense, torch.zeros(4), stride=2)
    out = layer(x)
    # a stride-2 3x3 conv on 21 rows gives ceil(21 / 2) = 11, a pool or Lanczos floor(21 / 2) = 10
    assert out.shape == ((1, 4, 11, 13) if mode == "stride" else (1, 4, 10, 13))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # same maths, fp32 summation order may differ


@pytest.mark.parametrize("mode", ["stride", "avg", "max", "lanczos2", "lanczos3"])
def test_downsample_modes_net(mode, rng):
    net = skip(3, 3, downsample_mode=mode, **THIN)
    for level in _levels(net):
        d = level.down.conv
        if mode == "stride":
            assert d.conv2d.stride == (2, 2) and d.downsample is None
        else:
            assert d.conv2d.stride == (1, 1)
            kind = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}.get(mode, LanczosDownsampler)
            assert isinstance(d.downsample, kind)
        assert level.conv.conv.downsample is None and level.conv.conv.conv2d.stride == (1, 1)
    taps = {"lanczos2": 8, "lanczos3": 12}.get(mode, 0)  # 4f and 6f taps at f = 2
    assert _n_params(net) == _expected_params(3, 3, *THIN.values(), lanczos_taps=taps)
    z = torch.rand(1, 3, 32, 40, generator=rng)
    assert net(z).shape == (1, 3, 32, 40)


@pytest.mark.parametrize("mode, support", [("lanczos2", 2), ("lanczos3", 3)])
def test_lanczos_downsampler_is_trainable_diagonal(mode, support):
    net = skip(3, 3, downsample_mode=mode, **THIN)
    params = {id(p) for p in net.parameters()}
    for level, c in zip(_levels(net), THIN["channels_down"]):
        conv = level.down.conv.downsample.downsampler
        assert conv.weight.requires_grad and id(conv.weight) in params  # Adam trains it, as in the original
        kernel = torch.from_numpy(np.outer(*[_lanczos_1d(2, support)] * 2)).float()
        assert conv.weight.shape == (c, c, 4 * support, 4 * support)
        for i in range(c):
            for j in range(c):
                expected = kernel if i == j else torch.zeros_like(kernel)
                torch.testing.assert_close(conv.weight[i, j], expected, rtol=0, atol=1e-7)  # fp32 copy of fp64
        assert torch.all(conv.bias == 0)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("pad", ["reflection", "zero"])
def test_pad_modes(pad, k, rng):
    layer = PadConv(3, 5, k, pad=pad)
    x = torch.rand(1, 3, 9, 11, generator=rng)
    w, b = layer.conv2d.weight, layer.conv2d.bias
    if pad == "reflection":
        expected = F.conv2d(nn.ReflectionPad2d((k - 1) // 2)(x), w, b)
    else:
        expected = F.conv2d(x, w, b, padding=(k - 1) // 2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # fp32, same conv
    assert layer(x).shape == (1, 5, 9, 11)


class _PadOps(TorchDispatchMode):
    """Records every aten op whose name has 'pad' in it (reflection_pad2d, constant_pad_nd, their backwards)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "pad" in func.overloadpacket.__name__:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _pad_ops_of(module: nn.Module, x: torch.Tensor) -> list[str]:
    with _PadOps() as mode:
        module(x.requires_grad_()).sum().backward()
    return mode.seen


def test_1x1_convs_run_no_pad_op(rng):
    """The original puts ReflectionPad2d(0) before each 1x1 conv: a full copy forward, a zero-fill + scatter
    backward on CUDA. PadConv runs none for k = 1 (the state dict keeps the original's keys: test_original_layout).
    A 3x3 block pads once forward and once backward, which shows the recorder sees pads."""
    x = torch.rand(1, 4, 9, 11, generator=rng)
    assert _pad_ops_of(ConvBNAct(4, 4, 1, pad="reflection"), x) == []
    assert _pad_ops_of(PadConv(4, 3, 1, pad="reflection"), x) == []  # the output head
    assert _pad_ops_of(ConvBNAct(4, 4, 3, pad="reflection"), x) == ["reflection_pad2d", "reflection_pad2d_backward"]
    net = skip(3, 3, **THIN)  # per level: three 3x3 convs padded, the 1x1 skip and up1x1 convs not; the 1x1 head not
    assert _pad_ops_of(net, torch.rand(1, 3, 24, 24, generator=rng)).count("reflection_pad2d") == 3 * 3


def test_reflection_and_zero_differ_at_the_border(rng):
    torch.manual_seed(3)
    zero = PadConv(2, 2, 3, pad="zero")
    refl = PadConv(2, 2, 3, pad="reflection")
    refl.load_state_dict(zero.state_dict())
    x = torch.rand(1, 2, 8, 8, generator=rng) + 0.5
    a, b = zero(x), refl(x)
    torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])  # interior equal
    assert not torch.allclose(a[..., 0, :], b[..., 0, :])  # border differs


@pytest.mark.parametrize("pad", ["reflection", "zero"])
def test_pad_in_net(pad, rng):
    net = skip(3, 3, pad=pad, **THIN)
    convs = [m for m in net.modules() if isinstance(m, PadConv)]
    for m in convs:
        k = m.conv2d.kernel_size[0]
        assert m.reflection_pad == ((k - 1) // 2 if pad == "reflection" else 0)
        assert m.conv2d.padding == ((0, 0) if pad == "reflection" else ((k - 1) // 2,) * 2)
    z = torch.rand(1, 3, 24, 24, generator=rng)
    assert net(z).shape == (1, 3, 24, 24)


def test_activations(rng):
    x = torch.randn(1000, generator=rng)
    torch.testing.assert_close(activation("LeakyReLU")(x), torch.where(x > 0, x, 0.2 * x))
    torch.testing.assert_close(activation("Swish")(x), x * torch.sigmoid(x))
    torch.testing.assert_close(activation("ELU")(x), torch.where(x > 0, x, torch.expm1(x)))
    torch.testing.assert_close(activation("none")(x), x)
    with pytest.raises(ValueError, match="ReLU6"):
        activation("ReLU6")


@pytest.mark.parametrize(
    "act, kind", [("LeakyReLU", nn.LeakyReLU), ("Swish", Swish), ("ELU", nn.ELU), ("none", nn.Identity)]
)
def test_activation_in_net(act, kind, rng):
    net = skip(3, 3, act=act, **THIN)
    blocks = [m for m in net.modules() if isinstance(m, ConvBNAct)]
    assert blocks and all(isinstance(b.act, kind) for b in blocks)
    out = net(torch.rand(1, 3, 16, 16, generator=rng))
    assert out.shape == (1, 3, 16, 16) and 0 < out.min() and out.max() < 1  # sigmoid head


def test_no_sigmoid(rng):
    net = skip(3, 3, need_sigmoid=False, **THIN)
    out = net(torch.rand(1, 3, 16, 16, generator=rng))
    assert out.min() < 0 or out.max() > 1  # unbounded head (BN-normalised features feed it)


def test_no_bias():
    net = skip(3, 3, need_bias=False, **THIN)
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_need1x1_up_false(rng):
    net = skip(3, 3, need1x1_up=False, **THIN)
    assert all(level.up1x1 is None for level in _levels(net))
    assert _n_params(net) == _expected_params(3, 3, *THIN.values(), need1x1_up=False)
    assert _n_params(skip(3, 3, **THIN)) - _n_params(net) == sum(u * u + 3 * u for u in THIN["channels_up"])
    assert net(torch.rand(1, 3, 16, 24, generator=rng)).shape == (1, 3, 16, 24)


def test_hourglass(rng):
    down = (4, 6, 8)
    net = hourglass(3, 3, channels_down=down, channels_up=down)
    assert net.spec.channels_skip == (0, 0, 0)
    assert all(level.skip is None for level in _levels(net))
    assert _n_params(net) == _expected_params(3, 3, down, down, (0, 0, 0))
    assert net(torch.rand(1, 3, 24, 16, generator=rng)).shape == (1, 3, 24, 16)


def test_hourglass_default_depth_and_original_names():
    assert hourglass(32).spec.channels_skip == (0,) * 5
    net = hourglass(3, 3, num_channels_down=[4, 6], num_channels_up=[4, 6])
    assert net.spec.channels_skip == (0, 0) and net.spec.channels_down == (4, 6)


def test_zero_skip_levels_mixed(rng):
    net = skip(3, 3, channels_down=(4, 6, 8), channels_up=(4, 6, 8), channels_skip=(0, 3, 0))
    assert [level.skip is None for level in _levels(net)] == [True, False, True]
    assert [level.merge_bn.num_features for level in _levels(net)] == [6, 3 + 8, 8]  # skip[i] + k
    assert _n_params(net) == _expected_params(3, 3, (4, 6, 8), (4, 6, 8), (0, 3, 0))
    assert net(torch.rand(1, 3, 24, 24, generator=rng)).shape == (1, 3, 24, 24)


def test_per_level_lists(rng):
    net = skip(
        3,
        3,
        filter_size_down=(5, 3, 1),
        filter_size_up=(3, 5, 1),
        upsample_mode=("nearest", "bilinear", "nearest"),
        downsample_mode=("stride", "avg", "max"),
        filter_skip_size=3,
        **THIN,
    )
    levels = list(_levels(net))
    assert [lv.down.conv.conv2d.kernel_size[0] for lv in levels] == [5, 3, 1]
    assert [lv.conv.conv.conv2d.kernel_size[0] for lv in levels] == [5, 3, 1]
    assert [lv.up.conv.conv2d.kernel_size[0] for lv in levels] == [3, 5, 1]
    assert [lv.skip.conv.conv2d.kernel_size[0] for lv in levels] == [3, 3, 3]
    assert [lv.up1x1.conv.conv2d.kernel_size[0] for lv in levels] == [1, 1, 1]
    assert [lv.upsample.mode for lv in levels] == ["nearest", "bilinear", "nearest"]
    assert [type(lv.down.conv.downsample) for lv in levels] == [type(None), nn.AvgPool2d, nn.MaxPool2d]
    assert _n_params(net) == _expected_params(3, 3, *THIN.values(), fd=(5, 3, 1), fu=(3, 5, 1), fs=3)
    assert net(torch.rand(1, 3, 24, 32, generator=rng)).shape == (1, 3, 24, 32)


@pytest.mark.parametrize("name", ["filter_size_down", "filter_size_up", "upsample_mode", "downsample_mode"])
def test_per_level_list_wrong_length(name):
    value = (3, 3) if name.startswith("filter") else ("nearest", "nearest") if name == "upsample_mode" else ("avg",) * 2
    with pytest.raises(ValueError, match=name):
        skip(3, 3, **{name: value}, **THIN)


def test_filter_skip_size_must_be_scalar():
    with pytest.raises(ValueError, match="filter_skip_size"):
        skip(3, 3, filter_skip_size=(1, 1, 1), **THIN)


def test_channel_lists_must_match():
    with pytest.raises(ValueError, match="equal length"):
        skip(3, 3, channels_down=(4, 4), channels_up=(4, 4, 4), channels_skip=(1, 1, 1))
    with pytest.raises(ValueError, match="equal length"):
        skip(3, 3, channels_down=(), channels_up=(), channels_skip=())


def test_original_keyword_aliases():
    old = skip(
        num_input_channels=3,
        num_output_channels=2,
        num_channels_down=[4, 6],
        num_channels_up=[5, 7],
        num_channels_skip=[2, 0],
        act_fun="ELU",
    )
    new = skip(3, 2, channels_down=(4, 6), channels_up=(5, 7), channels_skip=(2, 0), act="ELU")
    assert old.spec == new.spec
    assert (old.input_depth, old.n_channels) == (new.input_depth, new.n_channels) == (3, 2)
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    assert isinstance(old.level.down.act, nn.ELU)
    assert old.level.down.conv.conv2d.in_channels == 3 and old.head.conv2d.out_channels == 2


def test_unknown_keyword():
    with pytest.raises(TypeError, match="num_chanels_down"):
        skip(3, 3, num_chanels_down=[4, 4])
    with pytest.raises(TypeError, match="input_depth"):
        skip(n_channels=3)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"pad": "circular"}, "pad"),
        ({"upsample_mode": "bicubic"}, "upsample_mode"),
        ({"downsample_mode": "area"}, "downsample_mode"),
        ({"act": "ReLU"}, "activation"),
    ],
)
def test_unknown_setting_values(bad, match):
    with pytest.raises(ValueError, match=match):
        skip(3, 3, **bad, **THIN)


def test_build_rejects_other_specs():
    with pytest.raises(TypeError, match="SkipSpec"):
        build({"channels_down": (4,)}, 3, 3)


# --- odd sizes and working_size ----------------------------------------------------------------------


def _output_size(net, depth, h, w, rng):
    """The net's output (H, W) for an (h, w) input, or None when the original would raise."""
    try:
        return tuple(net(torch.rand(1, depth, h, w, generator=rng)).shape[-2:])
    except (RuntimeError, ValueError):  # a reflection pad wider than the map, 1-value BatchNorm
        return None


THIN5 = {"channels_down": (4,) * 5, "channels_up": (4,) * 5, "channels_skip": (2,) * 5}  # the default net's shape


@pytest.mark.parametrize("pad", ["reflection", "zero"])
@pytest.mark.parametrize("h, w", [(17, 23), (67, 45), (64, 64), (1, 40), (2, 2), (40, 1500), (514, 514)])
def test_working_size_skip(h, w, pad, rng):
    spec = SkipSpec(pad=pad, **THIN5)
    hw = working_size(spec, 3, h, w)
    # the thin net stands for the full default net: same depth, pads and kernels
    assert hw == working_size(SkipSpec(pad=pad), 32, h, w)
    assert hw[0] >= h and hw[1] >= w
    net = build(spec, 3, 3)
    assert _output_size(net, 3, *hw, rng) == hw
    if hw == (h, w):
        return
    assert _output_size(net, 3, h, w, rng) != (h, w)
    # minimal: one pixel less on a grown side fails
    if hw[0] > h:
        assert _output_size(net, 3, hw[0] - 1, hw[1], rng) != (hw[0] - 1, hw[1])
    if hw[1] > w:
        assert _output_size(net, 3, hw[0], hw[1] - 1, rng) != (hw[0], hw[1] - 1)


def test_working_size_known_values():
    default = SkipSpec()
    # 5 halvings must leave >= 2 px for the deepest reflection pad: ceil(s / 32) >= 2  <=>  s >= 33
    assert working_size(default, 32, 17, 23) == (33, 33)
    assert working_size(default, 32, 1, 40) == (33, 40)
    assert working_size(default, 32, 514, 514) == (514, 514)  # barbara: Concat crops 257 -> 129 ...
    assert working_size(default, 32, 67, 45) == (67, 45)
    assert working_size(default, 32, 40, 3000) == (40, 3000)
    assert working_size(SkipSpec(pad="zero"), 32, 1, 40) == (1, 40)  # 1 x 2 at the deepest: BN has 2 values
    assert working_size(SkipSpec(pad="zero"), 32, 17, 23) == (17, 33)  # 17 x 23 ends at 1 x 1: 1-value BN


def test_working_size_hourglass(rng):
    # without a skip branch nothing crops: odd sides grow on the way up (37 -> 19 -> 10 -> 5 -> 3 -> 2 -> ... -> 64),
    # as in the original; working_size accepts an output at least the working size, and the engine crops it
    spec = SkipSpec(channels_down=(4,) * 5, channels_up=(4,) * 5, channels_skip=(0,) * 5)
    assert working_size(spec, 2, 37, 45) == (37, 45)
    out = build(spec, 2, 3)(torch.rand(1, 2, 37, 45, generator=rng))
    assert out.shape[-2] >= 37 and out.shape[-1] >= 45 and out.shape[-2:] != (37, 45)
    assert build(spec, 2, 3)(torch.rand(1, 2, 64, 96, generator=rng)).shape == (1, 3, 64, 96)


def test_default_net_at_514():
    with torch.device("meta"):
        net = skip(32, 3)
        out = net(torch.empty(1, 32, 514, 514))
    assert out.shape == (1, 3, 514, 514)


def test_concat_crop_at_odd_size(rng):
    net = skip(3, 3, **THIN)
    shapes = []
    hook = net.level.upsample.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[-2:])))
    out = net(torch.rand(1, 3, 13, 11, generator=rng))
    hook.remove()
    assert shapes == [(14, 12)]  # 13x11 -> 7x6 -> upsampled 14x12, cropped back by Concat
    assert out.shape == (1, 3, 13, 11)


def test_concat_crop_offset(rng):
    a = torch.rand(1, 2, 13, 11, generator=rng)
    b = torch.rand(1, 3, 16, 12, generator=rng)
    out = concat_cropped([a, b])
    # offset (size - min) // 2: 3 extra rows -> start at 1, 1 extra column -> start at 0 (drops the last)
    assert torch.equal(out, torch.cat([a, b[:, :, 1:14, 0:11]], 1))


@pytest.mark.parametrize("mode", ["deconv", "bilinear", "nearest"])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_unet_builds_and_keeps_size(mode, norm, rng):
    spec = UNetSpec(feature_scale=16, upsample_mode=mode, norm=norm)
    net = build(spec, 3, 2)
    assert isinstance(net, UNet)
    for h, w in [(64, 48), (67, 45)]:
        hw = working_size(spec, 3, h, w)
        assert hw[0] >= h and hw[1] >= w
        out = net(torch.rand(1, 3, *hw, generator=rng))
        assert out.shape == (1, 2, *hw) and 0 < out.min() and out.max() < 1
    assert working_size(spec, 3, 64, 48) == (64, 48)


def test_unet_shrinks_odd_sizes(rng):
    net = build(UNetSpec(feature_scale=16), 3, 3)
    out = net(torch.rand(1, 3, 67, 45, generator=rng))
    assert out.shape[-2] < 67 and out.shape[-1] < 45  # why working_size grows UNet inputs


def test_unet_filters():
    net = build(UNetSpec(feature_scale=4), 32, 3)
    assert net.start[0].conv2d.out_channels == 16
    assert [d[1][0].conv2d.out_channels for d in net.downs] == [32, 64, 128, 256]


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("residual", [True, False])
def test_resnet_builds_and_keeps_size(norm, residual, rng):
    spec = ResNetSpec(num_blocks=2, channels=8, norm=norm, need_residual=residual)
    net = build(spec, 3, 3)
    assert isinstance(net, ResNet)
    assert working_size(spec, 3, 17, 23) == (17, 23)
    out = net(torch.rand(1, 3, 17, 23, generator=rng))
    assert out.shape == (1, 3, 17, 23) and 0 < out.min() and out.max() < 1
    blocks = [m for m in net.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 2 and all(b.body[0].bias is None for b in blocks)


def test_resnet_residual_adds_identity(rng):
    torch.manual_seed(5)
    net = build(ResNetSpec(num_blocks=1, channels=4), 3, 3)
    block = net.body[2]
    x = torch.rand(1, 4, 6, 6, generator=rng)
    torch.testing.assert_close(block(x), block.body(x) + x)


def test_unet_resnet_spec_errors():
    with pytest.raises(ValueError, match="norm"):
        UNetSpec(norm="group")
    with pytest.raises(ValueError, match="upsample_mode"):
        UNetSpec(upsample_mode="bicubic")
    with pytest.raises(ValueError, match="norm"):
        ResNetSpec(norm="none")


# --- inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(5, 7), (1, 4), (64, 48)])
def test_meshgrid_input(h, w):
    z = meshgrid_input(h, w)
    assert z.shape == (1, 2, h, w) and z.dtype == torch.float32
    # the original: np.meshgrid(arange(W) / (W - 1), arange(H) / (H - 1)), X then Y
    x, y = np.meshgrid(np.arange(w) / float(max(w - 1, 1)), np.arange(h) / float(max(h - 1, 1)))
    expected = torch.from_numpy(np.concatenate([x[None], y[None]])[None]).float()
    assert torch.equal(z, expected)
    assert z[0, 0, 0, -1] == 1 and z[0, 0, -1, 0] == 0  # X runs along the width
    if h > 1:
        assert z[0, 1, -1, 0] == 1 and z[0, 1, 0, -1] == 0  # Y runs along the height


def test_noise_input(rng):
    z = noise_input(32, 40, 30, generator=rng)
    assert z.shape == (1, 32, 40, 30) and z.dtype == torch.float32
    assert z.min() >= 0 and z.max() < 0.1  # U[0, 0.1): not centred
    assert abs(z.mean().item() - 0.05) < 0.002  # 38,400 draws: std of the mean ~1.5e-4
    again = noise_input(32, 40, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)


def test_use_block_ops_routes_every_block_and_reference_undoes_it():
    from dipfast.nets.blocks import REFERENCE, BlockOps, block_ops_of, use_block_ops

    class Counting(BlockOps):
        name = "counting"

        def __init__(self):
            self.calls = {"conv_bn_act": 0, "merge": 0, "upsample": 0}

        def conv_bn_act(self, m, x):
            self.calls["conv_bn_act"] += 1
            return super().conv_bn_act(m, x)

        def merge(self, level, parts):
            self.calls["merge"] += 1
            return super().merge(level, parts)

        def upsample(self, m, x):
            self.calls["upsample"] += 1
            return super().upsample(m, x)

    torch.manual_seed(0)
    net = skip(4, 3, channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2))
    z = torch.rand(1, 4, 16, 16)
    expected = net(z)
    ops = Counting()
    assert use_block_ops(net, ops) is net and block_ops_of(net) == {"counting"}
    torch.testing.assert_close(net(z), expected, rtol=0, atol=0)
    # per level: skip, down, conv, up, up1x1 convs; one merge and one upsample
    assert ops.calls == {"conv_bn_act": 10, "merge": 2, "upsample": 2}
    use_block_ops(net, REFERENCE)
    assert block_ops_of(net) == {"reference"}
    with pytest.raises(TypeError, match="BlockOps"):
        use_block_ops(net, object())
