"""Reading one markdown task file: frontmatter (YAML, safe loading only) and body."""

from __future__ import annotations

import datetime
import math
import os
import re
import stat
from dataclasses import dataclass

import yaml

from workqueue.text import ascii_number, list_items

try:
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader


class DuplicateKey(yaml.YAMLError):
    pass


class NotADate(yaml.YAMLError):
    """A value YAML reads as a date that is none (`2026-02-30`), with its key when known."""

    def __init__(self, node: yaml.Node):
        self.node, self.key = node, None

    def __str__(self) -> str:
        value = self.node.value[:80]
        if self.key is None:  # an item of a list
            return f"{value} is not a date (line {self.node.start_mark.line + 2})"
        return f"{self.key[:80]}: {value} is not a date"


class UniqueKeyLoader(SafeLoader):
    """Safe loading that refuses a key given twice in one mapping: PyYAML keeps the last
    without a word (`status: done`, then a merge's `status: queued`, read as queued).
    Frontmatter's own keys are read in any case (load_yaml), so there `status` and
    `Status` are one key given twice too."""

    def construct_document(self, node):
        self.frontmatter_node = node
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        spellings: dict[str, tuple[str, int]] = {}
        top = node is getattr(self, "frontmatter_node", None)
        for key_node, value in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key, line = key_node.value, key_node.start_mark.line + 2  # after its `---`
                if key in seen:
                    raise DuplicateKey(f"{key[:80]}: given twice (line {line})")
                seen.add(key)
                if not top:
                    continue
                if key.lower() in WRITTEN_TEXT:
                    _as_written(value)
                first, first_line = spellings.setdefault(key.lower(), (key, line))
                if first != key:
                    raise DuplicateKey(
                        f"{first[:80]} (line {first_line}) and {key[:80]} (line {line}): "
                        "one key given twice, in two spellings"
                    )
        try:
            return super().construct_mapping(node, deep)
        except NotADate as exc:
            if exc.key is None:
                keys = (k for k, v in node.value if v is exc.node)
                exc.key = next((k.value for k in keys if isinstance(k, yaml.ScalarNode)), None)
            raise

    def construct_date(self, node):
        # PyYAML's own ValueError ("month must be in 1..12") names no field and no value.
        try:
            return self.construct_yaml_timestamp(node)
        except ValueError:
            raise NotADate(node) from None


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", UniqueKeyLoader.construct_date)

# Fields whose values are text, an id or a name: `id: 007`, `title: 1.10`, `assignee: no`
# mean what they say, not YAML 1.1's 7, 1.1 and False (nor is `title: 2026-02-30` a date).
WRITTEN_TEXT = ("id", "title", "status", "project", "assignee", "type", "complexity")
WRITTEN_TEXT += ("tags", "depends_on", "parent")
PLAIN_TEXT = "tag:yaml.org,2002:str"
NOT_TEXT = ("int", "float", "bool", "timestamp")


def _as_written(node: yaml.Node) -> None:
    """Read a plain (unquoted) number, flag or date, or a list's, as its text."""
    for item in node.value if isinstance(node, yaml.SequenceNode) else [node]:
        if isinstance(item, yaml.ScalarNode) and item.tag.rpartition(":")[2] in NOT_TEXT:
            item.tag = PLAIN_TEXT


FENCE = re.compile(r"^---[ \t]*\r?\n", re.ASCII)
CLOSING = re.compile(r"^(?:---|\.\.\.)[ \t]*\r?$", re.MULTILINE)
HEADING = re.compile(r"^#[ \t]+(.+)$", re.MULTILINE)  # closing #s are cut in `title`
CLOSE_SECTION = re.compile(r"^##[ \t]+(?:Close Reason|Closed)\b", re.MULTILINE | re.IGNORECASE)
# A line git leaves around an unresolved merge conflict: seven marks, then a space and a
# label, or nothing.
CONFLICT_MARK = re.compile(r"([<=>])\1{6}(?: |$)")
CODE_FENCE = ("```", "~~~")

