"""Weight parity with the original skip() (models/skip.py + models/common.py + models/downsampler.py).

`original_skip` (tests/_original_dip.py) is a port of the original builder, test-only code: nested Sequentials whose
`add` appends under 1-based keys (the original monkey-patches torch.nn.Module.add; a subclass
does it here without touching torch), the Concat module with its crop, conv() as a
constructor-built Sequential [pad, Conv2d, downsampler] with None filtered out, bn, act,
nn.Upsample, and the final 1x1 conv + Sigmoid. Its state dict is loaded into dipfast's Skip with
load_original_state_dict and both nets must compute the same function.
"""

import pytest
import torch
from _original_dip import original_skip
from torch import nn

from dipfast.nets import load_original_state_dict, original_keys, skip

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
    original = original_skip(depth, n_out, **kwargs)
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
    original = original_skip(32, 3, **DEFAULT)
    conv = original.get_submodule("1.1.1.1")
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.kernel_size == (3, 3)
    assert isinstance(original.get_submodule("1.1.1.0"), nn.ReflectionPad2d)
    ours = skip(32, 3)
    keys = original_keys(ours)
    assert keys["level.down.conv.conv2d.weight"] == "1.1.1.1.weight"
    assert ours.level.down.conv.conv2d.weight.shape == original.state_dict()["1.1.1.1.weight"].shape == (128, 32, 3, 3)
    # with pad='zero' the conv Sequential holds only the Conv2d, at "0"
    zero = skip(32, 3, pad="zero")
    assert original_keys(zero)["level.down.conv.conv2d.weight"] == "1.1.1.0.weight"
    assert isinstance(original_skip(32, 3, **dict(DEFAULT, pad="zero")).get_submodule("1.1.1.0"), nn.Conv2d)


def test_top_level_layout():
    keys = set(original_skip(32, 3, **DEFAULT).state_dict())
    # "2" BN after the concat, "3" up conv (.1 behind its pad), "6" 1x1 conv, "9" head, then "10" Sigmoid
    assert {"2.weight", "3.1.weight", "4.weight", "6.1.weight", "7.weight", "9.1.weight", "9.1.bias"} <= keys
    assert {"1.0.1.1.weight", "1.1.4.1.weight", "1.1.7.1.0.1.1.weight"} <= keys  # skip conv, 2nd conv, level 1
    assert isinstance(original_skip(32, 3, **DEFAULT).get_submodule("10"), nn.Sigmoid)


@pytest.mark.parametrize("name, depth, n_out, kwargs, size", CASES, ids=[c[0] for c in CASES])
def test_every_original_key_is_used(name, depth, n_out, kwargs, size):
    original = original_skip(depth, n_out, **kwargs)
    ours = _ours(depth, n_out, kwargs)
    mapping = original_keys(ours)
    assert set(mapping) == set(ours.state_dict())  # every dipfast tensor is mapped ...
    assert sorted(mapping.values()) == sorted(original.state_dict())  # ... onto every original key, once each
    original_sd = original.state_dict()
    for key, theirs in mapping.items():
        assert ours.state_dict()[key].shape == original_sd[theirs].shape, (key, theirs)


def test_missing_key_is_named():
    original = original_skip(3, 3, **dict(SMALL, pad="reflection"))
    sd = original.state_dict()
    del sd["1.1.4.1.weight"]
    with pytest.raises(ValueError, match=r"missing \['1\.1\.4\.1\.weight'\]"):
        load_original_state_dict(_ours(3, 3, dict(SMALL, pad="reflection")), sd)


def test_unexpected_key_is_named():
    original = original_skip(3, 3, **dict(SMALL, pad="reflection"))
    sd = dict(original.state_dict())
    sd["11.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"unexpected \['11\.weight'\]"):
        load_original_state_dict(_ours(3, 3, dict(SMALL, pad="reflection")), sd)


def test_other_arguments_are_a_value_error():
    ours = _ours(3, 3, dict(SMALL, pad="reflection"))
    other = original_skip(3, 3, **dict(SMALL, pad="reflection", num_channels_skip=[0, 2, 4, 1]))
    with pytest.raises(ValueError, match=r"1\.0\.1\.1\.weight"):  # level 0's skip conv is absent there
        load_original_state_dict(ours, other.state_dict())
    wider = original_skip(3, 3, **dict(SMALL, pad="reflection", num_channels_down=[9, 12, 16, 16]))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_original_state_dict(ours, wider.state_dict())
    zero = original_skip(3, 3, **dict(SMALL, pad="zero"))
    with pytest.raises(ValueError, match="missing"):  # reflection keys ".1." vs zero-pad ".0."
        load_original_state_dict(ours, zero.state_dict())


def test_load_rejects_other_modules():
    with pytest.raises(TypeError, match="skip"):
        load_original_state_dict(nn.Conv2d(1, 1, 1), {})


@pytest.mark.parametrize("mode", ["lanczos2", "lanczos3"])
def test_lanczos_downsampler_init_is_bit_identical(mode):
    kwargs = dict(SMALL, pad="reflection", downsample_mode=mode)
    original, ours = original_skip(3, 3, **kwargs), _ours(3, 3, kwargs)
    theirs = original.state_dict()
    n = 0
    for key, their_key in original_keys(ours).items():
        if "downsampler_" in their_key:
            assert torch.equal(ours.state_dict()[key], theirs[their_key]), key  # before any loading
            n += 1
    assert n == 2 * len(SMALL["num_channels_down"])  # weight and bias at every level
