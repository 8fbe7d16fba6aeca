"""Claims: take ready tasks exactly once, finish them with a fencing check, reap the dead.

The hot path is a few bulk statements per batch, never an ORM call per task.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from workqueue import agent_tree, locks
from workqueue.locks import Identity, LockError, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    id: int
    queue: str
    key: str
    title: str
    path: str
    fence: int


@dataclass
class Result:
    """What a processor reports for one claim."""

    status: str = Status.DONE  # done, blocked, or queued to give the task back
    outcome: str = ""
    reason: str = ""
    evidence: str = ""
    next_step: str = ""
    commit: str = ""
    tokens: int = 0
    cost_usd: Decimal | None = None  # what the agent's CLI says the run cost, if it says
    output_tail: str = ""
    data: dict = field(default_factory=dict)

    def row_values(self) -> dict:
        return {
            "status": self.status,
            "outcome": self.outcome or (self.status == Status.DONE and "success" or ""),
            "reason": self.reason,
            "evidence": self.evidence,
            "next_step": self.next_step,
            "commit": self.commit,
            "tokens": self.tokens,
            "cost_usd": self.cost_usd,
            "output_tail": self.output_tail,
            "result": self.data,
        }


@dataclass
class FinishReport:
    finished: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)


BUSY_RETRY_SECONDS = 30.0  # a task whose lock an outside process holds is tried again after
BUSY_ROUNDS = 8  # claims in a row that may find only busy tasks before the worker gives up


def claim_ready_tasks(
    queue: str,
    identity: Identity,
    owner_file: OwnerFile,
    limit: int = 1,
    lease_seconds: int = 300,
    filters=None,
    busy: dict[int, float] | None = None,
) -> list[Claim]:
    """Claim up to `limit` ready tasks: the database row first, then the lock directory.

    Tasks whose lock directory a live outside holder already has go back untouched and
    are skipped (noted in `busy`, task id to the time to try again), and the claim goes
    on to the next ready tasks: one busy task must not look like an empty queue.
    Raises LockError, after giving every task back, when the lock root cannot take locks.
    """
    busy = {} if busy is None else busy
    for _ in range(BUSY_ROUNDS):
        now = time.monotonic()
        skip = [i for i, until in busy.items() if until > now]
        claims = _claim_rows(queue, identity, limit, lease_seconds, filters, skip)
        if not claims:
            return []
        held, taken_by_others = _take_locks(identity, owner_file, claims)
        for claim, _owner in taken_by_others:
            busy[claim.id] = now + BUSY_RETRY_SECONDS
        if held:
            return held
    return []


def _take_locks(identity, owner_file, claims):
    try:
        owner_file.refresh()
    except LockError:
        give_back(identity, claims, EventKind.LOCK_FAILED, "cannot write owner file")
        raise
    held, busy = [], []
    for claim in claims:
        try:
            owner = locks.acquire(claim.queue, claim.key, owner_file)
        except LockError as exc:
            for taken in held:
                locks.try_release(taken.queue, taken.key)
            give_back(identity, claims, EventKind.LOCK_FAILED, str(exc))
            raise
        if owner is None:
            held.append(claim)
        else:
            busy.append((claim, owner))
    for claim, owner in busy:
        give_back(identity, [claim], EventKind.LOCK_BUSY, "lock directory held", owner)
    return held, busy


class WriterClock:
    """Seconds this process spent waiting for the write lock and inside write transactions.

    On SQLite the writers take turns, so the sum of every worker's held time is the part
    of a run that more workers cannot shorten; waiting time says they are queueing.
    """

    def __init__(self):
        self.waited = 0.0
        self.held = 0.0
        self._lock = threading.Lock()  # the heartbeat thread writes too

    def add(self, waited: float, held: float) -> None:
        with self._lock:
            self.waited += waited
            self.held += held

    def reading(self) -> tuple[float, float]:
        return self.waited, self.held


writer_clock = WriterClock()


@contextmanager
def write_transaction():
    """A short write transaction; on SQLite, writers queue on a file lock first.

    SQLite's busy handler sleeps in growing steps instead of queueing, so under
    contention one worker can wait for seconds while others write again and again.
    An exclusive `flock` is a real queue: the kernel wakes the next waiter at once.
    """
    if connection.vendor != "sqlite":
        started = time.perf_counter()
        try:
            with transaction.atomic():
                yield
        finally:
            writer_clock.add(0.0, time.perf_counter() - started)
        return
    connection.ensure_connection()  # opening it (PRAGMAs, schema) needs no turn at the lock
    asked = time.perf_counter()
    with open(_writer_lock_path(), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        got = time.perf_counter()
        try:
            with transaction.atomic():
                yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            writer_clock.add(got - asked, time.perf_counter() - got)


def _writer_lock_path() -> str:
    return f"{connection.settings_dict['NAME']}.writers"


def _claim_rows(queue, identity, limit, lease_seconds, filters, skip=()) -> list[Claim]:
    candidates = Task.objects.filter(queue=queue).ready().claim_order()
    if skip:
        candidates = candidates.exclude(pk__in=skip)
    if filters is not None:
        candidates = filters.apply(candidates)
    candidates = candidates.select_for_update(skip_locked=True, of=("self",))
    # A database error propagates: Worker.with_database backs off and tries again.
    with write_transaction():
        rows = list(candidates.values_list("id", "key", "title", "source_path", "fence")[:limit])
        if not rows:
            return []
        now = timezone.now()
        # One fence for the batch, above every fence these tasks ever had.
        fence = max(r[4] for r in rows) + 1
        ids = [r[0] for r in rows]
        Task.objects.filter(pk__in=ids).update(
            status=Status.CLAIMED,
            holder=identity.worker,
            holder_host=identity.host,
            holder_pid=identity.pid,
            holder_started=identity.started,
            holder_herd=identity.herd,
            fence=fence,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            claimed_at=now,
            attempts=F("attempts") + 1,
            updated_at=now,
        )
        TaskEvent.objects.record(
            [(i, now, EventKind.CLAIMED, identity.worker, fence, "", {}) for i in ids]
        )
    return [Claim(r[0], queue, r[1], r[2], r[3], fence) for r in rows]


def give_back(
    identity: Identity, claims: list[Claim], kind: str, message: str, owner: dict | None = None
) -> None:
    """Undo claims that never started: back to queued, the attempt not counted."""
    now = timezone.now()
    with write_transaction():
        for fence, ids in _by_fence(claims).items():
            Task.objects.filter(
                pk__in=ids, status=Status.CLAIMED, fence=fence, holder=identity.worker
            ).update(
                status=Status.QUEUED,
                attempts=F("attempts") - 1,
                lease_expires_at=None,
                updated_at=now,
                **_no_holder(),
            )
        TaskEvent.objects.bulk_create(
            TaskEvent(
                task_id=c.id,
                at=now,
                kind=kind,
                actor=identity.worker,
                fence=c.fence,
                message=message,
                data={"owner": owner} if owner else {},
            )
            for c in claims
        )


def finish_claims(
    identity: Identity,
    finished: list[tuple[Claim, Result]],
    owner_file: OwnerFile | None = None,
) -> FinishReport:
    """Record results in one transaction; each row only if its fencing number still matches.

    A holder that lost its claim (reaped, then claimed by another) is refused, and the
    refusal is recorded; the task's newer result is left untouched.
    """
    report = FinishReport()
    if not finished:
        return report
    now = timezone.now()
    # Tasks with the same fence and the same result share one UPDATE (all of a no-op batch).
    groups: dict[tuple, tuple[dict, list[int]]] = {}
    for claim, result in finished:
        values = result.row_values()
        # Only the result dict needs a dump to compare; the other values are plain.
        signature = tuple(
            json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else v
            for v in values.values()
        )
        groups.setdefault((claim.fence, signature), (values, []))[1].append(claim.id)
    # Every statement is compiled before the write lock, which then covers only their runs.
    updates = []
    for (fence, _), (values, ids) in groups.items():
        status = values["status"]
        extra = {"finished_at": now} if status != Status.QUEUED else _requeue_fields()
        if status == Status.QUEUED:
            keep = ("status", "output_tail", "reason", "result")
            values = {k: v for k, v in values.items() if k in keep}
            if values["result"].get("quota"):
                # Quota or rate limit: not the task's fault, so the attempt is not counted.
                extra["attempts"] = F("attempts") - 1
        mine = Task.objects.filter(
            pk__in=ids, status=Status.CLAIMED, fence=fence, holder=identity.worker
        )
        values = {"updated_at": now, "lease_expires_at": None, **values, **extra}
        updates.append((fence, status, ids, mine.update_statement(**values)))
    events = [_finish_event(identity, claim, result, now) for claim, result in finished]
    insert = TaskEvent.objects.insert_statement(events)
    with write_transaction(), connection.cursor() as cursor:
        for fence, status, ids, statement in updates:
            cursor.execute(*statement)
            if cursor.rowcount == len(ids):
                report.finished.extend(ids)
                continue
            refused = set(
                Task.objects.filter(pk__in=ids)
                .exclude(fence=fence, status=status, updated_at=now)
                .values_list("id", flat=True)
            )
            report.refused.extend(refused)
            report.finished.extend(i for i in ids if i not in refused)
        refused = set(report.refused)
        if refused:
            insert = TaskEvent.objects.insert_statement(
                [
                    _refusal_event(identity, claim, result, now) if claim.id in refused else event
                    for (claim, result), event in zip(finished, events, strict=True)
                ]
            )
        TaskEvent.objects.run_insert(insert)
    kept = [(c, r) for c, r in finished if c.id not in refused]
    if owner_file is not None:
        owner_file.release_own([locks.lock_path(c.queue, c.key) for c, _ in kept])
    else:
        for claim, _ in kept:
            locks.try_release(claim.queue, claim.key)
    _apply_pending_changes([c.id for c, _ in kept])
    return report


def _refusal_event(identity: Identity, claim: Claim, result: Result, now) -> tuple:
    return (
        claim.id,
        now,
        EventKind.LATE_FINISH_REFUSED,
        identity.worker,
        claim.fence,
        "finish refused: claim lost (fencing number no longer matches)",
        {"status": result.status, "outcome": result.outcome},
    )


def _finish_event(identity: Identity, claim: Claim, result: Result, now) -> tuple:
    kind = {Status.DONE: EventKind.DONE, Status.BLOCKED: EventKind.BLOCKED}.get(
        result.status, EventKind.RELEASED
    )
    message = result.reason if result.status != Status.DONE else result.outcome
    data = {"tokens": result.tokens} if result.tokens else {}
    if result.data.get("quota"):
        data.update(quota=True, resets_at=result.data.get("resets_at"))
    if result.commit:
        data["commit"] = result.commit
    return (claim.id, now, kind, identity.worker, claim.fence, message or "", data)


def record_agent(identity: Identity, claim: Claim, pgid: int, started: float) -> bool:
    """Note on the claim the process group of the agent working on it."""
    with write_transaction():
        return bool(
            Task.objects.filter(
                pk=claim.id, status=Status.CLAIMED, fence=claim.fence, holder=identity.worker
            ).update(agent_pgid=pgid, agent_started=started)
        )


def heartbeat(identity: Identity, lease_seconds: int) -> int:
    """Extend the lease of every task this worker holds."""
    with write_transaction():
        return Task.objects.held_by(identity.worker).update(
            lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds)
        )


def release_claims(identity: Identity, claims: list[Claim], message: str) -> None:
    """Give back claims a stopping worker will not process (the attempt stays counted)."""
    now = timezone.now()
    with write_transaction():
        for fence, ids in _by_fence(claims).items():
            Task.objects.filter(
                pk__in=ids, status=Status.CLAIMED, fence=fence, holder=identity.worker
            ).update(status=Status.QUEUED, updated_at=now, **_requeue_fields())
        TaskEvent.objects.bulk_create(
            TaskEvent(
                task_id=c.id,
                at=now,
                kind=EventKind.RELEASED,
                actor=identity.worker,
                fence=c.fence,
                message=message,
            )
            for c in claims
        )
    for claim in claims:
        locks.try_release(claim.queue, claim.key)


@dataclass
class StaleClaim:
    task: Task
    why: str


@dataclass
class ReapReport:
    requeued: list[StaleClaim] = field(default_factory=list)
    blocked: list[StaleClaim] = field(default_factory=list)
    orphan_locks: list[Path] = field(default_factory=list)
    agents_alive: list[tuple[StaleClaim, list[int]]] = field(default_factory=list)

    def as_dict(self) -> dict:
        def rows(items):
            return [
                {
                    "queue": s.task.queue,
                    "key": s.task.key,
                    "holder": s.task.holder,
                    "host": s.task.holder_host,
                    "pid": s.task.holder_pid,
                    "why": s.why,
                }
                for s in items
            ]

        return {
            "requeued": rows(self.requeued),
            "blocked": rows(self.blocked),
            "orphan_locks": [str(p) for p in self.orphan_locks],
            "agents_alive": [
                {"queue": s.task.queue, "key": s.task.key, "pids": pids}
                for s, pids in self.agents_alive
            ],
        }


def find_stale_claims(queue: str | None = None, holder_pid: int | None = None) -> list[StaleClaim]:
    """Claims whose holder is provably dead on this host, or whose lease ran out."""
    now = timezone.now()
    # Outside holders (a file that says in_progress) have no pid: only a person releases them.
    claimed = Task.objects.claimed().in_queue(queue).filter(holder_pid__isnull=False)
    if holder_pid is not None:
        claimed = claimed.filter(holder_pid=holder_pid)
    verdicts: dict[tuple, bool] = {}
    stale = []
    for task in claimed.iterator():
        holder = (task.holder_host, task.holder_pid, task.holder_started)
        if holder not in verdicts:
            verdicts[holder] = locks.owner_is_dead(*holder)
        if verdicts[holder]:
            stale.append(StaleClaim(task, f"holder pid {task.holder_pid} is gone"))
        elif task.lease_expires_at and task.lease_expires_at < now:
            stale.append(StaleClaim(task, "lease expired"))
    return stale


def release_stale_claims(
    queue: str | None = None,
    dry_run: bool = False,
    actor: str = "reaper",
    holder_pid: int | None = None,
) -> ReapReport:
    """Put stale claims back in the queue (or block them past the attempt limit)."""
    report = ReapReport()
    limits = dict(Queue.objects.values_list("name", "max_attempts"))
    stale_claims = find_stale_claims(queue, holder_pid)
    # The dead worker's agent goes first: two agents must never work on one task.
    alive = {} if dry_run else agent_tree.end_agents_of(s.task for s in stale_claims)
    for stale in stale_claims:
        task = stale.task
        if task.pk in alive:
            report.agents_alive.append((stale, alive[task.pk]))
            log.warning(
                "%s/%s stays claimed: its agent's processes %s could not be ended",
                task.queue,
                task.key,
                alive[task.pk],
            )
            continue
        limit = limits.get(task.queue, 3)
        blocked = task.attempts >= limit
        (report.blocked if blocked else report.requeued).append(stale)
        if dry_run:
            continue
        now = timezone.now()
        reason = f"abandoned {task.attempts} times" if blocked else ""
        with transaction.atomic():
            updated = Task.objects.filter(
                pk=task.pk, status=Status.CLAIMED, fence=task.fence
            ).update(
                status=Status.BLOCKED if blocked else Status.QUEUED,
                reason=reason or F("reason"),
                updated_at=now,
                **(
                    {"finished_at": now, "lease_expires_at": None}
                    if blocked
                    else _requeue_fields()
                ),
            )
            if updated:
                TaskEvent.objects.create(
                    task=task,
                    at=now,
                    kind=EventKind.REAPED,
                    actor=actor,
                    fence=task.fence,
                    message=f"{stale.why}; " + (reason or "back to queued"),
                    data={
                        "holder": task.holder,
                        "host": task.holder_host,
                        "pid": task.holder_pid,
                        "herd": task.holder_herd,
                        "attempts": task.attempts,
                    },
                )
        if updated:
            locks.try_release(task.queue, task.key)
            if task.worktree:
                from workqueue.worktrees import clean_task_worktree

                clean_task_worktree(task, None, actor)
    if holder_pid is None:
        report.orphan_locks = release_orphan_locks(queue, dry_run)
    return report


def release_orphan_locks(queue: str | None = None, dry_run: bool = False) -> list[Path]:
    """Lock directories with no claim behind them whose owner is dead on this host."""
    held = set(
        (locks.lock_name(q), locks.lock_name(k))
        for q, k in Task.objects.claimed().in_queue(queue).values_list("queue", "key")
    )
    removed = []
    for lock in locks.list_locks(queue):
        if (lock.queue_dir, lock.name) in held:
            continue
        if locks.abandoned(lock.owner, lock.age_seconds):
            removed.append(lock.path)
            if not dry_run:
                with suppress(LockError):  # a link planted since the listing: refused
                    locks.remove(lock.path)
    # Spare lock directories and owner files that dead workers of ours left behind.
    for path in locks.leftovers():
        removed.append(path)
        if not dry_run:
            with suppress(LockError):
                locks.remove_leftover(path)
    return removed


class AgentStillRunning(Exception):
    """A claim's agent could not be ended, so its task cannot go to anyone else."""


