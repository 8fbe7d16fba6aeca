"""Stale claims, orphan locks, and the admin's report of the lock root.

A claim is stale when its holder is provably dead (same host, and the pid is gone or is
another process) or its lease ran out. Its agent is ended first, since two agents must
never work on one task; then the row goes back (transitions.release_by_reaper), and the
lock directory goes only while it is still the dead holder's.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db.models import Q

from workqueue import agent_tree, claims, clock, locks, signals, transitions, writeback
from workqueue.locks import LockError
from workqueue.models import Queue, Status, Task

log = logging.getLogger(__name__)


@dataclass
class StaleClaim:
    task: Task
    why: str
    holder_dead: bool = False


@dataclass
class ReapReport:
    requeued: list[StaleClaim] = field(default_factory=list)
    blocked: list[StaleClaim] = field(default_factory=list)
    orphan_locks: list[Path] = field(default_factory=list)
    agents_alive: list[tuple[StaleClaim, list[int]]] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)  # left beside task files

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
            "temporaries": self.temporaries,
            "agents_alive": [
                {"queue": s.task.queue, "key": s.task.key, "pids": pids}
                for s, pids in self.agents_alive
            ],
        }


def find_stale_claims(queue: str | None = None, holder_pid: int | None = None) -> list[StaleClaim]:
    """Claims whose holder is provably dead on this host, or whose lease ran out."""
    now = clock.now()
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
            stale.append(StaleClaim(task, f"holder pid {task.holder_pid} is gone", True))
        elif task.lease_expires_at and task.lease_expires_at < now:
            stale.append(StaleClaim(task, "lease expired"))
    return stale


def release_stale_claims(
    queue: str | None = None,
    dry_run: bool = False,
    actor: str = "reaper",
    holder_pid: int | None = None,
    counted: bool = True,
) -> ReapReport:
    """Put stale claims back in the queue (or block them past their attempt limit; with
    `counted=False`, as for the workers a cancel killed, back uncounted)."""
    report = ReapReport()
    limits = dict(Queue.objects.values_list("name", "max_attempts"))
    # What dead workers left in the lock root, read once: it names them below, and goes.
    leftover = locks.leftover_records()
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
        queue_limit = limits.get(task.queue, 3)
        if dry_run:
            limit = min(queue_limit, task.max_attempts or queue_limit)
            (report.blocked if task.attempts >= limit else report.requeued).append(stale)
            continue
        status = transitions.release_by_reaper(task, stale.why, actor, queue_limit, counted)
        if not status:
            continue  # its claim changed since it was judged
        (report.blocked if status == Status.BLOCKED else report.requeued).append(stale)
        let_go(task, actor)
    if not dry_run:
        released = [*report.requeued, *report.blocked]
        # Edits made while the dead worker held them were waiting for the claim's end.
        claims.apply_pending_changes([s.task.pk for s in released])
        from workqueue.editing import write_finished_status

        # Its file says so, as a worker's block writes it; and a dead worker may have been
        # killed between recording its last finishes and writing their files (with no
        # claim left: its owner file, which it did not live to discard, names it).
        dead = {
            (t.holder, t.holder_host, t.holder_pid, t.holder_started)
            for t in (s.task for s in released if s.holder_dead)
        }
        dead |= {owner for owner in locks.dead_owners(leftover) if holder_pid in (None, owner[2])}
        # Its temporaries lie beside the files of the claims just released, and beside
        # those of the tasks it finished but did not live to rename into place.
        beside = [(s.task.source_path, s.task.holder_pid) for s in released if s.holder_dead]
        beside += files_finished_by(dead, queue)
        report.temporaries = remove_temporaries_of_dead(beside)
        lagging = finished_unwritten(dead, queue)
        if report.blocked or lagging:
            write_finished_status([s.task.pk for s in report.blocked] + lagging, actor)
    if holder_pid is None:
        report.orphan_locks = release_orphan_locks(queue, dry_run, leftover)
    return report


def finished_unwritten(holders: set[tuple], queue: str | None = None) -> list[int]:
    """The tasks these dead holders (worker, host, pid, start) finished whose rows still
    keep their files as imported: a worker writes a finished task's file after the finish's
    commit. The worker's name only where known (an owner file need not carry it)."""
    from workqueue.importer import status_unwritten

    if not holders:
        return []
    return status_unwritten(finished_by(holders, queue))


