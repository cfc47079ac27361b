"""Which native ops this process runs, settled on their first use (dipfast.native says how).

The op modules (batch_norm, philox, upsample) ask enabled() before each kernel call; this module holds
that state and never imports them at module level: it registers their fakes by name once the library
has defined their ops.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading

from dipfast.native import loader

_log = logging.getLogger("dipfast.native")  # the package's logger: one name for its one line
_status: loader.NativeStatus | None = None
_loading = threading.Lock()
_disabled = 0  # open disabled() contexts


class NativeOpsMissing(RuntimeError):
    """DIPFAST_REQUIRE_NATIVE=1 is set and the native ops did not load."""


def status() -> loader.NativeStatus:
    """Which native ops this process runs (loader.NativeStatus), loading them on the first call: the
    ahead-of-time build, else a build cached for this torch (built now if missing), else the eager ops
    with one logged line that says why. Raises NativeOpsMissing under DIPFAST_REQUIRE_NATIVE=1 when eager."""
    global _status, AVAILABLE
    with _loading:
        if _status is None:
            found = loader.load()
            if found.loaded:
                _register_fakes()
            else:
                _log.warning(loader.fallback_message(found))
            _status, AVAILABLE = found, found.loaded
    if not _status.loaded and os.environ.get("DIPFAST_REQUIRE_NATIVE") == "1":
        raise NativeOpsMissing(f"DIPFAST_REQUIRE_NATIVE=1 but the native CPU ops did not load: {_status.detail}")
    return _status


def __getattr__(name: str):
    """AVAILABLE (whether the ops loaded) is defined by the first status() call, which this makes on
    the first read: so `import dipfast` loads and builds nothing."""
    if name == "AVAILABLE":
        status()
        return AVAILABLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_fakes() -> None:
    """The ops' shapes for torch.compile, registered once the library has defined the ops."""
    for name in ("batch_norm", "philox", "upsample"):  # modules; the attribute batch_norm is the function
        importlib.import_module(f"dipfast.native.{name}").register_fakes()


def enabled() -> bool:
    """Whether the native ops run now: built, loaded, and not switched off by disabled()."""
    if _status is None:  # the first use; NativeBlocks() makes it before torch.compile can trace this
        status()
    return AVAILABLE and _disabled == 0


@contextlib.contextmanager
def disabled():
    """Run the eager twins instead of the native ops inside this context (the native backend's step
    included): to measure what the ops add, or to tell a kernel bug from a model one."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1
