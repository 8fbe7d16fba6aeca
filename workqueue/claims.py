"""The worker's hot path: a claim is a row and a lock directory, taken and let go together.

The rows change through `transitions`; this module adds the filesystem half. A batch is a
few bulk statements, never an ORM call per task.
"""

from __future__ import annotations

import logging
import math
import time

from workqueue import locks, transitions
from workqueue.locks import Identity, LockError, OwnerFile
from workqueue.models import EventKind, Status, Task
from workqueue.processing import Claim, Result
from workqueue.transitions import FinishReport

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 30.0  # a task whose lock an outside process holds is tried again after
BUSY_ROUNDS = 8  # claims in a row that may find only busy tasks before the worker gives up


def pass_over(busy: dict[int, float], task_id: int) -> None:
    """Never claim this task again in this run: it was given back (a command's exit 75, an
    agent's release), so it is another worker's to try. It keeps its place at the head of
    the claim order, so the next claim would otherwise take it straight back, for ever."""
    busy[task_id] = math.inf


def claim_ready_tasks(
    queue: str,
    identity: Identity,
    owner_file: OwnerFile,
    limit: int = 1,
    lease_seconds: int = 300,
    filters=None,
    busy: dict[int, float] | None = None,
    max_attempts: int | None = None,
    agent: tuple[int, float] | None = None,
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
        claims = transitions.claim(
            queue, identity, limit, lease_seconds, filters, skip, max_attempts, agent
        )
        if not claims:
            return []
        held, taken_by_others = _take_locks(identity, owner_file, claims)
        for claim, owner in taken_by_others:
            if claim.id not in busy:  # said once a run, not at each try again
                log.warning("%s passed over: %s", claim.key, locks.describe_holder(owner))
            busy[claim.id] = now + BUSY_RETRY_SECONDS
        if held:
            return held
    return []


def _take_locks(identity, owner_file, claims):
    try:
        owner_file.refresh()
    except LockError:
        transitions.give_back(identity, claims, EventKind.LOCK_FAILED, "cannot write owner file")
        raise
    held, busy = [], []
    for claim in claims:
        try:
            owner = locks.acquire(claim.queue, claim.key, owner_file)
        except LockError as exc:
            owner_file.release_own([locks.lock_path(c.queue, c.key) for c in held])
            transitions.give_back(identity, claims, EventKind.LOCK_FAILED, str(exc))
            raise
        if owner is None:
            held.append(claim)
        else:
            busy.append((claim, owner))
    for claim, owner in busy:
        transitions.give_back(identity, [claim], EventKind.LOCK_BUSY, "lock directory held", owner)
    return held, busy


def finish_claims(
    identity: Identity,
    finished: list[tuple[Claim, Result]],
    owner_file: OwnerFile,
    write_status: bool = True,
) -> FinishReport:
    """Record results (transitions.finish); apply the file changes that waited for the
    claims; write each finished task's state into its file (`write_status`: not for
    triage, whose files are its own output, nor a dry run); then let go of the lock
    directories of the claims that were still ours, so that a script that waits for a
    lock finds the file saying what happened. A task given back goes the other way round,
    see release_claims."""
    given_back = {c.id for c, r in finished if r.status == Status.QUEUED}
    owner_file.release_own(
        [locks.lock_path(c.queue, c.key) for c, _ in finished if c.id in given_back]
    )
    report = transitions.finish(identity, finished)
    ended = set(report.finished) - given_back
    apply_pending_changes(report.finished)
    if write_status and ended:
        from workqueue.editing import write_finished_status

        write_finished_status([c.id for c, _ in finished if c.id in ended], identity.worker)
    owner_file.release_own([locks.lock_path(c.queue, c.key) for c, _ in finished if c.id in ended])
    return report


def release_claims(
    identity: Identity,
    claims: list[Claim],
    owner_file: OwnerFile,
    message: str,
    counted: bool = True,
) -> list[int]:
    """Give back claims, locks and all (a stopping worker's it never started are not
    `counted` as attempts); then the edits (and file changes) that waited for them.

    The lock directories go first: with the rows queued first, a worker that claimed one
    in between found its lock still held, passed the task over for 30 s and could end its
    run leaving it queued. A lock is let go only where it is ours (release_own), and
    while the row is still our claim no worker of ours can take the task."""
    owner_file.release_own([locks.lock_path(c.queue, c.key) for c in claims])
    released = set(transitions.release_by_worker(identity, claims, message, counted))
    apply_pending_changes(list(released))
    return list(released)


def apply_pending_changes(ids: list[int]) -> None:
    """The tasks `ids` were let go: write the edits and file changes that waited for their
    claims to end (a task claimed again meanwhile waits for that claim's end)."""
    pending = Task.objects.filter(change_pending=True)
    if not ids or not pending.exists():  # one look at a small partial index
        return
    from workqueue.importer import refresh_from_source

    for task in pending.filter(pk__in=ids).exclude(status=Status.CLAIMED):
        refresh_from_source(task)
