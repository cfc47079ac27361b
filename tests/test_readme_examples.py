"""The README's Python examples run as written, so that the documentation cannot drift from the API: each ```python
block, in a folder holding the files it names (small synthetic images) and the arrays it uses, with every task's
preset on the tiny net and a short count (the blocks' own iters= run as given)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY
from PIL import Image

from dipfast import presets

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """The files and names the examples use, and every preset on the tiny net for 120 iterations (more than
    stop='auto''s default window of 100)."""
    rng = np.random.default_rng(0)

    def image(h: int, w: int, mode: str = "RGB") -> Image.Image:
        if mode == "L":  # a mask: known pixels but for a hole
            mask = np.full((h, w), 255, np.uint8)
            mask[h // 3 : h // 2, w // 3 : w // 2] = 0
            return Image.fromarray(mask)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    monkeypatch.chdir(tmp_path)
    for name, (h, w) in {"noisy.png": (32, 32), "lr.png": (8, 8), "kate.png": (32, 32), "photo.jpg": (40, 48)}.items():
        image(h, w).save(name)
    image(32, 32, "L").save("kate_mask.png")
    (tmp_path / "photos").mkdir()
    for k in range(2):
        image(32, 32).save(f"photos/{k}.png")
    for name, preset in presets.PRESETS.items():
        monkeypatch.setitem(presets.PRESETS, name, dataclasses.replace(preset, **TINY, iterations=120))
    arrays = {name: rng.random((32, 32, 3), dtype=np.float32) for name in ("noisy", "clean", "img1", "img2", "img3")}
    return {**arrays, "lr": rng.random((8, 8, 3), dtype=np.float32)}


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3 and all("dipfast.restore(" in block for block in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(BLOCKS)), ids=[f"block{k + 1}" for k in range(len(BLOCKS))])
def test_a_readme_example_runs_as_written(readme_folder, block):
    import dipfast

    namespace = {"dipfast": dipfast, **readme_folder}
    exec(compile(BLOCKS[block], f"README.md, python block {block + 1}", "exec"), namespace)
    results = [v for v in namespace.values() if isinstance(v, dipfast.Result)]
    assert results and all(np.isfinite(np.asarray(r.image, dtype=np.float32)).all() for r in results)
