"""Operating-system side of herds: start worker processes, look at them, end their trees."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

import psutil

START_TIME_SLACK = 1.0  # psutil create_time is rounded to clock ticks


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def leader(pid: int | None, started: float | None) -> psutil.Process | None:
    """The worker process itself, if it still lives and is not a reused pid."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if started is not None and abs(process.create_time() - started) > START_TIME_SLACK:
            return None
        return process
    except psutil.Error:
        return None


def tree(pid: int | None, started: float | None) -> list[psutil.Process]:
    """The worker, its descendants, and anything left in its process group."""
    found: dict[int, psutil.Process] = {}
    head = leader(pid, started)
    if head is not None:
        found[head.pid] = head
        with contextlib.suppress(psutil.Error):
            for child in head.children(recursive=True):
                found[child.pid] = child
    if pid and started is not None:
        # Orphans whose parent died still carry the worker's pid as their group id.
        for process in psutil.process_iter(["create_time"]):
            if process.pid in found:
                continue
            with contextlib.suppress(psutil.Error, OSError):
                if (
                    os.getpgid(process.pid) == pid
                    and process.info["create_time"] >= started - START_TIME_SLACK
                ):
                    found[process.pid] = process
    return list(found.values())


@dataclass
class Sample:
    alive: bool
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    children: int = 0


def sample(pid: int | None, started: float | None) -> Sample:
    head = leader(pid, started)
    if head is None:
        return Sample(alive=False)
    cpu = 0.0
    rss = 0
    processes = [head]
    with contextlib.suppress(psutil.Error):
        processes += head.children(recursive=True)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            cpu += times.user + times.system
            rss += process.memory_info().rss
    return Sample(alive=True, cpu_seconds=cpu, rss_bytes=rss, children=len(processes) - 1)


def signal_tree(processes: list[psutil.Process], signum: int, group: int | None = None) -> None:
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)


def terminate_trees(targets: list[tuple[int | None, float | None]], grace: float) -> list[int]:
    """SIGTERM every worker's whole tree at once, wait up to `grace`, then SIGKILL the rest.

    Returns the pids that had to be killed.
    """
    everything: dict[int, psutil.Process] = {}
    groups = []
    for pid, started in targets:
        processes = tree(pid, started)
        if any(p.pid == pid for p in processes):
            groups.append(pid)
        everything.update((p.pid, p) for p in processes)
        signal_tree(processes, signal.SIGTERM, pid if pid in everything else None)
    if not everything:
        return []
    _gone, alive = psutil.wait_procs(list(everything.values()), timeout=grace)
    # A child started during the grace period is caught by a second look.
    left = {p.pid: p for p in alive}
    for pid, started in targets:
        left.update((p.pid, p) for p in tree(pid, started))
    if left:
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        signal_tree(list(left.values()), signal.SIGKILL)
        psutil.wait_procs(list(left.values()), timeout=5)
    return list(left)
