"""Shared pieces of the native op tests: the skip mark, the layouts, and the tolerance policy."""

import pytest
import torch

from dipfast import native

requires_native = pytest.mark.skipif(
    not native.AVAILABLE, reason="dipfast native CPU ops not loaded (`dipfast doctor` says why)"
)

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}

# The tolerance policy for the kernels against the float64 twin, relative to the largest magnitude
# of the expected tensor (assert_native_close). fp32: each value is a handful of fp32 operations on
# fp32 inputs, with statistics from fp32 block sums combined in double: a few fp32 ulps (6e-8) of
# the magnitude. Largest measured over this suite: BatchNorm forward 4.6e-7, dx 4.8e-7, dweight
# 3.3e-7, merge 7.3e-7 (eager fp32: 1.5e-7, 3.3e-7, 8.3e-7); upsample 1.2e-7. 2e-6 is ~3x above the
# worst. float64: the same formulas in double against ATen's, ~1e-15 measured.
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def assert_native_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(actual).any(), "NaN in a native op's output"
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    assert scale > 0, "the oracle is all zeros: the comparison would be vacuous"
    torch.testing.assert_close(actual, expected, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    return (actual.detach().double() - oracle.detach().double()).abs().max().item()


def assert_within_eager_error(native_out, eager_out, oracle, factor: float = 2.0) -> None:
    """bf16: the native op's error against the float64 oracle is at most factor x eager bf16's."""
    native_err, eager_err = max_error(native_out, oracle), max_error(eager_out, oracle)
    assert native_err <= factor * eager_err, f"native bf16 error {native_err:.3g} > {factor} x eager {eager_err:.3g}"
