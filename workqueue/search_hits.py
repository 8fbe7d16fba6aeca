"""A search's matching ids, kept in a temporary table for the rest of the request.

A board filtered by text runs several statements (the view's version, the column counts,
a page of cards per column, the facets). Handed the search as a subquery, each would run
it again, and for a text that matches most tasks each run reads every task; handed a table
of ids with a primary key, each looks ids up instead. The table lives on the request's
connection and is dropped when the request ends (or with the connection).
"""

from __future__ import annotations

import itertools
import weakref

from django.core.signals import request_finished
from django.db import DatabaseError, connections
from django.dispatch import receiver

KEEP = 2  # tables per connection: one search per request, and the one before it
_names = itertools.count()
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> names
# By vendor: how the table is named in a write, its id column, and the insert.
# - SQLite's writers' queue (hypervisor_site.sqlite) lets writes to `temp.` pass: the
#   temporary database is the connection's own, and a search must not wait on workers.
#   An INTEGER PRIMARY KEY is the rowid itself, and the short-text scan may select an id
#   twice (title and body): kept once.
# - PostgreSQL's ids are bigint, and its search selects each id once.
DIALECTS = {
    "sqlite": ("temp.", "integer", "INSERT OR IGNORE INTO"),
    "postgresql": ("", "bigint", "INSERT INTO"),
}


def keep(db, sql: str, params: list) -> tuple[str, int]:
    """Run `sql` (selecting ids) once into a new temporary table; its name and rows."""
    kept = _kept.setdefault(db, [])
    while len(kept) >= KEEP:
        _drop(db, kept.pop(0))
    schema, id_type, insert = DIALECTS[db.vendor]
    name = f"search_hits_{next(_names)}"
    with db.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE {name} (id {id_type} PRIMARY KEY)")
        kept.append(name)
        cursor.execute(f"{insert} {schema}{name} (id) {sql}", params)
        return f"{schema}{name}", cursor.rowcount


def _drop(db, name: str) -> None:
    if db.connection is None:  # closed: its temporary tables went with it
        return
    try:
        with db.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {name}")
    except DatabaseError:  # a failed transaction: they go when it is rolled back or closed
        pass


@receiver(request_finished)
def drop_kept(**kwargs) -> None:
    for db in connections.all(initialized_only=True):
        for name in _kept.pop(db, []):
            _drop(db, name)
