"""dipfast/bench/kernel_groups.py: CUDA kernel names -> the floor model's op groups, with synthetic names and times.

The names are those the CUDA profiler reports for cuDNN, ATen, dipfast.kernels and Inductor kernels (shortened
where a template argument list is long; the part that decides is kept).
"""

# ruff: noqa: E501  (the kernel names as the profiler prints them)
from __future__ import annotations

import re

import pytest

from dipfast.bench import floor
from dipfast.bench.kernel_groups import (
    PROFILE_GROUP_OF,
    PROFILE_GROUPS,
    floor_ratios,
    group_times,
    kernel_group,
    launch_summary,
    profile_floor_ms,
)

from ._suites import ROOT

KERNELS = {
    # cuDNN and CUTLASS convolutions, and cuDNN's layout transposes
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn": "conv",
    "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x64_execute_kernel__5x_cudnn": "conv",
    "sm80_xmma_wgrad_implicit_gemm_indexed_tf32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize64x64x32_stage4_warpsize2x2x1": "conv",
    "void implicit_convolve_sgemm<float, float, 1024, 5, 5, 3, 3, 3, 1, false, false, true>(int, int, int, float const*)": "conv",
    "void cudnn::cnn::wgrad_alg0_engine<float, 128, 6, 8, 3, 3, 5, false, 512>(int, int, int, float const*, int)": "conv",
    "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_128x128_16x4_nt_align4>(cutlass_80_tensorop_s1688gemm_128x128)": "conv",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true, (cudnnKernelDataType_t)2>(...)": "layout",
    "void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>(...)": "layout",
    # ATen
    "void at::native::batch_norm_collect_statistics_kernel<at::native::InvStd, float, float, float, int>(...)": "batch_norm",
    "void at::native::batch_norm_backward_reduce_channels_last_kernel<4, c10::BFloat16, float, float>(...)": "batch_norm",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::WelfordOps<float>>>(...)": "batch_norm",
    "void at::native::(anonymous namespace)::reflection_pad2d_out_kernel<float>(float const*, float*, long, long)": "pad",
    "void at::native::(anonymous namespace)::reflection_pad2d_backward_out_kernel<float>(float*, float const*)": "pad",
    "void at::native::(anonymous namespace)::upsample_bilinear2d_out_frame<float, float>(int, float, float, bool)": "upsample",
    "void at::native::(anonymous namespace)::upsample_bilinear2d_nhwc_out_frame<c10::BFloat16, float>(...)": "upsample",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>>(...)": "concat",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::leaky_relu_kernel(at::TensorIteratorBase&, c10::Scalar const&)::{lambda(float)#1}, std::array<char*, 2ul> >(int)": "activation",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::leaky_relu_backward_kernel(at::TensorIteratorBase&)::{lambda(float, float)#1}>(int)": "activation",
    "void at::native::vectorized_elementwise_kernel<4, at::native::sigmoid_kernel_cuda(at::TensorIteratorBase&)::{lambda(float)#1}>(int)": "activation",
    "void at::native::elementwise_kernel<128, 2, at::native::mse_backward_cuda_kernel(at::TensorIterator&, c10::Scalar const&)::{lambda(float, float, float)#1}>(int)": "loss",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)0, false>>(...)": "adam",
    "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<2>, at::native::BinaryOpScalarFunctor<float, 2, 1, 1>, std::multiplies<float>, float>(...)": "adam",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >(int)": "copy",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda(float)#1}>(int)": "copy",
    "Memset (Device)": "copy",
    "Memcpy DtoD (Device -> Device)": "copy",
    "void at::native::vectorized_elementwise_kernel<4, at::native::where_kernel_impl(at::TensorIterator&)::{lambda(bool, float, float)#1}>(int)": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul> >(int)": "elementwise",
    "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, at::native::templates::cuda::normal_and_transform<float, float>>(...)": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, unsigned int, float, 4>>(...)": "elementwise",
    # dipfast.kernels (Triton)
    "_conv_bn_lrelu_fwd_kernel": "conv",
    "_conv_wgrad_kernel": "conv",
    "_conv_dgrad_kernel": "conv",
    "_merge_conv_fwd_kernel": "conv",
    "_merge_wgrad_kernel": "conv",
    "_bn_lrelu_kernel": "batch_norm",
    "_bn_lrelu_bwd_kernel": "batch_norm",
    "_merge_stats_kernel": "batch_norm",
    "_merge_bn_bwd_kernel": "batch_norm",
    "_reflect_fold_kernel": "pad",
    "_reflection_pad_kernel": "pad",
    "_reflection_fold_kernel": "pad",
    "_lanczos2_fwd_kernel": "loss",
    "_rules_pixels_kernel": "elementwise",  # the EMA, the metrics, early stopping: the floor's elementwise groups
    "_early_stop_scalars_kernel": "elementwise",
    "_copy_rows_kernel": "elementwise",  # backtracking's and the freeze's copies, not a cast
    # Inductor: a fused kernel counts in its first group in the patterns' order
    "triton_red_fused__native_batch_norm_legit_functional_0": "batch_norm",
    "triton_poi_fused__native_batch_norm_legit_functional_leaky_relu_reflection_pad2d_1": "batch_norm",
    "triton_poi_fused_reflection_pad2d_backward_2": "pad",
    "triton_poi_fused_upsample_bilinear2d_3": "upsample",
    "triton_poi_fused_cat_4": "concat",
    "triton_poi_fused_leaky_relu_leaky_relu_backward_5": "activation",
    "triton_per_fused_mse_loss_6": "loss",
    "triton_poi_fused_convolution_7": "conv",  # a conv's bias: the conv itself is cuDNN's
    "triton_poi_fused__to_copy_8": "copy",
    "triton_poi_fused_add_mul_9": "elementwise",
    "some_kernel_nobody_named": "other",
}


