""" "Triage this view": a dry-run herd of the triage processor, reviewed, then applied.

The herd works the view's ready tasks with the `triage` profile and `--dry-run`: each
task ends done with outcome `skipped` and the proposed change as a diff in its result,
and no file is touched. A person accepts or rejects each proposal. Accepting writes
exactly the proposed change (the rules are run again on the file, which must still be
the one imported and still give the same diff) and the task stays done, as the triage
processor would have left it. Rejecting puts the task back in the queue.

A review of thousands of proposals is shown a page at a time, and decided as a whole
("Apply all") or page by page; the decisions are recorded as a BulkAction and carried
out like a bulk action from the board: a few in the request, more on Huey with progress.

Public API:
    start(user, form) -> Herd
    proposals(herd) -> list[Task]
    decide(user, herd, accepted, rejected) -> BulkAction
    latest_decision(herd) -> BulkAction | None
    review(herd, accepted, rejected, actor) -> Review
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from django.db import transaction

from herds.models import Herd, Profile
from workqueue import actions, bulk, editing
from workqueue.models import BulkAction, Queue, Status, Task
from workqueue.triage import ChildIndex, rules_for
from workqueue.triage_rules import triage_bytes, unified_diff

PROFILE = "triage"
WORKERS = 2  # the triage rules are fast: as many workers as cores
PAGE = 100  # proposals shown at once: a page of 10,000 diffs is megabytes a browser crawls
ACTION = "triage"  # a BulkAction carrying out a review's decisions


class CannotTriage(ValueError):
    """The view cannot be triaged as it is (no queue chosen, a text search, no profile)."""


def start(user, queue: str, conditions: list[str]) -> Herd:
    """Launch the dry run over the ready tasks of `queue` that match `conditions`."""
    missing = Queue.objects.missing(queue)
    if missing:  # a herd on it would end at once, having done nothing
        raise CannotTriage(missing)
    profile = Profile.objects.filter(name=PROFILE).first()
    if profile is None:
        raise CannotTriage("there is no 'triage' profile: add one in the admin")
    return Herd.launch(
        queue,
        profile,
        min(WORKERS, profile.max_workers),
        filters=conditions,
        created_by=user,
        dry_run=True,
    )


def proposals(herd: Herd):
    """The herd's tasks still waiting for a decision, in the order they were triaged."""
    return (
        Task.objects.filter(
            holder_herd=herd.pk, status=Status.DONE, outcome="skipped", result__dry_run=True
        )
        .exclude(result__has_key="review")
        .order_by("finished_at", "id")
    )


def refused(herd: Herd):
    """The herd's tasks the dry run could not triage (blocked, with the reason)."""
    return Task.objects.filter(holder_herd=herd.pk, status=Status.BLOCKED).order_by("id")


def decide(user, herd: Herd, accepted: list[int], rejected: list[int]) -> BulkAction:
    """Record a person's decisions on `herd`'s proposals and carry them out: here when
    few, else on Huey (bulk.dispatch). A task that is no proposal by then (decided in
    another tab, of another herd) is listed as skipped, with why."""
    accepted = list(dict.fromkeys(accepted))
    taken = set(accepted)
    rejected = [pk for pk in dict.fromkeys(rejected) if pk not in taken]
    decision = BulkAction.objects.create(
        user=user,
        actor=f"user:{user.get_username()}",
        action=ACTION,
        params={"herd": herd.pk, "accepted": accepted, "rejected": rejected},
        total=len(accepted) + len(rejected),
    )
    bulk.forget_earlier(decision)
    bulk.dispatch(decision)
    decision.refresh_from_db()
    return decision


def _waiting(herd: Herd, ids: list[int]) -> dict[int, Task]:
    """The proposals among `ids`, by id: a batch at a time, since a database takes only
    so many values in one statement (PostgreSQL 65,535)."""
    found = {}
    for start in range(0, len(ids), editing.BATCH):
        chunk = ids[start : start + editing.BATCH]
        found.update((t.pk, t) for t in proposals(herd).filter(pk__in=chunk))
    return found


