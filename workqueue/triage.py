"""The built-in `triage` processor: close, classify, assign and link markdown tasks.

The decisions live in workqueue.triage_rules (pure functions). This processor reads each
file once, refuses a file that changed since its import (unless the change is exactly its
own decision, written by an earlier attempt that died before recording it), and writes back
only what changes (workqueue.writeback). The writes of a batch happen together when the worker
sends `tasks_processed`, just before it finishes the batch: every temporary is written,
all are synced to disk at once, then each is renamed over its file unless that file
changed meanwhile, and the rows are updated by one statement run once per file.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.dispatch import receiver
from django.utils import timezone

from workqueue import signals
from workqueue.models import Queue, Status, Task, TaskBody
from workqueue.processing import Claim, Processor, Result, WorkContext
from workqueue.taskfile import TaskFileError, read_regular_file
from workqueue.triage_rules import (
    Decision,
    Rules,
    applied,
    decide_for,
    triage_bytes,
    unified_diff,
)
from workqueue.writeback import (
    Document,
    EditRefused,
    atomic_write,
    discard,
    file_identity,
    replace_if_unchanged,
    sync_files,
    write_temporary,
)

STAMP_KEYS = ("claimed_by", "herd", "claimed_at")
CHANGED_ON_DISK = "changed on disk since claim"


def rules_for(queue: str) -> Rules:
    """Triage's names and links for a queue, from its settings (the admin edits them)."""
    row = Queue.objects.filter(name=queue).first() or Queue(name=queue)
    links = row.project_links if isinstance(row.project_links, dict) else {}
    return Rules(
        human=row.human_assignee,
        bot=row.bot_assignee,
        project_links=tuple((k.lower(), v) for k, v in links.items()),
    )


class ChildIndex:
    """Which task ids some task of the queue names as its `parent`.

    One scan of the queue per process, refreshed after `ttl` seconds: a query per task
    would read the queue's JSON once per container task.
    """

    def __init__(self, ttl: float = 30.0):
        self.ttl = ttl
        self.parents: dict[str, set[str]] = {}
        self.loaded: dict[str, float] = {}

    def has_children(self, queue: str, task_id: str) -> bool:
        if queue not in self.loaded or time.monotonic() - self.loaded[queue] > self.ttl:
            self.parents[queue] = parent_ids(queue)
            self.loaded[queue] = time.monotonic()
        return task_id in self.parents[queue]


def parent_ids(queue: str) -> set[str]:
    found: set[str] = set()
    rows = Task.objects.filter(queue=queue, frontmatter__has_key="parent").values_list(
        "frontmatter__parent", flat=True
    )
    for value in rows:
        for parent in value if isinstance(value, list) else [value]:
            name = str(parent or "").strip()
            if name.startswith("[[") and name.endswith("]]"):
                name = name[2:-2].split("|")[0].strip()
            if name:
                found.add(name)
    return found


@dataclass
class _Held:
    sha256: str
    key: str
    herd: int | None
    frontmatter: dict | None  # the row's, when it is the imported file's (no edit waits)


HELD_COLUMNS = (
    "id",
    "source_sha256",
    "key",
    "holder_herd",
    "frontmatter",
    "pending_edit",
    "change_pending",
)


def _held_row(sha256, key, herd, frontmatter, pending_edit, change_pending) -> _Held:
    # An edit or a file change waiting for the claim to end makes the row differ from the
    # file: then the file's YAML is loaded again.
    mine = not pending_edit and not change_pending
    return _Held(sha256, key, herd, frontmatter if mine else None)


@dataclass
class _Write:
    claim: Claim
    result: Result
    new: bytes
    seen: tuple[int, int, int]  # the file as read (inode, size, mtime): renamed only over it
    mode: int
    row: dict


