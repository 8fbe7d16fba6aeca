"""Editing tasks: validated field changes written back into the task's file, then the row.

The file stays the source of truth. An edit rewrites only the frontmatter lines of the
keys that change (workqueue.writeback: order, quoting, comments and every other byte
kept), atomically (a temporary file beside the task, synced, renamed over it), then
updates the row from what was written and records one `edited` event naming the fields.

- A file whose content differs from the one imported is not written: FileChanged, with
  the difference, and nothing else happens. (Reload: `reload_from_disk`.)
- A task a worker of ours holds keeps its file until the claim ends, as an import does:
  the row shows the edit at once, the change waits in `Task.pending_edit`, and
  `apply_pending_edit` writes it when the claim ends (the importer calls it).
- A status change is a person's action (workqueue.actions, over the transitions);
  it is never written here. The file gets the matching `status` (and `close_reason` or
  `blocked_reason`). A claimed task's status is not edited; the board's Close, Block and
  Release claim end a claim on purpose (`edit_tasks(action=...)`).

Public API (the board, bulk actions in the background and the MCP server use these):
    FIELDS, STATE_ACTIONS
    validate(changes, task=None) -> dict                    EditError names each field
    edit_task(task, changes, actor, reason="", base_sha256=None, check=None) -> EditResult
    check_bulk(changes=None, action=None, reason="", add_tags=(), remove_tags=())
    edit_tasks(task_ids, actor, changes=None, action=None, reason="", add_tags=(),
               remove_tags=(), batch_size=BATCH, on_batch=None) -> BulkReport
    undo_edits(applied, actor, message="undo", ...) -> BulkReport   where nothing changed
    rewrite_tasks(task_ids, actor, transform, message) -> BulkReport  contents computed
    apply_pending_edit(task) -> None             the importer calls it as a claim ends
    apply_pending_after_release(tasks) -> None   after a person ends claims
    reload_from_disk(task) -> Task
    file_difference(task) -> str
Errors: EditError (bad values, by field), FileChanged (with .diff), Conflict (moved).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from hypervisor_site.writers import write_transaction
from workqueue import actions, taskfile
from workqueue.importer import check_columns, refresh_from_source, status_fields, task_fields
from workqueue.models import (
    BOARD_INDEX_FIELDS,
    Dependency,
    EventKind,
    Status,
    Task,
    TaskBody,
    TaskEvent,
    board_index_problem,
)
from workqueue.taskfile import TaskFileError
from workqueue.text import unified_diff as diff_lines
from workqueue.writeback import (
    Document,
    EditRefused,
    discard,
    file_identity,
    overwrite_if_unchanged,
    overwrite_spot,
    replace_if_unchanged,
    sync_files,
    write_temporary,
)

log = logging.getLogger("workqueue.editing")
# A batch whose files could not be written names this many in the log, then counts.
NAMED_UNWRITTEN = 5

# The fields a person may edit, in the order the form shows them.
FIELDS = (
    "title", "status", "priority", "project", "assignee", "complexity", "type", "tags",
    "parent", "depends_on", "body",
)  # fmt: skip
TEXT_FIELDS = ("project", "assignee", "complexity", "type")
LIST_FIELDS = ("tags", "depends_on")
# Statuses a person may set. `claimed` belongs to workers.
SETTABLE_STATUSES = (Status.QUEUED, Status.DONE, Status.BLOCKED)
# Bulk state actions: (the status they set, the statuses they apply to). Close, Block and
# Release claim may end a claim; the board's single-card buttons allow the same.
STATE_ACTIONS = {
    "close": (Status.DONE, {Status.QUEUED, Status.CLAIMED, Status.BLOCKED}),
    "block": (Status.BLOCKED, {Status.QUEUED, Status.CLAIMED}),
    "requeue": (Status.QUEUED, {Status.DONE, Status.BLOCKED}),
    "release": (Status.QUEUED, {Status.CLAIMED}),
}
# The file's own status words, by what they mean (taskfile.close_rule, importer.status_fields).
FILE_STATUS = {Status.DONE: "done", Status.BLOCKED: "blocked", Status.QUEUED: "queued"}
PARENT_LIMIT = 500
TAG_LIMIT = 200
BATCH = 500  # tasks per batch of a bulk edit: one sync, one transaction
# Columns a bulk edit never reads.
UNUSED = ("output_tail", "result", "evidence", "next_step", "worktree", "branch")
CHANGED_ON_DISK = "changed on disk since import"
MISSING = "the file is missing on disk"


class EditError(ValueError):
    """Bad input. `errors` maps each field to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in errors.items()))


class FileChanged(Exception):
    """The task's file is not the one imported (or is gone): nothing was written."""

    def __init__(self, task: Task, why: str, diff: str = ""):
        self.task, self.why, self.diff = task, why, diff
        super().__init__(f"{task.source_path}: {why}")


class Conflict(Exception):
    """The task moved meanwhile (another person, a worker) or its agent could not be ended."""


CANNOT_WRITE = "cannot write the file"  # a full disk, a read-only file: not a conflict


@dataclass
class EditResult:
    task: Task
    changed: list[str]  # the fields that changed, in FIELDS order
    written: bool  # the file was rewritten now
    deferred: bool  # a worker holds the task: the file is written when the claim ends


@dataclass
class Applied:
    """One task a bulk edit changed, with what undoing it needs."""

    task_id: int
    key: str
    path: str
    old_bytes: bytes | None  # the file before (None: no file written)
    new_sha256: str
    old_values: dict  # the row's edited columns before
    old_status: str
    old_reason: str
    new_status: str
    updated_at: object  # the row's updated_at right after the edit
    deferred: bool = False


@dataclass
class BulkReport:
    total: int = 0
    changed: int = 0
    unchanged: int = 0
    # {"task": id, "key": key, "path": path, "why": reason}: changed on disk, moved
    # meanwhile, not applicable to its status, a value its file cannot take.
    skipped: list[dict] = field(default_factory=list)

    def skip(self, task: Task, why: str) -> None:
        self.skipped.append(
            {"task": task.pk, "key": task.key, "path": task.source_path, "why": why}
        )

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
        }


# Validation -------------------------------------------------------------------