def end_agent_before_release(task: Task) -> None:
    if task.status == Status.CLAIMED:
        alive = agent_tree.end_agents_of([task]).get(task.pk)
        if alive:
            raise AgentStillRunning(
                f"{task.key}: its agent's processes {', '.join(map(str, alive))} "
                "could not be ended; the task stays claimed"
            )


def release_task(task: Task, actor: str, message: str = "") -> bool:
    """A person releases a claim (or requeues a task): back to queued, lock removed.

    A claimed task's agent is ended first; raises AgentStillRunning if it cannot be.
    """
    end_agent_before_release(task)
    now = timezone.now()
    with transaction.atomic():
        updated = Task.objects.filter(pk=task.pk, fence=task.fence, status=task.status).update(
            status=Status.QUEUED, updated_at=now, **_requeue_fields()
        )
        if updated:
            TaskEvent.objects.create(
                task=task,
                at=now,
                kind=EventKind.REQUEUED,
                actor=actor,
                fence=task.fence,
                message=message or f"requeued from {task.status}",
            )
    if updated and task.status == Status.CLAIMED:
        locks.try_release(task.queue, task.key)
    return bool(updated)


def set_task_status(task: Task, status: str, actor: str, reason: str = "") -> bool:
    """A person marks a task done or blocked from the board or the admin.

    A claimed task's agent is ended first; raises AgentStillRunning if it cannot be.
    """
    end_agent_before_release(task)
    now = timezone.now()
    values = {
        "status": status,
        "updated_at": now,
        "finished_at": now,
        "lease_expires_at": None,
        "agent_pgid": None,
        "agent_started": None,
    }
    if status == Status.BLOCKED:
        values["reason"] = reason
    else:
        values["outcome"] = "closed"
    with transaction.atomic():
        updated = Task.objects.filter(pk=task.pk, fence=task.fence, status=task.status).update(
            **values
        )
        if updated:
            TaskEvent.objects.create(
                task=task,
                at=now,
                kind=EventKind.BLOCKED if status == Status.BLOCKED else EventKind.DONE,
                actor=actor,
                fence=task.fence,
                message=reason or f"marked {status} by {actor}",
            )
    if updated and task.status == Status.CLAIMED:
        locks.try_release(task.queue, task.key)
    return bool(updated)


def _apply_pending_changes(ids: list[int]) -> None:
    pending = Task.objects.filter(change_pending=True)
    if not pending.exists():  # one look at a small partial index, not one per finished row
        return
    from workqueue.importer import refresh_from_source

    for task in pending.filter(pk__in=ids):
        refresh_from_source(task)


def _by_fence(claims: list[Claim]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for claim in claims:
        groups[claim.fence].append(claim.id)
    return groups


def _no_holder() -> dict:
    return {
        "holder": "",
        "holder_host": "",
        "holder_pid": None,
        "holder_started": None,
        "holder_herd": None,
        "agent_pgid": None,
        "agent_started": None,
    }


def _requeue_fields() -> dict:
    return {"lease_expires_at": None, **_no_holder()}
