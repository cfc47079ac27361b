"""Peak memory of a measured block, labelled with what was measured.

- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats: the peak of tensors
  allocated by PyTorch's caching allocator on that device ("cuda max_memory_allocated").
- CPU on Linux: the process's peak resident set size (VmHWM in /proc/self/status), reset
  before the block by writing 5 to /proc/self/clear_refs: "cpu peak RSS". The growth is the
  peak minus the RSS before the block; memory the allocator kept from earlier blocks is
  reused, so the growth can understate a block's working set, never overstate it.
- elsewhere: resource.getrusage ru_maxrss, the peak of the whole process so far, labelled so.

steady() marks the end of a fit's warm-up: the peak from there on is reported beside the block's
("steady_peak_mib": CUDA and Linux only), without the warm-up's transients (cuDNN's algorithm search
takes whatever workspace the allocator will give it, and hands it back).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from dipfast.memory import MIB


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """with PeakMemory(device) as m: ...; then m.result() -> {"kind", "peak_mib", "growth_mib"}."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.kind = None
        self.before = self.peak = None
        self.warm_peak = self.steady_peak = None  # the peak up to steady(), and from it on

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            self.before = torch.cuda.memory_allocated(self.device)
        elif _reset_hwm() and _status_kib("VmHWM") is not None:
            self.kind = "cpu peak RSS (VmHWM, reset before the block)"
            self.before = _status_kib("VmRSS") * 1024
        else:
            self.kind = "process peak RSS so far (ru_maxrss; not reset per block)"
            self.before = None
        return self

    def _resettable_peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024 if self.before is not None else None

    def steady(self) -> None:
        """The warm-up ends here: what follows is also measured alone."""
        self.warm_peak = self._resettable_peak()
        if self.warm_peak is None:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_hwm()

    def __exit__(self, *exc):
        self.peak = self._resettable_peak()
        if self.peak is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
        elif self.warm_peak is not None:
            self.steady_peak, self.peak = self.peak, max(self.peak, self.warm_peak)
        return False

    def result(self) -> dict:
        growth = None if self.before is None else max(self.peak - self.before, 0) / MIB
        steady = None if self.steady_peak is None else self.steady_peak / MIB
        return {"kind": self.kind, "peak_mib": self.peak / MIB, "growth_mib": growth, "steady_peak_mib": steady}
