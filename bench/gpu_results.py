"""A GPU window's archives into bench/results/: one folder per window, its README's facts filled in from them.

    python bench/gpu_results.py CALL1.tar.gz [CALL2.tar.gz ...] --command "bash bench/gpu_quick.sh" --command "..."

Each archive is one call's `gpu-quick.tar.gz` (bench/gpu_quick.sh), unpacked as given into call1/, call2/, ... of
bench/results/<date>-<gpu>-<commit, 10 characters>/ (date: today; gpu and commit from the first call's
environment.json), leaving out the logs longer than --log-lines lines (their tails are kept, in <name>.log) and
pytest-benchmark's raw samples (ops/benchmarks.json: the table is in ops/ops.md), as bench/results/README.md asks.
README.md gets what the archives say: the GPU, its driver, torch, CUDA, cuDNN, triton and Python, the commit and
whether it was recorded from a clean tree, each call's command (--command, in order) and wall time, each step's
status, seconds and limit, the steps that were skipped or failed, and each call's headline.md; the analysis is the
author's to write where the README says so. A folder that exists is not overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAW = ("ops/benchmarks.json",)  # pytest-benchmark's samples: ops.md has the table


def _members(archive: tarfile.TarFile):
    for member in archive.getmembers():
        name = member.name.removeprefix("./")
        if member.isfile() and name not in RAW and not name.startswith("/") and ".." not in Path(name).parts:
            yield name, member


def unpack(archive_path: Path, dest: Path, log_lines: int) -> None:
    """The archive's files into dest, long logs cut to their last log_lines lines."""
    with tarfile.open(archive_path) as archive:
        for name, member in _members(archive):
            data = archive.extractfile(member).read()
            if name.endswith(".log"):
                lines = data.decode(errors="replace").splitlines()
                if len(lines) > log_lines:
                    data = "\n".join([f"[... {len(lines) - log_lines} lines left out]", *lines[-log_lines:]]).encode()
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def _steps(call: Path) -> list[list[str]]:
    summary = call / "summary.tsv"
    if not summary.is_file():
        return []
    return [line.split("\t") for line in summary.read_text().splitlines()[1:] if line.strip()]


def folder_name(environment: dict, today: datetime.date) -> str:
    gpu = (environment.get("gpu") or "cpu").split()[-1].lower()  # "NVIDIA H200" -> h200
    return f"{today.isoformat()}-{gpu}-{(environment.get('commit') or 'unknown')[:10]}"


def readme(environment: dict, calls: list[Path], commands: list[str]) -> str:
    smi = (environment.get("nvidia_smi") or "").splitlines()
    driver = smi[1].split(", ")[1] if len(smi) > 1 and ", " in smi[1] else "unknown"
    cudnn = environment.get("cudnn")
    cudnn = f"{cudnn // 10000}.{cudnn // 100 % 100}" if isinstance(cudnn, int) else "unknown"
    commit = environment.get("commit") or "unknown"
    how = (
        "recorded through DIPFAST_BENCH_COMMIT"
        if environment.get("from") == "DIPFAST_BENCH_COMMIT"
        else ("a clean tree" if environment.get("dirty") is False else "a tree with changes: not a result to commit")
    )
    lines = [
        f"# {environment.get('gpu') or 'no GPU'}, commit {commit[:10]}: a `bench/gpu_quick.sh` window\n",
        f"{environment.get('gpu')} (driver {driver}), torch {environment.get('torch')}, "
        f"CUDA {environment.get('cuda')}, cuDNN {cudnn}, triton {environment.get('triton')}, "
        f"Python {environment.get('python')}; commit {commit} "
        f"({how}). The files are the script's; logs longer than the limit keep their tails.\n",
        "| folder | command | wall |",
        "|---|---|---|",
    ]
    for k, call in enumerate(calls):
        seconds = sum(int(row[2]) for row in _steps(call) if len(row) > 2 and row[2].isdigit())
        command = commands[k] if k < len(commands) else "(not given)"
        lines.append(f"| `{call.name}/` | `{command}` | {seconds} s of steps |")
    for call in calls:
        lines += [
            f"\n## `{call.name}/`: the steps\n",
            "| step | status | seconds | limit | note |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join((row + [""] * 5)[:5]) + " |" for row in _steps(call)]
        missed = [row[0] for row in _steps(call) if len(row) > 1 and row[1] != "ok"]
        if missed:
            lines.append(f"\nNot ok: {', '.join(missed)}.")
    lines.append("\n## What the figures say\n\n(the author's analysis: each decision with the figure behind it)\n")
    for call in calls:
        headline = call / "headline.md"
        if headline.is_file():
            text = "\n" + headline.read_text().strip()
            lines += [f"\n## `{call.name}/headline.md`", text.replace("\n## ", "\n### ")]  # under this section
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archives", nargs="+", type=Path, help="each call's gpu-quick.tar.gz, in the calls' order")
    parser.add_argument("--command", action="append", default=[], help="each call's command, in order")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--log-lines", type=int, default=200)
    args = parser.parse_args(argv)
    for archive in args.archives:
        if not tarfile.is_tarfile(archive):
            print(f"gpu_results: {archive} is not a tar archive (each call's gpu-quick.tar.gz)", file=sys.stderr)
            return 2
    with tarfile.open(args.archives[0]) as first:
        member = next((m for name, m in _members(first) if name == "environment/environment.json"), None)
        environment = json.loads(first.extractfile(member).read()) if member else {}
    dest = args.out / folder_name(environment, datetime.date.today())
    if dest.exists():
        print(f"gpu_results: {dest} exists; move it away or give another --out", file=sys.stderr)
        return 2
    calls = [dest / f"call{k + 1}" for k in range(len(args.archives))]
    for archive, call in zip(args.archives, calls):
        unpack(archive, call, args.log_lines)
    (dest / "README.md").write_text(readme(environment, calls, args.command))
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
