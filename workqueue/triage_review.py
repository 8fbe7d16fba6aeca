""" "Triage this view": a dry-run herd of the triage processor, reviewed, then applied.

The herd works the view's ready tasks with the `triage` profile and `--dry-run`: each
task ends done with outcome `skipped` and the proposed change as a diff in its result,
and no file is touched. A person accepts or rejects each proposal. Accepting writes
exactly the proposed change (the rules are run again on the file, which must still be
the one imported and still give the same diff) and the task stays done, as the triage
processor would have left it. Rejecting puts the task back in the queue.

Public API:
    start(user, form) -> Herd
    proposals(herd) -> list[Task]
    review(herd, accepted, rejected, actor) -> Review
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from django.db import transaction

from herds.models import Herd, Profile
from workqueue import actions, editing
from workqueue.models import Status, Task
from workqueue.triage import ChildIndex, rules_for
from workqueue.triage_rules import triage_bytes, unified_diff

PROFILE = "triage"
WORKERS = 2  # the triage rules are fast: as many workers as cores


class CannotTriage(ValueError):
    """The view cannot be triaged as it is (no queue chosen, a text search, no profile)."""


def start(user, queue: str, conditions: list[str]) -> Herd:
    """Launch the dry run over the ready tasks of `queue` that match `conditions`."""
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


@dataclass
class Review:
    applied: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def review(herd: Herd, accepted: list[int], rejected: list[int], actor: str) -> Review:
    """Apply the accepted proposals, put the rejected tasks back in the queue."""
    pending = {t.pk: t for t in proposals(herd).filter(pk__in=[*accepted, *rejected])}
    result = Review()
    rules, children = rules_for(herd.queue), ChildIndex()

    def apply_proposal(task: Task, raw: bytes) -> tuple[bytes, dict]:
        new, decision, _doc = triage_bytes(
            raw,
            Path(task.source_path).stem,
            lambda task_id: children.has_children(task.queue, task_id or task.key),
            rules,
        )
        proposed = task.result.get("diff", "")
        if (unified_diff(task.source_path, raw, new) if new != raw else "") != proposed:
            raise editing.Skip("the rules now propose something else: run the triage again")
        data = {k: v for k, v in task.result.items() if k not in ("dry_run", "diff")}
        data["review"] = "applied"
        closed_by = f"triage:{decision.close_reason}" if decision.close_reason else task.closed_by
        outcome = "closed" if decision.action == "close" else "success"
        return new, {"result": data, "outcome": outcome, "closed_by": closed_by}

    take = [pk for pk in accepted if pk in pending]
    report = editing.rewrite_tasks(take, actor, apply_proposal, "triage applied")
    skipped = {s["task"] for s in report.skipped}
    result.skipped = report.skipped
    result.applied = [pending[pk].key for pk in take if pk not in skipped]
    for pk in rejected:
        task = pending.get(pk)
        if task is None or pk in take:
            continue
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
    return result
