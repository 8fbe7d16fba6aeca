"""The clock that claims' leases and workers' heartbeats are written and judged by.

Hosts that share a PostgreSQL database need not agree on the time. Judged by each host's
own clock, one running ten minutes ahead would take every other host's live claims as
expired and give them to its own workers while their agents still run; one running behind
would write leases that others take as expired at once, and keep a dead host's claims
longer. On PostgreSQL these times are the database server's; SQLite is one host's, whose
clock is its database's.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from django.db import connections
from django.db.models.functions import Now
from django.utils import timezone


def now(using: str = "default") -> datetime:
    """The time by the database's clock (the start of this statement on PostgreSQL)."""
    db = connections[using]
    if db.vendor != "postgresql":
        return timezone.now()
    with db.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def stamp(using: str = "default") -> Now | datetime:
    """The time by the database's clock, for an UPDATE to write: on PostgreSQL its own
    clock read in the statement (no query of its own), a timedelta may be added."""
    return Now() if connections[using].vendor == "postgresql" else timezone.now()


SHOWN_OFFSET_SECONDS = 60.0
_offset: tuple[float, timedelta] | None = None  # when read (monotonic), database's - ours


def shown_now() -> datetime:
    """The database's time for pages to show leases by (a card's lease left, "stale
    claim"), without a query per card: this process's clock plus how far the database's
    differs from it, read again each minute."""
    global _offset
    if connections["default"].vendor != "postgresql":
        return timezone.now()
    if _offset is None or time.monotonic() - _offset[0] > SHOWN_OFFSET_SECONDS:
        ours = timezone.now()
        _offset = (time.monotonic(), now() - ours)
    return timezone.now() + _offset[1]
