"""Weight parity with the original skip() (models/skip.py + models/common.py + models/downsampler.py).

`_original_skip` below is a port of the original builder, test-only code: nested Sequentials whose
`add` appends under 1-based keys (the original monkey-patches torch.nn.Module.add; a subclass
does it here without touching torch), the Concat module with its crop, conv() as a
constructor-built Sequential [pad, Conv2d, downsampler] with None filtered out, bn, act,
nn.Upsample, and the final 1x1 conv + Sigmoid. Its state dict is loaded into dipfast's Skip with
load_original_state_dict and both nets must compute the same function.
"""

import numpy as np
import pytest
import torch
from torch import nn

from dipfast.nets import load_original_state_dict, original_keys, skip

# --- the original, ported ---------------------------------------------------------------------------


class _Seq(nn.Sequential):
    def add(self, module):  # the original's monkey-patched Module.add
        self.add_module(str(len(self) + 1), module)


class _Concat(nn.Module):
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


def _get_kernel_lanczos(factor, kernel_width, support):
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


class _Downsampler(nn.Module):
    """Downsampler(n_planes, factor, kernel_type, phase=0.5, preserve_size=True), lanczos kinds only."""

    def __init__(self, n_planes, factor, kernel_type):
        super().__init__()
        support = {"lanczos2": 2, "lanczos3": 3}[kernel_type]
        self.kernel = _get_kernel_lanczos(factor, 2 * support * factor + 1, support)
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


def _conv(in_f, out_f, kernel_size, stride=1, bias=True, pad="zero", downsample_mode="stride"):
    downsampler = None
    if stride != 1 and downsample_mode != "stride":
        if downsample_mode == "avg":
            downsampler = nn.AvgPool2d(stride, stride)
        elif downsample_mode == "max":
            downsampler = nn.MaxPool2d(stride, stride)
        elif downsample_mode in ["lanczos2", "lanczos3"]:
            downsampler = _Downsampler(out_f, stride, downsample_mode)
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


def _bn(num_features):
    return nn.BatchNorm2d(num_features)


def _act(act_fun="LeakyReLU"):
    if act_fun == "LeakyReLU":
        return nn.LeakyReLU(0.2, inplace=True)
    if act_fun == "ELU":
        return nn.ELU()
    if act_fun == "none":
        return nn.Sequential()
    raise AssertionError(act_fun)


def _original_skip(
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

    model = _Seq()
    model_tmp = model
    input_depth = num_input_channels
    for i in range(len(num_channels_down)):
        deeper = _Seq()
        skip_ = _Seq()
        if num_channels_skip[i] != 0:
            model_tmp.add(_Concat(1, skip_, deeper))
        else:
            model_tmp.add(deeper)
        model_tmp.add(_bn(num_channels_skip[i] + (num_channels_up[i + 1] if i < last_scale else num_channels_down[i])))

        if num_channels_skip[i] != 0:
            skip_.add(_conv(input_depth, num_channels_skip[i], filter_skip_size, bias=need_bias, pad=pad))
            skip_.add(_bn(num_channels_skip[i]))
            skip_.add(_act(act_fun))

        deeper.add(
            _conv(
                input_depth,
                num_channels_down[i],
                filter_size_down[i],
                2,
                bias=need_bias,
                pad=pad,
                downsample_mode=downsample_mode[i],
            )
        )
        deeper.add(_bn(num_channels_down[i]))
        deeper.add(_act(act_fun))

        deeper.add(_conv(num_channels_down[i], num_channels_down[i], filter_size_down[i], bias=need_bias, pad=pad))
        deeper.add(_bn(num_channels_down[i]))
        deeper.add(_act(act_fun))

        deeper_main = _Seq()
        if i == len(num_channels_down) - 1:
            k = num_channels_down[i]
        else:
            deeper.add(deeper_main)
            k = num_channels_up[i + 1]

        deeper.add(nn.Upsample(scale_factor=2, mode=upsample_mode[i]))  # align_corners left unset, as the original

        model_tmp.add(
            _conv(num_channels_skip[i] + k, num_channels_up[i], filter_size_up[i], 1, bias=need_bias, pad=pad)
        )
        model_tmp.add(_bn(num_channels_up[i]))
        model_tmp.add(_act(act_fun))

        if need1x1_up:
            model_tmp.add(_conv(num_channels_up[i], num_channels_up[i], 1, bias=need_bias, pad=pad))
            model_tmp.add(_bn(num_channels_up[i]))
            model_tmp.add(_act(act_fun))

        input_depth = num_channels_down[i]
        model_tmp = deeper_main

    model.add(_conv(num_channels_up[0], num_output_channels, 1, bias=need_bias, pad=pad))
    if need_sigmoid:
        model.add(nn.Sigmoid())
    return model


# --- helpers ------------------------------------------------------------------------------------------

_OURS = {
    "num_input_channels": None,
    "num_output_channels": None,
    "num_channels_down": "channels_down",
    "num_channels_up": "channels_up",
    "num_channels_skip": "channels_skip",
    "act_fun": "act",
}


def _ours(depth, n_out, kwargs):
    """dipfast's skip() with the original's keyword names and the original skip()'s own defaults
    (pad 'zero', upsample 'nearest'; dipfast's defaults are get_net's default net instead)."""
    return skip(
        depth, n_out, **{"pad": "zero", "upsample_mode": "nearest", **{_OURS.get(k, k): v for k, v in kwargs.items()}}
    )


def _pair(depth, n_out, **kwargs):
    """The original net, randomised (BN affine and running stats too), and dipfast's net loaded from it."""
    torch.manual_seed(11)
    original = _original_skip(depth, n_out, **kwargs)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)  # neither init (0.4's U(0,1), modern 1) would catch a swapped gamma
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    ours = _ours(depth, n_out, kwargs)
    load_original_state_dict(ours, original.state_dict())
    return original, ours


