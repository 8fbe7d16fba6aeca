"""A search's matching ids, kept in a temporary table for the rest of the request.

A board filtered by text runs several statements (the view's version, the column counts,
a page of cards per column, the facets). Handed the search as a subquery, each would run
it again, and for a text that matches most tasks each run reads every task; handed a table
of ids with a primary key, each looks ids up instead. The table lives on the request's
connection and is dropped when the request ends (or with the connection).

On PostgreSQL the board's search is kept across requests instead (keep_shared), in a table
every web process reads (migration 0024), for as long as its text's generation holds.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager

from django.core.signals import request_finished
from django.db import DatabaseError, connections, transaction
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


# Kept searches (PostgreSQL) go once no request can still be reading them (each use marks
# it, and a request lasts well under ten seconds): one of another generation's text after
# ten seconds unused (no request asks for it again, and while text keeps changing each
# render keeps one), one beyond the newest few after a minute, any after ten minutes.
STALE = "interval '10 seconds'"
IDLE = "interval '60 seconds'"
KEPT_SEARCHES = 16
FORGOTTEN = "interval '600 seconds'"  # forms.SEARCH_KEPT_SECONDS: no cache names it now
KEPT_PREFIX = "queue_kept_hits_"


def kept_table(search: int) -> str:
    return f"{KEPT_PREFIX}{int(search)}"


def keep_shared(db, sql: str, params: list, key: str, generation: str) -> str:
    """PostgreSQL: run `sql` (selecting ids) once into a table of its own that every
    connection reads (migration 0024), listed as `key` (what the board's cache keeps it
    under: its text and generation); the table's name. A table per search, not one for
    all: PostgreSQL plans for its size without being told, and one goes whole."""
    with transaction.atomic(using=db.alias), db.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM queue_kept_search WHERE (generation <> %s AND used_at < now() - {STALE})"  # noqa: S608
            f" OR (used_at < now() - {IDLE} AND (used_at < now() - {FORGOTTEN} OR id NOT IN "
            f"(SELECT id FROM queue_kept_search ORDER BY used_at DESC LIMIT {KEPT_SEARCHES})))",
            [generation],
        )
        _drop_unlisted(cursor)
        cursor.execute(
            "INSERT INTO queue_kept_search (key, generation) VALUES (%s, %s) RETURNING id",
            [key, generation],
        )
        search = cursor.fetchone()[0]
        table = kept_table(search)
        # Made by a query, which PostgreSQL may read in parallel (an INSERT it does not),
        # and told to: it plans a scan that hands on a third of 100,000 rows as dearer in
        # parallel. Ids indexed after the fill, in one sort. 104 -> 68 ms for that third.
        with planned_with(cursor, parallel_setup_cost="0", parallel_tuple_cost="0"):
            cursor.execute(f"CREATE UNLOGGED TABLE {table} (id) AS {sql}", params)  # noqa: S608
        cursor.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
    return table


@contextmanager
def planned_with(cursor, **settings: str):
    """PostgreSQL planner settings for the statements inside, in a transaction: a local
    setting lasts until the transaction ends (a test's, or a request's under
    ATOMIC_REQUESTS), so each is put back after. A statement that fails takes them back
    with its transaction or savepoint."""
    # Read and set in one statement (its columns are worked out in order): one round trip.
    read = ["current_setting(%s)"] * len(settings)
    cursor.execute(_set_local(settings, read), [*settings, *_pairs(settings)])
    before = dict(zip(settings, cursor.fetchone()[: len(settings)], strict=True))
    yield
    cursor.execute(_set_local(before), _pairs(before))


def _set_local(settings: dict[str, str], read: list[str] | None = None) -> str:
    return "SELECT " + ", ".join([*(read or []), *["set_config(%s, %s, true)"] * len(settings)])


def _pairs(settings: dict[str, str]) -> list[str]:
    return [value for pair in settings.items() for value in pair]


@contextmanager
def counted_in_id_order(db):
    """PostgreSQL: the statements inside join a kept search's ids to the tasks in id
    order, its primary key merged with migration 0025's index, instead of hashing the
    ids. For a text in a third of 1,000,000 tasks 129-136 ms against 203-258 for the hash
    join, which PostgreSQL prices lower (at 100,000 both 18-22 ms)."""
    if db.vendor != "postgresql":
        yield
        return
    with (
        transaction.atomic(using=db.alias),
        db.cursor() as cursor,
        planned_with(cursor, enable_hashjoin="off"),
    ):
        yield


def _drop_unlisted(cursor) -> None:
    """Drop the kept tables no listed search names: those just let go, and any a crash
    left (it empties the unlogged list and tables, but leaves the tables)."""
    cursor.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND pg_table_is_visible(oid) "
        "AND starts_with(relname::text, %s) "
        "AND relname NOT IN (SELECT %s || id::text FROM queue_kept_search)",
        [KEPT_PREFIX, KEPT_PREFIX],
    )
    for (name,) in cursor.fetchall():
        cursor.execute(f"DROP TABLE IF EXISTS {name}")  # noqa: S608 - named by us


def forget_kept(db) -> None:
    """PostgreSQL: let every kept search go, as a change of text does (the bench)."""
    with transaction.atomic(using=db.alias), db.cursor() as cursor:
        cursor.execute("DELETE FROM queue_kept_search")
        _drop_unlisted(cursor)


def kept_as(db, key: str) -> str | None:
    """The table of the search kept as `key` by any web process, marked as used now; None
    once it went (idle, or a crash emptied the unlogged list)."""
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE queue_kept_search SET used_at = now() WHERE id = "
            "(SELECT max(id) FROM queue_kept_search WHERE key = %s) RETURNING id",
            [key],
        )
        row = cursor.fetchone()
        return kept_table(row[0]) if row else None


@receiver(request_finished)
def drop_kept(**kwargs) -> None:
    for db in connections.all(initialized_only=True):
        for name in _kept.pop(db, []):
            _drop(db, name)
