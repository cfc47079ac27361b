"""NVTX ranges around the phases of a DIP step, for Nsight Systems timelines.

    with phase("forward"):
        out = net(z)

Off by default: phase() then returns one shared nullcontext (no allocation, no call into
NVTX). enable() turns the ranges on when the `nvtx` package imports; without it they stay a
no-op. Inside a torch.compile trace phase() is always the nullcontext, so it never breaks a
graph. With no profiler attached the NVTX calls themselves are no-ops in the C library.
"""

from __future__ import annotations

import contextlib

import torch

DOMAIN = "dipfast"
COLORS = {
    "noise": "grey",
    "forward": "green",
    "loss": "yellow",
    "backward": "red",
    "backtracking": "purple",
    "optimizer": "blue",
    "read-back": "orange",
}
PHASES = tuple(COLORS)

_NULL = contextlib.nullcontext()
_lib = None  # the nvtx module once imported, False when it is missing
_enabled = False


def _nvtx():
    global _lib
    if _lib is None:
        try:
            import nvtx

            _lib = nvtx
        except ImportError:
            _lib = False
    return _lib


def enable(on: bool = True) -> bool:
    """Turn the ranges on (when nvtx imports) or off; returns whether they are on."""
    global _enabled
    _enabled = bool(on) and bool(_nvtx())
    return _enabled


def enabled() -> bool:
    return _enabled


def phase(name: str):
    """A context manager: an NVTX range named `name` in the 'dipfast' domain, or a no-op."""
    if not _enabled or torch.compiler.is_compiling():
        return _NULL
    return _nvtx().annotate(name, color=COLORS.get(name), domain=DOMAIN)
