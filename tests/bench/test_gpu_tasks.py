"""bench/gpu_tasks.py records what a failed case's error says first: the cause, not CUDA's closing advice."""

from __future__ import annotations

from ._suites import bench_script


def _gpu_tasks():
    return bench_script("gpu_tasks")


def test_a_failed_capture_is_described_by_the_error_inside_it():
    inside = "CUDA error: operation not permitted when stream is capturing\nCompile with `TORCH_USE_CUDA_DSA` to ..."
    try:
        try:
            raise RuntimeError(inside)
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as e:
        assert "previous error" in _gpu_tasks()._described(e)  # `from None`: the chain was cut on purpose
    try:
        try:
            raise RuntimeError(inside)
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as e:
        described = _gpu_tasks()._described(e)
    assert described.startswith("RuntimeError: CUDA error: operation not permitted when stream is capturing (")
    assert "TORCH_USE_CUDA_DSA" not in described
