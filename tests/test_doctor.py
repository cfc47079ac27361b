"""`dipfast doctor` and the summary line of `dipfast --version` (dipfast/doctor.py): each row against
what the libraries themselves say, and the GPU rows with a GPU faked where there is none."""

from __future__ import annotations

import pytest
import torch

import dipfast.native as native
from dipfast import cli, doctor
from dipfast.backends import bf16_native
from dipfast.native import loader

triton = pytest.importorskip("triton")


def test_every_row_says_what_its_library_says():
    rows = dict(doctor.rows())
    assert list(rows) == ["native ops", "triton", "cuda", "bf16", "torch"]
    status = native.status()
    assert rows["native ops"] == f"{status.path}: {status.detail}"
    assert rows["triton"].startswith(f"{triton.__version__}, ")
    assert rows["torch"].startswith(f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    cpu_bf16 = bf16_native(torch.device("cpu"))
    assert rows["bf16"].startswith("CPU yes" if cpu_bf16 else "CPU no")
    if not torch.cuda.is_available():
        assert "CPU interpreter" in rows["triton"]
        assert rows["cuda"] in ("none (this torch is a CPU build)", "no GPU found")


def test_the_summary_is_one_line_of_the_same_facts():
    line = doctor.summary()
    assert "\n" not in line and line.startswith(f"native ops: {native.status().path}; triton {triton.__version__}: ")
    assert line.endswith(f"torch {torch.__version__}")
    assert f"bf16 in hardware: {'yes' if bf16_native(torch.device('cpu')) else 'no'} (CPU)" in line


def test_eager_ops_are_reported_with_the_reason_and_the_fix(monkeypatch):
    eager = loader.NativeStatus("eager", "no ahead-of-time build, and no C++ compiler (c++) to build them")
    monkeypatch.setattr(native, "status", lambda: eager)
    row = dict(doctor.rows())["native ops"]
    assert row == f"eager: {eager.detail}; to get them, {loader.HOW_TO_GET_THEM}"
    assert doctor.summary().startswith("native ops: eager; ")


def test_required_but_missing_ops_are_reported_not_raised(monkeypatch):
    def missing():
        raise native.NativeOpsMissing("DIPFAST_REQUIRE_NATIVE=1 but the native CPU ops did not load: x")

    monkeypatch.setattr(native, "status", missing)
    assert dict(doctor.rows())["native ops"].startswith("eager (DIPFAST_REQUIRE_NATIVE=1 is set")


def test_a_gpu_is_named_with_its_capability_and_bf16(monkeypatch):
    """No GPU here: torch.cuda's answers for an A100 and an older V100, faked."""
    gpus = {0: ("NVIDIA A100-SXM4-80GB", (8, 0)), 1: ("Tesla V100-SXM2-16GB", (7, 0))}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: gpus[torch.device(d).index][1])
    monkeypatch.setattr(doctor, "bf16_native", lambda d: d.type == "cpu" or gpus[d.index][1] >= (8, 0))
    rows = dict(doctor.rows())
    assert rows["cuda"] == (
        "cuda:0: NVIDIA A100-SXM4-80GB (compute capability 8.0), cuda:1: Tesla V100-SXM2-16GB (compute capability 7.0)"
    )
    assert rows["bf16"] == "CPU yes (AVX512-BF16 or AMX), cuda:0 yes, cuda:1 no"
    assert rows["triton"] == f"{triton.__version__}, runs on CUDA"
    assert "CUDA: NVIDIA A100-SXM4-80GB, Tesla V100-SXM2-16GB" in doctor.summary()


def test_the_command_prints_the_report(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == doctor.report().splitlines() and out.startswith("native ops: ")
    assert len(out.splitlines()) == 5
