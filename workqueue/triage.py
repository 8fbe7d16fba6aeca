"""The built-in `triage` processor: close, classify, assign and link markdown tasks.

The decisions are pure functions of (frontmatter, body, title, has children); the
processor around them reads each file once, refuses files that changed since the claim,
and writes back only the lines that change (see workqueue.writeback).
"""

from __future__ import annotations

import difflib
import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from workqueue import taskfile
from workqueue.claims import Claim, Result
from workqueue.models import Queue, Status, Task
from workqueue.processors import Processor, WorkContext
from workqueue.taskfile import TaskFileError
from workqueue.writeback import Document, EditRefused, atomic_write

CONTAINER_TYPES = frozenset({"epic", "project", "goal"})
HUMAN_TAGS = frozenset({"peer_review", "vote", "human-required", "needs-review"})
MECHANICAL_TITLE_WORDS = ("rename", "remove", "delete", "move", "update config")
STAMP_KEYS = ("claimed_by", "herd", "claimed_at")

CLOSE_SECTION = re.compile(r"## close reason|## closed")
HUMAN_SIGNS = re.compile(r"\b(?:review|vote|meeting|respond|approve|finance|policy|decide)\b")
CHOICE = re.compile(r"\b(?:decide|choose|which)\b")
CHECKLIST = re.compile(r"- \[[ x]\]")
FILE_PATH = re.compile(r"[/\\][\w.-]*\.(?:py|ts|js|md|yaml|json)\b")
FIX = re.compile(r"\bfix\b")
HUMAN_WORK = re.compile(
    r"\breview\b|\brespond\b.*\b(?:email|to)\b|\bmeeting\b|\bdecision\b"
    r"|\bdesign\b.*\b(?:decision|choice)\b|\bapprove\b|\bfinance\b|\breceipt\b"
    r"|\bpeer.?review\b"
)
HUMAN_PHRASES = ("requires human", "underspecified", "needs clarification")
BOT_WORK = re.compile(
    r"\bimplement\b.*\b(?:function|method|class|script)\b|\bfix\b.*\b(?:bug|error|issue)\b"
    r"|\btest\b.*\b(?:coverage|unit|integration)\b|\brefactor\b"
    r"|\bupdate\b.*\b(?:config|schema|spec)\b|\badd\b.*\b(?:field|parameter|option)\b"
)
H1 = re.compile(r"^# ", re.MULTILINE)


@dataclass(frozen=True)
class Rules:
    """What the rules need from settings: the two assignees and the project links."""

    human: str = "nic"
    bot: str = "bot"
    project_links: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls) -> Rules:
        links = getattr(settings, "HYPERVISOR_PROJECT_LINKS", {}) or {}
        return cls(
            human=settings.HYPERVISOR_HUMAN_ASSIGNEE,
            bot=settings.HYPERVISOR_BOT_ASSIGNEE,
            project_links=tuple((k.lower(), v) for k, v in links.items()),
        )

    def project_link(self, project: str) -> str:
        if project.startswith("[[") and project.endswith("]]"):
            return project
        return dict(self.project_links).get(project.lower(), f"[[{project}]]")


@dataclass
class Decision:
    action: str  # "close" or "assign:<name>"
    changes: list[str] = field(default_factory=list)
    set_keys: dict[str, str] = field(default_factory=dict)  # frontmatter keys to write
    close_reason: str = ""
    complexity: str = ""
    assignee: str = ""
    link: str = ""  # the project link to insert into the body, when it is missing

    def as_data(self) -> dict:
        data = {"action": self.action, "changes": list(self.changes)}
        if self.close_reason:
            data["close_reason"] = self.close_reason
        else:
            data["complexity"] = self.complexity
            data["assignee"] = self.assignee
        data["time"] = datetime.now(UTC).isoformat(timespec="seconds")
        return data


# The decisions --------------------------------------------------------------


def close_reason(fm: dict, body: str) -> str:
    if CLOSE_SECTION.search(body.lower()):
        return "has_close_reason"
    if taskfile.text_field(fm, "status").lower() == "done":
        return "status_done"
    if fm.get("close_reason"):
        return "has_close_reason_field"
    return ""


def classify(fm: dict, body: str, title: str, has_children: bool) -> str:
    """The complexity of a task that has none yet: the first rule that matches."""
    text = f"{body}\n{title}".lower()
    title_l = title.lower()
    kind = taskfile.text_field(fm, "type").lower()
    tags = {t.lower() for t in taskfile.list_field(fm, "tags")}
    container = kind in CONTAINER_TYPES
    checklist = bool(CHECKLIST.search(text))
    words = len(body.split())
    if kind == "learn" or tags & HUMAN_TAGS or HUMAN_SIGNS.search(text):
        return "blocked-human"
    if (
        (container and not has_children)
        or (container and words < 50 and not checklist)
        or (CHOICE.search(text) and not checklist)
    ):
        return "needs-decomposition"
    file_path = bool(FILE_PATH.search(text))
    if (
        any(w in title_l for w in MECHANICAL_TITLE_WORDS)
        or (checklist and file_path)
        or (FIX.search(title_l) and file_path)
    ):
        return "mechanical"
    if (container and has_children) or (
        words > 500 and ("## acceptance" in text or "acceptance criteria" in text)
    ):
        return "multi-step"
    return "requires-judgment"