PRIORITY_WORDS = {
    "critical": 0,
    "urgent": 0,
    "highest": 0,
    "high": 1,
    "medium": 2,
    "normal": 2,
    "low": 3,
    "lowest": 4,
}
DEFAULT_PRIORITY = 2
# Frontmatter nesting allowed: task files use three or four levels, and the conversion
# below recurses once per level (PyYAML's parser stops at 1,000 on its own).
MAX_NESTING = 64
TOO_DEEP = f"nested more than {MAX_NESTING} levels deep"
# Python will not write an integer of more than 4,300 digits as text (nor JSON).
MAX_NUMBER_BITS = 13_288  # 4,000 digits


class TaskFileError(ValueError):
    """A file that cannot become a task; the message says why in one line."""


@dataclass
class TaskFile:
    frontmatter: dict
    body: str
    # Character offsets of the YAML text inside the file, for in-place edits.
    yaml_start: int = 0
    yaml_end: int = 0


FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


def check_regular(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise TaskFileError(f"not a regular file: {kind}, not read")
    if st.st_size > limit:
        raise TaskFileError(f"file is {st.st_size:,} bytes, over the {limit:,}-byte limit")


def read_regular_file(path, limit: int) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes, at most `limit` of them, and its stat.

    Checked with lstat before opening (opening a device can have effects of its own), then
    opened without following a symlink or blocking on a FIFO swapped in meanwhile, and
    checked again on the open descriptor, which is what is read.
    """
    check_regular(os.lstat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        check_regular(st, limit)
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:  # it grew while being read
        raise TaskFileError(f"file grew past the {limit:,}-byte limit while being read")
    return raw, st


def decode(raw: bytes) -> str:
    if not raw.strip():
        raise TaskFileError("empty file")
    if b"\x00" in raw[:8192]:
        raise TaskFileError("binary file (contains NUL bytes), not markdown")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise TaskFileError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
            "(saved as Latin-1 or Windows-1252?): save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def opens_with_frontmatter(raw: bytes) -> bool:
    """Whether a file's first line is the `---` that opens frontmatter (as parse reads it)."""
    line, newline, _ = raw.removeprefix("\ufeff".encode()).partition(b"\n")
    return bool(newline) and re.fullmatch(rb"---[ \t]*\r?", line) is not None


def parse(raw: bytes, known: dict | None = None) -> TaskFile:
    """The frontmatter and body of a file. `known`: the frontmatter as loaded before from
    these very bytes (same hash), so the YAML is not loaded a second time."""
    text = decode(raw)
    # A half-merged file's YAML error (or a body of both sides) would not say what it is.
    if known is None and (line := merge_conflict(text)):
        raise TaskFileError(f"{conflict_reason(line)}: resolve it, then import again")
    opening = FENCE.match(text)
    if not opening:
        return TaskFile({}, text)
    closing = CLOSING.search(text, opening.end())
    if not closing:
        raise TaskFileError("unclosed frontmatter: no closing '---' line")
    yaml_text = text[opening.end() : closing.start()]
    body = text[closing.end() :].removeprefix("\r").removeprefix("\n")
    frontmatter = known if known is not None else load_yaml(yaml_text)
    return TaskFile(frontmatter, body, opening.end(), closing.start())


def merge_conflict(text: str) -> int:
    """The line of the `<<<<<<<` of a conflict git left unresolved in `text`, or 0. Marks
    inside a fenced code block are an example, not a conflict."""
    if "<<<<<<<" not in text:
        return 0
    fenced, opened, seen = False, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(CODE_FENCE):
            fenced = not fenced
        found = not fenced and CONFLICT_MARK.match(line)
        if not found:
            continue
        if found[1] == "<":
            opened, seen = number, "<"
        elif seen + found[1] in ("<=", "=>"):
            seen = found[1]
        if seen == ">":
            return opened
    return 0


def conflict_reason(line: int) -> str:
    return f"unresolved merge conflict (git's '<<<<<<<' at line {line})"


def load_yaml(yaml_text: str) -> dict:
    if "*" in yaml_text and _has_alias(yaml_text):
        # Aliases let a few lines expand into gigabytes (the "billion laughs").
        raise TaskFileError("YAML aliases (*name) are not allowed in frontmatter")
    try:
        data = yaml.load(yaml_text, Loader=UniqueKeyLoader)  # noqa: S506 - SafeLoader's
    except (DuplicateKey, NotADate) as exc:
        raise TaskFileError(str(exc)) from None
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise TaskFileError(
            f"YAML {tag.strip()} (only plain YAML is allowed: safe loading)"
        ) from None
    except yaml.YAMLError as exc:
        raise TaskFileError(f"YAML syntax error {_where(exc)}: {_problem(exc)}") from None
    except (ValueError, ArithmeticError) as exc:  # 5,000 digits
        reason = str(exc).split(":")[0].split(";")[0]
        raise TaskFileError(f"YAML value that cannot be read: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TaskFileError(f"frontmatter is a {type(data).__name__}, not a mapping of fields")
    fields = {}
    for key, value in data.items():
        # `Status: done` is the status (a file's own spelling stays in the file: writeback).
        name = _name(key).lower()
        try:
            fields[name] = _jsonable(value)
        except TaskFileError as exc:
            raise TaskFileError(f"{name[:80]}: {exc}") from None
    return fields


def _has_alias(yaml_text: str) -> bool:
    try:
        return any(
            isinstance(e, yaml.AliasEvent) for e in yaml.parse(yaml_text, Loader=SafeLoader)
        )
    except yaml.YAMLError:
        return False  # load_yaml reports the syntax error itself


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"at line {mark.line + 2}, column {mark.column + 1}" if mark else "in frontmatter"


def _problem(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def _name(key) -> str:
    if isinstance(key, int) and key.bit_length() > MAX_NUMBER_BITS:
        raise TaskFileError("a field name of more than 4,000 digits")
    return str(key)


def _jsonable(value, depth=0):
    if depth > MAX_NESTING:
        raise TaskFileError(TOO_DEEP)
    if isinstance(value, int) and value.bit_length() > MAX_NUMBER_BITS:
        raise TaskFileError("a number of more than 4,000 digits")
    if isinstance(value, dict):
        return {_name(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, datetime.date | datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


# The fields that fill columns: text (a list of texts joined), or a list of texts.
TEXT_FIELDS = ("id", "title", "status", "project", "assignee", "type", "complexity")
LIST_FIELDS = ("tags", "depends_on")
ONE_VALUE = ("id", "status")


def check_shapes(fm: dict) -> None:
    """A mapping, or a list inside a list, where a column's text belongs is refused naming
    the field: stored, it was Python's repr (`{'a': 1}` as a task's id or tag)."""
    for name in TEXT_FIELDS + LIST_FIELDS:
        value = fm.get(name)
        wanted = "a list of texts" if name in LIST_FIELDS else "text"
        if isinstance(value, dict):
            raise TaskFileError(f"{name}: a mapping, not {wanted}")
        if isinstance(value, list):
            if name in ONE_VALUE:
                raise TaskFileError(f"{name}: a list, not one value")
            for i, item in enumerate(value, 1):
                if isinstance(item, dict | list):
                    shape = "a mapping" if isinstance(item, dict) else "a list"
                    raise TaskFileError(f"{name}: item {i} is {shape}, not text")


def text_field(fm: dict, name: str, limit: int | None = 200) -> str:
    """A frontmatter value as text, cut to `limit` (None: whole, for callers that validate)."""
    value = fm.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return str(value).strip()[:limit]


def list_field(fm: dict, name: str) -> list[str]:
    value = fm.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        # Read as the board's editor reads a list (`bug, "needs review"`: the quotes go),
        # but a file's `bug, needs review` is two items; without a comma, `bug auth` is
        # two words.
        try:
            return list_items(value, words="," not in value)
        except ValueError:
            # A quote left open (`6" screen`) is kept as written, not the file refused.
            parts = value.split(",") if "," in value else value.split()
            return [p.strip() for p in parts if p.strip()]
    if isinstance(value, list):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    return [str(value)]


def priority(fm: dict) -> int:
    value = fm.get("priority")
    if value is None or value == "":
        return DEFAULT_PRIORITY
    if isinstance(value, bool):
        raise TaskFileError(f"priority: {value!r} is not a number or P0-P4/high/medium/low")
    if isinstance(value, float) and not math.isfinite(value):
        raise TaskFileError(f"priority: {value!r} is not a finite number")
    if isinstance(value, float) and not value.is_integer():
        # int() would make 0.9 the most urgent, P0.
        raise TaskFileError(f"priority: {value!r} is not a whole number")
    if isinstance(value, int | float):
        return int(value)
    word = str(value).strip().lower()
    # "-3" typed in a form is the -3 a file's YAML gives as a number.
    if (number := ascii_number(word.removeprefix("-"))) is not None:
        return -number if word.startswith("-") else number
    if re.fullmatch(r"p[0-9]", word):
        return int(word[1])
    if word in PRIORITY_WORDS:
        return PRIORITY_WORDS[word]
    raise TaskFileError(f"priority: {value!r} is not a number or P0-P4/high/medium/low")


def title(fm: dict, body: str, fallback: str, limit: int = 500) -> str:
    """The declared title whole (the caller validates it), else the heading or fallback cut."""
    found = text_field(fm, "title", None)
    if found:
        return found
    heading = HEADING.search(body)
    if not heading:
        return fallback[:limit]
    # Not `(.+?)[ \t#]*$` in the pattern: on a line of " #" pairs that was quadratic.
    text = heading[1].rstrip(" \t#") or heading[1][0]
    return text.strip()[:limit]


# The status words a file may use, by what they mean. A word in none of them (`review`,
# a typo) reads as queued for a new task and moves no task that has a state already.
DONE_WORDS = ("done", "closed", "completed", "complete", "finished", "resolved", "fixed")
CANCELLED_WORDS = ("cancelled", "canceled", "wontfix", "won't fix", "wont-fix", "obsolete")
CLOSED_STATUSES = DONE_WORDS + CANCELLED_WORDS
OPEN_WORDS = ("", "inbox", "queued", "todo", "to do", "to-do", "open", "ready", "active", "new")
OPEN_WORDS += ("backlog", "pending", "next", "planned", "reopened")
CLAIMED_WORDS = ("in_progress", "in-progress", "in progress", "claimed")


def status_meaning(word: str) -> str:
    """What a file's status word says: open, closed, blocked, claimed, or "" (unknown)."""
    word = word.strip().lower()
    for meaning, words in (
        ("open", OPEN_WORDS),
        ("closed", CLOSED_STATUSES),
        ("blocked", ("blocked",)),
        ("claimed", CLAIMED_WORDS),
    ):
        if word in words:
            return meaning
    return ""


def close_rule(fm: dict, body: str) -> tuple[str, str] | None:
    """(rule, outcome) when the file says the task is closed: the one rule, for the import
    and for triage. A `## Close Reason` or `## Closed` section first (a level-2 heading,
    not `### Closed` inside some other section), then the status, then a `close_reason`.
    Only `status: blocked` beats the section: the block came later (a worker's, or the
    board's, over a file whose body an agent or a person had given a close section)."""
    status = text_field(fm, "status").lower()
    if status == "blocked":
        return None
    if CLOSE_SECTION.search(body):
        return "close_reason_section", "closed"
    if status in ("done", "closed"):
        return f"status_{status}", "closed"
    if status in DONE_WORDS:
        return "status_done", "closed"
    if status in CANCELLED_WORDS:
        return "status_cancelled", "cancelled"
    if fm.get("close_reason"):
        return "close_reason_field", "closed"
    return None