def latest_decision(herd: Herd) -> BulkAction | None:
    return BulkAction.objects.filter(action=ACTION, params__herd=herd.pk).first()


def carry_out(decision: BulkAction) -> None:
    """What bulk.run does for a review: the counts on the row after every batch
    (`changed` the proposals applied, `unchanged` those rejected: their files are left
    as they were)."""
    herd = Herd.objects.get(pk=decision.params["herd"])

    def progress(result: Review) -> None:
        skipped = result.skipped[: bulk.SKIPPED_KEPT]
        BulkAction.objects.filter(pk=decision.pk).update(
            processed=len(result.applied) + len(result.rejected) + len(result.skipped),
            changed=len(result.applied),
            unchanged=len(result.rejected),
            skipped=skipped,
        )

    params = decision.params
    review(
        herd,
        params["accepted"],
        params["rejected"],
        decision.actor,
        progress,
        keep=lambda applied: bulk.keep_for_undo(decision, applied),
    )


@dataclass
class Review:
    applied: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def review(
    herd: Herd, accepted: list[int], rejected: list[int], actor: str, progress=None, keep=None
) -> Review:
    """Apply the accepted proposals, put the rejected tasks back in the queue;
    `progress(review so far)` after every batch, `keep(applied)` what undoing a batch's
    proposals needs (each task's proposal too, so that it waits for a decision again)."""
    pending = _waiting(herd, [*accepted, *rejected])
    result = Review()
    rules, children = rules_for(herd.queue), ChildIndex()

    def apply_proposal(task: Task, raw: bytes) -> tuple[bytes, dict]:
        new, decision, _doc = triage_bytes(
            raw,
            Path(task.source_path).stem,
            lambda task_id: children.has_children(task.queue, task_id or task.key),
            rules,
        )
        # The proposal as loaded here: the batch's own rows leave `result` out.
        proposal = pending[task.pk].result
        proposed = proposal.get("diff", "")
        if (unified_diff(task.source_path, raw, new) if new != raw else "") != proposed:
            raise editing.Skip("the rules now propose something else: run the triage again")
        data = {k: v for k, v in proposal.items() if k not in ("dry_run", "diff")}
        data["review"] = "applied"
        closed_by = f"triage:{decision.close_reason}" if decision.close_reason else task.closed_by
        outcome = "closed" if decision.action == "close" else "success"
        return new, {"result": data, "outcome": outcome, "closed_by": closed_by}

    take = [pk for pk in accepted if pk in pending]

    def applied_batch(report: editing.BulkReport, applied: list[editing.Applied]) -> None:
        result.applied.extend(pending[a.task_id].key for a in applied)
        if keep is not None:
            for a in applied:
                task = pending[a.task_id]
                a.old_values["extra"] = {
                    "result": task.result,
                    "outcome": task.outcome,
                    "closed_by": task.closed_by,
                }
            keep(applied)
        result.skipped = list(report.skipped)
        if progress is not None:
            progress(result)

    editing.rewrite_tasks(take, actor, apply_proposal, "triage applied", on_batch=applied_batch)
    # Decided meanwhile (a second tab, another person's "Apply all"): said, not dropped.
    gone = [pk for pk in dict.fromkeys([*accepted, *rejected]) if pk not in pending]
    keys = dict(Task.objects.filter(pk__in=gone).values_list("pk", "key"))  # as shown
    result.skipped += [
        {"task": pk, "key": keys.get(pk, ""), "path": "", "why": "no longer waits for a decision"}
        for pk in gone
    ]
    back = [pk for pk in rejected if pk in pending and pk not in take]
    for n, pk in enumerate(back, 1):
        task = pending[pk]
        with transaction.atomic():
            if actions.back_to_queue(task, actor, "triage proposal rejected"):
                data = {**task.result, "review": "rejected"}
                Task.objects.filter(pk=pk).update(result=data)
                result.rejected.append(task.key)
            else:
                result.skipped.append(
                    {
                        "task": pk,
                        "key": task.key,
                        "path": task.source_path,
                        "why": "moved meanwhile",
                    }
                )
        if progress is not None and n % editing.BATCH == 0:
            progress(result)
    if progress is not None:
        progress(result)
    return result