def validate(changes: dict, task: Task | None = None) -> dict:
    """Normalised values for `changes` (a form's strings or typed values).

    Raises EditError naming every bad field: a value its column cannot hold, an unknown
    field, a status a person cannot set, a task that depends on itself.
    """
    errors: dict[str, str] = {}
    clean: dict = {}
    for name, value in changes.items():
        try:
            clean[name] = _clean(name, value, task)
        except (TaskFileError, ValueError, TypeError) as exc:
            message = str(exc)
            prefix = f"{name}: "
            errors[name] = message[len(prefix) :] if message.startswith(prefix) else message
    if not errors:  # the columns the board's indexes hold together
        problem = _index_problem(task, clean)
        edited = [name for name in ("tags", *BOARD_INDEX_FIELDS) if name in clean]
        if edited and problem:
            errors[edited[0]] = problem
    if errors:
        raise EditError(errors)
    return clean


def _index_problem(task: Task | None, values: dict) -> str:
    """Why `task` (a new one when None) with `values` edited could not be indexed: the
    columns the board's indexes hold together (models.board_index_problem)."""
    row = {name: getattr(task, name, "") if task else "" for name in BOARD_INDEX_FIELDS}
    row.update((name, values[name]) for name in BOARD_INDEX_FIELDS if name in values)
    if "tags" in values:
        row["tag_index"] = _tag_index(values["tags"])
    return board_index_problem(row)


def _clean(name: str, value, task: Task | None):
    if name not in FIELDS:
        raise ValueError(f"not an editable field (fields: {', '.join(FIELDS)})")
    if name == "body":
        if not isinstance(value, str):
            raise TypeError("text expected")
        if "\x00" in value:
            raise ValueError("contains a NUL character")
        if len(value.encode()) > settings.HYPERVISOR_MAX_FILE_BYTES:
            raise ValueError(f"over the {settings.HYPERVISOR_MAX_FILE_BYTES:,}-byte file limit")
        return value.replace("\r\n", "\n")
    if name == "priority":
        number = taskfile.priority({"priority": value})
        check_columns({"priority": number})
        return number
    if name in LIST_FIELDS:
        items = taskfile.list_field({name: value}, name)
        for item in items:
            if len(item.splitlines()) > 1:
                raise ValueError(f"{item[:40]!r}: one line only")
        if name == "tags":
            for tag in items:
                if "|" in tag or len(tag) > TAG_LIMIT:
                    raise ValueError(f"{tag[:40]!r}: a tag is a word without '|', at most 200")
            items = list(dict.fromkeys(items))
            check_columns({"tag_index": _tag_index(items)})
        else:
            items = list(dict.fromkeys(items))
            if task is not None and task.key in items:
                raise ValueError("a task cannot depend on itself")
        check_columns({name: items})
        return items
    text = _one_line(value)
    if name == "title":
        # Something to see: a title of format characters alone (U+200F) is a blank link.
        if all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text):
            raise ValueError("a task needs a title")
        check_columns({"title": text})
    elif name == "status":
        if text not in SETTABLE_STATUSES:
            raise ValueError(f"{text!r}: choose {', '.join(SETTABLE_STATUSES)}")
    elif name == "parent":
        if len(text) > PARENT_LIMIT:
            raise ValueError(f"{len(text):,} characters, over {PARENT_LIMIT}")
        check_columns({"frontmatter": {"parent": text}})
    else:
        check_columns({name: text})
    return text


def _one_line(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str | int):
        raise TypeError("text expected")
    text = str(value).strip()
    # Every break str.splitlines() knows (U+2028, U+0085, ...): YAML breaks a line at
    # some of them too, and the file could not be written in place.
    if len(text.splitlines()) > 1:
        raise ValueError("one line only")
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    return text


def _tag_index(tags: list[str]) -> str:
    return "|" + "|".join(tags) + "|" if tags else ""


# One task ---------------------------------------------------------------------


def edit_task(
    task: Task,
    changes: dict,
    actor: str,
    reason: str = "",
    base_sha256: str | None = None,
    check: Callable[[Task], object] | None = None,
) -> EditResult:
    """Apply a person's edit of one task: the file, then the row, then one event.

    `base_sha256` is the file hash the person's form was made from: a file changed since
    (on disk or by someone else's save) is refused as FileChanged. `check(task)` is given
    the task as this edit reads it, and raises FileChanged when a field the person changed
    was changed since their form was shown (forms.TaskEditForm.changes). Raises EditError
    for bad values, FileChanged, and Conflict when the task moved meanwhile.

    Another save of the task under way as this one reads it (a person's, a bulk action's:
    its file renamed, its row not committed yet) is waited for, and this edit is planned
    again over it, once: an edit of another field then saves too.
    """
    for last in (False, True):
        task, plan = _edit_plan(task.pk, changes, reason, base_sha256, check)
        if plan is None:
            return EditResult(task, [], False, False)
        if plan.unwritable == CHANGED_ON_DISK and not last and _saved_meanwhile(task):
            continue
        if plan.unwritable in (CHANGED_ON_DISK, MISSING):
            raise FileChanged(task, plan.unwritable, plan.diff)
        if plan.unwritable:
            raise EditError({"file": plan.unwritable})
        report = BulkReport(total=1)
        _commit([plan], actor, report)
        if not report.skipped:
            break
        why = report.skipped[0]["why"]
        if why == CHANGED_ON_DISK and not last:
            continue  # saved by someone else between this read and the row's lock
        if why == CHANGED_ON_DISK:
            raise FileChanged(task, why, file_difference(task))
        if why.startswith(CANNOT_WRITE):  # reloading the task would not help
            raise EditError({"file": why})
        raise Conflict(why)
    task = Task.objects.select_related("content").get(pk=task.pk)
    changed = [name for name in FIELDS if name in plan.old or (name == "status" and plan.status)]
    return EditResult(task, changed, plan.path != "" and not plan.deferred, plan.deferred)


def _edit_plan(pk: int, changes: dict, reason: str, base_sha256: str | None, check):
    """edit_task's task as it is now, and its plan (None: nothing changes)."""
    task = Task.objects.select_related("content").get(pk=pk)
    if check is not None:
        check(task)
    values = validate(changes, task)
    if base_sha256 is not None and base_sha256 != task.source_sha256:
        raise FileChanged(task, "changed since you opened it", file_difference(task))
    status = values.pop("status", None)
    if status == task.status:
        status = None
    if status and task.status == Status.CLAIMED:
        raise EditError({"status": "a claimed task's status is not edited: release it first"})
    if status == Status.BLOCKED and not reason.strip():
        raise EditError({"reason": "say why the task is blocked"})
    return task, _plan(task, values, status, reason.strip())


def _saved_meanwhile(task: Task) -> bool:
    """Whether the task's row moved since `task` was read, once a write of it under way has
    ended (its row's lock; on SQLite the writers' turn): a save renames its file before its
    row commits, so a file newer than the row may be that save's, not an outside change."""
    with write_transaction():
        rows = Task.objects.select_for_update().filter(pk=task.pk)
        now = rows.values_list("source_sha256", flat=True).first()
    return now is not None and now != task.source_sha256