def held_by(holders: set[tuple]) -> Q:
    """Tasks whose last holder is one of these (worker, host, pid, start); the worker's
    name only where known (an owner file need not carry it)."""
    same_holder = Q(pk__in=[])
    for worker, host, pid, started in holders:
        # The start as the owner file carried it, to the millisecond its name has.
        near = Q(holder_started__gte=started - 0.001, holder_started__lte=started + 0.001)
        named = Q(holder=worker) if worker else Q()
        same_holder |= Q(named, near, holder_host=host, holder_pid=pid)
    return same_holder


def finished_by(holders: set[tuple], queue: str | None = None):
    """The tasks with a file these holders finished (done or blocked)."""
    return (
        Task.objects.in_queue(queue)
        .filter(held_by(holders), status__in=(Status.DONE, Status.BLOCKED))
        .exclude(source_path="")
    )


def files_finished_by(holders: set[tuple], queue: str | None = None) -> list[tuple[str, int]]:
    """(task file, pid) of the tasks these dead holders finished: a finish writes its
    batch's temporaries after the rows say so."""
    if not holders:
        return []
    return list(finished_by(holders, queue).values_list("source_path", "holder_pid"))


def let_go(task: Task, actor: str) -> None:
    """After a claim was released by someone other than its worker: its lock directory
    goes, only while it is still the old holder's (a new worker may have taken the task
    meanwhile), and whoever keeps things per claim (worktrees) hears of it."""
    if task.holder_pid is not None:
        locks.release_held_by(
            task.queue, task.key, task.holder_host, task.holder_pid, task.holder_started
        )
    signals.claim_released.send(sender=Task, task=task, actor=actor)


def remove_temporaries_of_dead(beside: list[tuple[str, int]]) -> list[str]:
    """The temporary files dead workers left beside task files (killed between writing
    a batch and renaming it into place), given as (task file, dead worker's pid), folder
    by folder: a folder is read once however many of its tasks were reaped."""
    left: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for path, pid in beside:
        if path:
            folder, name = os.path.split(path)
            left[folder][name].add(pid)
    removed = []
    for folder, names in left.items():
        removed += writeback.remove_temporaries(folder, names)
    for path in removed:
        log.info("removed %s, a temporary file a dead worker left", path)
    return removed


def release_orphan_locks(
    queue: str | None = None,
    dry_run: bool = False,
    leftover: list[tuple[Path, dict | None]] | None = None,
) -> list[Path]:
    """Lock directories with no claim behind them whose owner is dead on this host, and
    what dead workers left (`leftover`: locks.leftover_records(), read here if not given)."""
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
    for path, _ in locks.leftover_records() if leftover is None else leftover:
        removed.append(path)
        if not dry_run:
            with suppress(LockError):
                locks.remove_leftover(path)
    for path in leftover_session_folders():
        removed.append(path)
        if not dry_run:
            # Not through a link: rmtree refuses one, and opens what is below without
            # following any.
            with suppress(OSError):
                shutil.rmtree(path)
    return removed


def session_folders() -> Path:
    """Where pull workers keep a session's config files (workqueue.pull_agent), each
    folder with its worker's owner record."""
    return Path(settings.HYPERVISOR_DATA_DIR, "run")


def leftover_session_folders() -> list[Path]:
    """Session folders of pull workers that died without removing them (a SIGKILL)."""
    found = []
    with suppress(OSError), os.scandir(session_folders()) as entries:
        for entry in entries:
            ours = entry.name.startswith("pull-") and entry.is_dir(follow_symlinks=False)
            if ours and locks.owner_record_is_dead(locks.read_owner_outside(entry.path)):
                found.append(Path(entry.path))
    return found


def lock_report() -> tuple[list[dict], ReapReport]:
    """Every lock directory with what the reaper would do about it (a dry run)."""
    dry_run = release_stale_claims(dry_run=True)
    stale_keys = {(s.task.queue, s.task.key): s for s in [*dry_run.requeued, *dry_run.blocked]}
    orphans = {str(p) for p in dry_run.orphan_locks}
    rows = []
    for lock in sorted(locks.list_locks(), key=lambda lock: (lock.queue_dir, lock.name)):
        queue = locks.key_from_lock_name(lock.queue_dir)
        stale_claim = stale_keys.get((queue, lock.key))
        owner = lock.owner or {}
        rows.append(
            {
                "path": lock.path,
                "queue": queue,
                "key": lock.key,
                "host": owner.get("host", "?"),
                "pid": owner.get("pid", "?"),
                "worker": owner.get("worker", ""),
                "alive": lock.owner_alive,
                "age": lock.age_seconds,
                "stale": bool(stale_claim) or str(lock.path) in orphans,
                "why": stale_claim.why if stale_claim else "",
            }
        )
    return rows, dry_run
