"""The settings of dipfast's compiled calls: a cache that outlives /tmp and cannot serve a stale backward.

Inductor's caches (the FX graph cache and AOTAutograd's, which holds a forward with its backward) key on
the traced graph. A dipfast op appears in that graph by name and schema only: its autograd rule, which
decides the backward graph, is not part of the key. After an upgrade that changes a rule, or an op's
backward, the cache would hand back the backward compiled for the old one. The key's tag
(torch.compiler.config.cache_key_tag) therefore carries a hash of the files that define dipfast's ops.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import torch

RECOMPILE_LIMIT = 64  # Dynamo variants per code object: a benchmark process compiles dozens of fits
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dipfast" / "inductor"


def op_sources() -> list[Path]:
    """The files whose contents define dipfast's torch ops: the Triton ops' modules, the native ops'
    Python side (fakes, vmap rules), and their C++ autograd: the ahead-of-time library where setup.py built
    one, the C++ sources where they are installed (the per-user build compiles those)."""
    from dipfast.native import loader

    package = Path(__file__).parent
    # found, not imported (an import here would close a cycle through the package); an editable install
    # maps dipfast.kernels to the repository's kernels/
    kernels = importlib.util.find_spec("dipfast.kernels").submodule_search_locations
    folders = [*map(Path, kernels), package / "native"]
    files = [f for folder in folders for f in folder.glob("*.py")]
    if (library := loader.aot_library()) is not None:
        files.append(Path(library))
    if (cpp := loader.source_dir()) is not None:
        files += [f for f in cpp.iterdir() if f.suffix in (".cpp", ".h")]
    return sorted(files)


@functools.cache
def ops_tag() -> str:
    """'dipfast-' and a short hash of op_sources()' contents: it changes whenever one of them does."""
    digest = hashlib.sha256()
    for path in op_sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return "dipfast-" + digest.hexdigest()[:16]


@contextlib.contextmanager
def compile_settings(compiled: bool):
    """For a compiled call only: Inductor's cache kept across processes (not in /tmp, its default), its
    key tagged with ops_tag() (after any tag of the user's), Dynamo's recompile limit raised. The
    process's own settings are restored afterwards.

    The cache folder is CACHE_DIR unless the user chose one (TORCHINDUCTOR_CACHE_DIR): torch sets that variable
    to its /tmp default on first use, as importing torch._dynamo does, so its default counts as no choice."""
    if not compiled:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # Inductor's import: a compiled call's

    previous_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if previous_dir in (None, default_cache_dir()):  # torch's own default is no choice of the user's
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR)
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    tag = torch.compiler.config.cache_key_tag
    if ops_tag() not in tag:  # once, in nested compiled calls
        tag = "-".join(t for t in (tag, ops_tag()) if t)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit), torch.compiler.config.patch(cache_key_tag=tag):
            yield
    finally:
        if previous_dir is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_dir
        else:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