@dataclass
class _Plan:
    """One task's edit, worked out before anything is written."""

    task: Task
    values: dict  # the fields that change, new values
    old: dict  # the same fields, old values
    status: str | None  # the transition to make
    reason: str
    path: str = ""  # the file to write ("" for a task without one)
    raw: bytes = b""
    new: bytes = b""
    seen: tuple | None = None
    mode: int = 0o644
    doc: Document | None = None
    deferred: bool = False
    unwritable: str = ""  # why the file cannot be written (FileChanged)
    diff: str = ""
    temporary: str = ""
    spot: tuple[int, bytes] | None = None  # written over the file in place instead
    stat: os.stat_result | None = None
    message: str = ""  # for the transition's event and the edit event ("" for the usual)
    restore: dict | None = None  # undo of a row-only edit: the columns as they were
    extra: dict | None = None  # more row values (rewrite_tasks: a processor's result)
    new_body: str | None = None  # the body to store, when it changed


def _current(task: Task, name: str):
    if name == "body":
        return task.body.replace("\r\n", "\n")
    if name == "parent":
        return taskfile.text_field(task.frontmatter, "parent", None)
    return getattr(task, name)


def _missing(plan: _Plan) -> _Plan:
    """A task whose file is gone: a field edit has nowhere to go and is refused, but
    closing or blocking it is its row's alone (else a task whose file was deleted could
    never leave the queue but through the admin's delete)."""
    if plan.values:
        plan.unwritable = MISSING
    return plan


def _plan(task: Task, values: dict, status: str | None, reason: str) -> _Plan | None:
    changed = {n: v for n, v in values.items() if _current(task, n) != v}
    if not changed and not status:
        return None
    plan = _Plan(task, changed, {n: _current(task, n) for n in changed}, status, reason)
    if changed.keys() & {"tags", *BOARD_INDEX_FIELDS}:  # each of many tasks: its own values
        plan.unwritable = _index_problem(task, changed)
        if plan.unwritable:
            return plan
    if task.status == Status.CLAIMED and task.holder_pid is not None and not status:
        plan.deferred = True  # a worker of ours holds it: the file waits for the claim
        return plan
    if not task.source_path:
        return plan
    if task.outside_holder:
        # An outside tool's lock: it may be rewriting the file now, undoing this or undone.
        plan.unwritable = f"{task.outside_holder}; edit the task when it lets go"
        return plan
    if task.source_missing:
        return _missing(plan)  # a README left out stays as its author wrote it
    plan.path = task.source_path
    try:
        raw, stat = taskfile.read_regular_file(plan.path, settings.HYPERVISOR_MAX_FILE_BYTES)
    except FileNotFoundError:
        plan.path = ""
        return _missing(plan)
    except (OSError, TaskFileError) as exc:
        plan.unwritable = f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"
        return plan
    if hashlib.sha256(raw).hexdigest() != task.source_sha256:
        plan.unwritable = CHANGED_ON_DISK
        plan.diff = file_difference(task, raw)
        return plan
    plan.raw, plan.seen, plan.mode = raw, file_identity(stat), stat.st_mode
    try:
        # The file is the one imported (same hash): its frontmatter is the row's.
        plan.doc = Document.parse(raw, dict(task.frontmatter))
        keys = _file_keys(plan.doc, changed, status, reason)
        if keys:
            plan.doc.set_keys(keys)
        if "body" in changed:
            plan.doc.body = changed["body"].replace("\n", plan.doc.newline)
        plan.new = plan.doc.render()
    except (TaskFileError, EditRefused) as exc:
        plan.unwritable = f"cannot edit the file in place: {exc}"
    return plan


def _file_keys(doc: Document, changed: dict, status: str | None, reason: str) -> dict:
    fm = doc.frontmatter
    keys: dict = {}
    for name, value in changed.items():
        if name == "body":
            continue
        if name == "priority":
            keys[name] = _priority_like(fm.get("priority"), value)
        elif name == "title" or value or name in fm:
            # An emptied field loses its key; a list keeps an empty `[]` where it was.
            keys[name] = value if value or name in LIST_FIELDS else None
    if status:
        keys.update(_status_keys(fm, status, reason))
    return keys


def _priority_like(old, number: int):
    """`P1` stays in P-notation; anything else becomes a plain number."""
    if isinstance(old, str) and len(old.strip()) == 2 and old.strip()[0] in "pP":
        return f"{old.strip()[0]}{number}" if 0 <= number <= 9 else number
    return number


def _status_keys(fm: dict, status: str, reason: str) -> dict:
    current = taskfile.text_field(fm, "status").lower()
    closes = taskfile.close_rule(fm, "") is not None
    keys: dict = {}
    if status == Status.DONE:
        if taskfile.status_meaning(current) != "closed":  # `completed`, `wontfix` say it
            keys["status"] = FILE_STATUS[status]
        if reason:
            keys["close_reason"] = reason
        keys["blocked_reason"] = None
    elif status == Status.BLOCKED:
        keys["status"] = FILE_STATUS[status]
        keys["blocked_reason"] = reason
        keys["close_reason"] = None
    else:
        if closes or current in ("blocked", "in_progress", "in-progress", "claimed"):
            keys["status"] = FILE_STATUS[status]
        keys["close_reason"] = None
        keys["blocked_reason"] = None
    return {k: v for k, v in keys.items() if v is not None or k in fm}


def _write_temporaries(plans: list[_Plan], skip: Callable[[Task, str], None]) -> list[_Plan]:
    """Each plan's new file in a temporary beside it, on disk before any is renamed: one
    sync for a batch, a lone file its own fsync (a syncfs waits on every writer of the
    filesystem). Returns the plans to go on with (row-only ones too); `skip` hears why of
    the others, whose temporaries are gone."""
    files = [p for p in plans if p.doc is not None]
    lone = len(files) == 1
    for plan in files:
        try:
            plan.temporary = write_temporary(plan.path, plan.new, plan.mode, sync=lone)
        except OSError as exc:
            skip(plan.task, f"{CANNOT_WRITE}: {exc.strerror or exc}")
    live = [p for p in plans if p.doc is None or p.temporary]
    try:
        sync_files([] if lone else [p.temporary for p in live if p.temporary])
    except OSError as exc:
        for plan in live:
            if plan.temporary:
                discard(plan.temporary)
                skip(plan.task, f"{CANNOT_WRITE}: {exc.strerror or exc}")
        live = [p for p in live if not p.temporary]
    return live


