"""compile_cache: a compiled call's cache key carries the hash of dipfast's op sources, so a changed op
(its autograd rule above all, which the traced graph does not show) never gets a stale compiled backward."""

import os
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import dipfast
import dipfast.kernels
from dipfast import backends, compile_cache
from dipfast.native import loader


def _fit_step(x, w):
    return (x.sin() * w).sum()


def _compile_and_backward() -> dict:
    """One compiled forward and backward from a cold Dynamo; AOTAutograd's cache counters after it."""
    torch._dynamo.reset()
    w = torch.randn(8, requires_grad=True)
    with compile_cache.compile_settings(True):
        torch.compile(_fit_step)(torch.randn(8), w).backward()
    assert w.grad is not None
    return dict(counters["aot_autograd"])


def test_another_ops_tag_misses_the_cache_the_same_tag_hits(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    counters.clear()
    first = _compile_and_backward()
    assert first.get("autograd_cache_saved") == 1
    again = _compile_and_backward()
    assert again.get("autograd_cache_hit") == 1, "the cache did not serve an unchanged compile"
    monkeypatch.setattr(compile_cache, "ops_tag", lambda: "dipfast-changed")
    changed = _compile_and_backward()
    assert changed.get("autograd_cache_hit") == 1, "a changed op source was served from the cache"
    assert changed.get("autograd_cache_miss") == 2


def test_ops_tag_changes_with_an_op_source(tmp_path, monkeypatch):
    source = tmp_path / "op.py"
    source.write_text("def rule(): return 1\n")
    monkeypatch.setattr(compile_cache, "op_sources", lambda: [source])
    compile_cache.ops_tag.cache_clear()
    try:
        before = compile_cache.ops_tag()
        source.write_text("def rule(): return 2\n")
        compile_cache.ops_tag.cache_clear()
        assert compile_cache.ops_tag() != before
    finally:
        compile_cache.ops_tag.cache_clear()


def test_every_module_that_registers_a_dipfast_op_is_hashed():
    folders = {Path(dipfast.__file__).parent, Path(dipfast.kernels.__file__).parent}
    registering = {
        f for folder in folders for f in folder.rglob("*.py") if re.search(r"\"dipfast(_native)?::", f.read_text())
    }
    assert registering, "no op registrations found: the search is wrong"
    assert registering <= set(compile_cache.op_sources())


def test_the_native_ops_cpp_autograd_is_hashed_however_it_was_built():
    """The C++ autograd decides the native ops' backward: the ahead-of-time library where setup.py built one,
    the sources the per-user build compiles otherwise (an install that skipped or failed the ahead-of-time build)."""
    hashed = set(compile_cache.op_sources())
    library, sources = loader.aot_library(), loader.source_dir()
    assert library is not None or sources is not None, "neither the library nor the C++ sources were found"
    assert library is None or Path(library) in hashed
    assert sources is None or {sources / "autograd.cpp", sources / "common.h"} <= hashed


@pytest.mark.parametrize("users_tag", ["", "mine"])
def test_compile_settings_tag_once_and_restore(users_tag):
    # torch's own patch(), not monkeypatch, whose undo (pytest 9.2) deletes the entry and so hides it from torch
    with torch.compiler.config.patch(cache_key_tag=users_tag):
        with compile_cache.compile_settings(True):
            tag = torch.compiler.config.cache_key_tag
            with compile_cache.compile_settings(True):
                assert torch.compiler.config.cache_key_tag == tag
        assert tag.startswith(users_tag) and tag.endswith(compile_cache.ops_tag())
        assert torch.compiler.config.cache_key_tag == users_tag
        with compile_cache.compile_settings(False):
            assert torch.compiler.config.cache_key_tag == users_tag


def test_the_cache_goes_to_dipfasts_folder_unless_the_user_chose_one(tmp_path, monkeypatch):
    """torch sets TORCHINDUCTOR_CACHE_DIR to its /tmp default on first use (importing torch._dynamo does), which left
    dipfast's folder unused: every compiled fit's cache went to /tmp, and a cleaned /tmp cost the next fit a minute of
    compiling. The step's backward, where AOTAutograd compiles the backward graph and saves both, is inside too."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = tmp_path / "dipfast"
    monkeypatch.setattr(compile_cache, "CACHE_DIR", ours)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    counters.clear()
    assert _compile_and_backward().get("autograd_cache_saved") == 1
    assert any((ours / "aotautograd").iterdir())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()  # restored
    with backends.resolve("compile", "fp32", torch.device("cpu")).step_math():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(ours)
    with backends.resolve("native", "fp32", torch.device("cpu")).step_math():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()
    users = tmp_path / "users"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(users))
    with compile_cache.compile_settings(True):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(users)
