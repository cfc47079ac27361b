"""Which op group of the floor model (dipfast.bench.floor) a CUDA kernel's time belongs to, by its name.

A profile on CUDA lists kernels: cuDNN's convolutions (sm90_xmma_fprop_implicit_gemm..., cutlass,
implicit_convolve_sgemm, dgrad/wgrad engines) and their layout transposes (nchwToNhwcKernel), ATen's
BatchNorm kernels (batch_norm_collect_statistics..., Welford reductions), reflection_pad2d,
upsample_bilinear2d, CatArrayBatchedCopy, elementwise kernels named after their functor
(leaky_relu_kernel, sigmoid, mse), Adam's multi_tensor_apply / FusedAdam, the Triton kernels of
dipfast.kernels (_conv_bn_lrelu_fwd_kernel, _bn_lrelu_bwd_kernel, _merge_stats_kernel, ...) and
Inductor's triton_{poi,red,per}_fused_<ops> kernels. The first pattern that matches decides, so a
fused kernel counts in one group: its first op in _PATTERNS' order (a dipfast conv kernel with the
BatchNorm statistics in its epilogue is 'conv'; Inductor's fused BatchNorm + LeakyReLU is
'batch_norm'), and the groups it absorbed show less time than their floor. The floor model's
groups fold into these (PROFILE_GROUP_OF); 'layout' (transposes) has no floor: it is pure overhead,
and 'other' is any kernel no pattern knows.
"""

from __future__ import annotations

import re

PROFILE_GROUPS = (
    "conv",
    "batch_norm",
    "activation",
    "pad",
    "upsample",
    "concat",
    "loss",
    "adam",
    "elementwise",
    "copy",
    "layout",
    "other",
)

# the floor model's groups -> the groups kernel names can tell apart (the EMA, the input noise and
# backtracking run as anonymous elementwise kernels; the casts as copy kernels)
PROFILE_GROUP_OF = {
    "conv": "conv",
    "batch_norm": "batch_norm",
    "activation": "activation",
    "pad": "pad",
    "upsample": "upsample",
    "concat": "concat",
    "loss": "loss",
    "adam": "adam",
    "elementwise": "elementwise",
    "input_noise": "elementwise",
    "ema": "elementwise",
    "backtracking": "elementwise",
    "cast": "copy",
}

_PATTERNS = [
    ("copy", r"^mem(set|cpy)"),  # the runtime's memset and memcpy (device to device) rows
    ("layout", r"nchwToNhwc|nhwcToNchw|nchw_to_nhwc|nhwc_to_nchw"),
    ("conv", r"^_(conv_bn_lrelu_fwd|conv_wgrad|conv_dgrad|merge_conv_fwd|merge_wgrad)_kernel"),  # dipfast.kernels
    # dipfast.kernels' per-channel finalize of the BatchNorm partials (channel_sums.py) included
    ("batch_norm", r"batch_norm|bn_fw|bn_bw|welford|_bn_lrelu|_merge_stats|_merge_bn|^_chan_finalize|^_column_sums"),
    ("pad", r"reflection_pad|replication_pad|reflect_fold|reflection_fold|constant_pad"),
    ("upsample", r"upsample|^_transpose_kernel"),  # bilinear_x2.py's backward: the upsample's transpose
    ("concat", r"CatArrayBatchedCopy|(^|_)cat(_|$)|slice_backward"),
    ("activation", r"leaky_relu|sigmoid|threshold|(^|[^a-z])relu|(^|[^a-z])elu"),
    ("loss", r"mse_|lanczos"),
    ("adam", r"adam|multi_tensor_apply"),
    ("conv", r"conv|xmma|cutlass|gemm|cudnn|wgrad|dgrad|fprop|splitK|scalePackedTensor|computeOffsets"),
    # the fast step's rules after the backward, fused (dipfast.kernels.fused_rules): the EMA, metrics, early stopping,
    # backtracking's and the freeze's row copies
    ("elementwise", r"^_(rules|early_stop|copy_rows)_"),
    ("copy", r"copy|(^|[^a-z])fill"),
    ("elementwise", r"elementwise|reduce_kernel|^triton_|distribution|normal|philox|where|index"),
]
_COMPILED = [(group, re.compile(pattern, re.IGNORECASE)) for group, pattern in _PATTERNS]


def kernel_group(name: str) -> str:
    """The profile group of a CUDA kernel name ('other' when no pattern matches)."""
    return next((group for group, pattern in _COMPILED if pattern.search(name)), "other")


def group_times(kernels: list[tuple[str, float]]) -> dict[str, float]:
    """[(kernel name, time)] -> {group: summed time}, in PROFILE_GROUPS order, groups with no kernel left out (any
    per-kernel quantity sums so: launch counts too)."""
    sums: dict[str, float] = {}
    for name, t in kernels:
        group = kernel_group(name)
        sums[group] = sums.get(group, 0.0) + t
    return {g: sums[g] for g in PROFILE_GROUPS if g in sums}


# A kernel whose launches average less than this is launch-bound: a CUDA graph still spends a few microseconds of
# the stream on each (its launch, ramp and drain), so such kernels cost by their count, not their bytes or FLOPs
SHORT_KERNEL_US = 5.0


def launch_summary(kernels: list[tuple[str, float, float]]) -> dict:
    """[(kernel name, launches per iteration, ms per iteration)] -> the launches per iteration in all and per group
    (PROFILE_GROUPS order), and those of the kernels averaging under SHORT_KERNEL_US with their summed ms."""
    short = [(calls, ms) for _, calls, ms in kernels if calls and 1e3 * ms / calls < SHORT_KERNEL_US]
    return {
        "launches_per_iter": sum(calls for _, calls, _ in kernels),
        "short_launches_per_iter": sum(calls for calls, _ in short),
        "short_ms_per_iter": sum(ms for _, ms in short),
        "launches_by_group": group_times([(name, calls) for name, calls, _ in kernels]),
    }


def floor_ratios(measured_ms: dict[str, float], floor_ms: dict[str, float]) -> list[dict]:
    """One row per profile group: measured ms, floor ms (None where the model has none) and their ratio."""
    rows = []
    for g in PROFILE_GROUPS:
        if g not in measured_ms and g not in floor_ms:
            continue
        m, f = measured_ms.get(g, 0.0), floor_ms.get(g)
        rows.append({"group": g, "ms_per_iter": m, "floor_ms": f, "ratio": m / f if f else None})
    total_m, total_f = sum(measured_ms.values()), sum(floor_ms.values())
    rows.append(
        {
            "group": "total",
            "ms_per_iter": total_m,
            "floor_ms": total_f or None,
            "ratio": total_m / total_f if total_f else None,
        }
    )
    return rows


def profile_floor_ms(groups: dict[str, dict]) -> dict[str, float]:
    """The floor model's per-group sums ({group: {floor_ms, ...}}) folded into the profile's groups."""
    out: dict[str, float] = {}
    for g, sums in groups.items():
        key = PROFILE_GROUP_OF[g]
        out[key] = out.get(key, 0.0) + sums["floor_ms"]
    return out
