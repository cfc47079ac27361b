"""What a result was measured on: CPU model or GPU name, library versions, the git commit.

Nothing here initialises CUDA unless the device asked for is a CUDA one.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

COMMIT_ENV = "DIPFAST_BENCH_COMMIT"  # set by a caller whose copy of the tree has no .git (the GPU machine)


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    """{'commit': sha or None, 'dirty': bool or None}, from DIPFAST_BENCH_COMMIT or the checkout."""
    if os.environ.get(COMMIT_ENV):
        return {"commit": os.environ[COMMIT_ENV], "dirty": None, "from": COMMIT_ENV}
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"commit": sha, "dirty": bool(status.strip()), "from": "git"}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "from": "no git checkout"}


def machine_info(device) -> dict:
    import dipfast

    dev = torch.device(device)
    info = {
        "device": str(dev),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "numpy": package_version("numpy"),
        "scikit-image": package_version("scikit-image"),
        "pillow": package_version("pillow"),
        "dipfast": dipfast.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        **git_commit(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_label(info: dict) -> str:
    """One line naming the machine, for table captions and plot titles."""
    where = (
        info["gpu"]
        or f"{info['cpu']} ({info['torch_threads']} torch thread{'s' if info['torch_threads'] != 1 else ''})"
    )
    commit = (info.get("commit") or "unknown")[:10] + ("+dirty" if info.get("dirty") else "")
    return f"{where}, torch {info['torch']}, commit {commit}"
