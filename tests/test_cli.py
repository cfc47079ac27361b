"""The `dipfast` command: --version, restore (every task), demo, and every bad input.

Bad input must end with exit status 2 and exactly one line on stderr, 'dipfast: error: ...',
never a traceback, never an overwritten input. Most cases call dipfast.cli.main() in-process;
a few run `python -m dipfast.cli` to check the real process's exit status and stderr.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import random_image
from PIL import Image

import dipfast
from dipfast import cli, early_stop

REPO = Path(__file__).resolve().parents[1]


# Tiny nets on a shared 2-core machine: one torch thread each, as threads competing for the cores slow them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def in_png(tmp_path, np_rng) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(random_image(np_rng, 16, 16, 3, np.uint8)).save(path)
    return path


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own exits (--version, usage errors)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(*args, cwd) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "dipfast.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_error_line(rc, err, *fragments):
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert rc == cli.EXIT_BAD_INPUT == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("dipfast: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------------
# in a real process


def test_version(tmp_path):
    """The version, then `dipfast doctor` in one line (tests/test_doctor.py checks its contents)."""
    p = run_process("--version", cwd=tmp_path)
    version, summary = p.stdout.splitlines()
    assert p.returncode == 0 and version == f"dipfast {dipfast.__version__}"
    assert summary.startswith("native ops: ") and f"torch {torch.__version__}" in summary
    assert p.stderr == ""


def test_restore_writes_the_output_and_a_summary(tmp_path, in_png):
    before = in_png.read_bytes()
    p = run_process("restore", in_png.name, "-o", "out.png", "--iters", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert re.fullmatch(r"out\.png: 2 iterations in \d+\.\d s \(\d+\.\d it/s\)\n", p.stdout), p.stdout
    with Image.open(tmp_path / "out.png") as out:
        assert out.format == "PNG" and out.mode == "RGB" and out.size == (16, 16)
    assert in_png.read_bytes() == before
    assert not list(tmp_path.glob(".*dipfast-tmp*"))  # no temporary file left behind


def test_restore_stop_auto_reports_its_early_stop(capsys, monkeypatch, tmp_path, in_png):
    """--stop auto reaches restore(): with a short rule in place of the calibrated one (window 4, patience 4),
    the fit stops well before --iters and the summary names the iteration whose output was written."""
    monkeypatch.setitem(early_stop.CALIBRATED, "denoise", early_stop.EarlyStopSpec(window=4, patience=4))
    rc, out, err = run_main(capsys, "restore", in_png, "-o", tmp_path / "out.png", "--stop", "auto", "--iters", "300")
    assert rc == 0, err
    m = re.fullmatch(r".*out\.png: (\d+) iterations in .*, stopped early: the output of iteration (\d+)\n", out)
    assert m is not None, out
    assert int(m[1]) == int(m[2]) + 4 < 300
    assert (tmp_path / "out.png").is_file()


def test_restore_stop_auto_says_why_a_clean_image_ran_to_the_bound(capsys, monkeypatch, tmp_path, np_rng):
    """Denoising's noise gate on an image with no noise never opens: the summary says so, with the estimate."""
    from _helpers import smooth_image

    path = tmp_path / "clean.png"
    Image.fromarray((255 * smooth_image(np_rng, 16, 16)).round().astype(np.uint8)).save(path)
    rule = early_stop.EarlyStopSpec(window=4, patience=4, noise_gate=1.0)
    monkeypatch.setitem(early_stop.CALIBRATED, "denoise", rule)
    rc, out, err = run_main(capsys, "restore", path, "-o", tmp_path / "out.png", "--iters", "30")
    assert rc == 0, err
    m = re.fullmatch(r".*out\.png: 30 iterations in .*, never stopped early: .* \(sigma (\d+\.\d)/255\), .*\n", out)
    assert m is not None, out
    assert float(m[1]) < 2  # a smooth image, rounded to 8 bits: about the rounding's 0.3/255


