"""Cores that workers of a CPU-bound processor take turns on.

With more such workers than cores, the one holding SQLite's write lock shares the cores
with its siblings and is descheduled in favour of them: it held the lock about twice as
long with 8 workers on 2 cores, and 8 workers ran slower than 2. So workers are dealt
one slot each, round robin over as many slots as there are cores, and work a batch
(claim, process, finish) only while they hold their slot: at most one worker per core
runs, the rest wait in the kernel. A slot is a POSIX record lock on a file, which the
kernel drops when its holder dies: a worker killed holding one never stalls the others.

Turns are passed on: a worker first takes the slot's gate (byte 0), then the slot
(byte 1), then lets the gate go. The next worker waits on the slot holding the gate, so
the holder, once done, cannot take the slot straight back: it queues at the gate.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

GATE, SLOT = 0, 1  # the bytes of a slot's file that are locked


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def needed(workers: int, cpu_bound: bool) -> bool:
    return cpu_bound and workers > cores()


class CpuSlot:
    """A context manager: hold the slot for the `with` block."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fd: int | None = None

    def __enter__(self) -> CpuSlot:
        if self._fd is None:
            # Opened by each process itself: record locks belong to a process, and closing
            # any descriptor of the file would drop them.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, GATE)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, SLOT)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, GATE)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, SLOT)


def slot_path(folder: Path, index: int) -> Path:
    """Worker `index`'s slot: round robin over one file per core."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"cpu-{index % cores()}.slot"
