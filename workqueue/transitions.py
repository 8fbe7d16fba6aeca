"""Every change of a task's state, in one place.

A task's status, holder, lease, fencing number and agent are written here and nowhere
else. Each transition is guarded by the status (and fence, and holder where there is one)
its caller saw, returns what it changed, and records a TaskEvent carrying the fence in the
same write transaction, counted there in the TransitionTally that /metrics reads. What
goes with a change outside the database (the lock directory, the agent's processes, a
worktree) is for the caller: claims (the worker's hot path), reaper, and actions (people,
from the board and the admin).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from django.db import connection
from django.db.models import DecimalField, ExpressionWrapper, F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from hypervisor_site.writers import write_transaction
from workqueue import clock
from workqueue.locks import Identity
from workqueue.models import EventKind, Status, Task, TaskEvent, TransitionTally
from workqueue.processing import Claim, Result

# The statuses a transition may start from. The board offers fewer (forms.ACTIONS); an
# import follows the file wherever the task stands, except in a worker's hands.
MARK_DONE_FROM = (Status.QUEUED, Status.CLAIMED, Status.BLOCKED)
BLOCK_FROM = (Status.QUEUED, Status.CLAIMED, Status.DONE)
REQUEUE_FROM = (Status.DONE, Status.BLOCKED)
HOLD_FROM = (Status.QUEUED, Status.DONE, Status.BLOCKED)
# A finish of one of these kinds, by this holder with this fence, is its finish applied.
FINISH_KINDS = (EventKind.DONE, EventKind.BLOCKED, EventKind.RELEASED)


def no_holder() -> dict:
    return {
        "holder": "",
        "holder_host": "",
        "holder_pid": None,
        "holder_started": None,
        "holder_herd": None,
        "lease_expires_at": None,
        "agent_pgid": None,
        "agent_started": None,
    }


def given_back(counted: bool = False) -> dict:
    """What a claim given back leaves: no holder, and (`counted=False`) the attempt its
    claim counted taken back, the task not being at fault."""
    return {**no_holder(), **({} if counted else {"attempts": F("attempts") - 1})}


def ended(now=None) -> dict:
    """What a claim leaves when its task ends, done or blocked: no lease, no agent (the
    holder stays, to say who had it)."""
    return {
        "finished_at": now or timezone.now(),
        "lease_expires_at": None,
        "agent_pgid": None,
        "agent_started": None,
    }


def _move(
    tasks,
    values: dict,
    kind: str,
    actor: str,
    message: str = "",
    data: dict | None = None,
) -> list[int]:
    """Change the rows `tasks` selects (its filter is the guard) and record an event for
    each, in one write transaction. Returns the ids changed."""
    now = timezone.now()
    with write_transaction():
        rows = list(tasks.select_for_update().values_list("id", "fence", "queue"))
        if rows:
            Task.objects.filter(pk__in=[r[0] for r in rows]).update(updated_at=now, **values)
            TaskEvent.objects.record(
                [(i, now, kind, actor, fence, message, data or {}) for i, fence, _ in rows]
            )
            TransitionTally.objects.add(Counter((queue, kind) for _, _, queue in rows))
    return [r[0] for r in rows]


def _held(identity: Identity, claims: list[Claim]):
    """One queryset per fence of the claims this worker still holds."""
    by_fence: dict[int, list[int]] = defaultdict(list)
    for claim in claims:
        by_fence[claim.fence].append(claim.id)
    return [
        Task.objects.filter(pk__in=ids, status=Status.CLAIMED, fence=fence, holder=identity.worker)
        for fence, ids in by_fence.items()
    ]


# The worker's transitions ---------------------------------------------------------


def claim(
    queue: str,
    identity: Identity,
    limit: int,
    lease_seconds: int,
    filters=None,
    skip: Iterable[int] = (),
    max_attempts: int | None = None,
    agent: tuple[int, float] | None = None,
) -> list[Claim]:
    """queued (and ready) -> claimed: up to `limit` tasks in claim order, one new fence
    above every fence they had. `max_attempts` (a profile's) rides on the claim, so
    whoever reaps it applies it in the same write; so does `agent` (the process group and
    start of an agent already at work, a pull worker's), so that no claim is ever without
    the agent a reaper must end before the task goes to another."""
    candidates = Task.objects.filter(queue=queue).ready().claim_order()
    candidates = candidates.excluding(list(skip))
    if filters is not None:
        candidates = filters.apply(candidates)
    candidates = candidates.select_for_update(skip_locked=True, of=("self",))
    with write_transaction():
        fields = ("id", "key", "title", "source_path", "fence", "updated_at")
        rows = list(candidates.values_list(*fields)[:limit])
        if not rows:
            return []
        now = timezone.now()
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
            lease_expires_at=clock.stamp() + timedelta(seconds=lease_seconds),
            claimed_at=now,
            attempts=F("attempts") + 1,
            max_attempts=max_attempts,
            updated_at=now,
            **({"agent_pgid": agent[0], "agent_started": agent[1]} if agent else {}),
        )
        TaskEvent.objects.record(
            [(i, now, EventKind.CLAIMED, identity.worker, fence, "", {}) for i in ids]
        )
        # Each task waited, queued, since its last change.
        TransitionTally.objects.add_claims(queue, [(now - r[5]).total_seconds() for r in rows])
    return [Claim(r[0], queue, r[1], r[2], r[3], fence) for r in rows]


def give_back(
    identity: Identity, claims: list[Claim], kind: str, message: str, owner: dict | None = None
) -> list[int]:
    """claimed -> queued for claims that never started (their lock was busy or could not
    be taken): the attempt is not counted."""
    values = {"status": Status.QUEUED, **given_back()}
    data = {"owner": owner} if owner else {}
    changed = []
    for mine in _held(identity, claims):
        changed += _move(mine, values, kind, identity.worker, message, data)
    return changed


def release_by_worker(
    identity: Identity, claims: list[Claim], message: str, counted: bool = True
) -> list[int]:
    """claimed -> queued for claims given back: an agent's release or a session's end
    counts the attempt (the task was handed out); a stopping worker's claims it never
    started do not (`counted=False`), or each drain would bring a batch nearer its
    attempts' limit."""
    values = {"status": Status.QUEUED, **given_back(counted)}
    changed = []
    for mine in _held(identity, claims):
        changed += _move(mine, values, EventKind.RELEASED, identity.worker, message)
    return changed


def heartbeat(identity: Identity, claims: list[Claim], lease_seconds: int) -> int:
    """Renew the lease of the claims this worker holds now (by id and fence): not of
    every row that names it. No event: the lease on the task says it."""
    renewed = 0
    until = clock.stamp() + timedelta(seconds=lease_seconds)
    with write_transaction():
        for mine in _held(identity, claims):
            renewed += mine.update(lease_expires_at=until)
    return renewed


def still_held(identity: Identity, claims: list[Claim]) -> set[int]:
    """The ids of `claims` this worker holds now (the rest were taken back)."""
    return {pk for mine in _held(identity, claims) for pk in mine.values_list("pk", flat=True)}


def record_agent(identity: Identity, claim: Claim, pgid: int, started: float) -> bool:
    """Note on the claim the process group of the agent working on it."""
    with write_transaction():
        return bool(
            Task.objects.filter(
                pk=claim.id, status=Status.CLAIMED, fence=claim.fence, holder=identity.worker
            ).update(agent_pgid=pgid, agent_started=started)
        )


@dataclass
class FinishReport:
    finished: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)


def finish(identity: Identity, finished: list[tuple[Claim, Result]]) -> FinishReport:
    """claimed -> done, blocked, or queued (given back), each row only while its fence
    and holder still match: a holder that lost its claim is refused and the refusal
    recorded. A finish tried again after its commit went through (the acknowledgement was
    lost) finds its own events and counts as finished, not refused.

    The hot path: rows with the same fence and result share one UPDATE (all of a no-op
    batch), compiled before the write lock so that the lock covers only their runs.
    """
    report = FinishReport()
    if not finished:
        return report
    now = timezone.now()
    groups: dict[tuple, tuple[dict, list[int]]] = {}
    for claim_, result in finished:
        key = (claim_.fence, result.row_key())
        if key not in groups:
            groups[key] = (_finish_values(result, now), [])
        groups[key][1].append(claim_.id)
    updates = []
    for (fence, _), (values, ids) in groups.items():
        mine = Task.objects.filter(
            pk__in=ids, status=Status.CLAIMED, fence=fence, holder=identity.worker
        )
        updates.append((fence, ids, mine.update_statement(**values)))
    events = [_finish_event(identity, c, r, now) for c, r in finished]
    missed: list[tuple[int, list[int]]] = []
    with write_transaction(), connection.cursor() as cursor:
        for fence, ids, statement in updates:
            cursor.execute(*statement)
            if cursor.rowcount == len(ids):
                report.finished.extend(ids)
            else:
                missed.append((fence, ids))
        applied: set[int] = set()
        for fence, ids in missed:
            # Unchanged rows: finished already by this very call's earlier try, or lost.
            earlier = set(
                TaskEvent.objects.filter(
                    task_id__in=ids, fence=fence, actor=identity.worker, kind__in=FINISH_KINDS
                ).values_list("task_id", flat=True)
            )
            changed = set(
                Task.objects.filter(pk__in=ids, fence=fence, updated_at=now).values_list(
                    "id", flat=True
                )
            )
            applied |= earlier - changed
            report.finished.extend(i for i in ids if i in earlier or i in changed)
            report.refused.extend(i for i in ids if i not in earlier and i not in changed)
        refused = set(report.refused)
        recorded = [
            (c.queue, _refusal_event(identity, c, r, now) if c.id in refused else event)
            for (c, r), event in zip(finished, events, strict=True)
            if c.id not in applied
        ]
        TaskEvent.objects.record([event for _, event in recorded])
        TransitionTally.objects.add(Counter((queue, event[2]) for queue, event in recorded))
    return report


def _finish_values(result: Result, now) -> dict:
    values = result.row_values()
    del values["tokens"], values["cost_usd"]  # added to the earlier runs', not set
    values.update(_spent(result))
    if result.status != Status.QUEUED:
        return {"updated_at": now, **ended(now), **values}
    # Given back: the task was not at fault. A quota or rate limit, or an agent ended
    # because its worker or herd stopped, does not count the attempt either; anything
    # else (the agent asked to be retried) does.
    counted = not (result.data.get("quota") or result.data.get("stopped"))
    back = {"updated_at": now, **given_back(counted)}
    keep = ("status", "output_tail", "reason", "result", "tokens", "cost_usd")
    back.update({k: values[k] for k in keep if k in values})
    return back


def _spent(result: Result) -> dict:
    """A run's tokens and cost added to what the task's earlier runs spent (those that
    gave it back too): a task's, a queue's and a herd's totals say what was spent."""
    spent = {"tokens": F("tokens") + result.tokens} if result.tokens else {}
    if result.cost_usd is not None:
        cost = DecimalField(max_digits=20, decimal_places=10)
        before = Coalesce(F("cost_usd"), Value(Decimal(0)), output_field=cost)
        spent["cost_usd"] = ExpressionWrapper(before + result.cost_usd, output_field=cost)
    return spent


def _refusal_event(identity: Identity, claim_: Claim, result: Result, now) -> tuple:
    return (
        claim_.id,
        now,
        EventKind.LATE_FINISH_REFUSED,
        identity.worker,
        claim_.fence,
        "finish refused: claim lost (fencing number no longer matches)",
        {"status": result.status, "outcome": result.outcome},
    )


def _finish_event(identity: Identity, claim_: Claim, result: Result, now) -> tuple:
    kind = {Status.DONE: EventKind.DONE, Status.BLOCKED: EventKind.BLOCKED}.get(
        result.status, EventKind.RELEASED
    )
    message = result.reason if result.status != Status.DONE else result.outcome
    data = {"tokens": result.tokens} if result.tokens else {}
    if result.commit:
        data["commit"] = result.commit
    if result.data.get("quota"):
        data.update(quota=result.data["quota"], resets_at=result.data.get("resets_at"))
    return (claim_.id, now, kind, identity.worker, claim_.fence, message or "", data)


# The reaper's transition ----------------------------------------------------------


def release_by_reaper(
    task: Task, why: str, actor: str, queue_limit: int, counted: bool = True
) -> str:
    """claimed -> queued, or blocked once the attempts reach the limit (the queue's, or
    the profile's that rode on the claim, whichever is lower), in one write. The task is
    the row the reaper judged: nothing happens if its claim changed since. Returns the
    new status, or "" when nothing changed. A worker killed by its herd's cancel
    (`counted=False`) was not failed by its task: the attempt is not counted."""
    limit = min(queue_limit, task.max_attempts or queue_limit)
    blocked = counted and task.attempts >= limit
    if blocked:
        source = "profile" if limit < queue_limit else "queue"
        tries = f"{task.attempts} attempt{'s' if task.attempts != 1 else ''}"
        reason = f"abandoned after {tries} ({source} limit {limit})"
        values = {"status": Status.BLOCKED, "reason": reason, **ended()}
    else:
        reason = "back to queued" if counted else "back to queued, attempt not counted"
        values = {"status": Status.QUEUED, **given_back(counted)}
    data = {
        "holder": task.holder,
        "host": task.holder_host,
        "pid": task.holder_pid,
        "herd": task.holder_herd,
        "attempts": task.attempts,
        "limit": limit,
        "status": values["status"],  # back to the queue, or blocked: a herd's summary counts
    }
    guard = Task.objects.filter(pk=task.pk, status=Status.CLAIMED, fence=task.fence)
    if _move(guard, values, EventKind.REAPED, actor, f"{why}; {reason}", data):
        return values["status"]
    return ""


# People's transitions (the board, the admin) and the file's (import) -------------------
# Each takes the tasks as its caller saw them (one, or a whole bulk batch) and changes
# those still in that state and fence, in one write; it returns the ids it changed.


def _move_seen(
    tasks: Iterable[Task], sources: Iterable[str], values: dict, kind: str, actor: str, message
) -> list[int]:
    seen = {t.pk: (t.status, t.fence) for t in tasks if t.status in sources}
    if not seen:
        return []
    now = timezone.now()
    with write_transaction():
        found = Task.objects.filter(pk__in=list(seen)).select_for_update()
        rows = [
            (pk, status, fence, queue)
            for pk, status, fence, queue in found.values_list("id", "status", "fence", "queue")
            if seen[pk] == (status, fence)
        ]
        if rows:
            Task.objects.filter(pk__in=[r[0] for r in rows]).update(updated_at=now, **values)
            TaskEvent.objects.record(
                [
                    (
                        pk,
                        now,
                        kind,
                        actor,
                        fence,
                        message(status) if callable(message) else message,
                        {},
                    )
                    for pk, status, fence, _ in rows
                ]
            )
            TransitionTally.objects.add(Counter((queue, kind) for *_, queue in rows))
    return [r[0] for r in rows]


def release_by_person(tasks: Iterable[Task], actor: str, message: str = "") -> list[int]:
    """claimed -> queued: a person (or the task's file) lets claims go."""
    values = {"status": Status.QUEUED, **no_holder()}
    return _move_seen(
        tasks, (Status.CLAIMED,), values, EventKind.RELEASED, actor, message or "claim released"
    )


def requeue(tasks: Iterable[Task], actor: str, message: str = "") -> list[int]:
    """done or blocked -> queued, its attempts counted afresh: a person says try again,
    and earlier runs (one that succeeded, one a herd's cancel ended) must not block it at
    its first abandonment."""
    values = {"status": Status.QUEUED, "attempts": 0, **no_holder()}
    return _move_seen(
        tasks,
        REQUEUE_FROM,
        values,
        EventKind.REQUEUED,
        actor,
        message or (lambda status: f"requeued from {status}"),
    )


def block(tasks: Iterable[Task], actor: str, reason: str) -> list[int]:
    """queued, claimed or done -> blocked, with the reason."""
    values = {"status": Status.BLOCKED, "reason": reason, **ended()}
    return _move_seen(tasks, BLOCK_FROM, values, EventKind.BLOCKED, actor, reason)


def mark_done(
    tasks: Iterable[Task], actor: str, reason: str = "", outcome: str = "closed"
) -> list[int]:
    """queued, claimed or blocked -> done (closed, or the outcome given)."""
    values = {"status": Status.DONE, "outcome": outcome, **ended()}
    if reason:
        values["reason"] = reason
    message = reason or f"marked {outcome} by {actor}"
    return _move_seen(tasks, MARK_DONE_FROM, values, EventKind.DONE, actor, message)


def hold_for_outside(tasks: Iterable[Task], holder: str, actor: str = "import") -> list[int]:
    """queued, done or blocked -> claimed by someone outside Hypervisor (a file that says
    in_progress): no pid, no lease; only a person or the file lets it go."""
    values = {
        **no_holder(),
        "status": Status.CLAIMED,
        "holder": holder,
        "claimed_at": timezone.now(),
    }
    message = f"held outside Hypervisor by {holder}"
    return _move_seen(tasks, HOLD_FROM, values, EventKind.CLAIMED, actor, message)