def _commit(plans: list[_Plan], actor: str, report: BulkReport) -> list[Applied]:
    """Write a batch: temporaries and one sync, then in one transaction (the rows locked,
    so two saves of one task take turns) the transitions, renames, rows and events."""
    now = timezone.now()
    live = _write_temporaries(plans, report.skip)
    try:
        applied = _commit_live(live, actor, report, now)
    finally:
        # A database error before a rename left its temporary: none is left behind.
        for plan in live:
            if plan.temporary:
                discard(plan.temporary)
    # An edit kept for a claim's end that ended meanwhile: its worker looked for waiting
    # edits before this one was recorded, and nothing else would write it.
    apply_pending_after_release(p.task for p in live if p.deferred)
    return applied


def _commit_live(live: list[_Plan], actor: str, report: BulkReport, now) -> list[Applied]:
    applied, updates, events = [], [], []
    with transaction.atomic():
        locked = Task.objects.select_for_update().filter(pk__in=[p.task.pk for p in live])
        rows, held = {}, set()
        for pk, sha256, status, pid in locked.values_list(
            "pk", "source_sha256", "status", "holder_pid"
        ):
            rows[pk] = sha256
            if status == Status.CLAIMED and pid is not None:
                held.add(pk)
        for plan in live:
            if plan.task.pk in held and plan.temporary and not plan.status:
                _defer(plan)
        unchanged = [p for p in live if rows.get(p.task.pk) == p.task.source_sha256]
        left_alone = _transitions([p for p in unchanged if p.status], actor)
        for plan in live:
            why = _write(plan, rows.get(plan.task.pk), left_alone)
            if why:
                report.skip(plan.task, why)
                continue
            done, values = _record(plan, actor, now)
            applied.append(done)
            updates.append((plan.task.pk, values))
            if plan.values or plan.extra:
                # A state change's own event says what happened; a field edit gets one.
                events.append(_edit_event(plan, actor, now))
        _save_rows(updates)
        _save_bodies([p for p in live if p.new_body is not None])
        TaskEvent.objects.record(events)
    report.changed += len(applied)
    return applied


def _defer(plan: _Plan) -> None:
    """A worker of ours claimed the task after its edit was planned: the file is its
    worker's until the claim ends, and gets the edit then, as an edit made while claimed."""
    discard(plan.temporary)
    plan.temporary, plan.doc, plan.path, plan.deferred = "", None, "", True


def _write(plan: _Plan, sha256: str | None, left_alone: dict[int, str]) -> str:
    """Rename one task's file after its transition; the reason it was skipped, or ""."""
    if sha256 != plan.task.source_sha256:
        why = CHANGED_ON_DISK if sha256 is not None else "no such task"
    elif plan.status and plan.task.pk in left_alone:
        why = left_alone[plan.task.pk]
    elif not plan.temporary:
        return ""
    else:
        try:
            plan.stat = replace_if_unchanged(plan.temporary, plan.path, plan.seen)
        except OSError as exc:
            return f"{CANNOT_WRITE}: {exc.strerror or exc}"
        finally:  # renamed, or removed by replace_if_unchanged: nothing left to discard
            plan.temporary = ""
        return "" if plan.stat is not None else CHANGED_ON_DISK
    if plan.temporary:
        discard(plan.temporary)
    return why


def _transitions(plans: list[_Plan], actor: str) -> dict[int, str]:
    """The batch's state changes, as a person's actions (workqueue.actions, over the
    transitions; never an update of ours): one per kind of change, each over every task
    that has it. Returns, per task left as it was, why."""
    groups: dict[tuple, list[_Plan]] = {}
    for plan in plans:
        if plan.status == Status.QUEUED:
            what = ("back_to_queue", "", plan.message or "requeued from the board")
        elif plan.status == Status.BLOCKED:
            what = ("block", plan.reason, "")
        else:
            what = ("done", plan.reason or plan.message, "")
        groups.setdefault(what, []).append(plan)
    left_alone: dict[int, str] = {}
    for (action, reason, message), group in groups.items():
        outcome = actions.act([p.task for p in group], action, actor, reason, message)
        changed = set(outcome.changed)
        for plan in group:
            if plan.task.pk not in changed:
                why = outcome.refused.get(plan.task.pk, "moved meanwhile; nothing done")
                plan.unwritable = why
                left_alone[plan.task.pk] = why
    return left_alone


# The edited columns, saved for undo and restored by it.
ROW_COLUMNS = (
    "title", "priority", "project", "assignee", "type", "complexity", "tags", "tag_index",
    "depends_on", "has_dependencies", "frontmatter", "source_size", "source_mtime_ns",
    "source_sha256", "pending_edit", "change_pending",
)  # fmt: skip


def _row_values(task: Task, with_body: bool) -> dict:
    values = {name: getattr(task, name) for name in ROW_COLUMNS}
    if with_body:
        values["body"] = task.body
    return values


def _record(plan: _Plan, actor: str, now) -> tuple[Applied, dict]:
    """What undoing the edit needs, and the row's new values (its body and dependencies
    are written here: few edits change them)."""
    task = plan.task
    # The body is kept for undo only where undo cannot take it from the old file.
    before = _row_values(task, plan.doc is None or "body" in plan.values)
    body = None
    if plan.doc is not None:
        parsed = taskfile.TaskFile(plan.doc.frontmatter, plan.doc.body)
        # The file's name is only the title of last resort.
        named = None if plan.doc.frontmatter.get("title") else Path(plan.path)
        fields = task_fields(parsed, named)
        values = {name: fields[name] for name in FILE_COLUMNS[:8]}
        values.update(
            frontmatter=fields["frontmatter"],
            source_size=plan.stat.st_size,
            source_mtime_ns=plan.stat.st_mtime_ns,
            source_sha256=hashlib.sha256(plan.new).hexdigest(),
            source_missing=False,
        )
        if "body" in plan.values:
            body = fields["body"]
        deps = fields["depends_on"]
    elif plan.restore is not None:
        values = dict(plan.restore)
        body, deps = values.pop("body", None), values.get("depends_on")
    else:
        values = {n: v for n, v in plan.values.items() if n not in ("body", "parent")}
        frontmatter = dict(task.frontmatter)
        for name, value in plan.values.items():
            if name != "body":
                frontmatter[name] = value
        values["frontmatter"] = frontmatter
        if "tags" in values:
            values["tag_index"] = _tag_index(values["tags"])
        body = plan.values.get("body")
        deps = values.pop("depends_on", None)
        if plan.deferred:
            pending = dict(task.pending_edit.get("changes", {}))
            pending.update(plan.values)
            # What the file said when each field was first edited: a field the file
            # changes meanwhile is the file's (apply_pending_edit).
            was = {**plan.old, **task.pending_edit.get("was", {})}
            values["pending_edit"] = {"changes": pending, "was": was, "actor": actor}
            values["change_pending"] = True
    if deps is not None and deps != task.depends_on:
        values["depends_on"], values["has_dependencies"] = deps, bool(deps)
        Dependency.objects.filter(task=task).delete()
        Dependency.objects.bulk_create([Dependency(task=task, key=k) for k in deps])
    if body is not None and body != task.body:
        plan.new_body = body  # stored with the batch's (_save_bodies)
    values.update(plan.extra or {})
    values["updated_at"] = now
    applied = Applied(
        task_id=task.pk,
        key=task.key,
        path=plan.path if plan.doc is not None else "",
        old_bytes=plan.raw if plan.doc is not None else None,
        new_sha256=values.get("source_sha256", task.source_sha256),
        old_values=before,
        old_status=task.status,
        old_reason=task.reason,
        new_status=plan.status or task.status,
        updated_at=now,
        deferred=plan.deferred,
    )
    return applied, values


