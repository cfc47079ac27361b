"""The manifest of a batch: JSON Lines in the output folder, one record per image, what a rerun resumes from.

While a batch runs, each finished image appends its record (flushed and synced before the next
one), so a killed driver loses nothing it reported. The last record of an output wins; closing
rewrites the file with that one record per output (through a temporary file and a rename). A line
cut short by a kill is skipped when the file is read back. One driver at a time: an exclusive lock
on a file beside the manifest, released by the system when its process ends however it ends.

A record (batch.py writes them):
    output         the output's path relative to the folder (the record's key)
    input          the input file as found;  input_sha256, mask, mask_sha256 (or null)
    settings       what decides the output: task, the resolved preset, backend, precision, device, seed
    status         'ok' or 'error';  error: the one-line reason, or null
    iterations, stop_reason, seconds (the fit's wall time; a group's fits share it), psnr and
    ema_psnr (with a target, else null), output_sha256, ran (host, device, backend, precision,
    worker, pid, group size), finished (UTC)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dipfast.errors import InputError
from dipfast.images import write_atomic

try:
    import fcntl
except ImportError:  # not POSIX: no lock, one driver per folder is then the user's to keep
    fcntl = None

NAME = "manifest.jsonl"


class Manifest:
    """The records of `out_dir`'s manifest, the latest per output, and the open log new records go to."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / NAME
        self._lock = open(self.path.with_name(f".{NAME}.lock"), "a")
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise InputError(
                    f"another dipfast batch is writing to {str(out_dir)!r}; wait for it or choose another folder"
                ) from None
        self.latest: dict[str, dict] = {}
        text = self.path.read_text() if self.path.exists() else ""
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the tail of a killed run's last write
                continue
            if isinstance(record, dict) and "output" in record:
                self.latest[record["output"]] = record
        self._log = open(self.path, "a")
        if text and not text.endswith("\n"):  # a cut-off line must not swallow the next record
            self._log.write("\n")

    def finished(self, key: str, fingerprint: dict) -> bool:
        """Whether `key` has an ok record with these input hashes and settings, and its output file exists."""
        record = self.latest.get(key)
        if record is None or record.get("status") != "ok":
            return False
        if any(record.get(k) != v for k, v in fingerprint.items()):
            return False
        return (self.path.parent / key).is_file()

    def add(self, record: dict) -> None:
        self._log.write(json.dumps(record, allow_nan=False) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        self.latest[record["output"]] = record

    def close(self) -> None:
        """One record per output, sorted by output path; then the lock goes."""
        self._log.close()
        lines = "".join(json.dumps(self.latest[k], allow_nan=False) + "\n" for k in sorted(self.latest))
        write_atomic(self.path, lines.encode())
        self._lock.close()
