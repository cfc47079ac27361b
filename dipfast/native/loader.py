"""Where the native CPU ops come from: the first of these that loads into the running torch.

    aot    dipfast/_native*.so, built by setup.py at install time
    jit    the same sources built for the running torch by torch.utils.cpp_extension, once per user, into
           $XDG_CACHE_HOME/dipfast/native/<key> (~/.cache/dipfast/native/<key> when unset); the key hashes
           the torch version, the Python ABI, the compiler, the flags and the sources, so every process
           with the same torch and compiler reuses one build, and a changed one builds anew
    eager  none: DIPFAST_NO_NATIVE=1, no compiler, or a failed build; dipfast.native's eager twins run

The ahead-of-time build fails to load where it was built against another torch (pip's build isolation
fetches its own) or by another compiler; the build at first use then takes its place. Two processes
building at once share one build: cpp_extension's lock file makes the second wait for the first.
load() never raises: a failure is an eager NativeStatus that says why.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dipfast.native.build_flags import CFLAGS, LDFLAGS

JIT_NAME = "dipfast_native"
# A lock file older than any build belongs to a process that died building: removed, or every later
# process would wait on it forever (cpp_extension's baton has no timeout).
STALE_LOCK_SECONDS = 30 * 60
# What the eager fallback costs, from the README's CPU table (native bf16 against native-eager bf16).
EAGER_SLOWDOWN = "1.2-1.6x"
HOW_TO_GET_THEM = (
    "install a C++ compiler (g++ or clang++) and ninja and start again, "
    "or reinstall with `pip install --no-build-isolation .` against this torch"
)


@dataclass(frozen=True)
class NativeStatus:
    """path: "aot", "jit" or "eager"; detail: the library loaded, or why none was."""

    path: str
    detail: str
    library: str | None = None

    @property
    def loaded(self) -> bool:
        return self.path != "eager"


def load() -> NativeStatus:
    """Load the native ops into this process from the first source that works (module docstring)."""
    if os.environ.get("DIPFAST_NO_NATIVE") == "1":
        return NativeStatus("eager", "switched off by DIPFAST_NO_NATIVE=1")
    aot = aot_library()
    if aot is None:
        why = "no ahead-of-time build"
    else:
        error = try_load(aot)
        if error is None:
            return NativeStatus("aot", f"ahead-of-time build {aot}", aot)
        why = f"the ahead-of-time build does not load into torch {torch.__version__} ({error})"
    return _load_jit(why)


def _load_jit(why: str) -> NativeStatus:
    sources = source_dir()
    if sources is None:
        return NativeStatus("eager", f"{why}, and the C++ sources are not installed")
    compiler = find_compiler()
    if compiler is None:
        return NativeStatus("eager", f"{why}, and no C++ compiler ({_compiler_command()}) to build them")
    if not _ninja_available():
        return NativeStatus("eager", f"{why}, and no ninja to build them (pip install ninja)")
    try:
        build_dir = cache_dir(sources, compiler)
    except (OSError, subprocess.SubprocessError) as err:
        return NativeStatus("eager", f"{why}, and the C++ compiler {compiler} does not run ({_one_line(err)})")
    cached = build_dir / f"{JIT_NAME}.so"
    if cached.exists() and not (build_dir / "lock").exists() and try_load(str(cached)) is None:
        return NativeStatus("jit", f"built for torch {torch.__version__}, cached in {build_dir}", str(cached))
    print(
        f"dipfast: {why}; building the native CPU ops once for torch {torch.__version__} "
        f"into {build_dir} (about a minute on 2 cores) ...",
        end="",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        library = build(sources, build_dir)
    except Exception as err:  # a compiler or linker error, a full disk, a library that does not load
        print(f" failed after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        log = _write_log(build_dir, err)
        return NativeStatus("eager", f"{why}, and building them failed ({_one_line(err)}; full log: {log})")
    print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return NativeStatus("jit", f"built for torch {torch.__version__} into {build_dir}", library)


def fallback_message(status: NativeStatus) -> str:
    """The one line dipfast logs when the ops run eager: why, what it costs, how to get them."""
    if status.detail.startswith("switched off"):
        return f"dipfast: native CPU ops {status.detail}; eager ops take over"
    return (
        f"dipfast: native CPU ops unavailable: {status.detail}; CPU fits run the eager ops, "
        f"{EAGER_SLOWDOWN} slower per step; to get them, {HOW_TO_GET_THEM}"
    )


def aot_library() -> str | None:
    """dipfast/_native*.so beside this dipfast, where setup.py put it. Looked for by path, not by import:
    another dipfast's editable-install finder on sys.meta_path would answer for a name it lacks."""
    package = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (package / f"_native{suffix}").is_file():
            return str(package / f"_native{suffix}")
    return None


def try_load(library: str) -> str | None:
    """Load a library of the ops (it registers them); None on success, else the error in one line."""
    try:
        torch.ops.load_library(library)
    except OSError as err:  # built against another torch (an undefined symbol), or a missing runtime library
        return _one_line(err)
    return None


def source_dir() -> Path | None:
    """The C++ sources: shipped in the package (dipfast/_csrc/native, setup.py copies them there), or
    the checkout's csrc/native for an editable install or a run from the source tree."""
    package = Path(__file__).resolve().parent.parent
    checkout = package.parent / "csrc" / "native" if (package.parent / "setup.py").exists() else None
    for candidate in (package / "_csrc" / "native", checkout):
        if candidate is not None and any(candidate.glob("*.cpp")):
            return candidate
    return None


def find_compiler() -> str | None:
    """The C++ compiler cpp_extension will call ($CXX, else c++), where it exists."""
    return shutil.which(shlex.split(_compiler_command())[0])


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dipfast" / "native"


def cache_dir(sources: Path, compiler: str) -> Path:
    """The build folder for these sources, this torch and this compiler (runs `compiler --version`)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=True)
    digest = hashlib.sha256()
    for part in (torch.__version__, torch.version.git_version, sys.implementation.cache_tag, platform.machine()):
        digest.update(f"{part}\0".encode())
    for part in (_compiler_command(), compiler, version.stdout, *CFLAGS, "\0", *LDFLAGS):
        digest.update(f"{part}\0".encode())
    for source in sorted(sources.iterdir()):
        if source.suffix in (".cpp", ".h"):
            digest.update(f"{source.name}\0".encode() + source.read_bytes())
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", f"torch-{torch.__version__}-{sys.implementation.cache_tag}")
    return cache_root() / f"{tag}-{digest.hexdigest()[:16]}"


def build(sources: Path, build_dir: Path) -> str:
    """Compile and load the ops into this process; the library's path."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    return cpp_extension.load(
        JIT_NAME,
        [str(s) for s in sorted(sources.glob("*.cpp"))],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _compiler_command() -> str:
    return os.environ.get("CXX") or "c++"


def _ninja_available() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


def _write_log(build_dir: Path, err: Exception) -> Path | str:
    log = build_dir / "build.log"
    try:
        log.write_text(f"{type(err).__name__}: {err}\n")
    except OSError:
        return "not written"
    return log


def _one_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
