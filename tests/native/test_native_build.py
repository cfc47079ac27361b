"""Where the native ops come from (dipfast/native/loader.py) and the eager fallback every function
takes without them.

The decision (the ahead-of-time build, else a build for this torch cached per user, else eager) is
tested here by injecting each failure; the real build at first use, from an installed package, is run
end to end by .ci/check_install.sh (a minute or more of compiling, too slow for this suite).
CI sets DIPFAST_REQUIRE_NATIVE=1: there, ops that did not load fail test_native_ops_built_when_required
(and every first use) instead of skipping the kernel tests quietly.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _native_helpers import requires_native

import dipfast.native as native
from dipfast.native import loader, runtime
from dipfast.native.blocks import NativeBlocks
from dipfast.native.philox import philox_normal_eager
from dipfast.nets import skip
from dipfast.nets.blocks import use_block_ops

pytestmark = pytest.mark.native
REPO = Path(__file__).resolve().parents[2]


def test_native_ops_built_when_required():
    assert native.AVAILABLE or os.environ.get("DIPFAST_REQUIRE_NATIVE") != "1", (
        "DIPFAST_REQUIRE_NATIVE=1 but dipfast's native CPU ops did not load: run `dipfast doctor`"
    )


def test_import_dipfast_loads_no_native_ops():
    """The ops load at their first use (a first use may build them for minutes), never at import."""
    code = "import sys, dipfast, dipfast.native.runtime as r; assert r._status is None and 'AVAILABLE' not in vars(r)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


class FakeMachine:
    """The loader's contact with the machine, each piece replaceable: the AOT library, what loads,
    the compiler, ninja, the cache and the build. Records the loads and builds it was asked for."""

    def __init__(self, monkeypatch, tmp_path, *, aot="aot.so", loads=(), compiler="/usr/bin/c++", fail_build=None):
        self.loaded, self.built = [], []
        self.build_dir = tmp_path / "cache" / "key"
        self.loads, self.fail_build = set(loads), fail_build
        monkeypatch.delenv("DIPFAST_NO_NATIVE", raising=False)
        monkeypatch.setattr(loader, "aot_library", lambda: aot)
        monkeypatch.setattr(loader, "try_load", self.try_load)
        monkeypatch.setattr(loader, "find_compiler", lambda: compiler)
        monkeypatch.setattr(loader, "_ninja_available", lambda: True)
        monkeypatch.setattr(loader, "source_dir", lambda: REPO / "csrc" / "native")
        monkeypatch.setattr(loader, "cache_dir", lambda sources, compiler: self.build_dir)
        monkeypatch.setattr(loader, "build", self.build)

    def try_load(self, library):
        self.loaded.append(library)
        return None if library in self.loads else f"{library}: undefined symbol: _ZN3c10"

    def build(self, sources, build_dir):
        self.built.append((sources, build_dir))
        if self.fail_build:
            build_dir.mkdir(parents=True, exist_ok=True)
            raise RuntimeError(self.fail_build)
        return str(build_dir / "dipfast_native.so")


def test_an_aot_build_that_loads_is_used(monkeypatch, tmp_path, capsys):
    machine = FakeMachine(monkeypatch, tmp_path, loads={"aot.so"})
    status = loader.load()
    assert (status.path, status.library, machine.built) == ("aot", "aot.so", [])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("aot", ["aot.so", None], ids=["aot-does-not-load", "no-aot"])
def test_without_a_loading_aot_build_the_ops_build_once_for_this_torch(monkeypatch, tmp_path, capsys, aot):
    machine = FakeMachine(monkeypatch, tmp_path, aot=aot)
    status = loader.load()
    assert status.path == "jit" and status.library == str(machine.build_dir / "dipfast_native.so")
    assert machine.built == [(REPO / "csrc" / "native", machine.build_dir)]
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and f"for torch {torch.__version__} into {machine.build_dir}" in notice
    assert notice.rstrip().endswith(" s") and " done in " in notice
    why = "the ahead-of-time build does not load into torch" if aot else "no ahead-of-time build"
    assert notice.startswith(f"dipfast: {why}") and status.detail.startswith("built for torch")


def test_a_cached_build_loads_without_building_or_a_notice(monkeypatch, tmp_path, capsys):
    machine = FakeMachine(monkeypatch, tmp_path)
    cached = machine.build_dir / "dipfast_native.so"
    cached.parent.mkdir(parents=True)
    cached.touch()
    machine.loads.add(str(cached))
    status = loader.load()
    assert (status.path, status.library, machine.built) == ("jit", str(cached), [])
    assert "cached in" in status.detail and capsys.readouterr().err == ""


def test_a_cached_build_another_process_is_writing_is_waited_for(monkeypatch, tmp_path):
    """The lock file says the library may be half-written: load() goes through the (locking) build."""
    machine = FakeMachine(monkeypatch, tmp_path)
    machine.build_dir.mkdir(parents=True)
    (machine.build_dir / "dipfast_native.so").touch()
    (machine.build_dir / "lock").touch()
    assert loader.load().path == "jit" and len(machine.built) == 1
    assert str(machine.build_dir / "dipfast_native.so") not in machine.loaded


@pytest.mark.parametrize(
    "missing, reason",
    [
        ("compiler", "no C++ compiler"),
        ("ninja", "no ninja to build them (pip install ninja)"),
        ("sources", "the C++ sources are not installed"),
    ],
)
def test_without_a_way_to_build_the_ops_run_eager_and_say_how_to_get_them(monkeypatch, tmp_path, missing, reason):
    machine = FakeMachine(monkeypatch, tmp_path, compiler=None if missing == "compiler" else "/usr/bin/c++")
    if missing == "ninja":
        monkeypatch.setattr(loader, "_ninja_available", lambda: False)
    if missing == "sources":
        monkeypatch.setattr(loader, "source_dir", lambda: None)
    status = loader.load()
    assert status.path == "eager" and status.library is None and machine.built == []
    message = loader.fallback_message(status)
    assert "\n" not in message and reason in message and "the ahead-of-time build does not load" in message
    assert f"{loader.EAGER_SLOWDOWN} slower" in message and "pip install --no-build-isolation ." in message
    assert "install a C++ compiler" in message


def test_a_failed_build_runs_eager_and_keeps_the_compiler_output(monkeypatch, tmp_path, capsys):
    error = "Error building extension 'dipfast_native': [1/5] c++ ...\nbatch_norm_act.cpp:3: error: boom"
    machine = FakeMachine(monkeypatch, tmp_path, fail_build=error)
    status = loader.load()
    log = machine.build_dir / "build.log"
    assert status.path == "eager" and "building them failed (Error building extension" in status.detail
    assert f"full log: {log}" in status.detail and "error: boom" in log.read_text()
    assert " failed after " in capsys.readouterr().err


def test_dipfast_no_native_loads_and_builds_nothing(monkeypatch, tmp_path, capsys):
    machine = FakeMachine(monkeypatch, tmp_path, loads={"aot.so"})
    monkeypatch.setenv("DIPFAST_NO_NATIVE", "1")
    status = loader.load()
    assert status.path == "eager" and machine.loaded == [] and machine.built == []
    message = loader.fallback_message(status)
    assert message == "dipfast: native CPU ops switched off by DIPFAST_NO_NATIVE=1; eager ops take over"
    assert capsys.readouterr().err == ""


def _first_use(monkeypatch, found):
    """native.status() as on a first use in a fresh process, with loader.load() giving `found`."""
    monkeypatch.setattr(runtime, "AVAILABLE", native.AVAILABLE)  # restored afterwards, as _status
    monkeypatch.setattr(runtime, "_status", None)
    monkeypatch.setattr(native.loader, "load", lambda: found)
    return native.status()


def test_first_use_logs_the_fallback_once(monkeypatch, caplog):
    monkeypatch.delenv("DIPFAST_REQUIRE_NATIVE", raising=False)
    eager = loader.NativeStatus("eager", "no ahead-of-time build, and no C++ compiler (c++) to build them")
    with caplog.at_level(logging.WARNING, logger="dipfast.native"):
        assert _first_use(monkeypatch, eager) is eager
        assert native.status() is eager
    assert [r.getMessage() for r in caplog.records] == [loader.fallback_message(eager)]


def test_dipfast_require_native_makes_eager_ops_an_error(monkeypatch):
    monkeypatch.setenv("DIPFAST_REQUIRE_NATIVE", "1")
    eager = loader.NativeStatus("eager", "no ahead-of-time build, and no C++ compiler (c++) to build them")
    with pytest.raises(native.NativeOpsMissing, match="did not load: no ahead-of-time build, and no C"):
        _first_use(monkeypatch, eager)
    with pytest.raises(native.NativeOpsMissing):  # on every use, not only the first
        native.status()
    loaded = loader.NativeStatus("jit", "built for torch", "x.so")
    monkeypatch.setattr(runtime, "_register_fakes", lambda: None)  # x.so defines no ops to fake
    assert _first_use(monkeypatch, loaded) is loaded


def _fake_compiler(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)
    return str(path)


def test_the_cache_is_keyed_by_torch_sources_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    sources = tmp_path / "src"
    sources.mkdir()
    (sources / "op.cpp").write_text("int f() { return 1; }")
    (sources / "op.h").write_text("int f();")
    compiler = _fake_compiler(tmp_path / "c++", "c++ 13.2")
    first = loader.cache_dir(sources, compiler)
    assert first == loader.cache_dir(sources, compiler)
    assert first.parent == tmp_path / "xdg" / "dipfast" / "native" and first.name.startswith("torch-")
    (sources / "op.h").write_text("int f(); // changed")
    header_changed = loader.cache_dir(sources, compiler)
    other_compiler = loader.cache_dir(sources, _fake_compiler(tmp_path / "c++", "c++ 14.1"))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    other_torch = loader.cache_dir(sources, compiler)
    assert len({first, header_changed, other_compiler, other_torch}) == 4 and "9.9.9" in other_torch.name


def test_the_cache_lives_under_home_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert loader.cache_root() == tmp_path / ".cache" / "dipfast" / "native"


def test_the_sources_come_from_the_package_else_the_checkout(monkeypatch, tmp_path):
    package = tmp_path / "dipfast"
    (package / "native").mkdir(parents=True)
    monkeypatch.setattr(loader, "__file__", str(package / "native" / "loader.py"))
    assert loader.source_dir() is None
    (tmp_path / "csrc" / "native").mkdir(parents=True)
    (tmp_path / "csrc" / "native" / "op.cpp").touch()
    assert loader.source_dir() is None  # a csrc/ beside an installed package is someone else's
    (tmp_path / "setup.py").touch()
    assert loader.source_dir() == tmp_path / "csrc" / "native"
    (package / "_csrc" / "native").mkdir(parents=True)
    (package / "_csrc" / "native" / "op.cpp").touch()
    assert loader.source_dir() == package / "_csrc" / "native"


def test_the_aot_build_is_the_one_beside_this_package(monkeypatch, tmp_path):
    package = tmp_path / "dipfast"
    (package / "native").mkdir(parents=True)
    monkeypatch.setattr(loader, "__file__", str(package / "native" / "loader.py"))
    assert loader.aot_library() is None
    library = package / f"_native{loader.importlib.machinery.EXTENSION_SUFFIXES[0]}"
    library.touch()
    assert loader.aot_library() == str(library)


def test_the_built_package_ships_the_sources(tmp_path):
    """setup.py's build_py copies csrc/native into the package, where source_dir() finds them."""
    env = {**os.environ, "DIPFAST_NO_NATIVE": "1"}  # build_py only: no torch import, no compiling
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    shipped = tmp_path / "dipfast" / "_csrc" / "native"
    expected = sorted(p.name for p in (REPO / "csrc" / "native").iterdir() if p.suffix in (".cpp", ".h"))
    assert sorted(p.name for p in shipped.iterdir()) == expected and expected
    for name in expected:
        assert (shipped / name).read_bytes() == (REPO / "csrc" / "native" / name).read_bytes()


