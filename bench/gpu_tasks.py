"""Every task through dipfast.restore() on each fast backend: does it run on this device at all?

    python bench/gpu_tasks.py --out DIR [--backends native compile triton] [--precision bf16]
                              [--tasks ...] [--size 64] [--iters 4] [--device auto]

A tiny net, a few iterations, synthetic images (a smooth random field, its noisy copy, a mask, a
guide): what is checked is that each (task, backend) fit runs to its last iteration and returns a
finite image of the right size, not its quality. On CUDA the fast backends capture the whole step in
a CUDA graph, which crashes on any host-to-device copy inside the step (super-resolution and
inpainting had never run there). 'tiles' is denoising in tiles of half the image, overlapping by an
eighth: restore()'s tiled path, its tiles trained side by side, and the blend.

Each backend runs in its own process, and after a case whose CUDA error poisons the context (an
illegal address, a sticky launch failure: dipfast.bench.lost_context) the backend's remaining cases
run in a fresh one, so that one broken case fails alone. Every case is recorded as it ends, pass or
fail with its error's first line, and the run never stops at a failure: DIR/tasks.jsonl (one JSON
object per case), DIR/tasks.md, and each backend's stderr in DIR/BACKEND.stderr.log. Exit status 0
when every case passed, else 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# the never-run-on-CUDA ones first; 'tiles': denoising in tiles of half the image (tiled_restore: its step of tiles
# side by side, the blend), never run on CUDA either
TASKS = ("sr", "inpaint", "tiles", "denoise", "jpeg", "restore", "enhance", "flash")
PRESET = {"sr": "sr4", "inpaint": "inpaint", "restore": "restore", "flash": "flash", "tiles": "denoise"}  # else: own
RESTORE_TASK = {"tiles": "denoise"}  # restore()'s task for a case that is not one


def _images(size: int, rng: np.random.Generator) -> dict:
    """(H, W, 3) float32 images in [0, 1]: a smooth target, its noisy copy, a half-known mask and a guide."""
    coarse = rng.random((size // 8 + 2, size // 8 + 2, 3))
    ys = np.linspace(0, coarse.shape[0] - 1.001, size)
    xs = np.linspace(0, coarse.shape[1] - 1.001, size)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    target = (
        coarse[y0][:, x0] * (1 - fy) * (1 - fx)
        + coarse[y0 + 1][:, x0] * fy * (1 - fx)
        + coarse[y0][:, x0 + 1] * (1 - fy) * fx
        + coarse[y0 + 1][:, x0 + 1] * fy * fx
    )
    noisy = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
    return {
        "target": target.astype(np.float32),
        "noisy": noisy.astype(np.float32),
        "mask": (rng.random((size, size)) < 0.5).astype(np.float32),
        "guide": np.clip(target * 1.3, 0, 1).astype(np.float32),
    }


def _arguments(task: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, tuple]:
    """restore()'s image, its task keywords, and the output shape expected."""
    im = _images(size, rng)
    if task == "sr":
        low = im["target"].reshape(size // 4, 4, size // 4, 4, 3).mean(axis=(1, 3))
        return low, {"scale": 4, "target": im["target"]}, (size, size, 3)
    kwargs = {"target": im["target"]}
    if task in ("inpaint", "restore"):
        kwargs["mask"] = im["mask"]
        return im["target"] * im["mask"][..., None], kwargs, (size, size, 3)
    if task == "flash":
        kwargs["guide"] = im["guide"]
    if task == "tiles":
        kwargs.update(tile=size // 2, overlap=size // 8)
    return im["noisy"], kwargs, (size, size, 3)


def run_case(task: str, backend: str, precision: str, *, size: int, iters: int, device: str) -> dict:
    """One restore() of `task` on `backend`: status 'ok', or 'failed' with the error's first line and its origin."""
    import dipfast
    from dipfast.bench import runs

    rng = np.random.default_rng(0)
    image, kwargs, shape = _arguments(task, size, rng)
    case = {"task": task, "backend": backend, "precision": precision, "size": size, "iters": iters, "device": device}
    t0 = time.perf_counter()
    try:
        result = dipfast.restore(
            image,
            RESTORE_TASK.get(task, task),
            iters=iters,
            stop="iterations",
            report_every=max(1, iters // 2),
            backend=backend,
            precision=precision,
            device=device,
            progress=False,
            **kwargs,
            **runs.net_overrides("tiny", PRESET.get(task, task)),
        )
        out = np.asarray(result.image)
        problems = []
        if result.iterations != iters:
            problems.append(f"ran {result.iterations} of {iters} iterations ({result.stop_reason})")
        if out.shape != shape:
            problems.append(f"image {out.shape}, expected {shape}")
        if not np.isfinite(out).all():
            problems.append("image not finite")
        if "tile" in kwargs and "tiling" not in result.extras:
            problems.append("not tiled")
        case.update(
            status="failed" if problems else "ok",
            error="; ".join(problems) or None,
            ran=f"{result.backend} {result.precision} on {result.device}",
            psnr=result.psnr,
        )
    except Exception as e:  # noqa: BLE001  (every failure is the finding: recorded, and the next case runs)
        case.update(status="failed", error=_described(e))
    case["seconds"] = round(time.perf_counter() - t0, 2)
    return case


def _described(e: BaseException) -> str:
    """'Type: first line (file:line)' of the error raised first: a failed CUDA graph capture raises its own error
    over the one inside it, and a CUDA error's first line names the cause (its last line is the advice to
    compile with TORCH_USE_CUDA_DSA, all the H200 run recorded of the triton x restore failure)."""
    while e.__context__ is not None and e.__cause__ is None and not e.__suppress_context__:
        e = e.__context__
    frames = traceback.extract_tb(e.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first} ({where})"


LOST_CONTEXT = 3  # a child's exit status: a case left the CUDA context unusable, the rest want a fresh process


def _child(args) -> int:
    """Run one backend's cases in this process, appending each to the JSON lines file as it ends. After a failure
    that leaves the CUDA context unusable (dipfast.bench.lost_context), it stops: exit status LOST_CONTEXT."""
    from dipfast.api import resolve_device
    from dipfast.bench import lost_context

    for task in args.tasks:
        case = run_case(task, args.backends[0], args.precision, size=args.size, iters=args.iters, device=args.device)
        lost = False
        if case["status"] == "failed":
            case["error"], lost = lost_context.noted(case["error"], resolve_device(args.device))
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(case) + "\n")
        print(f"{case['backend']:<8} {task:<8} {case['status']:<6} {case['seconds']:6.1f}s {case['error'] or ''}")
        sys.stdout.flush()
        if lost:
            return LOST_CONTEXT
    return 0


def markdown(cases: list[dict]) -> str:
    lines = [
        "## Every task through restore() on each fast backend\n",
        "| backend | task | status | ran | seconds | error |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['backend']} | {c['task']} | {c['status']} | {c.get('ran') or '-'} | {c.get('seconds', '-')} "
            f"| {(c.get('error') or '').replace('|', '/')} |"
        )
    passed = sum(c["status"] == "ok" for c in cases)
    logs = "Each backend's process wrote its stderr (CUDA's warnings among it) to BACKEND.stderr.log beside this file."
    return "\n".join(lines) + f"\n\n{passed} of {len(cases)} cases passed. {logs}\n"


def _child_command(backend: str, tasks: list[str], args, out: Path, jsonl: Path) -> list[str]:
    return [sys.executable, __file__, "--out", str(out), "--jsonl", str(jsonl), "--backends", backend,
            "--tasks", *tasks, "--precision", args.precision, "--size", str(args.size), "--iters", str(args.iters),
            "--device", args.device]  # fmt: skip


def run_backend(backend: str, args, out: Path, jsonl: Path) -> None:
    """One backend's cases in a process of their own (a fresh one for the cases after one that lost the CUDA
    context), each appended to jsonl; the cases a process left when it died recorded as such."""
    # the child's stderr kept whole: CUDA's own warnings go there and nowhere else (a graph destroyed during
    # another's capture says so only there, before the capture's end fails with an error of its own)
    log = out / f"{backend}.stderr.log"
    log.write_text("")
    left = list(args.tasks)
    while left:
        with open(log, "a") as stderr:
            proc = subprocess.run(_child_command(backend, left, args, out, jsonl), check=False,
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        sys.stdout.write(proc.stdout)
        done = {c["task"] for c in map(json.loads, jsonl.read_text().splitlines()) if c["backend"] == backend}
        still = [t for t in left if t not in done]
        got_through, left = len(still) < len(left), still
        if proc.returncode != LOST_CONTEXT or not got_through:  # finished, or died
            break
    if left:  # the process died (a crash, not an exception): its remaining cases say so
        last = (log.read_text().strip().splitlines() or [""])[-1]
        with open(jsonl, "a") as f:
            for task in left:
                error = f"the {backend} process died (exit {proc.returncode}) before this case: {last}"
                case = {"task": task, "backend": backend, "precision": args.precision, "status": "failed",
                        "error": error}  # fmt: skip
                f.write(json.dumps(case) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for tasks.jsonl and tasks.md")
    p.add_argument("--backends", nargs="+", default=["native", "compile", "triton"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--precision", default="bf16", help="restore()'s precision (default: bf16)")
    p.add_argument("--size", type=int, default=64, help="output side, a multiple of 16 (default: 64)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--jsonl", help=argparse.SUPPRESS)  # set in the per-backend child processes
    args = p.parse_args(argv)
    if args.size % 16:
        p.error(f"--size must be a multiple of 16 (the SR input is a quarter of it, the tiny net halves it twice); "
                f"got {args.size}")  # fmt: skip
    if args.jsonl:
        return _child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "tasks.jsonl"
    jsonl.write_text("")
    for backend in args.backends:
        run_backend(backend, args, out, jsonl)
        cases = [json.loads(line) for line in jsonl.read_text().splitlines()]
        (out / "tasks.md").write_text(markdown(cases))
    cases = [json.loads(line) for line in jsonl.read_text().splitlines()]
    print(markdown(cases))
    return 0 if all(c["status"] == "ok" for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
