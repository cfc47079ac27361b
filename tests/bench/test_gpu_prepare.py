"""bench/gpu_prepare.sh, what a GPU window's first call needs from this machine: run in a repository of its own (a
copy of the script, committed), with the paper's images beside it and a stand-in pip that "downloads" the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess

from ._suites import ROOT

PIP = """#!/usr/bin/env bash
# a stand-in python3 whose `-m pip download ... -d DIR` leaves a wheel in DIR and counts its calls
echo call >> "$(dirname "$0")/pip-calls"
while [ $# -gt 0 ]; do
    [ "$1" = -d ] && mkdir -p "$2" && touch "$2/nvidia_cudnn_frontend-1.16.0-cp312-manylinux.whl"
    shift
done
"""


def _repo(tmp_path):
    """tmp/repo (the script, committed), tmp/shared/data/dip (an image), tmp/python (the stand-in)."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench/gpu_prepare.sh", repo / "bench")
    (repo / ".gitignore").write_text(".gpu-data/\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "the script"], check=True)
    (tmp_path / "shared/data/dip/denoising").mkdir(parents=True)
    (tmp_path / "shared/data/dip/denoising/F16_GT.png").write_bytes(b"an image")
    python = tmp_path / "python"
    python.write_text(PIP)
    python.chmod(0o755)
    return repo, python


def _prepare(repo, python, *argv):
    env = {k: v for k, v in os.environ.items() if k != "DIPFAST_GPU_DATA"} | {"PYTHON": str(python)}
    proc = subprocess.run(["bash", str(repo / "bench/gpu_prepare.sh"), *argv], env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_it_fills_the_carry_once_and_prints_the_calls_with_the_commit(tmp_path):
    repo, python = _repo(tmp_path)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    rc, out, err = _prepare(repo, python)
    assert rc == 0, out + err
    assert (repo / ".gpu-data/dip/denoising/F16_GT.png").read_bytes() == b"an image"
    assert len(list((repo / ".gpu-data/wheels").glob("nvidia_cudnn_frontend-*.whl"))) == 1
    assert 'carries [".gpu-data"]' in out and f"DIPFAST_BENCH_COMMIT={commit.strip()} bash bench/gpu_quick.sh" in out
    assert "gpu_prepare.sh --left" in out and out.count("_BUDGET=") == 1  # call 2 waits for the seconds left
    rc, out, err = _prepare(repo, python, "--left", "400")  # again: nothing copied or downloaded twice
    assert rc == 0 and f"images: {repo / '.gpu-data/dip'} is there" in out
    assert "timeout_s 390" in out and "DIPFAST_GPU_QUICK_BUDGET=290 bash bench/gpu_quick.sh" in out
    assert (tmp_path / "pip-calls").read_text() == "call\n"


def test_what_it_cannot_do_is_said_and_fails_it(tmp_path):
    repo, python = _repo(tmp_path)
    (repo / "bench/gpu_prepare.sh").write_text((repo / "bench/gpu_prepare.sh").read_text() + "\n")  # uncommitted
    python.write_text("#!/usr/bin/env bash\nexit 1\n")  # pip without a network
    rc, out, err = _prepare(repo, python, "--data", str(tmp_path / "nowhere"))
    assert rc == 1 and "bash bench/gpu_quick.sh" in out
    assert "give --data" in err and "could not download" in err and "uncommitted changes" in err
    assert not (repo / ".gpu-data/dip").exists()