def _assert_same_function(original, ours, depth, h, w, rng):
    z = torch.rand(1, depth, h, w, generator=rng, dtype=torch.float64)
    original, ours = original.double(), ours.double()
    for train in (True, False):  # DIP runs in train mode; eval mode checks the running-stat mapping
        original.train(train)
        ours.train(train)
        a, b = original(z.clone()), ours(z.clone())
        assert a.shape == b.shape and a.shape[:2] == (1, original_out(original))
        # Concat crops to the input size; with no skip at level 0 an odd side comes out one larger (as the original)
        assert a.shape[2] >= h and a.shape[3] >= w and (a.shape[2:] == (h, w) or ours.level.skip is None)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)  # float64, same ops: rounding-level only
    # the training forward updated the BN running stats the same way
    ours_sd = ours.state_dict()
    for key, theirs in original_keys(ours).items():
        torch.testing.assert_close(ours_sd[key], original.state_dict()[theirs], rtol=1e-12, atol=1e-12)


def original_out(original):
    head = [m for m in original.modules() if isinstance(m, nn.Conv2d)][-1]
    return head.out_channels


# --- parity -------------------------------------------------------------------------------------------

DEFAULT = {
    "num_channels_down": [128] * 5,
    "num_channels_up": [128] * 5,
    "num_channels_skip": [4] * 5,
    "pad": "reflection",
    "upsample_mode": "bilinear",
}  # get_net(32, 'skip', 'reflection', 'bilinear', ...)
SMALL = {"num_channels_down": [8, 12, 16, 16], "num_channels_up": [6, 10, 16, 12], "num_channels_skip": [3, 2, 4, 1]}

CASES = [
    ("default 64x64", 32, 3, DEFAULT, (64, 64)),
    ("default 67x45", 32, 3, DEFAULT, (67, 45)),
    ("skip 0 levels", 3, 3, dict(SMALL, num_channels_skip=[0, 2, 0, 1], pad="reflection"), (37, 29)),
    ("all skip 0 (hourglass)", 2, 3, dict(SMALL, num_channels_skip=[0] * 4, pad="reflection"), (32, 32)),
    ("need1x1_up False", 3, 3, dict(SMALL, need1x1_up=False, pad="reflection", upsample_mode="bilinear"), (33, 40)),
    ("pad zero", 3, 3, dict(SMALL, pad="zero"), (35, 21)),
    ("avg", 3, 3, dict(SMALL, pad="reflection", downsample_mode="avg"), (48, 64)),
    ("max", 3, 2, dict(SMALL, pad="zero", downsample_mode="max"), (48, 32)),
    ("lanczos2", 3, 3, dict(SMALL, pad="reflection", downsample_mode="lanczos2"), (48, 64)),
    ("lanczos3 zero pad", 3, 3, dict(SMALL, pad="zero", downsample_mode="lanczos3"), (64, 48)),
    (
        "per-level lists",
        1,
        1,
        dict(
            SMALL,
            pad="reflection",
            filter_size_down=[5, 3, 5, 3],
            filter_size_up=[3, 5, 1, 3],
            filter_skip_size=3,
            upsample_mode=["nearest", "bilinear", "bilinear", "nearest"],
            downsample_mode=["stride", "avg", "max", "stride"],
        ),
        (64, 48),
    ),
    ("ELU, no bias", 3, 3, dict(SMALL, pad="reflection", act_fun="ELU", need_bias=False), (32, 24)),
    (
        "library depth 6",
        1,
        3,
        {
            "num_channels_down": [4, 4, 6, 6, 8, 8],
            "num_channels_up": [4, 4, 6, 6, 8, 8],
            "num_channels_skip": [0] * 6,
            "filter_size_down": 5,
            "filter_size_up": 3,
            "upsample_mode": "nearest",
            "need1x1_up": False,
            "pad": "reflection",
        },
        (192, 200),
    ),  # the deepest map must be >= 3 px for the 5x5 reflection pad
]


@pytest.mark.parametrize("name, depth, n_out, kwargs, size", CASES, ids=[c[0] for c in CASES])
def test_same_output_as_original(name, depth, n_out, kwargs, size, rng):
    original, ours = _pair(depth, n_out, **kwargs)
    _assert_same_function(original, ours, depth, *size, rng)


