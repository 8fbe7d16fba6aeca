from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, connections, models
from django.db.models import Count, Exists, F, Func, Max, Min, OuterRef, Q, Subquery, Sum, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Concat, Substr
from django.db.models.sql import UpdateQuery
from django.utils import timezone
from django.utils.functional import cached_property

from hypervisor_site.writers import write_transaction
from workqueue import clock, search_hits
from workqueue.names import validate_queue_name
from workqueue.routing import TEXT_FIELDS

# Planner statistics (SQLite): none below this many tasks, where every plan is quick, and
# measured again when the table's size moved by this factor since.
STATISTICS_FLOOR = 1000
STATISTICS_DRIFT = 1.25
HTTP_HOST = "http:"  # marks the host of a claim made over HTTP (pull_api)


class Status(models.TextChoices):
    QUEUED = "queued"
    CLAIMED = "claimed"
    DONE = "done"
    BLOCKED = "blocked"


class Outcome(models.TextChoices):
    SUCCESS = "success"
    CLOSED = "closed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class QueueQuerySet(models.QuerySet):
    def missing(self, name: str) -> str:
        """'' when a queue of this name exists (it has settings, or a task names it), else a
        sentence that names the queues there are: for a mistyped name on the command line."""
        if self.filter(name=name).exists() or Task.objects.filter(queue=name).exists():
            return ""
        queues = ", ".join(self.names()) or "none yet: import_tasks makes them"
        return f"no task is in a queue named {name!r} (queues: {queues})"

    def names(self) -> list[str]:
        names = set(self.values_list("name", flat=True))
        names |= set(field_values("queue", limit=10_000))
        return sorted(names)

    def record_folder(self, name: str, folder: Path) -> None:
        """Where new tasks of the queue go and the consumer reads it again: the first folder
        imported into it, or the one imported now when that one is gone (moved, renamed),
        which was otherwise kept for good and read and written nowhere."""
        recorded = self.filter(name=name).values_list("folder", flat=True).first()
        if recorded is None or recorded == str(folder) or (recorded and Path(recorded).is_dir()):
            return
        self.filter(name=name, folder=recorded).update(folder=str(folder))

    def move_folder(self, name: str, old: str, new: Path) -> None:
        """The queue's folder and its tasks' files are at `new` now, not `old`."""
        with write_transaction(self.db):
            self.filter(name=name, folder=old).update(folder=str(new))
            Task.objects.filter(queue=name, source_path__startswith=old + os.sep).update(
                source_path=Concat(Value(str(new)), Substr("source_path", len(old) + 1))
            )


class Queue(models.Model):
    """Per-queue settings. A queue exists as soon as a task names it."""

    name = models.CharField(max_length=100, primary_key=True, validators=[validate_queue_name])
    max_attempts = models.PositiveIntegerField(
        default=3, help_text="Claims a task may lose to dead workers before it is blocked."
    )
    stamp_claims = models.BooleanField(
        default=False,
        help_text="Write claimed_by/herd/claimed_at into the task file while it is held.",
    )
    # Triage's names for this queue's people (see workqueue.triage_rules).
    human_assignee = models.CharField(
        max_length=200, default="human", help_text="Triage assigns human work to this name."
    )
    bot_assignee = models.CharField(
        max_length=200, default="bot", help_text="Triage assigns mechanical work to this name."
    )
    project_links = models.JSONField(
        default=dict,
        blank=True,
        help_text='Triage\'s wikilink per project: {"osb": "[[oversight-board]]"}; '
        "any other project links to [[<project>]].",
    )
    folder = models.CharField(
        max_length=1000,
        blank=True,
        help_text="Where new tasks of this queue are written (inside an import root); "
        "set by the first import of a folder.",
    )

    objects = QueueQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        links = self.project_links
        if not isinstance(links, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in links.items()
        ):
            raise ValidationError(
                {"project_links": "An object of project names to wikilinks (both strings)."}
            )


def stamp(count: int, newest) -> str:
    """A set of tasks' stamp: how many, and their newest `updated_at`."""
    return f"{count}-{newest.timestamp() if newest else 0:.6f}"


