"""Huey's consumer, saying in a few lines (not a traceback a second) that its queue is gone.

Huey's scheduler reads the schedule every second and each worker thread reads the queue
again after a wait that grows to 10 s (settings.HUEY); each read that failed logged a
traceback, so a Redis restarting for a minute left some hundred of them. Here the reads
and writes the scheduler and workers make of the queue go through `Watched`: the first
failure is one line naming the queue (a Redis URL without its password), then a reminder
at most every REMIND_SECONDS while it lasts, and a line when the queue answers again.
Huey's own traceback of such a failure is dropped (`OutageFilter`); every other error it
logs, a task's included, is left as it was. Huey itself is used unchanged: only its
`_create_worker` and `_create_scheduler` hooks are overridden.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.exceptions
from huey import consumer as huey_consumer

from hypervisor_site.terminal import PrintableFormatter

log = logging.getLogger("huey.consumer")

REMIND_SECONDS = 10.0

# The queue out of reach: Redis refusing, gone, timing out, still loading its data, or
# refusing our password; SQLite's file gone or locked past its timeout.
UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlite3.OperationalError,
)


class QueueUnreachable(Exception):
    """A read or write of the queue that failed for want of the queue, already said."""


def without_password(url: str) -> str:
    """The URL with any password left out: of its user part, and of its query."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostport}" if user else hostport
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    # Not urlunsplit: it writes unix:///path (no host) as unix:/path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def describe(huey) -> str:
    """Where the queue is, for an operator, with no secret in it."""
    url = huey.storage_kwargs.get("url")
    if url:
        return without_password(url)
    # settings.HUEY gives Redis by its URL, or else SQLite's file.
    filename = getattr(huey.storage, "filename", None)
    return str(filename) if filename else f"{type(huey.storage).__name__} {huey.name!r}"


class QueueOutage:
    """What the scheduler and worker threads of one consumer have found of the queue."""

    def __init__(self, where: str, clock=time.monotonic):
        self.where = where
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # when it was first found out of reach
        self._said = 0.0
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def lost(self, exc: BaseException, doing: str) -> None:
        now = self._clock()
        error = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since = self._said = now
                self._failures = 1
                log.error(
                    "Huey's queue at %s is out of reach (%s): %s; retrying, "
                    "with a reminder every %.0f s while it lasts",
                    self.where,
                    doing,
                    error,
                    REMIND_SECONDS,
                )
            elif now - self._said >= REMIND_SECONDS:
                self._said = now
                log.error(
                    "Huey's queue at %s is still out of reach after %.0f s (%d failed "
                    "reads and writes): %s",
                    self.where,
                    now - self._since,
                    self._failures,
                    error,
                )

    def reached(self) -> None:
        if self._since is None:  # the usual case, without taking the lock
            return
        with self._lock:
            if self._since is None:
                return
            log.warning(
                "Huey's queue at %s answers again, after %.0f s out of reach",
                self.where,
                self._clock() - self._since,
            )
            self._since = None
            self._failures = 0


class Watched:
    """The consumer's Huey as its scheduler and worker threads see it: the reads and writes
    of the queue that they make themselves report to the outage; all else is Huey's."""

    def __init__(self, huey, outage: QueueOutage):
        self._huey = huey
        self._outage = outage

    def __getattr__(self, name):
        return getattr(self._huey, name)

    def _call(self, doing: str, method, *args):
        try:
            result = method(*args)
        except UNREACHABLE as exc:
            self._outage.lost(exc, doing)
            raise QueueUnreachable(doing) from exc
        self._outage.reached()
        return result

    def dequeue(self):
        return self._call("reading the queue", self._huey.dequeue)

    def read_schedule(self, timestamp=None):
        return self._call("reading the schedule", self._huey.read_schedule, timestamp)

    def enqueue(self, task):
        return self._call(f"enqueueing {task}", self._huey.enqueue, task)


class OutageFilter(logging.Filter):
    """Drops Huey's traceback of a failure that QueueOutage has already said."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], QueueUnreachable))


OUTAGE_FILTER = OutageFilter()


class Consumer(huey_consumer.Consumer):
    def __init__(self, huey, **options):
        self.outage = QueueOutage(describe(huey))
        for process in (huey_consumer.Worker, huey_consumer.Scheduler):
            # The loggers Huey's scheduler and workers log their failures to.
            logging.getLogger(f"huey.consumer.{process.process_name}").addFilter(OUTAGE_FILTER)
        # The handler Huey's command gave its logger just before, in Huey's format: its
        # lines (a task's exception) printable as ours are.
        for handler in logging.getLogger("huey").handlers:
            if not isinstance(handler.formatter, PrintableFormatter):
                handler.setFormatter(PrintableFormatter.around(handler.formatter))
        super().__init__(huey, **options)

    def _create_worker(self):
        worker = super()._create_worker()
        worker.huey = Watched(self.huey, self.outage)
        return worker

    def _create_scheduler(self):
        scheduler = super()._create_scheduler()
        scheduler.huey = Watched(self.huey, self.outage)
        return scheduler
