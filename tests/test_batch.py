"""dipfast.restore_many() and `dipfast batch` in this process: inputs, outputs, the manifest, resuming,
bad inputs, and a driver killed in the middle. Tiny net, 16 x 16 images, a few iterations.
(Ray: tests/test_batch_ray.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY, TINY_NET, random_image
from PIL import Image

import dipfast
from dipfast import batch, cli, images
from dipfast.errors import InputError
from dipfast.manifest import Manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITERS = 4
KW = {"iters": ITERS, "progress": False, **TINY}


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _tree(root: Path, np_rng, n: int = 3) -> list[str]:
    """n RGB PNGs (two in a subfolder), a grayscale JPEG of another size, a text file: the image keys."""
    keys = [f"img{k}.png" if k < n - 2 else f"sub/img{k}.png" for k in range(n)]
    for key in keys:
        _write(root / key, random_image(np_rng, 16, 16, 3, np.uint8))
    _write(root / "gray.jpg", random_image(np_rng, 12, 20, None, np.uint8))
    (root / "notes.txt").write_text("not an image")
    return sorted([*keys, "gray.jpg"])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if batch._is_image(p)}


# ---------------------------------------------------------------------------------------------
# the local path


def test_outputs_keep_paths_and_formats_and_equal_single_restores(tmp_path, np_rng):
    keys = _tree(tmp_path / "in", np_rng)
    out = tmp_path / "out"
    summary = dipfast.restore_many(tmp_path / "in", out, seed=3, **KW)
    assert (summary.restored, summary.skipped, summary.failed, summary.interrupted) == (len(keys), 0, 0, False)
    written = _outputs(out)
    assert sorted(written) == keys
    for key in keys:
        source = tmp_path / "in" / key
        with Image.open(out / key) as got, Image.open(source) as given:
            assert (got.format, got.mode, got.size) == (given.format, given.mode, given.size)
        alone = dipfast.restore(images.load_image(source), seed=3, **KW)  # `dipfast restore --seed 3`
        assert written[key] == images.encode_image(alone.image, source.suffix), key

    records = _records(out)
    assert [r["output"] for r in records] == keys  # one per image, sorted
    for r in records:
        assert r["status"] == "ok" and r["error"] is None and r["iterations"] == ITERS
        assert r["stop_reason"] == "iterations" and r["seconds"] > 0 and r["psnr"] is None
        assert r["settings"]["seed"] == 3 and r["settings"]["preset"]["iterations"] == ITERS
        assert r["ran"]["worker"] == "local" and r["ran"]["device"] == "cpu" and r["ran"]["group"] == 1
        assert r["input_sha256"] == batch.hashlib.sha256((tmp_path / "in" / r["output"]).read_bytes()).hexdigest()
        assert r["output_sha256"] == batch.hashlib.sha256(written[r["output"]]).hexdigest()


def test_batch_size_does_not_change_a_byte_and_targets_give_psnr(tmp_path, np_rng):
    src = tmp_path / "in"
    for k in range(3):
        _write(src / f"{k}.png", random_image(np_rng, 16, 16, 3, np.uint8))
        _write(tmp_path / "gt" / f"{k}.png", random_image(np_rng, 16, 16, 3, np.uint8))
    one = dipfast.restore_many(src, tmp_path / "one", batch=1, target_dir=tmp_path / "gt", **KW)
    four = dipfast.restore_many(src, tmp_path / "four", batch=4, target_dir=tmp_path / "gt", **KW)
    assert one.restored == four.restored == 3
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "four")
    for r in _records(tmp_path / "four"):
        out = np.asarray(Image.open(tmp_path / "four" / r["output"]), np.float64) / 255
        gt = np.asarray(Image.open(tmp_path / "gt" / r["output"]), np.float64) / 255
        # the record's PSNR is of the float output; the file is rounded to 8 bits
        assert r["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((out - gt) ** 2)), abs=0.05)


def test_rerun_skips_finished_images_and_redoes_changed_ones(tmp_path, np_rng):
    keys = _tree(tmp_path / "in", np_rng)
    out = tmp_path / "out"
    dipfast.restore_many(tmp_path / "in", out, **KW)
    stamps = {k: (out / k).stat().st_mtime_ns for k in keys}

    again = dipfast.restore_many(tmp_path / "in", out, **KW)
    assert (again.restored, again.skipped, again.failed) == (0, len(keys), 0)
    assert {k: (out / k).stat().st_mtime_ns for k in keys} == stamps

    _write(tmp_path / "in" / keys[0], random_image(np_rng, 16, 16, 3, np.uint8))  # new content
    (out / keys[1]).unlink()  # a lost output
    redo = dipfast.restore_many(tmp_path / "in", out, **KW)
    assert sorted(r["output"] for r in redo.records) == sorted(keys[:2]) and redo.skipped == len(keys) - 2
    assert len(_records(out)) == len(keys)

    other = dipfast.restore_many(tmp_path / "in", out, **{**KW, "iters": ITERS + 1})  # new settings: all again
    assert other.restored == len(keys) and {r["iterations"] for r in _records(out)} == {ITERS + 1}


def test_tiles_in_a_batch_are_the_tiled_restore_of_each_image(tmp_path, np_rng, capsys):
    """--tile/--overlap reach each image's restore(); they are settings (a rerun with others recomputes),
    and the default leaves the records of batches run before --tile existed valid."""
    src = tmp_path / "in"
    for k in range(2):
        _write(src / f"{k}.png", random_image(np_rng, 19, 14, 3, np.uint8))
    out = tmp_path / "out"
    summary = dipfast.restore_many(src, out, tile=8, overlap=2, seed=1, **KW)
    assert summary.restored == 2
    for r in _records(out):
        assert (r["settings"]["tile"], r["settings"]["overlap"]) == (8, 2)
        alone = dipfast.restore(images.load_image(src / r["output"]), seed=1, tile=8, overlap=2, **KW)
        assert alone.extras["tiling"]["grid"] == (3, 2)
        assert (out / r["output"]).read_bytes() == images.encode_image(alone.image, ".png")
    assert "tile" not in _records(dipfast.restore_many(src, tmp_path / "whole", **KW).manifest.parent)[0]["settings"]
    again = dipfast.restore_many(src, out, tile=8, overlap=3, seed=1, **KW)
    assert again.restored == 2 and again.skipped == 0

    with pytest.raises(InputError, match="tile must be 'auto', None or a positive integer; got 'big'"):
        dipfast.restore_many(src, tmp_path / "bad", tile="big", **KW)
    with pytest.raises(SystemExit) as e:
        cli.main(["batch", str(src), "-o", str(tmp_path / "o"), "--tile", "big"])
    assert e.value.code == 2 and "expected 'auto', 'none' or a positive integer" in capsys.readouterr().err


def test_bad_inputs_are_recorded_and_the_rest_completes(tmp_path, np_rng, capsys):
    src, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    good = [_write(src / f"good{k}.png", random_image(np_rng, 16, 16, 3, np.uint8)) for k in range(2)]
    _write(src / "blocked" / "x.png", random_image(np_rng, 16, 16, 3, np.uint8))
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    whole = (src / "good0.png").read_bytes()
    (src / "truncated.png").write_bytes(whole[: len(whole) // 2])
    _write(src / "wrongmask.png", random_image(np_rng, 16, 16, 3, np.uint8))
    _write(src / "nomask.png", random_image(np_rng, 16, 16, 3, np.uint8))
    for name in ("good0", "good1", "corrupt", "truncated", "blocked/x"):
        _write(masks / f"{name}.png", np.where(np_rng.random((16, 16)) < 0.7, 255, 0).astype(np.uint8))
    _write(masks / "wrongmask.png", np.full((8, 16), 255, np.uint8))
    out.mkdir()
    (out / "blocked").write_text("a file where the output folder should be")

    argv = ["batch", str(src), "-o", str(out), "--task", "inpaint", "--mask-dir", str(masks), "--quiet"]
    code = _cli(argv, iters=ITERS)
    assert code == cli.EXIT_SOME_FAILED
    errors = {r["output"]: r["error"] for r in _records(out) if r["status"] == "error"}
    assert set(errors) == {"corrupt.png", "truncated.png", "wrongmask.png", "nomask.png", "blocked/x.png"}
    assert "could not be decoded" in errors["corrupt.png"] and "could not be decoded" in errors["truncated.png"]
    assert "is 8 x 16 but the image is 16 x 16" in errors["wrongmask.png"]
    assert "no mask for 'nomask.png'" in errors["nomask.png"]
    assert "cannot be created" in errors["blocked/x.png"]
    assert all("\n" not in e for e in errors.values())
    assert sorted(_outputs(out)) == ["good0.png", "good1.png"] and all(p.exists() for p in good)
    printed = capsys.readouterr().out
    assert "2 restored" in printed and "5 failed" in printed and "  wrongmask.png: mask" in printed


def test_a_group_that_fails_is_retried_image_by_image(monkeypatch, np_rng):
    """One image that makes restore() fail costs only itself (here a NaN in one fit of a group)."""
    calls = []

    real = dipfast.api.restore

    def restore(xs, **kwargs):
        calls.append(len(xs))
        if len(xs) > 1 or np.asarray(xs[0]).mean() > 200:
            raise dipfast.errors.NumericalError("the loss became nan at iteration 3 (image 2 of 3)")
        return real(xs, **kwargs)

    monkeypatch.setattr(dipfast.api, "restore", restore)
    arrays = [random_image(np_rng, 16, 16, 3, np.uint8) // 2, np.full((16, 16, 3), 250, np.uint8)]
    items = tuple(batch.Item(f"{k}.png", images.encode_image(Image.fromarray(a), ".png")) for k, a in enumerate(arrays))
    outcomes = batch.run_group(batch.GroupTask({"iters": ITERS, "progress": False, **TINY}, items))
    assert calls == [2, 1, 1]
    assert "error" not in outcomes[0] and outcomes[0]["output"].startswith(b"\x89PNG")
    assert outcomes[1] == {"key": "1.png", "error": "NumericalError: the loss became nan at iteration 3 (image 2 of 3)"}


def test_inputs_expand_files_folders_and_globs(tmp_path, np_rng):
    keys = _tree(tmp_path / "in", np_rng)
    found = batch.expand_inputs([tmp_path / "in"], exclude=tmp_path / "in" / "sub")
    assert [s.key for s in found] == [k for k in keys if not k.startswith("sub/")]
    globbed = batch.expand_inputs([str(tmp_path / "in" / "**" / "*.png")])
    assert [s.key for s in globbed] == [k for k in keys if k.endswith(".png")]
    named = batch.expand_inputs([tmp_path / "in" / "sub" / "img2.png", tmp_path / "missing.png"])
    assert [s.key for s in named] == ["img2.png", "missing.png"]  # a missing file is that image's error later
    _write(tmp_path / "other" / "img0.png", random_image(np_rng, 4, 4, 3, np.uint8))
    with pytest.raises(InputError, match="would both be written to 'img0.png'"):
        batch.expand_inputs([tmp_path / "in" / "img0.png", tmp_path / "other" / "img0.png"])
    with pytest.raises(InputError, match="no image files found"):
        batch.expand_inputs([str(tmp_path / "in" / "*.tif")])
    # the output folder named as the input: every image is an output, and the error says so
    with pytest.raises(InputError, match=rf"^every image found \({len(keys)}\) is inside the output folder .*outside"):
        batch.expand_inputs([tmp_path / "in"], exclude=tmp_path / "in")


def test_outputs_inside_the_input_folder_never_become_inputs(tmp_path, np_rng):
    keys = _tree(tmp_path / "in", np_rng, n=2)
    out = tmp_path / "in" / "restored"
    assert dipfast.restore_many(tmp_path / "in", out, **KW).restored == len(keys)
    again = dipfast.restore_many(tmp_path / "in", out, **KW)
    assert (again.restored, again.skipped) == (0, len(keys))


def test_plan_groups_cuts_each_shape_in_key_order():
    jobs = [batch._Job(batch.Source(Path(k), k), shape=s) for k, s in zip("abcdefg", [1, 2, 1, 1, 2, 1, 1])]
    groups = batch.plan_groups(jobs, 3)
    assert [[j.source.key for j in g] for g in groups] == [["a", "c", "d"], ["b", "e"], ["f", "g"]]
    assert [len(g) for g in batch.plan_groups(jobs, 1)] == [1] * 7


def test_manifest_survives_a_cut_line_and_admits_one_driver(tmp_path):
    m = Manifest(tmp_path)
    m.add({"output": "a.png", "status": "ok"})
    with pytest.raises(InputError, match="another dipfast batch is writing"):
        Manifest(tmp_path)
    m._log.write('{"output": "b.png", "sta')  # a kill in the middle of a write
    m._log.flush()
    m._lock.close()  # the killed process's lock goes with it
    again = Manifest(tmp_path)
    again.add({"output": "c.png", "status": "ok"})
    again.close()
    assert [r["output"] for r in _records(tmp_path)] == ["a.png", "c.png"]


def test_command_rejects_bad_settings_in_one_line(tmp_path, np_rng, capsys):
    _tree(tmp_path / "in", np_rng, n=1)
    assert cli.main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--task", "inpaint"]) == 2
    assert "needs mask_dir= (--mask-dir)" in capsys.readouterr().err
    assert cli.main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--backend", "fast"]) == 2
    assert "unknown backend 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# the driver killed in the middle

# The command with the denoising preset on the tiny net: the real command line, in a fresh process.
# The driver of the stop tests: the tiny net, and a pause of 2 s before each group after the first, so the test's
# signal lands between two images however loaded the machine is (the fits alone take a fraction of a second);
# Ctrl-C raises KeyboardInterrupt as in a terminal, even where the test process was started with SIGINT ignored
# (a child inherits that, and Python then installs no handler).
_COMMAND = """
import dataclasses, signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from _helpers import TINY_NET
from dipfast import batch, presets
from dipfast.cli import main
torch.set_num_threads(1)
presets.PRESETS["denoise"] = dataclasses.replace(presets.PRESETS["denoise"], net=TINY_NET, input_depth=4)
run_group, groups = batch.run_group, []
def paced(task, *args, **kwargs):
    if groups:
        time.sleep(2)
    groups.append(task)
    return run_group(task, *args, **kwargs)
