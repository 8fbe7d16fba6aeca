"""Every writer of the SQLite database waits in one queue.

SQLite has one write lock, and its busy handler sleeps in growing steps instead of
queueing: under contention one writer can wait for seconds while others write again and
again. An exclusive `flock` on a file beside the database is a real queue (the kernel
wakes the next waiter at once), so the database backend (hypervisor_site.sqlite) takes it
before every write transaction and every write statement outside one. Workers, the reaper,
the importer, board and admin actions and the herds' bookkeeping all queue there alike.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, connections, transaction


class WriterClock:
    """Seconds this process spent waiting for the write lock and holding it.

    On SQLite the writers take turns, so the sum of every worker's held time is the part
    of a run that more workers cannot shorten; waiting time says they are queueing.
    """

    def __init__(self):
        self.waited = 0.0
        self.held = 0.0
        self._lock = threading.Lock()  # a worker's heartbeat thread writes too

    def add(self, waited: float, held: float) -> None:
        with self._lock:
            self.waited += waited
            self.held += held

    def reading(self) -> tuple[float, float]:
        return self.waited, self.held


writer_clock = WriterClock()


def writer_lock_path(database_name: str) -> str:
    return f"{database_name}.writers"


class WriterTurn:
    """One connection's place in the writers' queue (flock conflicts per open file, so
    each connection, in whichever thread, has a file of its own)."""

    def __init__(self, database_name: str):
        self.path = writer_lock_path(database_name)
        self.fd: int | None = None
        self.held_since: float | None = None

    def take(self) -> None:
        if self.held_since is not None:
            return
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        asked = time.perf_counter()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.held_since = time.perf_counter()
        writer_clock.add(self.held_since - asked, 0.0)

    def give_up(self) -> None:
        if self.held_since is None:
            return
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        writer_clock.add(0.0, time.perf_counter() - self.held_since)
        self.held_since = None

    @property
    def held(self) -> bool:
        return self.held_since is not None

    def close(self) -> None:
        self.give_up()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def write_transaction(using: str = DEFAULT_DB_ALIAS):
    """A short write transaction. On SQLite the backend queues it behind every other
    writer and counts its time; on PostgreSQL writers lock rows, and only the time held is
    counted here."""
    if connections[using].vendor == "sqlite":
        with transaction.atomic(using):
            yield
        return
    started = time.perf_counter()
    try:
        with transaction.atomic(using):
            yield
    finally:
        writer_clock.add(0.0, time.perf_counter() - started)