class TriageProcessor(Processor):
    name = "triage"
    finish_in_batches = True
    cpu_bound = True
    # Its edits are temporaries, one syncfs and renames (+4-9% items/s passing the turn on).
    ends_on_disk = True
    writes_status = False
    has_dry_run = True  # each task's diff goes into its result, no file is written

    def __init__(self):
        self.rules: dict[str, Rules] = {}  # per queue, read once per worker
        self.children = ChildIndex()
        self.held: dict[int, _Held] = {}
        self.pending: list[_Write] = []
        self.adopted: list[tuple[_Write, os.stat_result]] = []  # rows to record, files as they are
        self.stamping: dict[str, bool] = {}

    def _rules(self, queue: str) -> Rules:
        if queue not in self.rules:
            self.rules[queue] = rules_for(queue)
        return self.rules[queue]

    def process(self, claim: Claim, context: WorkContext) -> Result:
        held = self._held(claim, context)
        try:
            return self._triage(claim, context, held)
        except (TaskFileError, EditRefused) as exc:
            return Result(status=Status.BLOCKED, reason=str(exc))
        except OSError as exc:
            why = exc.strerror or exc
            return Result(status=Status.BLOCKED, reason=f"cannot triage {claim.path}: {why}")

    def _triage(self, claim: Claim, context: WorkContext, held: _Held) -> Result:
        if not claim.path:
            return Result(
                status=Status.DONE,
                outcome="skipped",
                data={"action": "skip", "changes": [], "reason": "no task file"},
            )
        # Not open(): a FIFO swapped in would hold the worker, a link be read through.
        try:
            raw, stat = read_regular_file(claim.path, settings.HYPERVISOR_MAX_FILE_BYTES)
        except TaskFileError as exc:
            return Result(status=Status.BLOCKED, reason=f"cannot read {claim.path}: {exc}")
        seen = file_identity(stat)
        if held.sha256 and hashlib.sha256(raw).hexdigest() != held.sha256:
            adopted = self._earlier_attempts_write(claim, context, held, raw, stat)
            if adopted is not None:
                return adopted
            unstamped = self._without_a_dead_attempts_stamp(claim, held, raw)
            if unstamped is None:
                return Result(
                    status=Status.BLOCKED,
                    reason=CHANGED_ON_DISK,
                    evidence=f"{claim.path}: its content hash differs from the imported file",
                    next_step="re-import the folder, then requeue the task",
                )
            raw = unstamped  # decided on and written from as imported: the stamp goes
        new, decision, doc = triage_bytes(
            raw,
            Path(claim.path).stem,
            lambda task_id: self.children.has_children(claim.queue, task_id or held.key),
            self._rules(claim.queue),
            # The hash matched: the row's frontmatter is this file's, loaded at its import.
            held.frontmatter if held.sha256 else None,
        )
        data = decision.as_data()
        if context.dry_run:
            data["dry_run"] = True
            if new != raw:
                data["diff"] = unified_diff(claim.path, raw, new)
            return Result(status=Status.DONE, outcome="skipped", data=data)
        result = Result(
            status=Status.DONE,
            outcome="closed" if decision.action == "close" else "success",
            data=data,
        )
        stamped = self._stamps(claim.queue)
        if stamped:
            written = self._stamp(claim, context, raw, held, seen, stat.st_mode)
            if written is None:  # saved since it was read: the save stands
                return Result(status=Status.BLOCKED, reason=CHANGED_ON_DISK)
            seen = file_identity(written)
        if new != raw or stamped:
            self.pending.append(
                _Write(claim, result, new, seen, stat.st_mode, _row_values(decision, doc))
            )
        return result

    def _earlier_attempts_write(
        self, claim: Claim, context: WorkContext, held: _Held, raw: bytes, stat: os.stat_result
    ) -> Result | None:
        """The result for a file that is the imported one with exactly this decision
        applied: an earlier attempt's write whose finish never came (its worker died
        between renaming its batch's files and recording them). The row takes the file
        as it is; anything else that changed the file is someone's edit (None)."""
        if held.frontmatter is None:
            return None  # an edit or change waited for the claim: not the import's content
        body = _imported_body(claim)
        decision = decide_for(
            held.frontmatter,
            body,
            Path(claim.path).stem,
            lambda task_id: self.children.has_children(claim.queue, task_id or held.key),
            self._rules(claim.queue),
        )
        if not (decision.set_keys or decision.link):
            return None
        doc = Document.parse(raw)
        if applied(held.frontmatter, body, decision, doc.newline) != (doc.frontmatter, doc.body):
            return None
        data = {**decision.as_data(), "written_by_an_earlier_attempt": True}
        if context.dry_run:
            return Result(status=Status.DONE, outcome="skipped", data={**data, "dry_run": True})
        result = Result(
            status=Status.DONE,
            outcome="closed" if decision.action == "close" else "success",
            data=data,
        )
        row = _row_values(decision, doc)
        self.adopted.append(
            (_Write(claim, result, raw, file_identity(stat), stat.st_mode, row), stat)
        )
        return result

    def _without_a_dead_attempts_stamp(
        self, claim: Claim, held: _Held, raw: bytes
    ) -> bytes | None:
        """The file as imported, when it is the import with an earlier attempt's claim
        stamp added (its worker died before the batch's write took the stamp out)."""
        if held.frontmatter is None or not self._stamps(claim.queue):
            return None
        if any(key in held.frontmatter for key in STAMP_KEYS):
            return None
        doc = Document.parse(raw)
        stamp = {key: None for key in STAMP_KEYS if key in doc.frontmatter}
        if not stamp:
            return None
        doc.set_keys(stamp)
        if (doc.frontmatter, doc.body) != (held.frontmatter, _imported_body(claim)):
            return None
        return doc.render()

    def write_batch(self) -> None:
        """Write every file of the batch; a file that fails turns its result to blocked."""
        adopted, self.adopted = self.adopted, []
        _record_rows(adopted)
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        temporaries = [_write_temporary(w) for w in pending]
        try:
            sync_files([t for t in temporaries if isinstance(t, str)])
        except OSError as exc:
            temporaries = [_discarded(t, exc) for t in temporaries]
        written = []
        for write, temporary in zip(pending, temporaries, strict=True):
            if isinstance(temporary, OSError):
                _block(write.result, _cannot_write(write, temporary))
                continue
            try:
                stat = replace_if_unchanged(temporary, write.claim.path, write.seen)
            except OSError as exc:
                _block(write.result, _cannot_write(write, exc))
                continue
            if stat is None:
                _block(write.result, CHANGED_ON_DISK)
                continue
            written.append((write, stat))
        _record_rows(written)

    def _held(self, claim: Claim, context: WorkContext) -> _Held:
        if claim.id not in self.held:
            # One query for the whole batch: every claim of a batch shares its fence.
            rows = Task.objects.filter(
                status=Status.CLAIMED, holder=context.worker_name, fence=claim.fence
            ).values_list(*HELD_COLUMNS)
            self.held.update((row[0], _held_row(*row[1:])) for row in rows)
        held = self.held.pop(claim.id, None)
        if held is None:
            row = Task.objects.filter(pk=claim.id).values_list(*HELD_COLUMNS)[0]
            held = _held_row(*row[1:])
        return held

    # Claim stamps: in the file from the moment the worker takes up the task until the
    # batch is written, in the same write as the decisions.

    def _stamps(self, queue: str) -> bool:
        if queue not in self.stamping:
            self.stamping[queue] = Queue.objects.filter(name=queue, stamp_claims=True).exists()
        return self.stamping[queue]

    def _stamp(
        self, claim: Claim, context: WorkContext, raw: bytes, held: _Held, seen: tuple, mode: int
    ) -> os.stat_result | None:
        doc = Document.parse(raw)
        doc.set_keys(
            {
                "claimed_by": context.worker_name,
                "herd": str(held.herd or ""),
                "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        return atomic_write(claim.path, doc.render(), seen, mode)


@receiver(signals.tasks_processed)
def write_triaged_files(sender, done, **kwargs) -> None:
    processor = getattr(sender, "processor", None)
    if isinstance(processor, TriageProcessor):
        processor.write_batch()


def _cannot_write(write: _Write, error: OSError) -> str:
    return f"cannot write {write.claim.path}: {error.strerror or error}"


def _write_temporary(write: _Write) -> str | OSError:
    try:
        return write_temporary(write.claim.path, write.new, write.mode, sync=False)
    except OSError as exc:
        return exc


def _discarded(temporary: str | OSError, error: OSError) -> OSError:
    if isinstance(temporary, str):
        discard(temporary)
    return error


def _imported_body(claim: Claim) -> str:
    """The body the row holds (read only when a file differs from its import)."""
    return TaskBody.objects.filter(task_id=claim.id).values_list("text", flat=True).first() or ""


def _block(result: Result, reason: str) -> None:
    result.status = Status.BLOCKED
    result.outcome = ""
    result.reason = reason
    result.data["written"] = False


def _row_values(decision: Decision, doc: Document) -> dict:
    # What a re-import would store, so that it finds the file unchanged.
    return {
        "frontmatter": doc.frontmatter,
        "body": doc.body,
        "complexity": decision.set_keys.get("complexity"),
        "assignee": decision.set_keys.get("assignee"),
        "closed_by": f"triage:{decision.close_reason}" if decision.close_reason else None,
    }


def _record_rows(written: list[tuple[_Write, os.stat_result]]) -> None:
    """Update the rows of written files, each only while its claim is still ours.

    One statement executed once per file: the ORM would compile an UPDATE per row.
    """
    if not written:
        return
    fields = {f: Task._meta.get_field(f) for f in ("frontmatter", "updated_at")}
    quote = connection.ops.quote_name
    task_table, body_table = quote(Task._meta.db_table), quote(TaskBody._meta.db_table)
    # The body first, while the row still shows the claim the task update checks.
    body_sql = (
        f"UPDATE {body_table} SET text = %s WHERE task_id = "  # noqa: S608 - model table names
        f"(SELECT id FROM {task_table} WHERE id = %s AND fence = %s AND status = %s)"
    )
    sql = (
        f"UPDATE {task_table} SET source_size = %s, source_mtime_ns = %s, "  # noqa: S608 - a model table name
        "source_sha256 = %s, frontmatter = %s, "
        "complexity = COALESCE(%s, complexity), assignee = COALESCE(%s, assignee), "
        "closed_by = COALESCE(%s, closed_by), updated_at = %s "
        "WHERE id = %s AND fence = %s AND status = %s"
    )
    now = fields["updated_at"].get_db_prep_save(timezone.now(), connection)
    params = [
        (
            stat.st_size,
            stat.st_mtime_ns,
            hashlib.sha256(write.new).hexdigest(),
            fields["frontmatter"].get_db_prep_save(write.row["frontmatter"], connection),
            write.row["complexity"],
            write.row["assignee"],
            write.row["closed_by"],
            now,
            write.claim.id,
            write.claim.fence,
            Status.CLAIMED.value,
        )
        for write, stat in written
    ]
    bodies = [
        (
            write.row["body"],
            write.claim.id,
            write.claim.fence,
            Status.CLAIMED.value,
        )
        for write, _ in written
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(body_sql, bodies)
        cursor.executemany(sql, params)
