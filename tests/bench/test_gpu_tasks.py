"""bench/gpu_tasks.py records what a failed case's error says first: the cause, not CUDA's closing advice."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pytest

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


def _fake_child(tmp_path, behaviour: str):
    """A stand-in for a backend's child process: it records the tasks it was given, then for each task in turn
    appends a case, exiting with LOST_CONTEXT after the first where `behaviour` says so ('lose': every process loses
    its context after its first case; 'lose-at-once': it loses it before writing any)."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            args = sys.argv[1:]
            tasks = args[args.index("--tasks") + 1 : args.index("--precision")]
            jsonl = args[args.index("--jsonl") + 1]
            with open({str(tmp_path / "calls.txt")!r}, "a") as f:
                f.write(" ".join(tasks) + "\\n")
            if {behaviour!r} == "lose-at-once":
                sys.exit(3)
            case = {{"task": tasks[0], "backend": "native", "status": "failed", "error": "lost"}}
            with open(jsonl, "a") as f:
                f.write(json.dumps(case) + "\\n")
            sys.exit(3 if len(tasks) > 1 else 0)
            """
        )
    )
    return lambda backend, tasks, args, out, jsonl: [sys.executable, str(script), "--jsonl", str(jsonl), "--tasks",
                                                     *tasks, "--precision", "bf16"]  # fmt: skip


@pytest.mark.parametrize("behaviour", ["lose", "lose-at-once"])
def test_after_a_lost_context_the_remaining_cases_run_in_a_fresh_process(tmp_path, monkeypatch, behaviour):
    tasks = _gpu_tasks()
    assert tasks.LOST_CONTEXT == 3
    monkeypatch.setattr(tasks, "_child_command", _fake_child(tmp_path, behaviour))
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text("")
    args = argparse.Namespace(tasks=["sr", "inpaint", "tiles"], precision="bf16")
    tasks.run_backend("native", args, tmp_path, jsonl)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    cases = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [c["task"] for c in cases] == ["sr", "inpaint", "tiles"]
    if behaviour == "lose":  # each process got one case through: three processes, each given what was left
        assert calls == ["sr inpaint tiles", "inpaint tiles", "tiles"]
        assert all(c["error"] == "lost" for c in cases)
    else:  # no case got through: no second process, and the cases say the process died
        assert calls == ["sr inpaint tiles"]
        assert all("the native process died (exit 3) before this case" in c["error"] for c in cases)


def test_a_child_stops_after_the_case_that_lost_the_context(tmp_path, monkeypatch):
    from dipfast.bench import lost_context

    tasks = _gpu_tasks()
    ran = []

    def failing(task, backend, precision, **kwargs):
        ran.append(task)
        return {"task": task, "backend": backend, "status": "failed", "error": "RuntimeError: CUDA error", "seconds": 0}

    monkeypatch.setattr(tasks, "run_case", failing)
    monkeypatch.setattr(lost_context, "context_lost", lambda device: True)
    jsonl = tmp_path / "tasks.jsonl"
    args = argparse.Namespace(tasks=["sr", "inpaint"], backends=["native"], precision="bf16", size=16, iters=1,
                              device="cpu", jsonl=str(jsonl))  # fmt: skip
    assert tasks._child(args) == tasks.LOST_CONTEXT and ran == ["sr"]
    (case,) = map(json.loads, jsonl.read_text().splitlines())
    assert (
        case["error"]
        == "RuntimeError: CUDA error (the CUDA context was lost with it: what came after it ran in a fresh process)"
    )