# What a written file sets on its row: the first eight come from the file's fields.
FILE_COLUMNS = (
    "title", "priority", "project", "assignee", "type", "complexity", "tags", "tag_index",
    "frontmatter", "source_size", "source_mtime_ns", "source_sha256", "source_missing",
    "updated_at",
)  # fmt: skip


def _save_rows(updates: list[tuple[int, dict]]) -> None:
    """Each row's new values; rows that set the same columns share one statement, run
    once per row (an ORM update compiles its SQL again for every row)."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for pk, values in updates:
        groups.setdefault(tuple(values), []).append((pk, values))
    quote = connection.ops.quote_name
    for columns, rows in groups.items():
        fields = [Task._meta.get_field(c) for c in columns]
        assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields)
        # Only quoted names from the model are formatted in; every value is a parameter.
        sql = f"UPDATE {quote(Task._meta.db_table)} SET {assignments} WHERE id = %s"  # noqa: S608
        params = [
            [f.get_db_prep_save(values[f.name], connection) for f in fields] + [pk]
            for pk, values in rows
        ]
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)


def _save_bodies(plans: list[_Plan]) -> None:
    """The batch's new bodies in one statement (a triage of thousands changes each)."""
    TaskBody.objects.bulk_create(
        [TaskBody(task_id=p.task.pk, text=p.new_body) for p in plans],
        update_conflicts=True,
        unique_fields=["task"],
        update_fields=["text"],
    )


def _edit_event(plan: _Plan, actor: str, now) -> tuple:
    data = {"fields": _event_fields(plan), "deferred": plan.deferred}
    return (plan.task.pk, now, EventKind.EDITED, actor, plan.task.fence, _edit_message(plan), data)


def _edit_message(plan: _Plan) -> str:
    names = ", ".join(n for n in FIELDS if n in plan.values)
    if plan.message:
        return f"{plan.message}: {names}"
    if plan.deferred:
        return f"edited {names} (the file is written when the claim ends)"
    return f"edited {names}"


def _event_fields(plan: _Plan) -> dict:
    # The body can be long: the event says that it changed, not what it became.
    return {
        name: {"from": plan.old[name], "to": value} if name != "body" else {"changed": True}
        for name, value in plan.values.items()
    }


# Many tasks -------------------------------------------------------------------


def edit_tasks(
    task_ids: Iterable[int],
    actor: str,
    changes: dict | None = None,
    action: str | None = None,
    reason: str = "",
    add_tags: Iterable[str] = (),
    remove_tags: Iterable[str] = (),
    batch_size: int = BATCH,
    on_batch: Callable[[BulkReport, list[Applied]], None] | None = None,
    seen: dict[int, str] | None = None,
) -> BulkReport:
    """The same edit (or one state action of STATE_ACTIONS) over many tasks, in batches.

    `seen` maps tasks to the state a person's page showed them in (Task.seen_as): a state
    action leaves a task that moved since alone (a worker took it: its run is not ended).

    Each batch writes its files together (temporaries, one sync, renames) and its rows in
    one transaction. A task whose file changed on disk, that moved meanwhile, or that the
    action does not apply to is skipped and listed in the report; the others go on.
    `on_batch(report, applied)` runs after every batch (progress, undo records).
    Raises EditError for bad values before anything is written.
    """
    values, add, remove = check_bulk(changes, action, reason, add_tags, remove_tags)
    status, applies_to = STATE_ACTIONS[action] if action else (None, None)
    ids = list(dict.fromkeys(int(i) for i in task_ids))
    report = BulkReport(total=len(ids))
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        tasks = Task.objects.filter(pk__in=chunk).defer(*UNUSED).order_by("id")
        plans = []
        for task in tasks:
            moved = task.moved_since(seen.get(task.pk, "")) if seen and action else ""
            if moved:
                report.skip(task, moved)
                continue
            if applies_to is not None and task.status not in applies_to:
                report.skip(task, f"is {task.status}")
                continue
            wanted = dict(values)
            if add or remove:
                wanted["tags"] = [t for t in dict.fromkeys([*task.tags, *add]) if t not in remove]
            if "depends_on" in wanted and task.key in wanted["depends_on"]:
                report.skip(task, "depends_on: a task cannot depend on itself")
                continue
            plan = _plan(task, wanted, status, reason.strip())
            if plan is None:
                report.unchanged += 1
            elif plan.unwritable:
                report.skip(task, plan.unwritable)
            else:
                plans.append(plan)
        missing = len(chunk) - len(tasks)
        if missing:
            found = {t.pk for t in tasks}
            report.skipped.extend(
                {"task": i, "key": "", "path": "", "why": "no such task"}
                for i in chunk
                if i not in found
            )
        applied = _commit(plans, actor, report)
        apply_pending_after_release(p.task for p in plans if p.status)
        if on_batch is not None:
            on_batch(report, applied)
    return report