def choose_assignee(fm: dict, body: str, title: str, complexity: str, rules: Rules) -> str:
    if complexity == "blocked-human":
        return rules.human
    if complexity == "mechanical":
        return rules.bot
    existing = taskfile.text_field(fm, "assignee")
    if existing:
        return existing
    text = f"{body}\n{title}".lower()
    body_l = body.lower()
    if HUMAN_WORK.search(text) or any(p in body_l for p in HUMAN_PHRASES):
        return rules.human
    tags = {t.lower() for t in taskfile.list_field(fm, "tags")}
    if "bot-assigned" in tags or BOT_WORK.search(text):
        return rules.bot
    if "## acceptance" in body_l or "- [ ]" in body_l:
        return rules.bot
    return rules.human


def missing_link(fm: dict, body: str, rules: Rules) -> str:
    """The project's wikilink when the body does not mention the project yet, else ""."""
    project = taskfile.text_field(fm, "project")
    if not project:
        return ""
    link = rules.project_link(project)
    body_l = body.lower()
    if link.lower() in body_l or f"[[{project}]]".lower() in body_l:
        return ""
    return link


def decide(fm: dict, body: str, title: str, has_children: bool, rules: Rules) -> Decision:
    reason = close_reason(fm, body)
    if reason:
        decision = Decision(action="close", close_reason=reason)
        if taskfile.text_field(fm, "status").lower() != "done":
            decision.set_keys["status"] = "done"
            decision.changes.append("status->done")
    else:
        existing = taskfile.text_field(fm, "complexity")
        complexity = existing or classify(fm, body, title, has_children)
        assignee = choose_assignee(fm, body, title, complexity, rules)
        decision = Decision(action=f"assign:{assignee}", complexity=complexity, assignee=assignee)
        if not existing:
            decision.set_keys["complexity"] = complexity
            decision.changes.append(f"complexity->{complexity}")
        if assignee != taskfile.text_field(fm, "assignee"):
            decision.set_keys["assignee"] = assignee
            decision.changes.append(f"assignee->{assignee}")
    decision.link = missing_link(fm, body, rules)
    if decision.link:
        decision.changes.append("added_wikilink")
    return decision


def insert_link(body: str, link: str, newline: str = "\n") -> str:
    """`Project: <link>` as its own paragraph after the first `# ` heading, else on top."""
    line = f"Project: {link}"
    heading = H1.search(body)
    if heading is None:
        if not body:
            return line + newline
        gap = newline if body.startswith(("\n", "\r\n")) else newline * 2
        return line + gap + body
    end = body.find("\n", heading.start())
    if end == -1:
        return body + newline + newline + line + newline
    before, after = body[: end + 1], body[end + 1 :]
    gap = "" if after.startswith(("\n", "\r\n")) or not after else newline
    return before + newline + line + newline + gap + after


def triage_bytes(
    raw: bytes, stem: str, has_children, rules: Rules
) -> tuple[bytes, Decision, Document]:
    """Decide and apply: the new file content (== raw when nothing changes).

    `has_children` is a callable taking the task id, asked only when the answer matters.
    """
    doc = Document.parse(raw)
    fm = doc.frontmatter
    title = taskfile.text_field(fm, "title", 500) or stem
    task_id = taskfile.text_field(fm, "id", 500)
    kind = taskfile.text_field(fm, "type").lower()
    children = kind in CONTAINER_TYPES and bool(has_children(task_id))
    decision = decide(fm, doc.body, title, children, rules)
    if decision.set_keys:
        doc.set_keys(decision.set_keys)
    if decision.link:
        doc.body = insert_link(doc.body, decision.link, doc.newline)
    new = doc.render() if (decision.set_keys or decision.link) else raw
    return new, decision, doc


def unified_diff(path: str, old: bytes, new: bytes) -> str:
    return "".join(
        difflib.unified_diff(
            old.decode("utf-8", "replace").splitlines(keepends=True),
            new.decode("utf-8", "replace").splitlines(keepends=True),
            fromfile=f"a/{Path(path).name}",
            tofile=f"b/{Path(path).name}",
        )
    )


# The processor ---------------------------------------------------------------


class ChildIndex:
    """Which task ids some task of the queue names as its `parent`.

    One scan of the queue per process, refreshed after `ttl` seconds: a per-task query
    would scan the queue's JSON once per container task.
    """

    def __init__(self, ttl: float = 30.0):
        self.ttl = ttl
        self.parents: dict[str, set[str]] = {}
        self.loaded: dict[str, float] = {}

    def has_children(self, queue: str, task_id: str) -> bool:
        if time.monotonic() - self.loaded.get(queue, -self.ttl - 1) > self.ttl:
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


