"""How much memory a fit will need, estimated before it starts, and the check that refuses one that won't fit.

The estimate runs the generator once on the meta device (shapes only, no data, milliseconds) and
counts what autograd saves for the backward: that, and the activations alive at the peak of the
forward, is most of a DIP step's memory. Add per parameter: the weight, its gradient, Adam's two
moments and the backtracking copy (5 x fp32); multiply by the number of networks; add a margin
for allocator slack and workspaces, and the runtime's fixed cost. It is an estimate:
tests/test_backends.py holds it within a factor of the peak measured on the CPU.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch

from dipfast import nets
from dipfast.errors import DeviceMemoryError, InputError

GIB = 2**30
MIB = 2**20
MARGIN = 1.5  # allocator slack, workspaces, the final output's forward
# Once per process, whatever the size: on the CPU oneDNN's primitive caches and thread pools and the native
# ops (above the 155 MiB that the growth at 64, 96 and 192 px puts them at); on CUDA an allowance for the
# cuDNN/cuBLAS workspaces and the CUDA graph's pool, not yet measured: the GPU window's headline.md sets each
# throughput row's estimate beside its peaks (dipfast bench throughput's steady_peak_memory_mib).
FIXED = {"cpu": 256 * MIB, "cuda": 512 * MIB}
# Above this many pixels the shape-only forward itself gets slow (minutes at 30000 x 30000), and a
# fully convolutional net's saved activations grow with the area: they are measured at a size of
# the same shape and this area, and scaled.
PROBE_AREA = 1024 * 1024
# The GPU kernels (Triton's) compute their offsets in 32 bits: on CUDA a step's largest tensor, in which vmap folds its
# N networks' activations into one, stays under this many elements. An H200's memory holds steps past it (a 12 MP
# photo in tiles of 1024 px, 19 a step: 2.6e9 elements in the top merge's padded input). A margin below 2^31: a 1-D
# kernel's last block computes offsets up to a block past the tensor's end, and one wrapped negative passes its mask.
INDEX_LIMIT = 2**31 - 2**16
# CUDA's grid takes at most 65535 programs on its axes 1 and 2, where the BatchNorm and pad kernels put a step's
# channels (vmap folds its N networks' into one tensor), at least 2 a program (kernels/batch_norm_act.py's _plane).
GRID_LIMIT = 65535
FEWEST_CHANNELS_A_PROGRAM = 2


class Probe(NamedTuple):
    """One network's forward at a working size, measured on the meta device."""

    saved: int  # bytes autograd saves for the backward
    params: int  # bytes of the parameters in fp32
    largest: int  # elements of the largest tensor saved (a conv's padded input, as a rule)
    channels: int  # the most channels of a saved activation (a merge's, as a rule)