@pytest.mark.parametrize("name, group", KERNELS.items(), ids=[f"{g}:{n[:40]}" for n, g in KERNELS.items()])
def test_kernel_group_of_each_kind_of_kernel(name, group):
    assert kernel_group(name) == group


def test_group_times_sum_the_kernels_of_each_group_in_order():
    kernels = [
        ("_conv_dgrad_kernel", 0.5),
        ("Memset (Device)", 0.125),
        ("sm90_xmma_fprop_implicit_gemm_bf16_cudnn", 0.25),
        ("void at::native::batch_norm_collect_statistics_kernel<float>", 1.0),
        ("unknown", 2.0),
    ]
    times = group_times(kernels)
    assert times == {"conv": 0.75, "batch_norm": 1.0, "copy": 0.125, "other": 2.0}
    assert list(times) == [g for g in PROFILE_GROUPS if g in times]


def test_every_kernel_of_dipfast_kernels_has_a_group():
    """Each Triton kernel the package launches (a @triton.jit function named *_kernel) is counted in a group, not
    'other': the finalize of the BatchNorm partials and the upsample's transpose were 'other' until this test."""
    source = "\n".join(p.read_text() for p in sorted((ROOT / "kernels").glob("*.py")))
    names = set(re.findall(r"@triton\.jit[^\n]*\n\s*def (_\w+_kernel)\(", source))
    assert {"_chan_finalize_kernel", "_transpose_kernel", "_batch_norm_stats_kernel"} <= names
    assert {name: kernel_group(name) for name in names if kernel_group(name) == "other"} == {}


def test_launch_summary_counts_launches_per_group_and_the_launch_bound_ones():
    kernels = [
        ("sm90_xmma_fprop_implicit_gemm_bf16_cudnn", 2.0, 0.5),  # 250 us a launch
        ("_chan_finalize_kernel", 30.0, 0.06),  # 2 us a launch: launch-bound
        ("_column_sums_kernel", 30.0, 0.15),  # exactly 5 us: not under the line
        ("void at::native::vectorized_elementwise_kernel<4, FillFunctor>", 39.0, 0.078),  # 2 us
    ]
    summary = launch_summary(kernels)
    assert summary["launches_per_iter"] == 101.0
    assert summary["short_launches_per_iter"] == 69.0 and summary["short_ms_per_iter"] == pytest.approx(0.138)
    assert summary["launches_by_group"] == {"conv": 2.0, "batch_norm": 60.0, "copy": 39.0}
    assert launch_summary([])["launches_per_iter"] == 0


def test_floor_ratios_put_each_group_beside_its_floor():
    rows = floor_ratios({"conv": 3.0, "batch_norm": 1.0, "layout": 0.5}, {"conv": 1.5, "batch_norm": 0.25, "pad": 0.25})
    by = {r["group"]: r for r in rows}
    assert by["conv"] == {"group": "conv", "ms_per_iter": 3.0, "floor_ms": 1.5, "ratio": 2.0}
    assert by["batch_norm"]["ratio"] == 4.0
    assert by["pad"] == {"group": "pad", "ms_per_iter": 0.0, "floor_ms": 0.25, "ratio": 0.0}  # fused away elsewhere
    assert by["layout"]["floor_ms"] is None and by["layout"]["ratio"] is None  # no floor: pure overhead
    assert by["total"] == {"group": "total", "ms_per_iter": 4.5, "floor_ms": 2.0, "ratio": 2.25}
    assert [r["group"] for r in rows] == ["conv", "batch_norm", "pad", "layout", "total"]
    unknown_gpu = floor_ratios({"conv": 1.0}, {})
    assert unknown_gpu[-1] == {"group": "total", "ms_per_iter": 1.0, "floor_ms": None, "ratio": None}


def test_every_floor_group_folds_into_a_profile_group():
    assert set(PROFILE_GROUP_OF) == set(floor.GROUPS)
    assert set(PROFILE_GROUP_OF.values()) <= set(PROFILE_GROUPS) - {"layout", "other"}
    groups = {"conv": {"floor_ms": 1.0}, "ema": {"floor_ms": 0.25}, "input_noise": {"floor_ms": 0.5},
              "cast": {"floor_ms": 0.125}}  # fmt: skip
    assert profile_floor_ms(groups) == {"conv": 1.0, "elementwise": 0.75, "copy": 0.125}
