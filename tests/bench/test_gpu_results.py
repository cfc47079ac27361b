"""bench/gpu_results.py: a GPU window's archives into one bench/results/ folder, its README's facts from them."""

from __future__ import annotations

import datetime
import io
import json
import tarfile

from ._suites import bench_script

ENVIRONMENT = {
    "gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900, "triton": "3.6.0",
    "python": "3.12.3", "commit": "0123456789abcdef0123", "from": "DIPFAST_BENCH_COMMIT",
    "nvidia_smi": "name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.159.04, 143771 MiB",
}  # fmt: skip


def _archive(path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_window_becomes_one_folder_with_its_facts(tmp_path):
    results = bench_script("gpu_results")
    summary = "step\tstatus\tseconds\tlimit\tnote\nthroughput\tok\t150\t240\t\nbatch\tfailed\t20\t90\texit 1\n"
    _archive(tmp_path / "one.tar.gz", {
        "environment/environment.json": json.dumps(ENVIRONMENT),
        "summary.tsv": summary,
        "headline.md": "## Headline: issue 12's targets\n\n| target | measured | verdict |",
        "throughput.log": "\n".join(f"line {i}" for i in range(500)),
        "ops/benchmarks.json": "{}",  # pytest-benchmark's raw samples: left out
    })  # fmt: skip
    _archive(tmp_path / "two.tar.gz", {"summary.tsv": "step\tstatus\tseconds\tlimit\tnote\nparity\tok\t90\t120\t\n"})
    out = tmp_path / "results"
    argv = [str(tmp_path / "one.tar.gz"), str(tmp_path / "two.tar.gz"), "--out", str(out), "--log-lines", "50",
            "--command", "bash bench/gpu_quick.sh"]  # fmt: skip
    assert results.main(argv) == 0
    folder = out / f"{datetime.date.today().isoformat()}-h200-0123456789"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "call1", "call2"]
    assert not (folder / "call1/ops/benchmarks.json").exists()
    log = (folder / "call1/throughput.log").read_text().splitlines()
    assert log[0] == "[... 450 lines left out]" and log[-1] == "line 499" and len(log) == 51
    readme = (folder / "README.md").read_text()
    assert "NVIDIA H200 (driver 580.159.04), torch 2.11.0+cu130, CUDA 13.0, cuDNN 9.19, triton 3.6.0" in readme
    assert "(recorded through DIPFAST_BENCH_COMMIT)" in readme
    assert "| `call1/` | `bash bench/gpu_quick.sh` | 170 s of steps |" in readme
    assert "| `call2/` | `(not given)` | 90 s of steps |" in readme
    assert "| batch | failed | 20 | 90 | exit 1 |" in readme and "Not ok: batch." in readme
    assert "### Headline: issue 12's targets" in readme  # call1's headline, under a section of its own
    assert results.main(argv) == 2  # the folder exists: nothing overwritten
    (tmp_path / "not.tar.gz").write_text("no archive")
    assert results.main([str(tmp_path / "not.tar.gz"), "--out", str(out)]) == 2