@functools.lru_cache(maxsize=64)
def _activation_and_param_bytes(spec: nets.NetSpec, input_depth: int, n_channels: int, h: int, w: int) -> Probe:
    with torch.device("meta"):
        net = nets.build(spec, input_depth, n_channels)
        z = torch.empty(1, input_depth, h, w)
    saved = largest = channels = 0

    def pack(t: torch.Tensor):
        nonlocal saved, largest, channels
        saved += t.numel() * t.element_size()
        largest = max(largest, t.numel())
        channels = max(channels, t.shape[1] if t.dim() == 4 else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(z)
    params = sum(p.numel() for p in net.parameters()) * 4
    return Probe(saved, params, largest, channels)


def _scaled_activation_and_param_bytes(spec, input_depth: int, n_channels: int, h: int, w: int) -> Probe:
    if h * w <= PROBE_AREA:
        return _activation_and_param_bytes(spec, input_depth, n_channels, h, w)
    shrink = math.sqrt(PROBE_AREA / (h * w))
    ph, pw = (max(64, round(side * shrink / 64) * 64) for side in (h, w))
    saved, params, largest, channels = _activation_and_param_bytes(spec, input_depth, n_channels, ph, pw)
    scale = (h * w) / (ph * pw)
    return Probe(int(saved * scale), params, math.ceil(largest * scale), channels)


def most_networks_indexed(spec, input_depth: int, n_channels: int, size: tuple[int, int], device) -> int | None:
    """The most networks one step at working size `size` holds on `device`'s type with its largest tensor under
    INDEX_LIMIT elements and its channels within CUDA's grid (0: not even one); None off CUDA, where no kernel has
    either limit."""
    if torch.device(device).type != "cuda":
        return None
    probe = _scaled_activation_and_param_bytes(spec, input_depth, n_channels, *size)
    return min((INDEX_LIMIT - 1) // probe.largest, GRID_LIMIT * FEWEST_CHANNELS_A_PROGRAM // probe.channels)


def estimate_bytes(
    spec,
    input_depth: int,
    n_channels: int,
    size: tuple[int, int],
    n_networks: int,
    precision: str,
    device="cpu",
    early_stop=None,
):
    """Peak bytes of a fit of `n_networks` networks at working size `size` (H', W') on `device`'s type;
    early_stop: the fit's EarlyStopSpec (stop='auto'), whose state is counted at the working size (an upper
    bound of the output's)."""
    activations, params, *_ = _scaled_activation_and_param_bytes(spec, input_depth, n_channels, *size)
    if precision == "bf16":  # conv inputs and outputs saved in bf16, BatchNorm's in fp32: about 0.6
        activations = int(activations * 0.6)
    criterion = 0
    if early_stop is not None:
        from dipfast.early_stop import EarlyStop

        # the criterion's state, and step_rules.Freeze's saved parameters and Adam moments (3 copies)
        criterion = EarlyStop.estimate_bytes(early_stop, n_networks, (n_channels, *size)) + 3 * params * n_networks
    return FIXED[torch.device(device).type] + int(n_networks * (activations + 5 * params) * MARGIN) + criterion


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device: the GPU's free memory, or the host's MemAvailable (None if unknown).

    On CUDA the caching allocator's cached blocks are handed back first: the GPU counts them as used, and after a fit
    they hold everything it reserved, its CUDA graph's memory pool included, which the next fit's allocations reuse.
    Read without that, a call's second image size, a batch's next group or a notebook's second call were checked
    against the memory less the last fit's."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def ran_out(
    error: BaseException, need: int, n_networks: int, size, precision: str, device, tile: int | None = None
) -> DeviceMemoryError:
    """The one-line error for a fit that ran out of memory (torch.OutOfMemoryError) though check_fits' estimate, `need`
    bytes, let it start: cuDNN's algorithm search (its workspaces: fp32's most) and the allocator's fragments are what
    the estimate does not see."""
    asked = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(error))
    options = []
    if n_networks > 1 and tile is None:
        options.append("fewer images or restarts per call")
    if precision != "bf16":
        options.append("precision='bf16'")
    options.append(f"a smaller tile= (this fit's: {tile})" if tile else "tiles (a tile= smaller than the image)")
    return DeviceMemoryError(
        f"this fit ran out of memory on {device}{f' ({asked[0]})' if asked else ''} though the estimate, "
        f"{need / GIB:.1f} GiB for {n_networks} network(s) at {size[0]} x {size[1]} in {precision}, let it start; "
        f"try {', or '.join(options)}"
    )


def check_fits(
    spec, input_depth, n_channels, size, n_networks: int, precision: str, device: torch.device, early_stop=None
) -> int:
    """Raise InputError naming the estimate and the options when the fit would not fit, or would pass the GPU kernels'
    limits (INDEX_LIMIT's offsets, GRID_LIMIT's programs: most_networks_indexed); return the estimate."""
    most = most_networks_indexed(spec, input_depth, n_channels, size, device)
    if most is not None and n_networks > most:
        probe = _scaled_activation_and_param_bytes(spec, input_depth, n_channels, *size)
        fewer = f"at most {most} images or restarts per call, or " if most else ""
        if n_networks * probe.largest > INDEX_LIMIT - 1:
            past = f"make a tensor of {n_networks * probe.largest:.3g} elements, more than the 2^31 that dipfast's GPU "
            past += f"kernels address; try {fewer}tiles (tile='auto', or a smaller tile=)"
        else:
            past = f"fold {n_networks * probe.channels} channels into one kernel launch, more than CUDA's grid holds; "
            past += f"try {fewer}larger tiles"
        raise InputError(f"{n_networks} network(s) at {size[0]} x {size[1]} {past}")
    need = estimate_bytes(spec, input_depth, n_channels, size, n_networks, precision, device, early_stop)
    free = available_bytes(device)
    if free is not None and need > free:
        options = []
        if n_networks > 1:
            options.append("fewer images or restarts per call")
        if precision != "bf16":
            options.append("precision='bf16'")
        options.append("a smaller image, or tiles (tile='auto', or a smaller tile=)")
        raise InputError(
            f"this fit needs about {need / GIB:.1f} GiB ({n_networks} network(s) at {size[0]} x {size[1]}, "
            f"{precision}) but {free / GIB:.1f} GiB are free on {device}; try {', or '.join(options)}"
        )
    return need
