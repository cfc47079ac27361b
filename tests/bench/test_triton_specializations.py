"""bench/triton_specializations.py: how many Triton compilations one step launches (the cold-cache start-up), with
the GPU's tile table, recorded on the CPU under the interpreter."""

from __future__ import annotations

import json
import re

import pytest

from dipfast.kernels.batch_norm_act import _HAS_TRITON, _INTERPRET

from ._suites import bench_script

STRIDE = re.compile(r"^(s|d|g|o|ds|dd)_s[nchw]$|^s[xogdp]_?[nchw]$")  # the kernels' stride arguments
ROW_STRIDE = re.compile(r"^(s|d|g|o|ds|dd)_sh$|^s[xogdp]_?h$")
WIDTH = {"width", "W"}  # the sizes a kernel specialises so its masks can be proven uniform over a vector

pytestmark = pytest.mark.skipif(
    not (_HAS_TRITON and _INTERPRET), reason="records launches in Triton's interpreter (a CPU session's build)"
)


@pytest.fixture(scope="module")
def tool():
    return bench_script("triton_specializations")


def test_default_net_step_compiles_each_kernel_once_per_pad_and_alignment(tool, tmp_path):
    """The default net at 256 px: every kernel of the native CUDA step is launched, and its compilations differ only
    in what sets addresses (strides' alignment, the pad), in a pointer's dtype (none since the net's input comes in
    bf16, as the deeper levels') or in a width, which the kernels' masks need to move vectors and which in NCHW is a
    row's stride (so it varies with one): no other size, count or per-level tile makes another one."""
    assert tool.main(["--size", "256", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "triton_specializations.json").read_text())
    kernels = report["kernels"]
    assert {"_batch_norm_stats_kernel", "_batch_norm_act_pad_kernel", "_batch_norm_act_bwd_sums_kernel",
            "_batch_norm_act_bwd_apply_kernel", "_chan_finalize_kernel", "_column_sums_kernel", "_upsample_kernel",
            "_transpose_kernel", "_reflection_pad_kernel", "_reflection_fold_kernel", "_rules_pixels_kernel",
            "_rules_scalars_kernel", "_copy_rows_kernel"} == set(kernels)  # fmt: skip
    for name, k in kernels.items():
        assert k["launches"] >= k["specializations"] >= 1
        varying = k["varying"]
        assert all(a == "PAD" or STRIDE.match(a) or a.endswith("_ptr") for a in varying if a not in WIDTH), varying
        for width in WIDTH & set(varying):  # specialised for vectors: with a row stride, no compilation of its own
            assert varying[width] in [v for a, v in varying.items() if ROW_STRIDE.match(a)], f"{name}: {varying}"
        pointers = {a: v for a, v in varying.items() if a.endswith("_ptr")}
        assert all(len({t.split("/")[0] for t in v}) == len(v) for v in pointers.values()), f"{name}: {varying}"
    assert report["total"] <= 25  # measured 25: 23, one per kernel of the fused rules, one fewer since the net's
    # input comes in bf16 (20 before the level inputs' pad kernels); 91 with the sizes specialised and a tile width
    # per level
    assert "| _batch_norm_act_pad_kernel |" in (tmp_path / "triton_specializations.md").read_text()


def test_a_size_argument_specialised_again_is_counted(tool):
    """The count can fail: the key of a launch sees an int's divisibility unless the kernel names it."""
    assert tool.launch_key(lambda n, m: None, (32, 33), {}, set()) == (("n", "16k"), ("m", "int"))
    assert tool.launch_key(lambda n, m: None, (32, 33), {}, {"n"}) == (("n", "int"), ("m", "int"))
