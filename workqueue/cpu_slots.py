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

A turn lasts several batches (HYPERVISOR_CPU_TURN_MS, two seconds): a worker's first
turn starts cold (its connection, its spare lock directories), and passing the slot on
after every batch of 250 no-op tasks made 8 workers a fifth slower than 2; with
half-second turns they were a tenth slower, with two-second turns as fast (2026-12-06,
10,000 tasks, medians of four runs in turn).
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from pathlib import Path

GATE, SLOT = 0, 1  # the bytes of a slot's file that are locked
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cores() -> int:
    """The cores this process may run on: those it may be scheduled on, fewer when its
    control group has a CPU quota (a container started with `--cpus 2` on a 64-core host
    sees 64 cores but gets the time of 2, and 64 slots would limit nothing)."""
    allowed = len(os.sched_getaffinity(0))
    quota = quota_cores()
    return allowed if quota is None else max(1, min(allowed, math.ceil(quota)))


def quota_cores(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")):
    """The CPU time this process's control groups may use, in cores: the smallest quota
    of its group and the groups above it (cgroup v2's cpu.max, or v1's cfs quota over its
    period), or None when there is none or none can be read. Inside a container the
    group's own path is usually not mounted and the walk up ends at the mount's root,
    the container's group."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy
            mount, read = root, _cpu_max
        elif "cpu" in controllers.split(","):
            mount, read = root / "cpu", _cfs_quota
        else:
            continue
        folder = mount / group.lstrip("/")
        for above in (folder, *folder.parents):
            limits.append(read(above))
            if above == mount:
                break
    limits = [limit for limit in limits if limit is not None]
    return min(limits, default=None)


def _cpu_max(folder: Path):
    def parse(text):
        quota, period = text.split()  # "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)

    return _read(folder / "cpu.max", parse)


def _cfs_quota(folder: Path):
    quota = _read(folder / "cpu.cfs_quota_us", int)
    period = _read(folder / "cpu.cfs_period_us", int)
    return None if quota is None or quota < 0 or not period else quota / period


def _read(path: Path, parse):
    try:
        return parse(path.read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def needed(workers: int, cpu_bound: bool) -> bool:
    return cpu_bound and workers > cores()


class CpuSlot:
    """A context manager: hold the slot for the `with` block, and for the blocks after it
    until the turn has lasted `turn_seconds`; `release` passes it on at once."""

    def __init__(self, path: str | Path, turn_seconds: float = 0.0):
        self.path = str(path)
        self.turn_seconds = turn_seconds
        self.turns = 0  # how many times this holder took the slot
        self._fd: int | None = None
        self._turn_ends: float | None = None  # while held: when the turn is over

    def __enter__(self) -> CpuSlot:
        if self._turn_ends is not None:
            return self
        if self._fd is None:
            # Opened by each process itself: record locks belong to a process, and closing
            # any descriptor of the file would drop them.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, GATE)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, SLOT)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, GATE)
        self._turn_ends = time.monotonic() + self.turn_seconds
        self.turns += 1
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._turn_ends is None:
            return  # passed on inside the block (a worker whose batch ends on the disk)
        if exc_type is not None or time.monotonic() >= self._turn_ends:
            self.release()

    def release(self) -> None:
        if self._turn_ends is not None:
            self._turn_ends = None
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, SLOT)


def slot_path(folder: Path, index: int) -> Path:
    """Worker `index`'s slot: round robin over one file per core."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"cpu-{index % cores()}.slot"