def check_bulk(
    changes: dict | None = None,
    action: str | None = None,
    reason: str = "",
    add_tags: Iterable[str] = (),
    remove_tags: Iterable[str] = (),
) -> tuple[dict, list[str], list[str]]:
    """Validate a bulk edit before anything is written: (values, tags to add, to remove).

    Raises EditError naming the field: a bad value, a status (bulk state changes are
    actions), an unknown action, a block without a reason.
    """
    changes = dict(changes or {})
    if "status" in changes:
        raise EditError({"status": "use an action (close, block, requeue, release)"})
    values = validate(changes)
    add = validate({"tags": list(add_tags)})["tags"] if add_tags else []
    remove = validate({"tags": list(remove_tags)})["tags"] if remove_tags else []
    if action is not None:
        if action not in STATE_ACTIONS:
            raise EditError({"action": f"{action!r}: choose {', '.join(STATE_ACTIONS)}"})
        if action == "block" and not reason.strip():
            raise EditError({"reason": "say why the tasks are blocked"})
    return values, add, remove


def apply_pending_after_release(tasks: Iterable[Task]) -> None:
    """A claim the board ended may leave edits (or a file change) waiting: apply them now.

    `tasks` as they were before the release: only those that were claimed are looked at.
    """
    from workqueue.importer import refresh_from_source

    ids = [t.pk for t in tasks if t.status == Status.CLAIMED]
    if ids:
        for task in Task.objects.filter(pk__in=ids, change_pending=True).exclude(
            status=Status.CLAIMED
        ):
            refresh_from_source(task)


def undo_edits(
    records: Iterable[Applied],
    actor: str,
    message: str = "undo",
    batch_size: int = BATCH,
    on_batch: Callable[[BulkReport, list[Applied]], None] | None = None,
) -> BulkReport:
    """Put back what a bulk edit changed: each file's bytes, its row, its status.

    Only where nothing changed since (the row's updated_at and status, the file's hash
    are what the edit left); the others are skipped and listed. A claim the edit ended
    is not taken again: that task goes back to the queue.
    """
    records = list(records)
    report = BulkReport(total=len(records))
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        tasks = Task.objects.defer(*UNUSED).in_bulk([r.task_id for r in chunk])
        plans = []
        for record in chunk:
            task = tasks.get(record.task_id)
            if task is None:
                report.skipped.append(
                    {"task": record.task_id, "key": "", "path": "", "why": "no such task"}
                )
                continue
            plan = _undo_plan(task, record, message)
            if isinstance(plan, str):
                report.skip(task, plan)
            elif plan is None:
                report.unchanged += 1
            else:
                plans.append(plan)
        applied = _commit(plans, actor, report)
        if on_batch is not None:
            on_batch(report, applied)
    return report


UNDONE_FIELDS = tuple(n for n in FIELDS if n not in ("status", "body"))


def _undo_plan(task: Task, record: Applied, message: str) -> _Plan | str | None:
    if task.updated_at != record.updated_at or task.status != record.new_status:
        return "changed since"
    old = record.old_values
    before = {
        n: taskfile.text_field(old["frontmatter"], "parent", None) if n == "parent" else old[n]
        for n in UNDONE_FIELDS
    }
    if "body" in old:  # kept only when the edit changed it, or for a task without a file
        before["body"] = old["body"].replace("\r\n", "\n")
    values = {n: v for n, v in before.items() if _current(task, n) != v}
    status = record.old_status if record.old_status != record.new_status else None
    if status == Status.CLAIMED:
        status = Status.QUEUED
    extra = old.get("extra")  # a rewrite's more row values (a triage review's result)
    if not values and not status and record.old_bytes is None and not extra:
        return None
    plan = _Plan(task, values, {n: _current(task, n) for n in values}, status, record.old_reason)
    plan.message = message
    plan.extra = extra
    if record.old_bytes is None:
        plan.restore = {n: old[n] for n in ROW_COLUMNS if not n.startswith("source_")}
        plan.restore["body"] = old.get("body", task.body)
        return plan
    plan.path = task.source_path
    try:
        raw, stat = taskfile.read_regular_file(plan.path, settings.HYPERVISOR_MAX_FILE_BYTES)
    except FileNotFoundError:
        return MISSING
    except (OSError, TaskFileError) as exc:
        return f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"
    if hashlib.sha256(raw).hexdigest() != record.new_sha256:
        return CHANGED_ON_DISK
    plan.raw, plan.seen, plan.mode = raw, file_identity(stat), stat.st_mode
    plan.new = bytes(record.old_bytes)
    try:
        plan.doc = Document.parse(plan.new)
    except TaskFileError as exc:
        return f"cannot read the old file: {exc}"
    return plan


class Skip(Exception):
    """Raised by a rewrite_tasks transform: leave this task alone, for this reason."""


def rewrite_tasks(
    task_ids: Iterable[int],
    actor: str,
    transform: Callable[[Task, bytes], tuple[bytes, dict]],
    message: str,
    batch_size: int = BATCH,
    on_batch: Callable[[BulkReport, list[Applied]], None] | None = None,
) -> BulkReport:
    """Write new file contents that `transform(task, raw)` computes (the triage rules,
    say), with an edit's batch writing, refusals and row update.

    `transform` gets each task and its file's bytes (the file checked unchanged since
    import) and returns the new bytes and more row values (not state: an outcome, a
    result); it raises Skip to leave a task alone. Each task changed gets one `edited`
    event saying `message` and the fields that changed.
    """
    ids = list(dict.fromkeys(int(i) for i in task_ids))
    report = BulkReport(total=len(ids))
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        plans = []
        tasks = Task.objects.filter(pk__in=chunk).defer(*UNUSED).select_related("content")
        for task in tasks.order_by("id"):
            plan = _rewrite_plan(task, transform, message)
            if isinstance(plan, str):
                report.skip(task, plan)
            else:
                plans.append(plan)
        applied = _commit(plans, actor, report)
        if on_batch is not None:
            on_batch(report, applied)
    return report


def _rewrite_plan(task: Task, transform, message: str) -> _Plan | str:
    plan = _Plan(task, {}, {}, None, "", message=message)
    if not task.source_path:
        return "no task file"
    try:
        raw, stat = taskfile.read_regular_file(
            task.source_path, settings.HYPERVISOR_MAX_FILE_BYTES
        )
    except FileNotFoundError:
        return MISSING
    except (OSError, TaskFileError) as exc:
        return f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"
    if hashlib.sha256(raw).hexdigest() != task.source_sha256:
        return CHANGED_ON_DISK
    try:
        new, plan.extra = transform(task, raw)
    except Skip as exc:
        return str(exc)
    if new == raw:
        return plan  # nothing to write: the row values only
    try:
        plan.doc = Document.parse(new)
    except TaskFileError as exc:
        return f"the new file would not load: {exc}"
    plan.path, plan.raw, plan.new = task.source_path, raw, new
    plan.seen, plan.mode = file_identity(stat), stat.st_mode
    try:
        before = task_fields(taskfile.TaskFile(task.frontmatter, ""), None)
        after = task_fields(taskfile.TaskFile(plan.doc.frontmatter, ""), None)
    except TaskFileError as exc:  # a value its column or the board's indexes cannot hold
        return f"the new file would not load: {exc}"
    for name in ("title", "priority", "project", "assignee", "complexity", "type", "tags"):
        if before[name] != after[name]:
            plan.values[name], plan.old[name] = after[name], before[name]
    if plan.doc.body != Document.parse(raw, dict(task.frontmatter)).body:
        plan.values["body"], plan.old["body"] = plan.doc.body, ""
    return plan


