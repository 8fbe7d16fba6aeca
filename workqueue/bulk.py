"""Bulk actions from the board: one action over many selected tasks, and its undo.

A few tasks are done in the request; more run in the background on Huey
(workqueue.tasks), in batches, with progress on the BulkAction row. The writing is
workqueue.editing's: files in batches (temporaries, one sync, renames), rows in one
transaction per batch, one event per task, changed files skipped and listed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from workqueue import editing
from workqueue.models import BulkAction, BulkChange, BulkStatus
from workqueue.text import list_items

log = logging.getLogger(__name__)

# The bulk bar's buttons: (action, button text, the dialog's field label or "" for none,
# the field's input type, the dialog's title before "N tasks").
BUTTONS = [
    ("assign", "Assign…", "Assignee", "text", "Assign"),
    ("priority", "Priority…", "Priority (lower is more urgent)", "number", "Priority for"),
    ("complexity", "Complexity…", "Complexity", "text", "Complexity for"),
    ("tags", "Tags…", 'Tags: +add -remove (+"two words")', "text", "Tags for"),
    ("project", "Project…", "Project", "text", "Project for"),
    ("close", "Close…", "Reason for closing", "text", "Close"),
    ("block", "Block…", "Reason for blocking", "text", "Block"),
    ("requeue", "Requeue", "", "", ""),
    ("release", "Release claim", "", "", ""),
]
ACTIONS = {action: label for action, _text, label, _type, _title in BUTTONS}
FIELD_OF = {
    "assign": "assignee",
    "priority": "priority",
    "complexity": "complexity",
    "project": "project",
}
INLINE_LIMIT = 25  # at most this many tasks are done in the request itself
SKIPPED_KEPT = 1000  # skipped tasks listed on the action; the count is always whole
UNDO_OFFERED = timedelta(hours=1)  # the board offers a finished action's Undo this long


@dataclass(frozen=True)
class Plan:
    """What editing.edit_tasks is asked to do for an action and its value."""

    changes: dict
    action: str | None
    reason: str
    add_tags: tuple[str, ...]
    remove_tags: tuple[str, ...]

    @classmethod
    def of(cls, action: str, value: str) -> Plan:
        value = value.strip()
        if action not in ACTIONS:
            raise editing.EditError({"action": f"{action!r}: choose {', '.join(ACTIONS)}"})
        if action == "priority" and not value:
            # Read as a file's missing priority, empty would set the default to all of them.
            raise editing.EditError({"priority": "give a number: lower is more urgent"})
        if action in FIELD_OF:
            return cls({FIELD_OF[action]: value}, None, "", (), ())
        if action == "tags":
            try:
                words = list_items(value)
            except ValueError as exc:
                raise editing.EditError({"tags": str(exc)}) from None
            add = tuple(w.lstrip("+") for w in words if not w.startswith("-") and w.lstrip("+"))
            remove = tuple(w[1:] for w in words if w.startswith("-") and w[1:])
            if not add and not remove:
                raise editing.EditError({"tags": "name tags to add (+tag) or remove (-tag)"})
            return cls({}, None, "", add, remove)
        if action in ("close", "block") and not value:
            why = "closed" if action == "close" else "blocked"
            raise editing.EditError({"reason": f"say why the tasks are {why}"})
        return cls({}, action, value, (), ())

    def check(self) -> None:
        """Raise EditError for a bad value before anything is stored or written."""
        editing.check_bulk(self.changes, self.action, self.reason, self.add_tags, self.remove_tags)


def start(
    user, action: str, value: str, task_ids: Iterable[int], seen: dict[int, str] | None = None
) -> BulkAction:
    """Record a bulk action and run it: here when small, else on Huey. EditError first.
    `seen`: the state the page showed each task in (Task.seen_as), for a state action."""
    plan = Plan.of(action, value)
    plan.check()
    ids = list(dict.fromkeys(int(i) for i in task_ids))
    params = {"value": value.strip()}
    if seen and plan.action:
        params["seen"] = {str(pk): state for pk, state in seen.items()}
    bulk = BulkAction.objects.create(
        user=user,
        actor=f"user:{user.get_username()}",
        action=action,
        params=params,
        task_ids=ids,
        total=len(ids),
    )
    forget_earlier(bulk)
    dispatch(bulk)
    return bulk


def forget_earlier(bulk: BulkAction) -> None:
    """Only a person's latest action can be undone: the earlier ones' copies go."""
    BulkChange.objects.filter(action__user=bulk.user).exclude(action=bulk).delete()


def start_undo(user, original: BulkAction) -> BulkAction:
    bulk = BulkAction.objects.create(
        user=user,
        actor=f"user:{user.get_username()}",
        action="undo",
        undo_of=original,
        params={"of": original.pk, "what": original.action},
        total=original.changes.count(),
    )
    dispatch(bulk)
    return bulk


def can_undo(bulk: BulkAction, user) -> bool:
    """The person's own latest action, finished, with changes, not undone yet."""
    return bulk == _latest(user) and _undoable(bulk, user)


def offered_undo(user) -> BulkAction | None:
    """The person's latest action while it can be undone and ended within UNDO_OFFERED: the
    board offers its Undo again after a reload."""
    latest = _latest(user)
    recent = latest and latest.finished_at and timezone.now() - latest.finished_at < UNDO_OFFERED
    return latest if recent and _undoable(latest, user) else None