def _eager_inputs(rng):
    x = torch.randn(2, 6, 5, 7, generator=rng, dtype=torch.float64)
    skip_part = torch.randn(2, 2, 5, 7, generator=rng, dtype=torch.float64)
    weight, bias = torch.rand(8, generator=rng, dtype=torch.float64) + 0.5, torch.randn(8, generator=rng).double()
    return x, skip_part, weight, bias


def _assert_every_function_is_its_eager_twin(rng):
    assert not native.enabled()
    x, skip_part, weight, bias = _eager_inputs(rng)
    bn = F.batch_norm(x, None, None, weight[:6], bias[:6], training=True, eps=1e-5)
    assert torch.equal(native.batch_norm_act(x, weight[:6], bias[:6]), F.leaky_relu(bn, 0.2))
    assert torch.equal(native.batch_norm(x, weight[:6], bias[:6]), bn)
    merged = F.batch_norm(torch.cat([skip_part, x], 1), None, None, weight, bias, training=True, eps=1e-5)
    assert torch.equal(native.concat_batch_norm(skip_part, x, weight, bias), merged)
    padded = F.pad(F.leaky_relu(bn, 0.2), (2, 2, 2, 2), mode="reflect")
    assert torch.equal(native.batch_norm_act_reflect_pad(x, weight[:6], bias[:6], pad=2), padded)
    upsampled = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(native.upsample_bilinear2x(x), upsampled)
    out = native.normal_(torch.empty(3, 50), 9, 4)
    assert torch.equal(out, philox_normal_eager((3, 50), 9, 4).float())