# Claims ending, reloads, differences ------------------------------------------


FILE_REASON_CHARS = 500  # a blocked reason's first line, in the file: the row keeps it whole


def write_finished_status(task_ids: Iterable[int], actor: str, quiet: bool = False) -> None:
    """Write into each task's file the state its finish gave it: `status: done`, or
    `status: blocked` with `blocked_reason` (the folder, outside scripts and an import into
    a new database then say what the board says).

    Nothing is written where the file already means that state (an agent's own `status:
    completed`). A file the agent changed during its run is taken in first, as an import
    would take it (its edit kept), and the status written over it. A file that is gone, not
    a regular file, or cannot be written is left alone: the finish stands, and an event on
    the task says why (unless `quiet`: a retry whose first failure already said so). A
    batch's files take one sync, as an edit's do.
    """
    finished = Task.objects.filter(
        pk__in=list(task_ids), status__in=(Status.DONE, Status.BLOCKED)
    ).exclude(source_path="")
    # Rows as named tuples, not models: a batch is hundreds of tasks, and making a model
    # of each was a twentieth of a no-op worker's time. Only a changed file needs its model.
    columns = ("pk", "fence", "status", "reason", "frontmatter")
    columns += ("source_path", "source_sha256", "source_missing")
    plans, notes, changed = [], [], []
    for task in finished.values_list(*columns, named=True):
        plan = _finish_plan(task, notes)
        if plan == CHANGED_ON_DISK:
            changed.append(task.pk)
        elif plan is not None:
            plans.append(plan)
    # The agent edited its file: its edit is taken in first, but the run's outcome is the
    # status written.
    for task in Task.objects.filter(pk__in=changed) if changed else ():
        refresh_from_source(task, follow_status=False)
    for task in finished.filter(pk__in=changed).values_list(*columns, named=True):
        plan = _finish_plan(task, notes)
        if plan == CHANGED_ON_DISK:  # changed again meanwhile: its next import tells
            notes.append((task, CHANGED_ON_DISK))
        elif plan is not None:
            plans.append(plan)
    overtaken = _write_finish_plans(plans, notes)
    # Another save wrote the file between this finish's read and its write (an edit planned
    # before the finish, of another field): it did not write the status. Read again, once.
    for task in finished.filter(pk__in=overtaken).values_list(*columns, named=True):
        plan = _finish_plan(task, notes)
        if plan == CHANGED_ON_DISK or (plan and _write_finish_plans([plan], notes)):
            notes.append((task, CHANGED_ON_DISK))  # overtaken twice: the next import writes it
    if quiet:
        return
    # Said where the run is watched too (the worker's output, a herd worker's log), not
    # only on each task's timeline: the folder no longer tells what happened.
    for task, why in notes[:NAMED_UNWRITTEN]:
        log.warning("%s, but not written into %s: %s", task.status, task.source_path, why)
    if len(notes) > NAMED_UNWRITTEN:
        more = len(notes) - NAMED_UNWRITTEN
        log.warning("and %d more finished tasks not written into their files", more)
    now = timezone.now()
    TaskEvent.objects.record(
        [
            (
                task.pk,
                now,
                EventKind.NOTE,
                actor,
                task.fence,
                f"{task.status}, but not written into {task.source_path}: {why}",
                {"file_written": False},
            )
            for task, why in notes
        ]
    )