class TaskQuerySet(models.QuerySet):
    def in_queue(self, queue: str | None) -> TaskQuerySet:
        return self.filter(queue=queue) if queue else self

    def queued(self) -> TaskQuerySet:
        return self.filter(status=Status.QUEUED)

    def claimed(self) -> TaskQuerySet:
        return self.filter(status=Status.CLAIMED)

    def waiting(self) -> TaskQuerySet:
        """Queued tasks with a dependency that is not done yet."""
        return self.queued().filter(has_dependencies=True).filter(Exists(_unmet_dependencies()))

    def ready(self) -> TaskQuerySet:
        """Queued tasks whose every dependency is done and whose file is there: a task
        whose file went (deleted, moved away) waits for it, rather than set an agent to
        work on a file that is not there and finish into nothing."""
        return self.queued().filter(
            Q(has_dependencies=False) | ~Exists(_unmet_dependencies()), source_missing=False
        )

    def matching_text(self, text: str) -> TaskQuerySet:
        """Tasks whose title, key or body contains `text`, ignoring case, found through
        the search index (TaskSearch)."""
        return self.filter(TaskSearch.matching(text, self.db))

    def excluding(self, ids: list[int]) -> TaskQuerySet:
        """All but the tasks `ids`, sent as one parameter however many they are: a
        worker's pass-over list grows with each task it gives back, and a parameter an
        id passed SQLite's limit (250,000 here, 32,766 in older builds) and made every
        PostgreSQL claim quote them all."""
        if not ids:
            return self
        if connections[self.db].vendor == "postgresql":
            listed = RawSQL("SELECT unnest(%s::bigint[])", [list(ids)])
        else:
            listed = RawSQL("SELECT value FROM json_each(%s)", [json.dumps(list(ids))])
        return self.exclude(pk__in=listed)

    def claim_order(self) -> TaskQuerySet:
        # Priority follows the P0..P4 convention: a lower number is more urgent.
        return self.order_by("priority", "id")

    def lease_expired(self, now=None) -> TaskQuerySet:
        return self.claimed().filter(
            lease_expires_at__lt=now or clock.now(self.db), holder_pid__isnull=False
        )

    def held_by(self, worker: str) -> TaskQuerySet:
        return self.claimed().filter(holder=worker)

    def update_statement(self, **values) -> tuple[str, tuple]:
        """The UPDATE that `update(**values)` would run, compiled now so that it can run
        later under a write lock (what QuerySet.update does, less the execution)."""
        query = self.query.chain(UpdateQuery)
        query.add_update_values(values)
        return query.get_compiler(self.db).as_sql()

    def counts(self) -> dict[str, int]:
        found = dict(self.values_list("status").annotate(n=Count("id")).order_by())
        return {status: found.get(status, 0) for status in Status.values}

    def count_by(self, *fields: str) -> dict[tuple, int]:
        """(values of `fields`) -> how many tasks, in one GROUP BY."""
        rows = self.values_list(*fields).annotate(n=Count("id")).order_by()
        return {tuple(row[:-1]): row[-1] for row in rows}

    def counts_and_stamp(self) -> tuple[dict[str, int], str]:
        """counts(), and what changes when a task of this set changes (every write sets
        updated_at), joins it (a newer updated_at, or one more task) or leaves it (one
        fewer): one read of the set for both."""
        # A count per status, not a GROUP BY: where the set is not read in status order
        # (the ids a text found), grouping sorted every row first (265 ms of 333,000
        # tasks' 201 at 1,000,000 on SQLite).
        per_status = {status: Count("id", filter=Q(status=status)) for status in Status.values}
        found = self.order_by().aggregate(**per_status, newest=Max("updated_at"))
        newest = found.pop("newest")
        return found, stamp(sum(found.values()), newest)

    def counts_by_index(self) -> dict[str, int]:
        """The same as counts(), one index range per status, in one statement.

        One statement is one snapshot: a task moving from claimed to done between two
        separate COUNTs would be counted in both columns.
        """
        parts, params = [], []
        for status in Status.values:
            sql, found = self.filter(status=status).order_by().values("pk").query.sql_with_params()
            # The ORM's own SQL, its values kept as parameters.
            parts.append(f"(SELECT COUNT(*) FROM ({sql}) AS counted)")  # noqa: S608
            params.extend(found)
        with connections[self.db].cursor() as cursor:
            cursor.execute("SELECT " + ", ".join(parts), params)
            return dict(zip(Status.values, cursor.fetchone(), strict=True))

    def keep_statistics(self) -> bool:
        """SQLite: measure the task table's indexes for the query planner when they were
        never measured or the table grew or shrank by more than a quarter since.

        Without statistics SQLite takes every index to narrow a search alike: a board
        filtered by four fields walked the least selective one's range (a quarter of the
        tasks, 400 ms at 1,000,000) instead of the project's (a twentieth). PostgreSQL's
        autovacuum keeps its own statistics. Returns whether it measured.
        """
        db = connections[self.db]
        if db.vendor != "sqlite":
            return False
        table = self.model._meta.db_table
        with db.cursor() as cursor:
            cursor.execute(f'SELECT COUNT(*) FROM "{table}"')  # noqa: S608 (our table)
            (count,) = cursor.fetchone()
            if count < STATISTICS_FLOOR:
                return False
            cursor.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")
            measured = None
            if cursor.fetchone():
                # A stat row starts with its index's row count; partial indexes have fewer.
                cursor.execute(
                    "SELECT MAX(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = %s", [table]
                )
                (measured,) = cursor.fetchone()
        if measured and measured / STATISTICS_DRIFT <= count <= measured * STATISTICS_DRIFT:
            return False
        with write_transaction(self.db), db.cursor() as cursor:
            cursor.execute(f'ANALYZE "{table}"')
        return True

    def insert_new(self, tasks: list[Task]) -> None:
        """Insert new tasks of one queue with one executemany, then set their pks.

        bulk_create spends most of an import's time preparing 40-odd values per row
        through the SQL compiler; only dates and JSON need converting here.
        """
        if not tasks:
            return
        db = connections[self.db]
        fields = [f for f in self.model._meta.concrete_fields if not f.primary_key]
        convert = [isinstance(f, models.DateTimeField | models.JSONField) for f in fields]
        sql = insert_statement(db, self.model, [f.column for f in fields])
        rows = []
        for task in tasks:
            values = []
            for f, conv in zip(fields, convert, strict=True):
                value = getattr(task, f.attname)
                values.append(f.get_db_prep_save(value, db) if conv else value)
            rows.append(values)
        with db.cursor() as cursor:
            cursor.executemany(sql, rows)
        queue = tasks[0].queue
        ids = {}
        for start in range(0, len(tasks), 500):
            keys = [t.key for t in tasks[start : start + 500]]
            ids.update(self.filter(queue=queue, key__in=keys).values_list("key", "pk"))
        for task in tasks:
            task.pk = ids[task.key]
            task._state.adding, task._state.db = False, self.db

    def stats(self, queue: str | None = None) -> dict:
        from workqueue.dependencies import stuck
        from workqueue.reaper import find_stale_claims

        tasks = self.in_queue(queue)
        waiting = waiting_by_queue()
        cannot = stuck(queue)
        claimed = tasks.claimed()
        oldest = claimed.aggregate(oldest=Min("claimed_at"))["oldest"]
        usage = {
            row["queue"]: {"tokens": row["tokens"] or 0, "cost_usd": float(row["cost"] or 0)}
            for row in tasks.values("queue")
            .annotate(tokens=Sum("tokens"), cost=Sum("cost_usd"))
            .order_by("queue")
        }
        return {
            "counts": tasks.counts(),
            "usage": usage,
            "total_tokens": sum(u["tokens"] for u in usage.values()),
            "total_cost_usd": round(sum(u["cost_usd"] for u in usage.values()), 10),
            "claimed_by": dict(
                claimed.values_list("holder").annotate(n=Count("id")).order_by("holder")
            ),
            "stale": len(find_stale_claims(queue)),
            "oldest_claim_seconds": (timezone.now() - oldest).total_seconds() if oldest else None,
            # Queued on dependencies not done; those that cannot become ready, and why.
            "waiting": waiting.get(queue, 0) if queue else sum(waiting.values()),
            "stuck": [s.as_dict() for s in cannot],
        }


def insert_statement(db, model, columns: list[str]) -> str:
    """An INSERT of one row for executemany: the hot paths' alternative to bulk_create."""
    quote = db.ops.quote_name
    # Only quoted names from the model are formatted in; every value is a parameter.
    return (
        f"INSERT INTO {quote(model._meta.db_table)} "  # noqa: S608
        f"({', '.join(quote(c) for c in columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
    )


