"""Why a queued task waits, and which waiting tasks cannot become ready as things stand.

A task is claimed only once every task it `depends_on` is done. A dependency that names
no task of the queue (a typo, a task never imported), one that is blocked, or a ring of
tasks that wait on each other keeps a task queued for ever without a word: a worker
finds nothing ready and ends with "0 done". `stuck` finds those tasks, and the tasks
that wait on them, so that the import, `queue_stats` and the worker can say so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import OuterRef, Q, Subquery

from workqueue.models import Dependency, Status, Task

STUCK_LISTED = 20  # stuck tasks a report lists; it always gives the whole count
WALK_LIMIT = 2000  # tasks a task's page follows its dependencies through
WALK_BATCH = 500  # keys a statement names


@dataclass(frozen=True)
class Stuck:
    queue: str
    key: str
    path: str
    why: str

    def as_dict(self) -> dict:
        return {"queue": self.queue, "key": self.key, "path": self.path, "why": self.why}

    def __str__(self) -> str:
        return f"{self.path or self.key}: cannot become ready: {self.why}"


def in_words(named: list[tuple[str, str]], count: int) -> str:
    """ "a: why; b: why; and 3 more": a few stuck tasks (key, why) of `count`."""
    words = "; ".join(f"{key}: {why}" for key, why in named)
    return words + (f"; and {count - len(named)} more" if count > len(named) else "")


def report_lines(stuck_tasks: list[Stuck], queue: str | None) -> list[str]:
    """What a command says of them: a line each up to STUCK_LISTED, then the count left."""
    lines = [str(s) for s in stuck_tasks[:STUCK_LISTED]]
    if len(stuck_tasks) > STUCK_LISTED:
        which = f" --queue {queue}" if queue else ""
        lines.append(
            f"and {len(stuck_tasks) - STUCK_LISTED} more: "
            f"python manage.py queue_stats{which} --json lists each"
        )
    return lines


def stuck(queue: str | None = None) -> list[Stuck]:
    """The queued tasks (of `queue`, or of every queue) that cannot become ready as things
    stand, each with why, ordered by queue and key."""
    edges = Dependency.objects.all()
    if queue is not None:
        edges = edges.filter(task__queue=queue)
    return _judge(_unmet(edges).iterator())


def _unmet(edges) -> Iterable[tuple]:
    """The dependencies of queued tasks among `edges` that are not done: (queue, key, path,
    dependency, its status or None for no such task, its reason)."""
    target = Task.objects.filter(queue=OuterRef("task__queue"), key=OuterRef("key"))
    return (
        edges.filter(task__status=Status.QUEUED, task__has_dependencies=True)
        .annotate(
            state=Subquery(target.values("status")[:1]),
            reason=Subquery(target.values("reason")[:1]),
        )
        .filter(Q(state__isnull=True) | ~Q(state=Status.DONE))  # None: no such task
        .values_list("task__queue", "task__key", "task__source_path", "key", "state", "reason")
        .order_by("task__queue", "task__key", "key")
    )


def _judge(rows: Iterable[tuple]) -> list[Stuck]:
    """From the unmet dependencies (`_unmet`'s rows): the tasks that cannot become ready."""
    waits_on: dict[tuple, list[str]] = defaultdict(list)  # (queue, key) -> unmet keys
    paths: dict[tuple, str] = {}
    why: dict[tuple, str] = {}
    for queue, key, path, dependency, state, reason in rows:
        node = (queue, key)
        paths[node] = path
        waits_on[node].append(dependency)
        if node in why:
            continue
        if state is None:
            why[node] = f"depends on {dependency!r}: no task of queue {queue!r} has that id"
        elif state == Status.BLOCKED:
            why[node] = f"depends on {dependency!r}, which is blocked" + (
                f" ({reason})" if reason else ""
            )
    for ring in _rings(waits_on):
        keys = ", ".join(repr(key) for _, key in sorted(ring))
        for node in ring:
            why.setdefault(node, f"in a ring of tasks that wait on each other: {keys}")
    _spread(waits_on, why)
    return [Stuck(q, k, paths[(q, k)], why[(q, k)]) for q, k in sorted(why)]


def _rings(waits_on: dict[tuple, list[str]]) -> list[list[tuple]]:
    """Rings of waiting tasks: the strongly connected components of more than one task,
    or of one that names itself (Tarjan's algorithm, without recursion: a chain of
    thousands of dependencies must not exhaust Python's stack)."""
    index: dict[tuple, int] = {}
    low: dict[tuple, int] = {}
    on_stack: set[tuple] = set()
    stack: list[tuple] = []
    rings = []

    def next_of(node):
        queue_ = node[0]
        return [(queue_, k) for k in waits_on.get(node, ()) if (queue_, k) in waits_on]

    for root in waits_on:
        if root in index:
            continue
        work = [(root, iter(next_of(root)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(next_of(child))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    ring = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        ring.append(member)
                        if member == node:
                            break
                    if len(ring) > 1 or node[1] in waits_on[node]:
                        rings.append(ring)
    return rings


def _spread(waits_on: dict[tuple, list[str]], why: dict[tuple, str]) -> None:
    """A task that waits on a stuck task is stuck too."""
    waited_by: dict[tuple, list[tuple]] = defaultdict(list)
    for node, keys in waits_on.items():
        for key in keys:
            waited_by[(node[0], key)].append(node)
    todo = list(why)
    while todo:
        node = todo.pop()
        for waiter in waited_by.get(node, ()):
            if waiter not in why:
                why[waiter] = f"depends on {node[1]!r}, which cannot become ready"
                todo.append(waiter)


@dataclass(frozen=True)
class Waited:
    """A dependency a queued task waits on: its key, its task (if there is one), where it
    stands in words."""

    key: str
    task_id: int | None
    state: str


def waits_on(task: Task) -> list[Waited]:
    """The dependencies of a queued task that are not done yet, for its page."""
    if task.status != Status.QUEUED or not task.has_dependencies:
        return []
    keys = list(task.dependencies.order_by("key").values_list("key", flat=True))
    found = {
        key: (pk, status)
        for key, pk, status in Task.objects.filter(queue=task.queue, key__in=keys).values_list(
            "key", "pk", "status"
        )
    }
    waited = []
    for key in keys:
        pk, status = found.get(key, (None, None))
        if status != Status.DONE:
            waited.append(Waited(key, pk, status or f"no task of queue {task.queue!r}"))
    return waited


def why_stuck(task: Task) -> str:
    """Why a waiting task cannot become ready as things stand, or "" when it can (or when
    what it waits on reaches further than WALK_LIMIT tasks: a page does not judge a whole
    queue). Walks from the task through the queued tasks it waits on, a level at a time."""
    rows, seen, level = [], {task.key}, [task.key]
    while level:
        if len(seen) > WALK_LIMIT:
            return ""
        found = []
        for start in range(0, len(level), WALK_BATCH):
            keys = level[start : start + WALK_BATCH]
            edges = Dependency.objects.filter(task__queue=task.queue, task__key__in=keys)
            found += _unmet(edges)
        rows += found
        level = list({r[3] for r in found if r[4] == Status.QUEUED} - seen)
        seen.update(level)
    return next((s.why for s in _judge(rows) if s.key == task.key), "")
