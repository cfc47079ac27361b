"""The README's examples run as written, so that the documentation cannot drift from the API: each ```python block
and each `dipfast` command line (but the harness's `dipfast bench`, minutes each, and `--ray`, a cluster), in a folder
holding the files they name (small synthetic images) and the arrays they use, with every task's preset on the tiny
net and a short count (their own iters= and --iters run as given)."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY
from PIL import Image

from dipfast import presets

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
COMMANDS = [
    line
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    for line in block.splitlines()
    if line.startswith("dipfast ") and not line.startswith("dipfast bench") and "--ray" not in line
]


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """The files and names the examples use, and every preset on the tiny net for 120 iterations (more than the
    default early-stop window of 100)."""
    rng = np.random.default_rng(0)

    def image(h: int, w: int, mode: str = "RGB") -> Image.Image:
        if mode == "L":  # a mask: known pixels but for a hole
            mask = np.full((h, w), 255, np.uint8)
            mask[h // 3 : h // 2, w // 3 : w // 2] = 0
            return Image.fromarray(mask)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    monkeypatch.chdir(tmp_path)
    sizes = {"lr.png": (8, 8), "hr.png": (32, 32), "photo.jpg": (40, 48)}  # the rest 32 x 32
    for name in ("noisy.png", "kate.png", "noflash.jpg", "flash.jpg", "photos/0.png", "photos/1.png", "damaged/a.png",
                 "clean/a.png", "scans/a.tif", *sizes):  # fmt: skip
        Path(name).parent.mkdir(exist_ok=True)
        image(*sizes.get(name, (32, 32))).save(name)
    for name in ("kate_mask.png", "masks/a.png"):
        Path(name).parent.mkdir(exist_ok=True)
        image(32, 32, "L").save(name)
    for name, preset in presets.PRESETS.items():  # flash's input is its 3-channel guide
        tiny = dataclasses.replace(preset, net=TINY["net"], input_depth=min(preset.input_depth, TINY["input_depth"]))
        monkeypatch.setitem(presets.PRESETS, name, dataclasses.replace(tiny, iterations=120))
    arrays = {name: rng.random((32, 32, 3), dtype=np.float32) for name in ("noisy", "clean", "img1", "img2", "img3")}
    return {**arrays, "lr": rng.random((8, 8, 3), dtype=np.float32)}


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 3 and all("dipfast.restore(" in block for block in BLOCKS)
    assert sum(line.startswith("dipfast restore ") for line in COMMANDS) >= 5 and len(COMMANDS) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(BLOCKS)), ids=[f"block{k + 1}" for k in range(len(BLOCKS))])
def test_a_readme_example_runs_as_written(readme_folder, block):
    import dipfast

    namespace = {"dipfast": dipfast, **readme_folder}
    exec(compile(BLOCKS[block], f"README.md, python block {block + 1}", "exec"), namespace)
    results = [v for v in namespace.values() if isinstance(v, dipfast.Result)]
    assert results and all(np.isfinite(np.asarray(r.image, dtype=np.float32)).all() for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("line", COMMANDS, ids=[f"command{k + 1}" for k in range(len(COMMANDS))])
def test_a_readme_command_runs_as_written(readme_folder, line, capsys):
    from dipfast import cli

    argv = shlex.split(line, comments=True)[1:]
    try:
        status = cli.main(argv)
    except SystemExit as done:  # --version: argparse's action exits
        status = done.code
    assert status == 0, capsys.readouterr().err