def _finish_plan(task, notes: list) -> _Plan | str | None:
    """The file with the task's state written, CHANGED_ON_DISK for a file that differs
    from the row, or None (nothing to write, or a note saying why not). `task` is a row of
    write_finished_status's columns."""
    if task.source_missing:  # gone, or no task now (a README left out): not written
        notes.append((task, MISSING))
        return None
    try:
        raw, stat = taskfile.read_regular_file(
            task.source_path, settings.HYPERVISOR_MAX_FILE_BYTES
        )
    except FileNotFoundError:
        notes.append((task, MISSING))
        return None
    except (OSError, TaskFileError) as exc:
        notes.append((task, f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"))
        return None
    if hashlib.sha256(raw).hexdigest() != task.source_sha256:
        return CHANGED_ON_DISK
    try:
        doc = Document.parse(raw, dict(task.frontmatter))
        if status_fields(doc.frontmatter, doc.body)["status"] == task.status:
            return None  # the file says so already, in its own words
        reason = task.reason.strip().split("\n")[0][:FILE_REASON_CHARS]
        keys = _status_keys(doc.frontmatter, task.status, "")
        if task.status == Status.BLOCKED and not reason:
            keys.pop("blocked_reason", None)
        elif task.status == Status.BLOCKED:
            keys["blocked_reason"] = reason
        doc.set_keys(keys)
    except (TaskFileError, EditRefused) as exc:
        notes.append((task, f"cannot edit the file in place: {exc}"))
        return None
    plan = _Plan(task, {}, {}, None, "", path=task.source_path, raw=raw, doc=doc)
    plan.new, plan.seen, plan.mode = doc.render(), file_identity(stat), stat.st_mode
    if stat.st_nlink == 1 and stat.st_mode & 0o222:  # else replaced whole, or refused
        plan.spot = overwrite_spot(raw, plan.new, doc.frontmatter_end(), pad=True)
    return plan


def _write_finish_plans(plans: list[_Plan], notes: list) -> list[int]:
    """Temporaries, one sync, then each renamed over its file while its row still shows
    the state and the file written from (a person may have moved it meanwhile). Returns
    the tasks whose state stands but whose file another save wrote meanwhile.

    A status word written over the old one in place (overwrite_spot) needs no temporary:
    creating and renaming files in one folder queue on the folder's lock and the
    filesystem's journal (a few thousand a second, however many write), writes in place
    do not. They are synced after, in one sync. Only a batch pads a shorter word: a lone
    finish (an agent's, whose run dwarfs any write) keeps its file free of the padding."""
    for plan in plans:
        if plan.spot and len(plans) == 1 and len(plan.new) != len(plan.raw):
            plan.spot = None
        if plan.spot:
            offset, data = plan.spot
            plan.new = plan.raw[:offset] + data + plan.raw[offset + len(data) :]
    spots = [p for p in plans if p.spot]
    plans = spots + _write_temporaries(
        [p for p in plans if not p.spot], lambda task, why: notes.append((task, why))
    )
    now = timezone.now()
    updates, in_place, overtaken = [], [], []
    try:
        with write_transaction():
            rows = Task.objects.select_for_update().filter(pk__in=[p.task.pk for p in plans])
            seen = {
                pk: (status, sha256)
                for pk, status, sha256 in rows.values_list("pk", "status", "source_sha256")
            }
            for plan in plans:
                status, sha256 = seen.get(plan.task.pk, (None, None))
                if status != plan.task.status:
                    continue  # moved meanwhile: its own change wrote the file
                if sha256 != plan.task.source_sha256:
                    overtaken.append(plan.task.pk)
                    continue
                try:
                    if plan.spot:
                        stat = overwrite_if_unchanged(plan.path, plan.seen, *plan.spot)
                    else:
                        stat = replace_if_unchanged(plan.temporary, plan.path, plan.seen)
                except OSError as exc:
                    notes.append((plan.task, f"{CANNOT_WRITE}: {exc.strerror or exc}"))
                    continue
                finally:  # renamed, or removed by replace_if_unchanged: nothing to discard
                    plan.temporary = ""
                if stat is None:
                    notes.append((plan.task, CHANGED_ON_DISK))
                    continue
                values = {
                    "frontmatter": plan.doc.frontmatter,
                    "source_size": stat.st_size,
                    "source_mtime_ns": stat.st_mtime_ns,
                    "source_sha256": hashlib.sha256(plan.new).hexdigest(),
                    "source_missing": False,
                    "updated_at": now,
                }
                updates.append((plan.task.pk, values))
                if plan.spot:
                    in_place.append(plan)
            _save_rows(updates)
    finally:
        for plan in plans:
            if plan.temporary:  # not reached: a row changed meanwhile, or the write failed
                discard(plan.temporary)
    try:
        sync_files([p.path for p in in_place])
    except OSError as exc:
        notes.extend((p.task, f"written, but not synced: {exc.strerror or exc}") for p in in_place)
    return overtaken


def apply_pending_edit(task: Task) -> None:
    """Write the edits a person made while a worker held the task, now that it is free.

    Called by the importer once the file itself has been re-read. An edit that cannot be
    written is noted on the task's timeline; the row then follows the file again.
    """
    pending = task.pending_edit or {}
    Task.objects.filter(pk=task.pk).update(pending_edit={}, change_pending=False)
    changes = pending.get("changes") or {}
    if not changes:
        return
    task = Task.objects.select_related("content").get(pk=task.pk)
    actor = pending.get("actor", "")
    try:
        values = validate(changes, task)
        if overwritten := _changed_in_the_file(task, values, pending.get("was", {})):
            values = {n: v for n, v in values.items() if n not in overwritten}
            TaskEvent.objects.create(
                task=task,
                kind=EventKind.NOTE,
                actor=actor,
                message=f"edit made while claimed not written: {'; '.join(overwritten.values())}",
                data={"changes": {n: changes[n] for n in overwritten}},
            )
        plan = _plan(task, values, None, "")
        if plan is None:
            return
        if plan.unwritable:
            raise FileChanged(task, plan.unwritable)
        report = BulkReport(total=1)
        _commit([plan], actor, report)
        if report.skipped:
            raise FileChanged(task, report.skipped[0]["why"])
    except (EditError, FileChanged) as exc:
        TaskEvent.objects.create(
            task=task,
            kind=EventKind.NOTE,
            actor=actor,
            message=f"edit made while claimed not written: {exc}",
            data={"changes": changes},
        )


def _changed_in_the_file(task: Task, values: dict, was: dict) -> dict[str, str]:
    """The fields of a waiting edit that the file changed too since (by hand, or an agent):
    the file's word stands, as over an edit from an older form. Name -> why."""
    found = {}
    for name, value in values.items():
        now = _current(task, name)
        if name not in was or now in (was[name], value):
            continue
        if name == "body":
            found[name] = "body: the file's body was changed meanwhile"
        else:
            found[name] = (
                f"{name}: the file was changed to say {now!r} meanwhile (the edit said {value!r})"
            )
    return found


def reload_from_disk(task: Task) -> Task:
    """Read the task's file again (the board's "reload" after a refused save)."""
    from workqueue.importer import refresh_from_source

    task = Task.objects.get(pk=task.pk)
    if task.source_path:
        if task.status == Status.CLAIMED and task.holder_pid is not None:
            Task.objects.filter(pk=task.pk).update(change_pending=True)
        else:
            refresh_from_source(task)
    return Task.objects.select_related("content").get(pk=task.pk)


def file_difference(task: Task, raw: bytes | None = None) -> str:
    """What changed in the task's file since it was imported, as a unified diff.

    The row keeps the imported frontmatter and body, not the bytes, so both sides are
    shown the same way: each frontmatter key on a line, then the body.
    """
    if raw is None:
        try:
            raw, _ = taskfile.read_regular_file(
                task.source_path, settings.HYPERVISOR_MAX_FILE_BYTES
            )
        except (OSError, TaskFileError) as exc:
            return f"cannot read {task.source_path}: {getattr(exc, 'strerror', None) or exc}"
    try:
        parsed = taskfile.parse(raw)
        now_lines = _canonical(parsed.frontmatter, parsed.body)
    except TaskFileError:
        now_lines = raw.decode("utf-8", "replace").splitlines(keepends=True)
    before = _canonical(task.frontmatter, task.body)
    name = Path(task.source_path).name
    diff = diff_lines(before, now_lines, f"{name} (imported)", f"{name} (on disk now)")
    if diff or hashlib.sha256(raw).hexdigest() == task.source_sha256:
        return diff
    return (
        f"{name} says the same as when it was imported, written another way (line endings, "
        "a byte-order mark, comments, quoting, spacing or the order of its keys): reload it "
        "to edit it as it is now."
    )


def _canonical(frontmatter: dict, body: str) -> list[str]:
    # Keys sorted: PostgreSQL's jsonb keeps the row's in an order of its own, not the file's.
    lines = [
        f"{k}: {json.dumps(v, ensure_ascii=False, sort_keys=True)}\n"
        for k, v in sorted(frontmatter.items())
    ]
    return ["---\n", *lines, "---\n", *body.replace("\r\n", "\n").splitlines(keepends=True)]