def test_demo_writes_its_pngs(tmp_path):
    p = run_process("demo", "--iters", "2", "--size", "16", "--out", "demo", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "noisy PSNR" in p.stdout and re.search(r"restored: PSNR \d+\.\d\d dB, EMA \d+\.\d\d dB", p.stdout)
    for name in ("clean.png", "noisy.png", "restored.png", "ema.png"):
        with Image.open(tmp_path / "demo" / name) as img:
            assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"
    with Image.open(tmp_path / "demo" / "psnr.png") as plot:
        assert plot.format == "PNG" and min(plot.size) > 100
    clean = np.asarray(Image.open(tmp_path / "demo" / "clean.png")).astype(int)
    noisy = np.asarray(Image.open(tmp_path / "demo" / "noisy.png")).astype(int)
    assert 10 < np.abs(clean - noisy).mean() < 40  # sigma = 25 noise, clipped


@pytest.mark.parametrize("case", ["missing input", "iters 0", "not an image"])
def test_bad_input_in_a_real_process(tmp_path, in_png, case):
    args = {
        "missing input": ["restore", "missing.png", "-o", "out.png"],
        "iters 0": ["restore", in_png.name, "-o", "out.png", "--iters", "0"],
        "not an image": ["restore", "text.png", "-o", "out.png"],
    }[case]
    (tmp_path / "text.png").write_text("hello, not a PNG\n")
    p = run_process(*args, cwd=tmp_path)
    assert_one_error_line(p.returncode, p.stderr)
    assert p.stdout == "" and not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------------------------------------
# every task through the command (in-process)


@pytest.mark.parametrize("task", ["denoise", "jpeg", "sr", "inpaint", "restore", "enhance", "flash"])
def test_every_task_runs(capsys, tmp_path, in_png, np_rng, task):
    extra = []
    if task == "sr":
        extra = ["--scale", "2"]
    elif task in ("inpaint", "restore"):
        Image.fromarray((np_rng.random((16, 16)) < 0.6).astype(np.uint8) * 255).save(tmp_path / "mask.png")
        extra = ["--mask", tmp_path / "mask.png"]
    elif task == "flash":
        Image.fromarray(random_image(np_rng, 16, 16, 3, np.uint8)).save(tmp_path / "flash.png")
        extra = ["--guide", tmp_path / "flash.png"]
    out = tmp_path / "out.png"
    rc, stdout, err = run_main(capsys, "restore", in_png, "-o", out, "--task", task, "--iters", "1", "--quiet", *extra)
    assert rc == 0, err
    assert err == "" and stdout.startswith(f"{out}: 1 iterations in ")
    side = 32 if task == "sr" else 16
    with Image.open(out) as img:
        assert img.size == (side, side) and img.mode == "RGB"


def test_target_and_ema_output(capsys, tmp_path, in_png, np_rng):
    Image.fromarray(random_image(np_rng, 16, 16, 3, np.uint8)).save(tmp_path / "gt.png")
    rc, stdout, err = run_main(
        capsys,
        "restore",
        in_png,
        "-o",
        tmp_path / "out.png",
        "--iters",
        "2",
        "--quiet",
        "--target",
        tmp_path / "gt.png",
        "--ema-output",
        tmp_path / "ema.png",
        "--seed",
        "3",
    )
    assert rc == 0, err
    assert re.search(r", PSNR \d+\.\d\d dB \(EMA \d+\.\d\d dB\)$", stdout.strip()), stdout
    for name in ("out.png", "ema.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (16, 16)
    assert (tmp_path / "out.png").read_bytes() != (tmp_path / "ema.png").read_bytes()


def test_rgba_and_16_bit_files_keep_their_mode(capsys, tmp_path, np_rng):
    rgba = random_image(np_rng, 12, 10, 4, np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(random_image(np_rng, 12, 10, None, np.uint16)).save(tmp_path / "gray16.png")
    for name in ("rgba.png", "gray16.png"):
        rc, _, err = run_main(
            capsys, "restore", tmp_path / name, "-o", tmp_path / f"out-{name}", "--iters", "1", "--quiet"
        )
        assert rc == 0, err
    with Image.open(tmp_path / "out-rgba.png") as img:
        assert img.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(img)[..., 3], rgba[..., 3])
    with Image.open(tmp_path / "out-gray16.png") as img:
        assert img.mode in ("I;16", "I") and np.asarray(img).max() > 255


def test_force_overwrites_an_existing_output(capsys, tmp_path, in_png):
    out = tmp_path / "out.png"
    out.write_bytes(b"old contents")
    rc, _, err = run_main(capsys, "restore", in_png, "-o", out, "--iters", "1", "--quiet", "--force")
    assert rc == 0, err
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (16, 16)


def test_no_command_prints_help(capsys):
    rc, out, _ = run_main(capsys)
    assert rc == 2 and "restore" in out and "demo" in out


# ---------------------------------------------------------------------------------------------
# every bad input (in-process): status 2, one line, no traceback, nothing written


def _png_of_width_zero(path: Path) -> None:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _bad_cases():
    """name -> setup(tmp_path, in_png, np_rng) returning (argv, fragments that the message must hold)."""

    def small_png(tmp, np_rng, name="small.png", side=8, channels=3):
        path = tmp / name
        Image.fromarray(random_image(np_rng, side, side, channels, np.uint8)).save(path)
        return path

    def truncated(tmp, inp, np_rng):
        path = tmp / "truncated.png"
        path.write_bytes(inp.read_bytes()[: len(inp.read_bytes()) // 2])
        return ["restore", path, "-o", tmp / "out.png"], ["truncated"]

    def text_png(tmp, inp, np_rng):
        (tmp / "text.png").write_text("this is not an image\n")
        return ["restore", tmp / "text.png", "-o", tmp / "out.png"], ["not an image"]

    def empty_file(tmp, inp, np_rng):
        (tmp / "empty.png").write_bytes(b"")
        return ["restore", tmp / "empty.png", "-o", tmp / "out.png"], ["empty.png"]

    def zero_px(tmp, inp, np_rng):
        _png_of_width_zero(tmp / "zero.png")
        return ["restore", tmp / "zero.png", "-o", tmp / "out.png"], ["zero.png"]

    def folder_input(tmp, inp, np_rng):
        (tmp / "folder.png").mkdir()
        return ["restore", tmp / "folder.png", "-o", tmp / "out.png"], ["is a folder"]

    def mask_size(tmp, inp, np_rng):
        mask = small_png(tmp, np_rng, "mask.png", 8, None)
        argv = ["restore", inp, "-o", tmp / "out.png", "--task", "inpaint", "--mask", mask]
        return argv, ["mask is 8 x 8", "16 x 16"]

    def target_size(tmp, inp, np_rng):
        gt = small_png(tmp, np_rng, "gt.png", 8)
        return ["restore", inp, "-o", tmp / "out.png", "--target", gt], ["target is"]

    def rgba_mask(tmp, inp, np_rng):
        mask = small_png(tmp, np_rng, "mask.png", 16, 4)
        return ["restore", inp, "-o", tmp / "out.png", "--task", "restore", "--mask", mask], ["alpha"]

    def existing_output(tmp, inp, np_rng):
        (tmp / "out.png").write_bytes(b"keep me")
        return ["restore", inp, "-o", tmp / "out.png"], ["exists", "--force"]

    def output_is_input(tmp, inp, np_rng):
        return ["restore", inp, "-o", inp, "--iters", "1"], ["is the input file"]

    def output_is_input_forced(tmp, inp, np_rng):
        return ["restore", inp, "-o", inp, "--iters", "1", "--force"], ["is the input file"]

    def output_is_input_symlink(tmp, inp, np_rng):
        (tmp / "link.png").symlink_to(inp)
        return ["restore", tmp / "link.png", "-o", inp, "--force"], ["is the input file"]

    def output_is_mask(tmp, inp, np_rng):
        mask = small_png(tmp, np_rng, "mask.png", 16, None)
        return ["restore", inp, "-o", mask, "--task", "inpaint", "--mask", mask, "--force"], ["is the input file"]

    def output_folder_missing(tmp, inp, np_rng):
        return ["restore", inp, "-o", tmp / "no" / "such" / "out.png"], ["does not exist"]

    def output_is_folder(tmp, inp, np_rng):
        (tmp / "outdir").mkdir()
        return ["restore", inp, "-o", tmp / "outdir", "--force"], ["is a folder"]

    def output_extension(tmp, inp, np_rng):
        return ["restore", inp, "-o", tmp / "out.notanimage"], ["extension"]

    def output_write_fails(tmp, inp, np_rng):
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc, a folder where no file can be created even by root")
        return ["restore", inp, "-o", "/proc/dipfast-test-output.png", "--iters", "1", "--quiet"], ["/proc"]

    def ema_same_as_output(tmp, inp, np_rng):
        return ["restore", inp, "-o", tmp / "out.png", "--ema-output", tmp / "out.png"], ["--ema-output"]

    def args(*extra, fragments):
        return lambda tmp, inp, np_rng: (["restore", inp, "-o", tmp / "out.png", *extra], list(fragments))

    return {
        "missing input": lambda tmp, inp, np_rng: (
            ["restore", tmp / "missing.png", "-o", tmp / "out.png"],
            ["does not exist"],
        ),
        "folder as input": folder_input,
        "not an image": text_png,
        "truncated png": truncated,
        "empty file": empty_file,
        "0 px png": zero_px,
        "mask of another size": mask_size,
        "mask with alpha": rgba_mask,
        "missing mask file": args(
            "--task", "inpaint", "--mask", "no-such-mask.png", fragments=["mask file", "does not exist"]
        ),
        "inpaint without mask": args("--task", "inpaint", fragments=["needs mask=", "--mask FILE"]),
        "flash without guide": args("--task", "flash", fragments=["needs guide=", "--guide FILE"]),
        "target of another size": target_size,
        "sr scale 3": args("--task", "sr", "--scale", "3", fragments=["scale must be one of [2, 4, 8]"]),
        "sr without scale": args("--task", "sr", fragments=["needs scale="]),
        "scale for denoise": args("--scale", "2", fragments=["scale="]),
        "iters 0": args("--iters", "0", fragments=["--iters", "positive integer", "0"]),
        "iters -5": args("--iters", "-5", fragments=["--iters", "positive integer", "-5"]),
        "iters abc": args("--iters", "abc", fragments=["--iters", "abc"]),
        "unknown task": args("--task", "deblur", fragments=["--task", "deblur"]),
        "custom task": args("--task", "custom", fragments=["--task"]),
        "unknown preset": args("--preset", "nope", fragments=["unknown preset 'nope'"]),
        "unknown device": args("--device", "tpu", fragments=["unknown device 'tpu'"]),
        "unsupported device": args("--device", "mps", fragments=["device 'mps'"]),
        "unknown precision": args("--precision", "fp8", fragments=["precision"]),
        "unknown backend": args("--backend", "nope", fragments=["backend"]),
        "negative seed": args("--seed", "-1", fragments=["--seed", "non-negative integer", "-1"]),
        "no output option": lambda tmp, inp, np_rng: (["restore", inp], ["-o/--output"]),
        "existing output": existing_output,
        "output is the input": output_is_input,
        "output is the input, --force": output_is_input_forced,
        "output is the input via a link": output_is_input_symlink,
        "output is the mask": output_is_mask,
        "output folder missing": output_folder_missing,
        "output is a folder": output_is_folder,
        "output extension": output_extension,
        "output write fails": output_write_fails,
        "ema output equals output": ema_same_as_output,
        "unknown command": lambda tmp, inp, np_rng: (["bogus"], ["bogus"]),
        "task as restore()'s positional": lambda tmp, inp, np_rng: (
            ["restore", inp, "sr", "-o", tmp / "out.png"],
            ["unrecognized arguments: sr", "'sr' is a value of --task: write --task sr"],
        ),
        "bench suite's option value alone": lambda tmp, inp, np_rng: (
            ["bench", "early-stop", "--out", tmp / "es", "inpaint"],
            ["unrecognized arguments: inpaint", "'inpaint' is a value of --tasks: write --tasks inpaint"],
        ),
        "a word no option takes": lambda tmp, inp, np_rng: (
            ["restore", inp, "blurry", "-o", tmp / "out.png"],
            ["unrecognized arguments: blurry"],
        ),
        "unknown stop": lambda tmp, inp, np_rng: (
            ["restore", inp, "-o", tmp / "out.png", "--stop", "soon"],
            ["--stop", "invalid choice: 'soon'"],
        ),
        "stop auto under its window": lambda tmp, inp, np_rng: (
            ["restore", inp, "-o", tmp / "out.png", "--stop", "auto", "--iters", "3"],
            ["early-stop window (100) is larger than iters (3)"],
        ),
        "batch stop auto under its window": lambda tmp, inp, np_rng: (
            ["batch", inp, "-o", tmp / "restored", "--stop", "auto", "--iters", "3"],
            ["early-stop window (100) is larger than iters (3)"],
        ),
        "demo size 4": lambda tmp, inp, np_rng: (["demo", "--size", "4", "--out", tmp / "demo"], ["demo size"]),
        "demo unknown device": lambda tmp, inp, np_rng: (
            ["demo", "--device", "tpu", "--out", tmp / "demo"],
            ["unknown device 'tpu'"],
        ),
        "demo negative seed": lambda tmp, inp, np_rng: (
            ["demo", "--seed", "-1", "--out", tmp / "demo"],
            ["--seed", "-1"],
        ),
        "demo iters 0": lambda tmp, inp, np_rng: (["demo", "--iters", "0", "--out", tmp / "demo"], ["--iters"]),
        "demo out is a file": lambda tmp, inp, np_rng: (["demo", "--out", inp], ["is a file"]),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(capsys, tmp_path, in_png, np_rng, case):
    argv, fragments = BAD[case](tmp_path, in_png, np_rng)
    snapshot = _tree(tmp_path)
    rc, out, err = run_main(capsys, *argv)
    assert_one_error_line(rc, err, *fragments)
    assert out == ""
    assert _tree(tmp_path) == snapshot  # nothing overwritten, no file or folder created


def _tree(root: Path) -> dict:
    """Every path under root: file contents, 'dir' for folders, the target for links."""
    return {p: os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir" for p in root.rglob("*")}


def test_demo_refuses_to_overwrite_without_force(capsys, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "ema.png").write_bytes(b"keep")
    rc, out, err = run_main(capsys, "demo", "--iters", "1", "--size", "8", "--out", tmp_path / "demo", "--quiet")
    assert_one_error_line(rc, err, "already holds", "ema.png", "--force")
    assert (tmp_path / "demo" / "ema.png").read_bytes() == b"keep" and out == ""


def test_cuda_without_a_gpu(capsys, monkeypatch, tmp_path, in_png):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        rc, out, err = run_main(capsys, "restore", in_png, "-o", tmp_path / "out.png", "--device", device)
        assert_one_error_line(rc, err, "CUDA", f"{device!r}")
        assert out == "" and not (tmp_path / "out.png").exists()


def _deny(monkeypatch, target: Path, mode: int) -> None:
    real = os.access

    def access(path, m, *args, **kwargs):
        if Path(os.fspath(path)).resolve() == target.resolve() and m & mode:
            return False
        return real(path, m, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_unreadable_input_file(capsys, tmp_path, in_png):
    in_png.chmod(0)
    try:
        if os.access(in_png, os.R_OK):
            pytest.skip(
                "running as root: chmod 000 leaves the file readable (test_unreadable_input_reported "
                "covers the check with os.access patched, test_bad_input[folder as input] a real failure)"
            )
        rc, out, err = run_main(capsys, "restore", in_png, "-o", tmp_path / "out.png")
        assert_one_error_line(rc, err, "not readable")
        assert out == ""
    finally:
        in_png.chmod(0o644)


def test_unreadable_input_reported(capsys, monkeypatch, tmp_path, in_png):
    _deny(monkeypatch, in_png, os.R_OK)
    rc, out, err = run_main(capsys, "restore", in_png, "-o", tmp_path / "out.png")
    assert_one_error_line(rc, err, "not readable", str(in_png))
    assert out == ""
    assert not (tmp_path / "out.png").exists()


def test_read_only_output_folder(capsys, tmp_path, in_png):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip(
                "running as root: a 0o555 folder stays writable (test_unwritable_output_reported covers "
                "the check with os.access patched, test_bad_input[output write fails] a real failure)"
            )
        rc, out, err = run_main(capsys, "restore", in_png, "-o", folder / "out.png")
        assert_one_error_line(rc, err, "not writable")
        assert out == "" and list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_unwritable_output_reported(capsys, monkeypatch, tmp_path, in_png):
    folder = tmp_path / "ro"
    folder.mkdir()
    _deny(monkeypatch, folder, os.W_OK)
    rc, out, err = run_main(capsys, "restore", in_png, "-o", folder / "out.png")
    assert_one_error_line(rc, err, "not writable")
    assert out == "" and list(folder.iterdir()) == []


def test_input_unchanged_when_output_is_input(capsys, tmp_path, in_png):
    before = in_png.read_bytes()
    for extra in ([], ["--force"]):
        rc, _, err = run_main(capsys, "restore", in_png, "-o", in_png, "--iters", "1", "--quiet", *extra)
        assert_one_error_line(rc, err, "is the input file")
        assert in_png.read_bytes() == before


def test_running_out_of_device_memory_is_one_line_and_writes_nothing(capsys, tmp_path, in_png, monkeypatch):
    """The device runs out after the estimate let the fit start: one line with the options, no output written."""
    import dipfast.engine

    def fit_many(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity")

    monkeypatch.setattr(dipfast.engine, "fit_many", fit_many)
    snapshot = _tree(tmp_path)
    argv = ["restore", in_png, "-o", tmp_path / "out.png", "--iters", "2", "--precision", "fp32"]
    rc, out, err = run_main(capsys, *argv)
    assert_one_error_line(rc, err, "ran out of memory", "Tried to allocate 512.00 MiB", "precision='bf16'", "tile=")
    assert out == "" and _tree(tmp_path) == snapshot