def _latest(user) -> BulkAction | None:
    return BulkAction.objects.filter(user=user).exclude(action="undo").first()


def _undoable(bulk: BulkAction, user) -> bool:
    if bulk.action == "undo" or bulk.status != BulkStatus.DONE or bulk.user_id != user.pk:
        return False
    return not BulkAction.objects.filter(undo_of=bulk).exists() and bulk.changes.exists()


def dispatch(bulk: BulkAction) -> None:
    if bulk.total <= INLINE_LIMIT:
        run(bulk.pk)
        return
    from herds.consumer import UNREACHABLE
    from workqueue.tasks import run_bulk_action

    try:
        run_bulk_action(bulk.pk)
    except UNREACHABLE as exc:
        # Huey's storage full (its SQLite file lives in the data dir) or out of reach: the
        # action says so where its progress is shown, rather than wait for ever.
        error = f"not started: Huey's queue could not take it ({exc}); nothing was changed"
        BulkAction.objects.filter(pk=bulk.pk, status=BulkStatus.PENDING).update(
            status=BulkStatus.FAILED, error=error, finished_at=timezone.now()
        )
        log.warning("bulk action %s %s", bulk.pk, error)


def run(pk: int) -> None:
    """Carry out a recorded action, once (a second consumer finds it taken)."""
    now = timezone.now()
    if not BulkAction.objects.filter(pk=pk, status=BulkStatus.PENDING).update(
        status=BulkStatus.RUNNING, started_at=now
    ):
        return
    bulk = BulkAction.objects.get(pk=pk)
    try:
        if bulk.undo_of_id:
            _undo(bulk)
        elif bulk.action == "triage":  # a triage review's decisions (triage_review.decide)
            from workqueue import triage_review

            triage_review.carry_out(bulk)
        else:
            _apply(bulk)
    except Exception as exc:
        BulkAction.objects.filter(pk=pk).update(
            status=BulkStatus.FAILED, error=str(exc)[:2000], finished_at=timezone.now()
        )
        raise
    BulkAction.objects.filter(pk=pk).update(status=BulkStatus.DONE, finished_at=timezone.now())


def _apply(bulk: BulkAction) -> None:
    plan = Plan.of(bulk.action, bulk.params.get("value", ""))
    editing.edit_tasks(
        bulk.task_ids,
        bulk.actor,
        plan.changes,
        action=plan.action,
        reason=plan.reason,
        add_tags=plan.add_tags,
        remove_tags=plan.remove_tags,
        on_batch=_progress(bulk, keep=True),
        seen={int(pk): state for pk, state in bulk.params.get("seen", {}).items()},
    )


def _undo(bulk: BulkAction) -> None:
    changes = BulkChange.objects.filter(action_id=bulk.undo_of_id).order_by("id")
    records = (
        editing.Applied(
            task_id=c.task_id,
            key="",
            path="",
            old_bytes=bytes(c.old_bytes) if c.old_bytes is not None else None,
            new_sha256=c.new_sha256,
            old_values=c.old_values,
            old_status=c.old_status,
            old_reason=c.old_reason,
            new_status=c.new_status,
            updated_at=c.updated_at,
            deferred=c.deferred,
        )
        for c in changes.iterator(chunk_size=editing.BATCH)
    )
    editing.undo_edits(
        records,
        bulk.actor,
        message=(
            f"undo of the triage review's decisions (bulk action {bulk.undo_of_id})"
            if bulk.params.get("what") == "triage"
            else f"undo of bulk action {bulk.undo_of_id}"
        ),
        on_batch=_progress(bulk, keep=False),
    )
    BulkChange.objects.filter(action_id=bulk.undo_of_id).delete()


def _progress(bulk: BulkAction, keep: bool):
    """After each batch: the undo records (for an action) and the counts on the row."""
    listed = 0

    def on_batch(report: editing.BulkReport, applied: list[editing.Applied]) -> None:
        nonlocal listed
        with transaction.atomic():
            if keep:
                keep_for_undo(bulk, applied)
            new_skips = report.skipped[listed:]
            listed = len(report.skipped)
            values = {
                "processed": report.changed + report.unchanged + listed,
                "changed": report.changed,
                "unchanged": report.unchanged,
            }
            kept = bulk.skipped + new_skips[: max(0, SKIPPED_KEPT - len(bulk.skipped))]
            if len(kept) != len(bulk.skipped):
                bulk.skipped = kept
                values["skipped"] = kept
            BulkAction.objects.filter(pk=bulk.pk).update(**values)

    return on_batch


def keep_for_undo(bulk: BulkAction, applied: list[editing.Applied]) -> None:
    BulkChange.objects.bulk_create(_change(bulk, a) for a in applied)


def _change(bulk: BulkAction, applied: editing.Applied) -> BulkChange:
    return BulkChange(
        action=bulk,
        task_id=applied.task_id,
        old_bytes=applied.old_bytes,
        new_sha256=applied.new_sha256,
        old_values=applied.old_values,
        old_status=applied.old_status,
        old_reason=applied.old_reason,
        new_status=applied.new_status,
        updated_at=applied.updated_at,
        deferred=applied.deferred,
    )
