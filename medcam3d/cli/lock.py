"""One run at a time per output folder: an OS file lock (``filelock``) plus a note naming the holder.

The lock (``OUTPUT/.medcam3d.lock``) is held by the run's main process from before the first file
of a case is written until the manifest is merged. The operating system releases it when that
process ends, even when it is killed, so a crashed run never blocks the next one. A second run that
finds the lock taken refuses at once (exit 2) with the holder's pid, host and start time, read from
``OUTPUT/.medcam3d-run.json``, which the holder writes after acquiring the lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from medcam3d.errors import InputError

LOCK_NAME = ".medcam3d.lock"
HOLDER_NAME = ".medcam3d-run.json"


def _holder_text(out_root: Path) -> str:
    try:
        info = json.loads((out_root / HOLDER_NAME).read_text(encoding="utf-8"))
        return (f"pid {info.get('pid')} on {info.get('host')}, run {info.get('run_id')}, started "
                f"{info.get('started')}")
    except (OSError, ValueError, AttributeError):
        return "a process that has not written its details yet"


class OutputLock:
    """Non-blocking exclusive lock of an output folder; use as a context manager.

    Raises:
        InputError: the folder is locked by another run (the message names it).
    """

    def __init__(self, out_root: Path, run_id: str) -> None:
        self.out_root = out_root
        self.run_id = run_id
        self._lock = FileLock(str(out_root / LOCK_NAME), timeout=0)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except Timeout:
            raise InputError(
                f"--output: {str(self.out_root)!r} is in use by another medcam3d run "
                f"({_holder_text(self.out_root)}); wait for it to finish or choose another --output"
            ) from None
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": self.run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv),
        }
        try:  # advisory only: a full disk must not stop the run here
            (self.out_root / HOLDER_NAME).write_text(json.dumps(info), encoding="utf-8")
        except OSError:
            (self.out_root / HOLDER_NAME).unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock.is_locked:
            (self.out_root / HOLDER_NAME).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