def unmet_dependency_counts(task_ids: list[int]) -> dict[int, int]:
    """Task id -> how many of its dependencies are not done yet (ids without any left out)."""
    rows = (
        Dependency.objects.filter(task_id__in=task_ids)
        .exclude(Exists(_done_dependency()))
        .values_list("task_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    return dict(rows)


def field_values(field: str, limit: int = 500, queue: str | None = None) -> list[str]:
    """The tasks' values of `field` but "" (of `queue`'s tasks, given one), in order: an
    index probe per value (each field filtered by has an index that leads with it and
    holds the queue, Task.Meta.indexes), where a DISTINCT read every row (0.1-0.2 s a
    field at a million tasks on PostgreSQL). At most `limit`.
    "NOT (x = '')" as the partial indexes say it: SQLite uses one only then."""
    db = connections[Task.objects.db]
    column = db.ops.quote_name(Task._meta.get_field(field).column)
    table = db.ops.quote_name(Task._meta.db_table)
    # Our table's and field's names only.
    probe = f"MIN({column}) FROM {table} WHERE NOT ({column} = '')"  # noqa: S608
    params: list = []
    if queue is not None:
        # SQLite would walk all the queue's tasks for each value (task_board): a "+" keeps
        # it on the field's index, which holds the queue too. PostgreSQL chooses well.
        plus = "+" if db.vendor == "sqlite" else ""
        probe += f" AND {plus}{db.ops.quote_name('queue')} = %s"
        params = [queue]
    sql = (
        f"WITH RECURSIVE found(value, n) AS (SELECT (SELECT {probe}), 1 "  # noqa: S608
        f"UNION ALL SELECT (SELECT {probe} AND {column} > found.value), n + 1 "
        "FROM found WHERE found.value IS NOT NULL AND n < %s"
        ") SELECT value FROM found WHERE value IS NOT NULL"
    )
    with db.cursor() as cursor:
        cursor.execute(sql, [*params, *params, limit])
        return [value for (value,) in cursor.fetchall()]


def waiting_by_queue() -> dict[str, int]:
    """Queue -> how many of its tasks are waiting(): queued with a dependency not done.

    The same tasks as Task.objects.waiting(), found from the dependencies rather than the
    tasks, so that the cost follows the dependencies, not the queued tasks (the rest of
    which are ready, and counted on an index). The task is a subquery, not a join: with a
    join SQLite starts from the tasks' status index (ten times slower at 75,000 queued).
    """
    waiting_task = Task.objects.filter(
        pk=OuterRef("task_id"), status=Status.QUEUED, has_dependencies=True
    )
    done = Task.objects.filter(queue=OuterRef("queue"), key=OuterRef("key"), status=Status.DONE)
    rows = (
        Dependency.objects.annotate(queue=Subquery(waiting_task.values("queue")))
        .filter(queue__isnull=False)
        .exclude(Exists(done))
        .values_list("queue")
        .annotate(n=Count("task_id", distinct=True))
        .order_by()
    )
    return dict(rows)


def _done_dependency():
    return Task.objects.filter(queue=OuterRef("task__queue"), key=OuterRef("key"), status="done")


def _unmet_dependencies():
    done = Task.objects.filter(queue=OuterRef("task__queue"), key=OuterRef("key"), status="done")
    return Dependency.objects.filter(task=OuterRef("pk")).exclude(Exists(done))


# PostgreSQL refuses a B-tree index entry over 2,704 bytes. The board's indexes hold the
# tags, project, assignee, type and complexity together (with the queue's name, at most 64
# bytes, and a few numbers), and `task_source` the file's path: values that would not fit
# are refused on every database, naming the fields, before anything is written. Without
# this a file with long non-ASCII tags failed its whole import on PostgreSQL alone.
BOARD_INDEX_FIELDS = {
    "tag_index": "tags", "project": "project", "assignee": "assignee",
    "type": "type", "complexity": "complexity",
}  # fmt: skip
BOARD_INDEX_BYTES = 2400
SOURCE_PATH_BYTES = 2400


def board_index_problem(values: dict) -> str:
    """Why a task with these column values cannot be indexed ("" when it can)."""
    used = sum(len((values.get(name) or "").encode()) for name in BOARD_INDEX_FIELDS)
    if used <= BOARD_INDEX_BYTES:
        return ""
    names = [label for name, label in BOARD_INDEX_FIELDS.items() if values.get(name)]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return (
        f"{listed}: {used:,} bytes together in UTF-8, over the {BOARD_INDEX_BYTES:,} "
        "the board's indexes hold"
    )


class Task(models.Model):
    queue = models.CharField(max_length=100)
    key = models.CharField(max_length=500)
    title = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    priority = models.IntegerField(default=2)
    project = models.CharField(max_length=200, blank=True)
    assignee = models.CharField(max_length=200, blank=True)
    type = models.CharField(max_length=100, blank=True)
    complexity = models.CharField(max_length=100, blank=True)
    tags = models.JSONField(default=list, blank=True)
    # "|a|b|" so that a tag filter is a plain LIKE on every database.
    tag_index = models.CharField(max_length=1000, blank=True, default="")
    depends_on = models.JSONField(default=list, blank=True)
    has_dependencies = models.BooleanField(default=False)
    frontmatter = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    # The markdown body lives in TaskBody: see there.

    # Where it came from; a change is detected by size and mtime first, then the hash.
    source_path = models.CharField(max_length=1000, blank=True)
    source_size = models.BigIntegerField(null=True, blank=True)
    source_mtime_ns = models.BigIntegerField(null=True, blank=True)
    source_sha256 = models.CharField(max_length=64, blank=True)
    source_missing = models.BooleanField(default=False)
    change_pending = models.BooleanField(
        default=False, help_text="The file changed while claimed; re-read when the claim ends."
    )
    # Field edits made while a worker held the task: written into the file when the claim
    # ends, as a file change is re-read then (workqueue.editing).
    pending_edit = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    closed_by = models.CharField(max_length=50, blank=True, help_text="Rule that closed it.")

    # The claim: the row half of it. The other half is the lock directory.
    holder = models.CharField(max_length=200, blank=True)
    holder_host = models.CharField(max_length=200, blank=True)
    holder_pid = models.IntegerField(null=True, blank=True)
    holder_started = models.FloatField(null=True, blank=True)
    holder_herd = models.BigIntegerField(null=True, blank=True)
    fence = models.BigIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # A profile's attempt limit, carried by the claim so that whoever reaps it applies it.
    max_attempts = models.PositiveIntegerField(null=True, blank=True)
    # The agent a command processor runs for the claim: its own process group, so that
    # whoever releases a dead worker's claim can end it first (see agent_tree).
    agent_pgid = models.IntegerField(null=True, blank=True)
    agent_started = models.FloatField(null=True, blank=True)

    # The result.
    outcome = models.CharField(max_length=100, blank=True)
    reason = models.TextField(blank=True)
    evidence = models.TextField(blank=True)
    next_step = models.TextField(blank=True)
    commit = models.CharField(max_length=100, blank=True)
    tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(
        max_digits=20, decimal_places=10, null=True, blank=True, help_text="As the agent CLI said."
    )
    output_tail = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    worktree = models.CharField(
        max_length=1000, blank=True, help_text="The task's own git worktree, while it exists."
    )
    branch = models.CharField(max_length=300, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = TaskQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["queue", "key"], name="task_unique_key_per_queue")
        ]
        indexes = [
            # The claim path: only queued rows, in claim order.
            models.Index(
                fields=["queue", "priority", "id"],
                name="task_claim_path",
                condition=Q(status="queued"),
            ),
            models.Index(fields=["queue", "status", "priority", "id"], name="task_board"),
            # The board without a queue filter: each column in order, and its count. With
            # every filtered field and updated_at: a tag filter (a LIKE) reads the index
            # alone for its counts, its version and the dropdowns' counts, not the rows.
            models.Index(
                fields=["status", "priority", "id", "tag_index", "queue", *TEXT_FIELDS]
                + ["updated_at"],
                name="task_board_all",
            ),
            # The board filtered by a field: counts and pages of one index range each, and
            # its version and dropdown counts too: the other filters are checked in the index
            # (a table lookup per task took 0.8 s for a dropdown at 300,000 tasks). Only
            # tasks with a value: no filter asks for an empty one, and each claim and finish
            # of a task moves its entry in each of these (routing.field_is).
            *(
                models.Index(
                    fields=[field, "status", "priority", "id", "queue", "tag_index"]
                    + [other for other in TEXT_FIELDS if other != field]
                    + ["updated_at"],
                    name=f"task_board_{field}",
                    condition=~Q(**{field: ""}),
                )
                for field in TEXT_FIELDS
            ),
            # SQLite also has `task_tags` on tag_index alone (migration 0018), for the tag
            # dropdown; PostgreSQL counts it in one hash aggregate and has no use for it.
            models.Index(
                fields=["lease_expires_at"], name="task_claimed", condition=Q(status="claimed")
            ),
            # A herd's tasks: its triage review, polled while it runs, and its summary.
            models.Index(
                fields=["holder_herd", "status"],
                name="task_herd",
                condition=Q(holder_herd__isnull=False),
            ),
            models.Index(fields=["queue", "source_path"], name="task_source"),
            models.Index(fields=["updated_at"], name="task_updated"),
            # File changes waiting for a claim to end: almost always none, checked per batch.
            models.Index(
                fields=["id"], name="task_change_pending", condition=Q(change_pending=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.queue}/{self.key}"

    def clean(self) -> None:
        problem = board_index_problem(vars(self))
        if problem:
            raise ValidationError(problem)

    # Written only by the transitions (workqueue.transitions).
    STATE_FIELDS = frozenset(
        {
            "status", "holder", "holder_host", "holder_pid", "holder_started", "holder_herd",
            "fence", "lease_expires_at", "claimed_at", "attempts", "max_attempts",
            "agent_pgid", "agent_started", "outcome", "reason", "evidence", "next_step",
            "commit", "tokens", "output_tail", "result", "finished_at",
        }
    )  # fmt: skip

    @classmethod
    def file_fields(cls) -> list[str]:
        """What a task's file and a person's edit may write: everything but the state."""
        return [
            f.name
            for f in cls._meta.concrete_fields
            if not f.primary_key and f.name not in cls.STATE_FIELDS
        ]

    @cached_property
    def outside_holder(self) -> str:
        """Who holds this queued task's lock directory, when a process not ours does:
        workers skip the task until it is let go."""
        if self.status != Status.QUEUED:
            return ""
        from workqueue import locks

        directory = locks.lock_dir(self.queue, self.key)
        owner = locks.read_owner(directory)
        if owner is None or locks.owner_record_is_dead(owner):
            return ""
        try:
            since = os.lstat(directory).st_mtime
        except OSError:
            since = None
        return locks.describe_holder(owner, since)

    @property
    def body(self) -> str:
        try:
            return self.content.text
        except TaskBody.DoesNotExist:
            return ""

    @property
    def seen_as(self) -> str:
        """The state a page shows the task in, sent back with its card's actions: from a
        page not refreshed since a worker took the task (or another person moved it), an
        action would end a run no one saw, or a claim other than the one shown."""
        return f"{self.status}:{self.fence}"

    def moved_since(self, seen: str) -> str:
        """Why a page that showed the task as `seen` (seen_as) is not acted on, or ""."""
        if not seen or seen == self.seen_as:
            return ""
        now = self.status + (f", held by {self.holder}" if self.status == Status.CLAIMED else "")
        return f"moved since your page showed it (it is {now})"

    @property
    def held_outside(self) -> bool:
        """Claimed because its file says in progress (transitions.hold_for_outside): no
        worker, no lease, no agent; it ends when the file says so or a person releases it."""
        return (
            self.status == Status.CLAIMED
            and self.holder_pid is None
            and self.lease_expires_at is None
        )

    @property
    def held_over_http(self) -> bool:
        """Claimed through /mcp/: the claim lives by its lease, and its pid is only that of
        the web process that served the request."""
        return self.holder_host.startswith(HTTP_HOST)

    @property
    def holder_process(self) -> int | None:
        """The pid worth showing."""
        return None if self.held_over_http else self.holder_pid

    @property
    def lease_left(self) -> timedelta | None:
        if self.status != Status.CLAIMED or self.lease_expires_at is None:
            return None
        return self.lease_expires_at - clock.shown_now()

    def is_stale(self) -> bool:
        from workqueue.locks import owner_is_dead

        if self.status != Status.CLAIMED:
            return False
        if self.lease_expires_at and self.lease_expires_at < clock.shown_now():
            return True
        return owner_is_dead(self.holder_host, self.holder_pid, self.holder_started)


class Dependency(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="dependencies")
    key = models.CharField(max_length=500)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task", "key"], name="dependency_unique")]
        verbose_name_plural = "dependencies"

    def __str__(self) -> str:
        return f"{self.task.key} -> {self.key}"


class EventKind(models.TextChoices):
    IMPORTED = "imported"
    UPDATED = "updated"
    CHANGE_DEFERRED = "change_deferred"
    MISSING = "missing"
    CLAIMED = "claimed"
    LOCK_BUSY = "lock_busy"
    LOCK_FAILED = "lock_failed"
    DONE = "done"
    BLOCKED = "blocked"
    RELEASED = "released"
    REQUEUED = "requeued"
    REAPED = "reaped"
    LATE_FINISH_REFUSED = "late_finish_refused"
    NOTE = "note"
    EDITED = "edited"
    CREATED = "created"


class TaskEventQuerySet(models.QuerySet):
    def record(self, rows: list[tuple]) -> None:
        """Insert events given as (task_id, at, kind, actor, fence, message, data) tuples.

        The claim and finish hot path writes an event per task; one executemany costs a
        fraction of bulk_create's per-object work.
        """
        if rows:
            self.run_insert(self.insert_statement(rows))

    def run_insert(self, statement: tuple[str, list]) -> None:
        with connections[self.db].cursor() as cursor:
            cursor.executemany(*statement)

    def prune(self, before, dry_run: bool = False, batch: int = 10_000) -> int:
        """Delete the events older than `before`, a range of ids at a time: short writes
        beside the workers' (`at` has no index, and one would tax every event's insert;
        ids follow time, so one read finds the last old one). Returns how many."""
        old = self.filter(at__lt=before)
        if dry_run:
            return old.count()
        span = old.aggregate(first=Min("id"), last=Max("id"))
        deleted = 0
        if span["first"] is None:
            return 0
        for start in range(span["first"], span["last"] + 1, batch):
            deleted += old.filter(pk__gte=start, pk__lt=start + batch).delete()[0]
        return deleted

    def insert_statement(self, rows: list[tuple]) -> tuple[str, list]:
        """The INSERT of `record`, with its values adapted: work to do outside a lock."""
        db = connections[self.db]
        columns = ["task_id", "at", "kind", "actor", "fence", "message", "data"]
        sql = insert_statement(db, self.model, columns)
        adapted = {}  # a batch shares one timestamp: adapt it once
        values = []
        for task, at, kind, actor, fence, message, data in rows:
            if at not in adapted:
                adapted[at] = db.ops.adapt_datetimefield_value(at)
            data = json.dumps(data, cls=DjangoJSONEncoder) if data else "{}"
            values.append((task, adapted[at], kind, actor, fence, message, data))
        return sql, values


# Each process adds to one of a few rows of the tally: on PostgreSQL, workers claiming at
# once would otherwise queue on one hot row per queue until each commits.
TALLY_SHARDS = 16
# Upper bounds, in seconds, of the buckets of the claim wait histogram; the last is +Inf.
# Tally rows keep the bucket's index: add bounds only at the end.
CLAIM_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, 86400, float("inf"))
NOT_TIMED = -1  # the bucket of every event but a worker's claim


def tally_shard() -> int:
    return os.getpid() % TALLY_SHARDS


class TransitionTallyQuerySet(models.QuerySet):
    def add(self, counts: dict[tuple[str, str], int]) -> None:
        """Count events recorded, as {(queue, kind): n}: call in their transaction."""
        shard = tally_shard()
        self._add([(q, kind, NOT_TIMED, shard, n, 0.0) for (q, kind), n in counts.items() if n])

    def add_claims(self, queue: str, waits: list[float]) -> None:
        """Count claims and how many seconds each task waited: call in the claim's
        transaction."""
        found: dict[int, list] = {}
        for wait in waits:
            wait = max(0.0, wait)  # another host's clock may run ahead
            bucket = bisect.bisect_left(CLAIM_WAIT_BUCKETS, wait)  # the first le >= wait
            found.setdefault(bucket, [0, 0.0])
            found[bucket][0] += 1
            found[bucket][1] += wait
        shard = tally_shard()
        self._add(
            [(queue, EventKind.CLAIMED, b, shard, n, secs) for b, (n, secs) in found.items()]
        )

    def _add(self, rows: list[tuple]) -> None:
        """Insert each row, or add its count and seconds to the row with the same key; in
        key order, so that two transactions adding to the same rows cannot deadlock."""
        if rows:
            with connections[self.db].cursor() as cursor:
                cursor.executemany(_tally_statement(self.db), sorted(rows))

    def totals(self) -> list[tuple[str, str, int, int, float]]:
        """(queue, kind, bucket, events, seconds), summed over the shards."""
        rows = self.values_list("queue", "kind", "bucket").annotate(
            n=Sum("count"), seconds=Sum("seconds")
        )
        return list(rows.order_by())


@functools.cache
def _tally_statement(alias: str) -> str:
    db = connections[alias]
    quote = db.ops.quote_name
    table = quote(TransitionTally._meta.db_table)
    keys, added = ["queue", "kind", "bucket", "shard"], ["count", "seconds"]
    sums = ", ".join(f"{quote(c)} = {table}.{quote(c)} + excluded.{quote(c)}" for c in added)
    return (
        insert_statement(db, TransitionTally, keys + added)
        + f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {sums}"
    )


class TransitionTally(models.Model):
    """How many events of each kind the transitions recorded, per queue, and for workers'
    claims how long their tasks had waited: the counters of /metrics.

    Counting TaskEvent rows by kind would read the whole table (it has no index on kind,
    and one would tax the insert of every event); this stays a few rows per queue, added
    to in the transaction that records the events (one table: fewer pages per commit).

    A claim's wait is counted from the row being claimed: its updated_at says when it was
    last queued or changed (requeue, release, import, edit). That costs no read, and bucket
    counts make a true Prometheus histogram over any window. The other ways cost more or
    say less: pairing events over a window reads TaskEvent without an index on kind;
    timing the claim statement measures the database, not the queue (a task left an hour
    behind a busy herd is claimed by a fast statement).
    """

    queue = models.CharField(max_length=100)
    kind = models.CharField(max_length=30, choices=EventKind.choices)
    bucket = models.SmallIntegerField(
        default=NOT_TIMED, help_text="A worker's claims: the index of their wait's bucket."
    )
    shard = models.PositiveSmallIntegerField(default=0)
    count = models.BigIntegerField(default=0)
    seconds = models.FloatField(default=0.0, help_text="The waits of the claims counted.")

    objects = TransitionTallyQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["queue", "kind", "bucket", "shard"], name="transition_tally_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.queue} {self.kind}: {self.count}"


class TaskBody(models.Model):
    """A task's markdown body, out of the task row.

    SQLite rewrites a whole row on every UPDATE, and each claim and finish updates task
    rows: with bodies of a few KB in the row, a claim batch held the write lock 2.4 times
    as long. Only the import, triage's write-back and the task detail touch the body.
    """

    task = models.OneToOneField(
        Task, on_delete=models.CASCADE, primary_key=True, related_name="content"
    )
    text = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"body of {self.task_id}"


class Found(NamedTuple):
    """The tasks a text search found: their `ids` when they are few, or else the few it
    did not find (`missing`), or else the name of a `table` of their ids: a temporary one
    that lasts for the request, or (PostgreSQL, the board) one kept in the database across
    requests (search_hits). The ids and the missing may be cached."""

    ids: list[int] | None = None
    missing: list[int] | None = None
    table: str = ""
    # Where the pages of its columns may walk the board's index (SQLite; 0 elsewhere):
    count: int = 0  # the ids in the table
    last: int = 0  # the highest task id when it was made: no more tasks than that
    # SQLite: the status most of its first ids have, and the search text's generation
    # read before the table was filled (counts_and_stamp).
    commonest: str = ""
    generation: str = ""

    @property
    def q(self) -> Q:
        if self.ids is not None:
            return Q(id__in=self.ids)
        if self.missing is not None:
            return ~Q(id__in=self.missing)
        return Q(id__in=self._table_ids())

    def filter(self, tasks: TaskQuerySet, page: tuple[int, int] | None = None) -> TaskQuerySet:
        """The tasks it found among `tasks`. For a page of a column in board order, given
        as (how far the page reaches, how many of the column's tasks it found).

        SQLite reads such a page by starting from the table: every id in it looked up,
        then sorted (50-60 ms a column for 39,000 ids at 1,000,000 tasks). Walking the
        column's index in order instead, and looking each task up in the table, reads
        about reach x (the column's size / found in it) index entries, each cheaper than a
        lookup of a row: taken when that is under three times the ids in the table, with
        every task standing for the column's size (at most that)."""
        if not (page and page[0] * self.last < 3 * page[1] * self.count):
            return tasks.filter(self.q)
        return self._walked(tasks)

    def _walked(self, tasks: TaskQuerySet) -> TaskQuerySet:
        """The tasks it found among `tasks`, read from whichever index of `tasks` fits
        and each looked up in the table: a unary plus gives the same id, but not one SQLite
        can start the read from."""
        plain = Func(F("id"), template="+%(expressions)s", output_field=models.BigIntegerField())
        return tasks.alias(plain_id=plain).filter(plain_id__in=self._table_ids())

    def counts_and_stamp(self, using: str = "default") -> tuple[dict[str, int], str] | None:
        """SQLite, a table of ids and no other filter: TaskQuerySet.counts_and_stamp of the
        tasks in it, without reading their rows. The tasks of each status but the commonest
        are walked in that status's index and looked up in the table (small, and read
        already); the commonest are what is left of the table; the newest is the first of
        the index of updated_at found in it. For a third of 1,000,000 tasks 186 -> 47 ms.
        All in one statement, one snapshot. None where the search text changed since the
        table was filled (a task deleted since would be left in it and counted), or where
        the walk would step through more than twice as many tasks as the table holds
        (5,000 of 1,000,000: 60 ms against 26 for looking them up), told by counting them
        up to that bound, which costs less than the lookups."""
        if not (self.count and self.generation):
            return None
        db = connections[using]
        tasks = Task.objects.using(using).order_by()
        others = [status for status in Status.values if status != self.commonest]
        bound = 2 * self.count
        walked = tasks.filter(status__in=others).values("pk")[:bound].query.sql_with_params()
        with db.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM ({walked[0]})", walked[1])  # noqa: S608
            if cursor.fetchone()[0] >= bound:
                return None
        parts, params = [], []
        for status in others:
            sql, found = (
                self._walked(tasks.filter(status=status)).values("pk").query.sql_with_params()
            )
            parts.append(f"(SELECT COUNT(*) FROM ({sql}) AS counted)")  # noqa: S608
            params.extend(found)
        sql, found = (
            self._walked(tasks)
            .order_by("-updated_at")
            .values("updated_at")[:1]
            .query.sql_with_params()
        )
        parts += [
            f"({sql})",
            f"(SELECT COUNT(*) FROM {self.table})",  # noqa: S608 - our name
            f"({TaskSearch.generation_sql()})",
        ]
        params.extend(found)
        with db.cursor() as cursor:
            cursor.execute("SELECT " + ", ".join(parts), params)
            *counted, newest, total, generation = cursor.fetchone()
        if TaskSearch.generation_of(generation) != self.generation:
            return None
        counts = dict(zip(others, counted, strict=True))
        counts[self.commonest] = total - sum(counted)
        newest = db.ops.convert_datetimefield_value(newest, None, db) if newest else None
        return {status: counts[status] for status in Status.values}, stamp(total, newest)

    def _table_ids(self) -> RawSQL:
        return RawSQL(f"SELECT id FROM {self.table}", [])  # noqa: S611, S608 - our name


class TaskSearch(models.Model):
    """A copy of each task's title, key and body that the board's free text searches.

    Database triggers write it (migration 0014_task_search), whatever path changed the
    task: nothing in Python does. On SQLite the table is FTS5 (trigram), whose rowid is the
    task's id; on PostgreSQL a plain table of lowercase text with pg_trgm indexes.
    """

    task = models.OneToOneField(
        Task, on_delete=models.DO_NOTHING, primary_key=True, db_constraint=False, related_name="+"
    )
    title = models.TextField()
    key = models.TextField()
    body = models.TextField()

    def __str__(self) -> str:
        return f"search text of {self.task_id}"

    # A search that finds this few tasks hands on their ids: the board's statements then
    # look rows up by id instead of searching again each. So does one that finds all but
    # this few (a common word): the board is then the whole board less those few, read
    # from its indexes. Others are kept in a temporary table of ids, searched once per
    # request rather than once per statement.
    FEW = 1000

    @classmethod
    def generation(cls, using: str = "default") -> str:
        """What changes when any task's searched text changes, and only then ("" where
        the database cannot tell). SQLite's FTS5 rewrites its structure record (its
        index's segments, with a count of their writes) at each commit that changes the
        index, and only then; on PostgreSQL the commits that wrote the search copy are
        counted (migrations 0022 and 0023). Claims and finishes, which change no text,
        leave it."""
        db = connections[using]
        if db.vendor == "postgresql":
            with db.cursor() as cursor:
                cursor.execute(
                    "SELECT sum(commits), current_setting('hypervisor.search_changes', true) "
                    "FROM queue_search_generation"
                )
                commits, own = cursor.fetchone()
                return f"commits-{commits}-{own or ''}"
        if db.vendor != "sqlite":
            return ""
        try:
            with db.cursor() as cursor:
                cursor.execute(cls.generation_sql())
                row = cursor.fetchone()
        except DatabaseError:  # not FTS5's layout: keep with the board's version instead
            return ""
        return cls.generation_of(row[0] if row else None)

    @classmethod
    def generation_sql(cls) -> str:
        """SQLite: the statement that reads FTS5's structure record."""
        return f"SELECT block FROM {cls._meta.db_table}_data WHERE id = 10"  # noqa: S608

    @staticmethod
    def generation_of(block: bytes | None) -> str:
        return hashlib.sha256(block).hexdigest() if block else ""

    @classmethod
    def matching(cls, text: str, using: str = "default") -> Q:
        """The condition on Task: its title, key or body contains `text` (any case)."""
        return cls.search(text, using).q

    @classmethod
    def search(
        cls, text: str, using: str = "default", keep_as: str = "", generation: str = ""
    ) -> Found:
        """Which tasks contain `text`: see Found. Given `keep_as` (the board's key for it
        under `generation`), PostgreSQL keeps a search of many tasks in the database, and
        a search kept so by any web process is used without searching."""
        db = connections[using]
        keep_as = keep_as if db.vendor == "postgresql" else ""
        kept = search_hits.kept_as(db, keep_as) if keep_as else None
        if kept:
            return Found(table=kept)
        sql, params = cls.matching_sql(db, text)
        # OFFSET 0 keeps PostgreSQL from planning for the LIMIT: it would read the table
        # in order hoping to stop early, every row of it when there are fewer matches.
        fence = " OFFSET 0" if db.vendor == "postgresql" else ""
        probe = f"SELECT * FROM ({sql}{fence}) AS hits LIMIT {cls.FEW + 1}"  # noqa: S608
        with db.cursor() as cursor:
            cursor.execute(probe, params)
            ids = [row[0] for row in cursor.fetchall()]
            if len(ids) <= cls.FEW:  # every match (an id may come twice)
                return Found(ids=sorted(set(ids)))
            if db.vendor == "sqlite":
                return cls._found_in_table(db, cursor, text, sql, params, ids, generation)
            # The tasks it did not find, up to a few: every task has its copy, written in
            # the task's own transaction (0014), so the copies the text is not in, read
            # until the limit. A text in every task is one scan, not a scan hashed for an
            # anti-join of every task; one in half the tasks stops almost at once.
            where, where_params = cls._folded_condition(text)
            cursor.execute(
                f"SELECT task_id FROM queue_tasksearch WHERE ({where}) IS NOT TRUE "  # noqa: S608
                f"LIMIT {cls.FEW + 1}",
                where_params,
            )
            missing = [row[0] for row in cursor.fetchall()]
        if len(missing) <= cls.FEW:
            return Found(missing=sorted(missing))
        if keep_as:  # PostgreSQL plans a column's page over them itself
            return Found(table=search_hits.keep_shared(db, sql, params, keep_as, generation))
        return Found(table=search_hits.keep(db, sql, params)[0])

    @classmethod
    def _found_in_table(
        cls, db, cursor, text: str, sql: str, params: list, ids: list, generation: str
    ) -> Found:
        """SQLite, a search found in more than a few tasks: FTS5 answers a phrase whole,
        not per task, so its ids are kept in a table first, and the tasks not in it looked
        for until the few, unless counting tells every task or more than a few missing."""
        unfound = cls._unfound(cursor, text, sql, params, ids)
        if unfound == 0:
            return Found(missing=[])
        # The board read it before searching; read now for other callers.
        generation = generation or cls.generation(db.alias)
        table, count = search_hits.keep(db, sql, params)
        if unfound is None or unfound <= cls.FEW:
            cursor.execute(
                f"SELECT t.id FROM {Task._meta.db_table} t WHERE NOT EXISTS "  # noqa: S608
                f"(SELECT 1 FROM {table} AS hits WHERE hits.id = t.id) LIMIT {cls.FEW + 1}"
            )
            missing = [row[0] for row in cursor.fetchall()]
            if len(missing) <= cls.FEW:
                return Found(missing=sorted(missing))
        tasks = Task.objects.using(db.alias)
        last = tasks.aggregate(last=Max("id"))["last"] or 0
        # Which status to count as what is left (Found.counts_and_stamp): a guess from the
        # first it found, right or wrong only as fast.
        sample = tasks.filter(id__in=set(ids)).counts()
        commonest = max(sample, key=sample.get)
        return Found(
            table=table, count=count, last=last, commonest=commonest, generation=generation
        )

    @classmethod
    def _unfound(cls, cursor, text: str, sql: str, params: list, ids: list[int]) -> int | None:
        """SQLite: how many tasks a phrase found in more than a few is not in, from two
        counts in one statement (so of one snapshot): each task has one copy (0014). Tells
        a text in every task without a table of its ids and a look through every task for
        the ones not in it (at 100,000 tasks 11 ms against 55), and a text missing from
        many without that look. None where not counted: under three characters (not a
        phrase, an id may be found twice), or where the first it found (FTS5 answers in id
        order) leave out more than a few of the tasks before them."""
        if len(text) < 3:
            return None
        table = Task._meta.db_table
        cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE id <= %s", [max(ids)])  # noqa: S608
        if cursor.fetchone()[0] - len(ids) > cls.FEW:
            return None
        cursor.execute(
            f"SELECT (SELECT COUNT(*) FROM {table}), (SELECT COUNT(*) FROM ({sql}))",  # noqa: S608
            params,
        )
        tasks, found = cursor.fetchone()
        return tasks - found if found <= tasks else None

    @classmethod
    def matching_sql(cls, db, text: str) -> tuple[str, list[str]]:
        """The ids of the tasks whose title, key or body contains `text` (any case)."""
        if db.vendor == "sqlite" and len(text) >= 3:
            # A phrase of trigrams: the substring, answered from the index.
            return (
                "SELECT rowid FROM queue_tasksearch WHERE queue_tasksearch MATCH %s",
                [_phrase(text)],
            )
        if db.vendor == "sqlite" and len(text) == 2:
            short = cls._two_characters_sql(db, text)
            if short:
                return short
        if db.vendor == "sqlite":
            # Under three characters there is no trigram to look up: a scan of the tasks'
            # own columns, which SQLite reads three times faster than the FTS5 copy.
            # SQLite's LIKE folds ASCII letters only: "ü" is also looked for as "Ü".
            patterns = _case_variants(_contains_pattern(text))
            like = " OR ".join(["{column} LIKE %s ESCAPE '\\'"] * len(patterns))
            title, key, body = (like.format(column=c) for c in ("title", "key", "text"))
            return (
                f"SELECT id FROM queue_task WHERE {title} OR {key} "  # noqa: S608
                # UNION ALL, so that the probe stops at its limit; ids kept are unique.
                f"UNION ALL SELECT task_id FROM queue_taskbody WHERE {body}",
                patterns * 3,
            )
        where, params = cls._folded_condition(text)
        return f"SELECT task_id FROM queue_tasksearch WHERE {where}", params  # noqa: S608

    @classmethod
    def _folded_condition(cls, text: str) -> tuple[str, list[str]]:
        """PostgreSQL: the condition on a copy that it contains `text`. The copy is
        lowercase (migration 0016): a LIKE the pg_trgm indexes answer, cheaper per row
        than ILIKE where it scans. The pattern is folded by the same lower() as the copy,
        not by Python's."""
        like = "LIKE lower(%s)"
        return f"title {like} OR key {like} OR body {like}", [_contains_pattern(text)] * 3

    @classmethod
    def _two_characters_sql(cls, db, text: str) -> tuple[str, list[str]] | None:
        """SQLite: two characters through the trigram index instead of a scan of every
        task's text. Two characters followed by a third are the start of a trigram: the
        index's words that begin with them (its vocabulary, migration 0019) are looked up,
        one phrase each. Two characters that end a title, key or body begin no trigram: an
        index of each one's last two characters finds them. None (scan instead) when the
        words would list more tasks than the table holds: reading them costs more."""
        folded = text.lower()
        if len(folded) != 2:
            return None
        budget = Task.objects.using(db.alias).aggregate(last=Max("id"))["last"] or 0
        words = []
        try:
            with db.cursor() as cursor:
                # The indexes of last characters are named below: gone (a later migration
                # that remakes a table drops them), scan instead.
                cursor.execute(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' "
                    "AND name IN (%s, %s, %s)",
                    list(LAST_TWO_INDEXES),
                )
                if cursor.fetchone()[0] != len(LAST_TWO_INDEXES):
                    return None
                cursor.execute(
                    "SELECT term, doc FROM queue_tasksearch_terms WHERE term >= %s AND term < %s",
                    [folded, folded + chr(0x10FFFF)],
                )
                for word, tasks in cursor:  # each row reads its word's list of tasks
                    budget -= tasks
                    if budget < 0:
                        return None
                    words.append(_phrase(word))
        except DatabaseError:  # no vocabulary (not FTS5's, or not migrated): scan instead
            return None
        # Any case of each character, as the index folds it.
        ends = sorted({a + b for a in _cases(text[0]) for b in _cases(text[1])})
        marks = ", ".join(["%s"] * len(ends))
        # Each index named: where most values are alike (every title ending in "area"),
        # SQLite's statistics tell it a lookup reads most of the table, and it scans every
        # task instead (167 ms at 1,000,000 against 0.1), though the index alone answers,
        # ids included, and never reads more than a scan would.
        title, key, body = LAST_TWO_INDEXES
        parts = [
            f"SELECT id FROM queue_task INDEXED BY {title} "  # noqa: S608
            f"WHERE substr(title, -2) IN ({marks})",
            f"SELECT id FROM queue_task INDEXED BY {key} WHERE substr(key, -2) IN ({marks})",  # noqa: S608
            f"SELECT task_id FROM queue_taskbody INDEXED BY {body} "  # noqa: S608
            f"WHERE substr(text, -2) IN ({marks})",
        ]
        params = ends * 3
        if words:
            parts.insert(0, "SELECT rowid FROM queue_tasksearch WHERE queue_tasksearch MATCH %s")
            params.insert(0, " OR ".join(words))
        return " UNION ALL ".join(parts), params


# SQLite's indexes of the last two characters of a title, a key and a body (migration 0019).
LAST_TWO_INDEXES = ("task_title_end", "task_key_end", "taskbody_text_end")


def _cases(c: str) -> list[str]:
    """`c` in each of its cases that folds as it does, as the search copies fold text:
    not "I" for the dotless "ı" (its upper case, but "I" folds to "i"), whose search would
    then find every "i"."""
    return list(
        dict.fromkeys(
            v for v in (c, c.lower(), c.upper()) if len(v) == 1 and v.lower() == c.lower()
        )
    )


def _case_variants(pattern: str) -> list[str]:
    """`pattern` with each non-ASCII letter in its cases (_cases; a short text: at most
    four patterns for two letters). SQLite's LIKE folds ASCII letters itself."""
    choices = [(c,) if c.isascii() else _cases(c) for c in pattern]
    return ["".join(p) for p in itertools.product(*choices)]


def _contains_pattern(text: str) -> str:
    """A LIKE pattern for `text` anywhere, its wildcards taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _phrase(text: str) -> str:
    """`text` as an FTS5 phrase: every character literal."""
    return '"' + text.replace('"', '""') + '"'


class TaskEvent(models.Model):
    # No index of its own: event_timeline (task, -at) serves every lookup by task, and
    # each claim and finish inserts an event per task.
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="events", db_index=False)
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=30, choices=EventKind.choices)
    actor = models.CharField(max_length=200, blank=True)
    fence = models.BigIntegerField(null=True, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)

    objects = TaskEventQuerySet.as_manager()

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["task", "-at"], name="event_timeline")]

    def __str__(self) -> str:
        return f"{self.kind} {self.task_id} at {self.at:%Y-%m-%d %H:%M:%S}"


class BulkStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# A running Huey consumer picks up a launch or a bulk action in well under a second: one
# still pending after this long has no consumer (a web server started on its own).
CONSUMER_PATIENCE = timedelta(seconds=10)


def consumer_wait(pending: bool, since) -> int:
    """Seconds something pending has waited for the consumer, once past
    CONSUMER_PATIENCE, else 0: its page then says what it waits for."""
    waited = timezone.now() - since
    return int(waited.total_seconds()) if pending and waited > CONSUMER_PATIENCE else 0


class BulkAction(models.Model):
    """One action over many selected tasks, run in the background (workqueue.bulk).

    Its changes keep what undoing it needs (the files' bytes before, the rows' values);
    only a person's latest action keeps them.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=20)
    params = models.JSONField(default=dict, blank=True)
    task_ids = models.JSONField(default=list, blank=True)
    undo_of = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="undone_by"
    )
    status = models.CharField(
        max_length=10, choices=BulkStatus.choices, default=BulkStatus.PENDING
    )
    total = models.PositiveIntegerField(default=0)
    processed = models.PositiveIntegerField(default=0)
    changed = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    # The first thousand skipped tasks ({task, key, path, why}); the count is always whole.
    skipped = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"bulk {self.pk}: {self.action} × {self.total}"

    @property
    def finished(self) -> bool:
        return self.status in (BulkStatus.DONE, BulkStatus.FAILED)

    @property
    def percent(self) -> int:
        return round(100 * self.processed / self.total) if self.total else 100

    @property
    def consumer_wait(self) -> int:
        return consumer_wait(self.status == BulkStatus.PENDING, self.created_at)

    @property
    def skipped_count(self) -> int:
        return self.processed - self.changed - self.unchanged


class BulkChange(models.Model):
    """One task a bulk action changed, and how it was before."""

    action = models.ForeignKey(BulkAction, on_delete=models.CASCADE, related_name="changes")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="+")
    old_bytes = models.BinaryField(null=True, blank=True)
    new_sha256 = models.CharField(max_length=64, blank=True)
    old_values = models.JSONField(default=dict, encoder=DjangoJSONEncoder)
    old_status = models.CharField(max_length=10)
    old_reason = models.TextField(blank=True)
    new_status = models.CharField(max_length=10)
    updated_at = models.DateTimeField()
    deferred = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"change of {self.task_id} by bulk {self.action_id}"


class SavedView(models.Model):
    """A board filter a person named, to come back to."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    query = models.CharField(max_length=2000, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["user", "name"], name="saved_view_unique_name")
        ]

    def __str__(self) -> str:
        return self.name
