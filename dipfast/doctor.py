"""`dipfast doctor` and `dipfast --version`: which of dipfast's paths run on this machine, and why.

- native ops: aot, jit or eager, and where from or why (dipfast.native.status(), which loads the ops,
  so a first run may build them);
- triton: its version, and where its kernels can run: on CUDA, or only under the CPU interpreter;
- cuda: each GPU's name and compute capability, or why there is none;
- bf16: whether the CPU and each GPU compute bf16 in hardware (precision='auto' picks bf16 on a CPU
  that does);
- torch: its version, and the CUDA it was built for.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform

import torch

from dipfast.backends import bf16_native


def rows() -> list[tuple[str, str]]:
    """(name, what is active and why) for each path, in the module docstring's order."""
    return [
        ("native ops", _native_ops()),
        ("triton", _triton()),
        ("cuda", _cuda()),
        ("bf16", _bf16()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {platform.python_version()}"),
    ]


def report() -> str:
    """The doctor's report: one `name: value` line per path."""
    found = rows()
    width = max(len(name) for name, _ in found)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in found)


def summary() -> str:
    """One line: the native ops' path, Triton, the GPUs, bf16 and torch, each in a word or two."""
    native = _native_status()
    triton = _triton_version()
    gpus = _gpus()
    return "; ".join(
        [
            f"native ops: {native.path if native else 'eager'}",
            f"triton {triton}: {'CUDA' if gpus else 'CPU interpreter only'}" if triton else "triton: not installed",
            f"CUDA: {', '.join(name for name, _ in gpus)}" if gpus else "CUDA: none",
            f"bf16 in hardware: {'yes' if bf16_native(torch.device('cpu')) else 'no'} (CPU)",
            f"torch {torch.__version__}",
        ]
    )


class VersionAction(argparse.Action):
    """--version: the version, then summary() on a second line."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from dipfast import __version__

        print(f"dipfast {__version__}\n{summary()}")
        parser.exit(0)


def _native_status():
    from dipfast import native

    try:
        return native.status()
    except native.NativeOpsMissing:  # DIPFAST_REQUIRE_NATIVE=1: the doctor reports, it does not fail
        return None


def _native_ops() -> str:
    from dipfast import native

    status = _native_status()
    if status is None:
        return "eager (DIPFAST_REQUIRE_NATIVE=1 is set and they did not load)"
    return f"{status.path}: {status.detail}" + (
        "" if status.loaded else f"; to get them, {native.loader.HOW_TO_GET_THEM}"
    )


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def _triton() -> str:
    version = _triton_version()
    if version is None:
        return "not installed: the triton backend cannot run (pip install triton, on a CUDA machine)"
    if _gpus():
        return f"{version}, runs on CUDA"
    interpreter = "on" if os.environ.get("TRITON_INTERPRET") == "1" else "off"
    return f"{version}, no GPU: runs only under the CPU interpreter TRITON_INTERPRET=1 (tests; {interpreter} now)"


def _gpus() -> list[tuple[str, torch.device]]:
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.device("cuda", i)) for i in range(torch.cuda.device_count())]


def _cuda() -> str:
    gpus = _gpus()
    if not gpus:
        return "none (this torch is a CPU build)" if torch.version.cuda is None else "no GPU found"
    return ", ".join(
        "{}: {} (compute capability {}.{})".format(device, name, *torch.cuda.get_device_capability(device))
        for name, device in gpus
    )


def _bf16() -> str:
    cpu = "CPU yes (AVX512-BF16 or AMX)" if bf16_native(torch.device("cpu")) else "CPU no (precision auto runs fp32)"
    gpus = [f"{device} {'yes' if bf16_native(device) else 'no'}" for _, device in _gpus()]
    return ", ".join([cpu, *gpus])