class TriageProcessor(Processor):
    name = "triage"
    finish_in_batches = True

    def __init__(self):
        self.rules = Rules.from_settings()
        self.children = ChildIndex()
        self.held: dict[int, _Held] = {}
        self.row_updates: list[tuple[Claim, dict]] = []
        self.stamping: dict[str, bool] = {}

    def process(self, claim: Claim, context: WorkContext) -> Result:
        held = self._held(claim, context)
        try:
            return self._triage(claim, context, held)
        finally:
            self.held.pop(claim.id, None)
            # Row updates go in one transaction per batch, before the worker finishes it.
            if not self.held or context.stopping():
                self.flush()

    def _triage(self, claim: Claim, context: WorkContext, held: _Held) -> Result:
        if not claim.path:
            return Result(
                status=Status.DONE,
                outcome="skipped",
                data={"action": "skip", "changes": [], "reason": "no task file"},
            )
        try:
            with open(claim.path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            return Result(status=Status.BLOCKED, reason=f"cannot read {claim.path}: {exc}")
        if held.sha256 and hashlib.sha256(raw).hexdigest() != held.sha256:
            return Result(
                status=Status.BLOCKED,
                reason="changed on disk since claim",
                evidence=f"{claim.path}: content hash differs from the imported file",
                next_step="re-import the folder, then requeue the task",
            )
        try:
            new, decision, doc = triage_bytes(
                raw,
                Path(claim.path).stem,
                lambda task_id: self.children.has_children(claim.queue, task_id or held.key),
                self.rules,
            )
        except (TaskFileError, EditRefused) as exc:
            return Result(status=Status.BLOCKED, reason=str(exc))
        data = decision.as_data()
        outcome = "closed" if decision.action == "close" else "success"
        if context.dry_run:
            data["dry_run"] = True
            if new != raw:
                data["diff"] = unified_diff(claim.path, raw, new)
            return Result(status=Status.DONE, outcome="skipped", data=data)
        try:
            if self._stamps(claim.queue):
                self._stamp(claim, context, raw)
                stat = atomic_write(claim.path, new)
            elif new != raw:
                stat = atomic_write(claim.path, new)
            else:
                return Result(status=Status.DONE, outcome=outcome, data=data)
        except OSError as exc:
            return Result(status=Status.BLOCKED, reason=f"cannot write {claim.path}: {exc}")
        self.row_updates.append((claim, self._row_values(new, stat, decision, doc)))
        return Result(status=Status.DONE, outcome=outcome, data=data)

    def _row_values(self, new: bytes, stat, decision: Decision, doc: Document) -> dict:
        # What a re-import would compute, so that it sees the file as unchanged.
        values = {
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "source_sha256": hashlib.sha256(new).hexdigest(),
            "frontmatter": doc.frontmatter,
            "body": doc.body,
        }
        if "complexity" in decision.set_keys:
            values["complexity"] = decision.set_keys["complexity"][:100]
        if "assignee" in decision.set_keys:
            values["assignee"] = decision.set_keys["assignee"][:200]
        if decision.action == "close":
            values["closed_by"] = f"triage:{decision.close_reason}"
        return values

    def flush(self) -> None:
        """Record written files on their rows, each only while the claim is still ours."""
        if not self.row_updates:
            return
        now = timezone.now()
        with transaction.atomic():
            for claim, values in self.row_updates:
                Task.objects.filter(pk=claim.id, fence=claim.fence, status=Status.CLAIMED).update(
                    updated_at=now, **values
                )
        self.row_updates = []

    def _held(self, claim: Claim, context: WorkContext) -> _Held:
        if claim.id not in self.held:
            # One query for the whole batch: every claim of it shares this fence.
            rows = Task.objects.filter(
                status=Status.CLAIMED, holder=context.worker_name, fence=claim.fence
            ).values_list("id", "source_sha256", "key")
            self.held.update({pk: _Held(sha, key) for pk, sha, key in rows})
        return self.held.get(claim.id) or _Held(
            *Task.objects.filter(pk=claim.id).values_list("source_sha256", "key").get()
        )

    # Claim stamps: visible in the file while the worker works on the task.

    def _stamps(self, queue: str) -> bool:
        if queue not in self.stamping:
            self.stamping[queue] = Queue.objects.filter(name=queue, stamp_claims=True).exists()
        return self.stamping[queue]

    def _stamp(self, claim: Claim, context: WorkContext, raw: bytes) -> None:
        doc = Document.parse(raw)
        herd = Task.objects.filter(pk=claim.id).values_list("holder_herd", flat=True).first()
        doc.set_keys(
            {
                "claimed_by": context.worker_name,
                "herd": str(herd or ""),
                "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        atomic_write(claim.path, doc.render())