def test_every_function_falls_back_to_eager_without_the_extension(monkeypatch, rng):
    monkeypatch.setattr(runtime, "AVAILABLE", False)
    _assert_every_function_is_its_eager_twin(rng)


def test_every_function_is_eager_inside_disabled(rng):
    with native.disabled():
        _assert_every_function_is_its_eager_twin(rng)


@requires_native
def test_disabled_nests_and_restores_the_ops_even_on_an_error():
    assert native.enabled()
    with pytest.raises(ValueError):
        with native.disabled():
            with native.disabled():
                assert not native.enabled()
            assert not native.enabled()
            raise ValueError("inside")
    assert native.enabled()


@requires_native
def test_fallback_draw_matches_the_kernel(monkeypatch):
    """Without the extension a run draws the same noise, to fp32 rounding of the polynomials."""
    kernel = native.normal_(torch.empty(4, 1000), 9, 4)
    monkeypatch.setattr(runtime, "AVAILABLE", False)
    torch.testing.assert_close(native.normal_(torch.empty(4, 1000), 9, 4), kernel, atol=2e-6, rtol=2e-6)


def test_native_blocks_without_the_extension_match_the_reference(monkeypatch, rng):
    monkeypatch.setattr(runtime, "AVAILABLE", False)
    reference = skip(4, channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2)).double()
    fallback = use_block_ops(skip(4, channels_down=(8, 8), channels_up=(8, 8), channels_skip=(2, 2)), NativeBlocks())
    fallback.load_state_dict(reference.state_dict())
    z = torch.rand(1, 4, 17, 23, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(fallback.double()(z), reference(z), rtol=1e-12, atol=1e-12)


def test_unsupported_inputs_take_the_eager_path(rng):
    """fp16 is not a kernel dtype: the eager twin runs, with or without the extension."""
    x = torch.randn(1, 3, 4, 4, generator=rng).half()
    up = native.upsample_bilinear2x(x)
    assert up.dtype == torch.float16 and torch.equal(up, F.interpolate(x, scale_factor=2, mode="bilinear"))