def test_same_output_fp32(rng):
    original, ours = _pair(3, 3, **dict(SMALL, pad="reflection", upsample_mode="bilinear"))
    z = torch.rand(1, 3, 45, 67, generator=rng)
    torch.testing.assert_close(ours(z), original(z), rtol=1e-5, atol=1e-6)  # fp32: summation-order differences only


# --- keys ---------------------------------------------------------------------------------------------


def test_first_level_stride2_conv_key():
    original = _original_skip(32, 3, **DEFAULT)
    conv = original.get_submodule("1.1.1.1")
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.kernel_size == (3, 3)
    assert isinstance(original.get_submodule("1.1.1.0"), nn.ReflectionPad2d)
    ours = skip(32, 3)
    keys = original_keys(ours)
    assert keys["level.down.conv.conv.weight"] == "1.1.1.1.weight"
    assert ours.level.down.conv.conv.weight.shape == original.state_dict()["1.1.1.1.weight"].shape == (128, 32, 3, 3)
    # with pad='zero' the conv Sequential holds only the Conv2d, at "0"
    zero = skip(32, 3, pad="zero")
    assert original_keys(zero)["level.down.conv.conv.weight"] == "1.1.1.0.weight"
    assert isinstance(_original_skip(32, 3, **dict(DEFAULT, pad="zero")).get_submodule("1.1.1.0"), nn.Conv2d)


def test_top_level_layout():
    keys = set(_original_skip(32, 3, **DEFAULT).state_dict())
    # "2" BN after the concat, "3" up conv (.1 behind its pad), "6" 1x1 conv, "9" head, then "10" Sigmoid
    assert {"2.weight", "3.1.weight", "4.weight", "6.1.weight", "7.weight", "9.1.weight", "9.1.bias"} <= keys
    assert {"1.0.1.1.weight", "1.1.4.1.weight", "1.1.7.1.0.1.1.weight"} <= keys  # skip conv, 2nd conv, level 1
    assert isinstance(_original_skip(32, 3, **DEFAULT).get_submodule("10"), nn.Sigmoid)


@pytest.mark.parametrize("name, depth, n_out, kwargs, size", CASES, ids=[c[0] for c in CASES])
def test_every_original_key_is_used(name, depth, n_out, kwargs, size):
    original = _original_skip(depth, n_out, **kwargs)
    ours = _ours(depth, n_out, kwargs)
    mapping = original_keys(ours)
    assert set(mapping) == set(ours.state_dict())  # every dipfast tensor is mapped ...
    assert sorted(mapping.values()) == sorted(original.state_dict())  # ... onto every original key, once each
    original_sd = original.state_dict()
    for key, theirs in mapping.items():
        assert ours.state_dict()[key].shape == original_sd[theirs].shape, (key, theirs)


def test_missing_key_is_named():
    original = _original_skip(3, 3, **dict(SMALL, pad="reflection"))
    sd = original.state_dict()
    del sd["1.1.4.1.weight"]
    with pytest.raises(ValueError, match=r"missing \['1\.1\.4\.1\.weight'\]"):
        load_original_state_dict(_ours(3, 3, dict(SMALL, pad="reflection")), sd)


def test_unexpected_key_is_named():
    original = _original_skip(3, 3, **dict(SMALL, pad="reflection"))
    sd = dict(original.state_dict())
    sd["11.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"unexpected \['11\.weight'\]"):
        load_original_state_dict(_ours(3, 3, dict(SMALL, pad="reflection")), sd)


def test_other_arguments_are_a_value_error():
    ours = _ours(3, 3, dict(SMALL, pad="reflection"))
    other = _original_skip(3, 3, **dict(SMALL, pad="reflection", num_channels_skip=[0, 2, 4, 1]))
    with pytest.raises(ValueError, match=r"1\.0\.1\.1\.weight"):  # level 0's skip conv is absent there
        load_original_state_dict(ours, other.state_dict())
    wider = _original_skip(3, 3, **dict(SMALL, pad="reflection", num_channels_down=[9, 12, 16, 16]))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_original_state_dict(ours, wider.state_dict())
    zero = _original_skip(3, 3, **dict(SMALL, pad="zero"))
    with pytest.raises(ValueError, match="missing"):  # reflection keys ".1." vs zero-pad ".0."
        load_original_state_dict(ours, zero.state_dict())


def test_load_rejects_other_modules():
    with pytest.raises(TypeError, match="skip"):
        load_original_state_dict(nn.Conv2d(1, 1, 1), {})


@pytest.mark.parametrize("mode", ["lanczos2", "lanczos3"])
def test_lanczos_downsampler_init_is_bit_identical(mode):
    kwargs = dict(SMALL, pad="reflection", downsample_mode=mode)
    original, ours = _original_skip(3, 3, **kwargs), _ours(3, 3, kwargs)
    theirs = original.state_dict()
    n = 0
    for key, their_key in original_keys(ours).items():
        if "downsampler_" in their_key:
            assert torch.equal(ours.state_dict()[key], theirs[their_key]), key  # before any loading
            n += 1
    assert n == 2 * len(SMALL["num_channels_down"])  # weight and bias at every level
