"""dipfast.kernels.hardware: the architectures whose fp32 Triton path is refused (never touches CUDA here)."""

import pytest
import torch

from dipfast.kernels import hardware

pytestmark = pytest.mark.parity


@pytest.mark.parametrize(
    "capability, expected", [((9, 0), "Hopper (sm_90)"), ((8, 0), None), ((10, 0), None)], ids=["h100", "a100", "b200"]
)
def test_hopper_is_unverified_in_fp32(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert hardware.fp32_unverified_arch(torch.device("cuda", 0)) == expected


def test_a_cpu_is_never_refused(monkeypatch):
    def no_cuda(device=None):
        raise AssertionError("a CPU device must not query CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    assert hardware.fp32_unverified_arch(torch.device("cpu")) is None
