"""Key mapping between the original skip() state dict and dipfast's Skip module.

The original builds nested nn.Sequentials with a monkey-patched ``add`` that names children
"1", "2", ... (1-based), while conv() returns a constructor-built Sequential named "0", "1", ...
(notes/reference_dip.md, section 2). At one level, with container prefix C:

    C1         Concat (children 0 = skip, 1 = deeper), or the deeper Sequential when skip[i] == 0
    C2         BN after the concat
    C3 C4 C5   up conv, BN, act           C6 C7 C8   1x1 conv, BN, act (if need1x1_up)
    skip:      1 conv, 2 BN, 3 act
    deeper:    1 stride-2 conv, 2 BN, 3 act, 4 conv, 5 BN, 6 act, 7 next level's container, 8 upsample
    conv():    0 ReflectionPad2d, 1 Conv2d, 2 downsampler   (pad='zero': 0 Conv2d, 1 downsampler);
               a Lanczos Downsampler holds its conv as `downsampler_` (2.downsampler_.weight)

and the head conv follows level 0's last module at the top level.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dipfast.nets.layers import ConvBNAct, PadConv
from dipfast.nets.skip import Skip, SkipLevel


def _pad_conv_keys(ours: str, theirs: str, module: PadConv, reflection: bool) -> dict[str, str]:
    conv_index = 1 if reflection else 0
    keys = {f"{ours}conv2d.{n}": f"{theirs}{conv_index}.{n}" for n, _ in module.conv2d.named_parameters()}
    if module.downsample is not None:
        for n, _ in module.downsample.named_parameters():
            # the original's Downsampler keeps its conv as `downsampler_` (models/downsampler.py)
            theirs_n = "downsampler_." + n.removeprefix("downsampler.") if n.startswith("downsampler.") else n
            keys[f"{ours}downsample.{n}"] = f"{theirs}{conv_index + 1}.{theirs_n}"
    return keys


def _bn_keys(ours: str, theirs: str) -> dict[str, str]:
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return {f"{ours}{n}": f"{theirs}{n}" for n in names}


def _block_keys(ours: str, theirs: list[str], block: ConvBNAct, reflection: bool) -> dict[str, str]:
    """A conv -> BN -> act triple stored under three consecutive original indices."""
    keys = _pad_conv_keys(f"{ours}conv.", f"{theirs[0]}.", block.conv, reflection)
    keys.update(_bn_keys(f"{ours}bn.", f"{theirs[1]}."))
    return keys


def _level_keys(ours: str, container: str, level: SkipLevel, reflection: bool) -> dict[str, str]:
    keys = {}
    if level.skip is not None:
        skip, deeper = f"{container}1.0.", f"{container}1.1."
        keys.update(_block_keys(f"{ours}skip.", [f"{skip}1", f"{skip}2"], level.skip, reflection))
    else:
        deeper = f"{container}1."
    keys.update(_block_keys(f"{ours}down.", [f"{deeper}1", f"{deeper}2"], level.down, reflection))
    keys.update(_block_keys(f"{ours}conv.", [f"{deeper}4", f"{deeper}5"], level.conv, reflection))
    if level.inner is not None:
        keys.update(_level_keys(f"{ours}inner.", f"{deeper}7.", level.inner, reflection))
    keys.update(_bn_keys(f"{ours}merge_bn.", f"{container}2."))
    keys.update(_block_keys(f"{ours}up.", [f"{container}3", f"{container}4"], level.up, reflection))
    if level.up1x1 is not None:
        keys.update(_block_keys(f"{ours}up1x1.", [f"{container}6", f"{container}7"], level.up1x1, reflection))
    return keys


def original_keys(net: Skip) -> dict[str, str]:
    """Map every state-dict key of `net` to the key the original skip() uses for the same tensor."""
    reflection = net.spec.pad == "reflection"
    keys = _level_keys("level.", "", net.level, reflection)
    head_index = 9 if net.spec.need1x1_up else 6
    keys.update(_pad_conv_keys("head.", f"{head_index}.", net.head, reflection))
    return keys


def load_original_state_dict(net: Skip, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict saved from the original skip() into `net`, built with the same arguments.

    Raises ValueError naming the keys that are missing or left over, or whose shapes differ:
    those mean the two networks were not built with the same arguments.
    """
    if not isinstance(net, Skip):
        raise TypeError(f"load_original_state_dict takes a dipfast skip() network; got {type(net).__name__}")
    mapping = original_keys(net)
    missing = sorted(theirs for theirs in mapping.values() if theirs not in state_dict)
    unexpected = sorted(set(state_dict) - set(mapping.values()))
    if missing or unexpected:
        raise ValueError(
            "state dict does not match this skip() network (built with other arguments?): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    ours = net.state_dict()
    for key, theirs in mapping.items():
        if tuple(state_dict[theirs].shape) != tuple(ours[key].shape):
            raise ValueError(
                f"shape mismatch for {theirs}: state dict has {tuple(state_dict[theirs].shape)}, "
                f"this network {tuple(ours[key].shape)}"
            )
    net.load_state_dict({key: state_dict[theirs] for key, theirs in mapping.items()})