batch.run_group = paced
sys.exit(main(sys.argv[1:]))
"""


def _cli(argv: list[str], iters: int) -> int:
    """cli.main with the tiny net, in this process."""
    import dataclasses

    from dipfast import presets

    saved = dict(presets.PRESETS)
    tiny = {k: dataclasses.replace(saved[k], net=TINY_NET, input_depth=4) for k in ("denoise", "inpaint")}
    presets.PRESETS.update(tiny)
    try:
        return cli.main([*argv, "--iters", str(iters)])
    finally:
        presets.PRESETS.update(saved)


STOPPED_ITERS = 20


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    """Eight inputs and their uninterrupted outputs, shared by the stop tests."""
    from _helpers import make_rng, torch_threads

    root = tmp_path_factory.mktemp("eight")
    rng = make_rng("eight_images")
    for k in range(8):
        _write(root / "in" / f"{k}.png", random_image(rng, 16, 16, 3, np.uint8))
    with torch_threads(1):
        whole = dipfast.restore_many(root / "in", root / "whole", **{**KW, "iters": STOPPED_ITERS})
    assert whole.restored == 8
    return root / "in", _outputs(root / "whole")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_a_stopped_driver_resumes_with_only_the_missing_images(tmp_path, eight_images, how):
    src, uninterrupted = eight_images
    out = tmp_path / "out"
    script = _COMMAND.format(tests=str(Path(__file__).parent))
    argv = [sys.executable, "-c", script, "batch", str(src), "-o", str(out), "--iters", str(STOPPED_ITERS), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.monotonic() + 240
    while not _outputs(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(how)
    _, err = proc.communicate(timeout=120)
    if how == signal.SIGINT:
        assert proc.returncode == cli.EXIT_INTERRUPTED, err.decode()[-2000:]
    before = _outputs(out)
    assert 0 < len(before) < 8, "the driver finished before it was stopped: give it more images"
    for key in before:  # a partial file never has the final name
        images.load_image(out / key)
    # Ctrl-C waits for the record of a written output; a kill between the two (a few ms) leaves
    # that one output unrecorded, and the rerun computes it again
    recorded = {r["output"] for r in _records(out) if r["status"] == "ok"}
    assert recorded <= set(before) and len(set(before) - recorded) <= (1 if how == signal.SIGKILL else 0)
    stamps = {k: (out / k).stat().st_mtime_ns for k in recorded}

    rest = dipfast.restore_many(src, out, **{**KW, "iters": STOPPED_ITERS})
    assert rest.skipped == len(recorded) and rest.restored == 8 - len(recorded) and rest.failed == 0
    assert sorted(r["output"] for r in rest.records) == sorted(set(uninterrupted) - recorded)
    assert {k: (out / k).stat().st_mtime_ns for k in recorded} == stamps  # not computed again
    assert len(_records(out)) == 8 and not [p for p in out.rglob("*") if images.TEMP_MARK in p.name]
    assert _outputs(out) == uninterrupted
