"""dipfast.bench.cli: the suites' command line, what a suite runs by default on a device, bad input (the runs
themselves: the other tests/bench files)."""

from __future__ import annotations

import pytest

from dipfast.bench import runs, time_to_psnr
from dipfast.bench.cli import main, methods_and_precisions
from dipfast.cli import _parser
from dipfast.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(*argv: str):
    return _parser().parse_args(["bench", "time-to-psnr", *argv])


def _planned_runs(monkeypatch, capsys, *argv: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The (method, precision) runs `dipfast bench time-to-psnr ARGV` would make on the CPU, and its stderr lines;
    nothing runs (the suite stops where it would start its first fit)."""
    planned = []

    def stop(cases, *, methods, precisions, pairs=None, **_):
        planned.extend(pairs if pairs is not None else runs.combinations(methods, precisions))
        raise InputError("stopped before the first run")

    monkeypatch.setattr(time_to_psnr, "run_time_to_psnr", stop)
    assert main(["time-to-psnr", "--size", "16", "--iters", "2", "--device", "cpu", "--quiet", *argv]) == 2
    return planned, capsys.readouterr().err.splitlines()


def test_a_cpu_suite_leaves_out_compile_triton_and_tf32_and_says_so(monkeypatch, capsys):
    planned, err = _planned_runs(monkeypatch, capsys)
    assert {m for m, _ in planned} == {"reference", "native", "native-eager", "native-nchw", "original-loop"}
    assert {p for _, p in planned} == {"fp32", "bf16"}
    assert len(planned) == 9  # 4 backends x 2 precisions, and the original loop in fp32
    assert err == [
        "dipfast bench: on cpu, left out: compile, triton, native-cl, native-reference-blocks, native-aligned, "
        "native-packed-parameters, native-unfused-rules, native-pdl, native-folded-finalize, "
        "native-parallel-compile, native-per-network, "
        "compile-forced-layout, compile-nchw, triton-nchw, triton-eager, original-loop-tf32, precision tf32 "
        "(torch.compile and Triton's interpreter take minutes a run here; on a CPU tf32 is fp32, native-cl, "
        "native-reference-blocks, "
        "native-unfused-rules, native-pdl, native-folded-finalize, native-parallel-compile and native-per-network "
        "are native, and the aligned "
        "and packed variants are about CUDA's tensor cores); add "
        "--backend all --precision all to run them, or name them",
        "dipfast bench: error: stopped before the first run",
    ]


def test_named_methods_run_on_a_cpu_and_the_line_names_only_what_is_still_left_out(monkeypatch, capsys):
    planned, err = _planned_runs(monkeypatch, capsys, "--backend", "compile", "triton")
    assert planned == [("compile", "fp32"), ("compile", "bf16"), ("triton", "fp32"), ("triton", "bf16")]
    assert "left out: precision tf32 (" in err[0] and "add --precision all to run them" in err[0]
    assert "--backend" not in err[0]


@pytest.mark.parametrize(
    "argv",
    [
        ("--backend", "all", "--precision", "all"),
        ("--configs", "compile:tf32", "native:bf16"),
    ],
    ids=["all", "configs"],
)
def test_all_or_configs_run_what_they_name_and_leave_nothing_out(monkeypatch, capsys, argv):
    planned, err = _planned_runs(monkeypatch, capsys, *argv)
    if "--configs" in argv:
        assert planned == [("compile", "tf32"), ("native", "bf16")]
    else:
        assert planned == runs.combinations(runs.dip_methods(), runs.api_precisions())
        assert ("triton", "tf32") in planned and ("original-loop-tf32", "tf32") in planned
    assert err == ["dipfast bench: error: stopped before the first run"]


def test_cuda_defaults_are_every_method_and_precision():
    methods, precisions, left_out = methods_and_precisions(_args(), "cuda")
    assert methods == runs.dip_methods() and precisions == runs.api_precisions() and left_out is None
    assert methods_and_precisions(_args("--backend", "native"), "cpu")[0] == ["native"]


def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["throughput", "--backend", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dipfast bench: error: unknown backend 'nope'") and "original-loop" in err
    assert main(["quality", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["time-to-psnr", "--no-cold", "--no-warm", "--out", str(tmp_path)]) == 2
    assert main([]) == 2


def test_add_bench_parser_plugs_into_a_parent_command(tmp_path):
    import argparse

    from dipfast.bench.cli import add_bench_parser, run_bench

    parser = argparse.ArgumentParser(prog="dipfast")
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    args = parser.parse_args(["bench", "summary", str(tmp_path)])
    assert args.command == "bench" and args.suite == "summary"
    assert run_bench(args) == 0
    args = parser.parse_args(["bench", "throughput", "--size", "16", "--batch", "1", "4", "--precision", "fp32"])
    assert args.size == [16] and args.batch == [1, 4] and args.precision == ["fp32"]
