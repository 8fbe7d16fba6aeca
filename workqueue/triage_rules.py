"""Triage decisions: pure functions of a task file, no database and no Django.

`decide` turns (frontmatter, body, title, has children) into a Decision; `triage_bytes`
applies it to a file's bytes and returns the new bytes (the same object when nothing
changes). The processor in workqueue.triage does the reading, checking and writing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from workqueue import taskfile
from workqueue.text import unified_diff as diff_lines
from workqueue.writeback import Document

CONTAINER_TYPES = frozenset({"epic", "project", "goal"})
HUMAN_TAGS = frozenset({"peer_review", "vote", "human-required", "needs-review"})
MECHANICAL_TITLE_WORDS = ("rename", "remove", "delete", "move", "update config")

HUMAN_SIGNS = re.compile(r"\b(?:review|vote|meeting|respond|approve|finance|policy|decide)\b")
CHOICE = re.compile(r"\b(?:decide|choose|which)\b")
CHECKLIST = re.compile(r"- \[[ x]\]")
FILE_PATH = re.compile(r"[/\\][\w.-]*\.(?:py|ts|js|md|yaml|json)\b")
FIX = re.compile(r"\bfix\b")


def then(first: str, *later: str) -> str:
    """A word, and one of `later` after it on the same line. Only a line's first `first` is
    tried (an atomic group): `first.*later` tried every one, and a line of "implement "
    repeated took a minute at 320 kB."""
    return rf"^(?>[^\n]*?\b{first}\b)[^\n]*\b(?:{'|'.join(later)})\b"


HUMAN_WORK = re.compile(
    "|".join(
        (
            r"\breview\b|\bmeeting\b|\bdecision\b|\bapprove\b|\bfinance\b|\breceipt\b",
            r"\bpeer.?review\b",
            then("respond", "email", "to"),
            then("design", "decision", "choice"),
        )
    ),
    re.MULTILINE,
)
HUMAN_PHRASES = ("requires human", "underspecified", "needs clarification")
BOT_WORK = re.compile(
    "|".join(
        (
            r"\brefactor\b",
            then("implement", "function", "method", "class", "script"),
            then("fix", "bug", "error", "issue"),
            then("test", "coverage", "unit", "integration"),
            then("update", "config", "schema", "spec"),
            then("add", "field", "parameter", "option"),
        )
    ),
    re.MULTILINE,
)
H1 = re.compile(r"^# ", re.MULTILINE)


@dataclass(frozen=True)
class Rules:
    """The two assignees and the project links: a queue's settings (Queue)."""

    human: str = "nic"
    bot: str = "bot"
    project_links: tuple[tuple[str, str], ...] = ()

    def names(self) -> frozenset[str]:
        """Triage's own assignees, casefolded: the names it may move a task between."""
        return frozenset({self.human.casefold(), self.bot.casefold()})

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
    existing = taskfile.text_field(fm, "assignee")
    # A person's name stays: triage moves work only between its own two names (a task
    # given to the bot that needs a human goes to the human).
    if existing and existing.casefold() not in rules.names():
        return existing
    if complexity == "blocked-human":
        return rules.human
    if complexity == "mechanical":
        return rules.bot
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
    closed = taskfile.close_rule(fm, body)
    if closed:
        decision = Decision(action="close", close_reason=closed[0])
        if taskfile.text_field(fm, "status").lower() not in taskfile.CLOSED_STATUSES:
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


def decide_for(
    fm: dict, body: str, stem: str, has_children: Callable[[str], bool], rules: Rules
) -> Decision:
    """The decision for a task file's frontmatter and body (`stem`: its file's name)."""
    title = taskfile.text_field(fm, "title", 500) or stem
    task_id = taskfile.text_field(fm, "id", 500)
    kind = taskfile.text_field(fm, "type").lower()
    children = kind in CONTAINER_TYPES and bool(has_children(task_id))
    return decide(fm, body, title, children, rules)


def applied(fm: dict, body: str, decision: Decision, newline: str) -> tuple[dict, str]:
    """The frontmatter and body that `decision` leaves, as triage_bytes writes them."""
    if decision.link:
        body = insert_link(body, decision.link, newline)
    return {**fm, **decision.set_keys}, body


def triage_bytes(
    raw: bytes,
    stem: str,
    has_children: Callable[[str], bool],
    rules: Rules,
    known: dict | None = None,
) -> tuple[bytes, Decision, Document]:
    """Decide and apply: the new file content (== raw when nothing changes).

    `has_children` is a callable taking the task id, asked only when the answer matters.
    `known`: the frontmatter already loaded from these bytes (see Document.parse).
    """
    doc = Document.parse(raw, known)
    decision = decide_for(doc.frontmatter, doc.body, stem, has_children, rules)
    if decision.set_keys:
        doc.set_keys(decision.set_keys)
    if decision.link:
        doc.body = insert_link(doc.body, decision.link, doc.newline)
    new = doc.render() if (decision.set_keys or decision.link) else raw
    return new, decision, doc


def unified_diff(path: str, old: bytes, new: bytes) -> str:
    return diff_lines(
        old.decode("utf-8", "replace").splitlines(keepends=True),
        new.decode("utf-8", "replace").splitlines(keepends=True),
        f"a/{Path(path).name}",
        f"b/{Path(path).name}",
    )
