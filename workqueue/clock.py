"""The clock that claims' leases and workers' heartbeats are written and judged by.

Hosts that share a PostgreSQL database need not agree on the time. Judged by each host's
own clock, one running ten minutes ahead would take every other host's live claims as
expired and give them to its own workers while their agents still run; one running behind
would write leases that others take as expired at once, and keep a dead host's claims
longer. On PostgreSQL these times are the database server's; SQLite is one host's, whose
clock is its database's.
"""

from __future__ import annotations

from datetime import datetime

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
