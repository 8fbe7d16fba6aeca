"""Writing a task file back without damage.

Only the frontmatter lines of changed keys are rewritten; every other byte (other keys,
their order and quoting, comments, the body) stays as it was. The edited frontmatter is
parsed again and must load as exactly the expected mapping, or nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

import yaml

from workqueue import taskfile
from workqueue.taskfile import SafeLoader

BOM = "\ufeff"
KEY_LINE = re.compile(r"([A-Za-z_][\w.-]*)[ \t]*:(?=[ \t\r\n]|$)")


class EditRefused(ValueError):
    """The frontmatter cannot be edited line by line without risk (flow style, odd keys)."""


@dataclass
class Document:
    """A task file split where it can be edited: before, the YAML text, between, the body."""

    bom: bool
    head: str  # the opening fence line ("" when the file has no frontmatter)
    yaml_text: str
    closing: str  # the closing fence line with its newline
    body: str
    frontmatter: dict
    newline: str

    @classmethod
    def parse(cls, raw: bytes) -> Document:
        parsed = taskfile.parse(raw)
        text = taskfile.decode(raw)
        newline = "\r\n" if "\r\n" in text[: text.find("\n") + 1] else "\n"
        if not taskfile.FENCE.match(text):
            return cls(raw.startswith(BOM.encode()), "", "", "", text, {}, newline)
        closing = taskfile.CLOSING.search(text, parsed.yaml_end)
        body_start = closing.end() + (1 if text[closing.end() : closing.end() + 1] == "\n" else 0)
        return cls(
            bom=raw.startswith(BOM.encode()),
            head=text[: parsed.yaml_start],
            yaml_text=text[parsed.yaml_start : parsed.yaml_end],
            closing=text[parsed.yaml_end : body_start],
            body=text[body_start:],
            frontmatter=parsed.frontmatter,
            newline=newline,
        )

    def render(self) -> bytes:
        head, closing = self.head, self.closing
        if self.yaml_text and not head:
            # A file without frontmatter that now needs one.
            head, closing = "---" + self.newline, "---" + self.newline
        return ((BOM if self.bom else "") + head + self.yaml_text + closing + self.body).encode(
            "utf-8"
        )

    def set_keys(self, changes: dict[str, str | None]) -> None:
        """Set (or, with None, remove) top-level keys in place; new keys go at the end."""
        expected = dict(self.frontmatter)
        for key, value in changes.items():
            if value is None:
                expected.pop(key, None)
            else:
                expected[key] = value
        self.yaml_text = edit_yaml(self.yaml_text, changes, self.newline)
        try:
            same = taskfile.load_yaml(self.yaml_text) == expected
        except taskfile.TaskFileError:
            same = False
        if not same:
            raise EditRefused("cannot edit this frontmatter in place without changing other keys")
        self.frontmatter = expected


def edit_yaml(yaml_text: str, changes: dict[str, str | None], newline: str = "\n") -> str:
    lines = yaml_text.splitlines(keepends=True)
    spans = _key_spans(lines)
    # Edit from the bottom up so that earlier spans keep their line numbers.
    edits = []
    for key, value in changes.items():
        if key in spans:
            start, end = spans[key]
            if value is None:
                edits.append((start, end, []))
            else:
                edits.append((start, end, [_replace_value(lines[start:end], value, newline)]))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    added = [
        f"{key}: {yaml_scalar(value)}{newline}"
        for key, value in changes.items()
        if key not in spans and value is not None
    ]
    if added and lines and not lines[-1].endswith("\n"):
        lines[-1] += newline
    return "".join(lines + added)


def _key_spans(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Top-level key -> (first line, end line) of its value, continuation lines included."""
    spans: dict[str, tuple[int, int]] = {}
    current, start, last = None, 0, 0
    for i, line in enumerate(lines):
        found = KEY_LINE.match(line)
        if found:
            if current is not None:
                spans[current] = (start, last + 1)
            current, start, last = found.group(1), i, i
        elif current is not None and _continues(line):
            if line.strip():
                last = i
        elif current is not None:
            spans[current] = (start, last + 1)
            current = None
    if current is not None:
        spans[current] = (start, last + 1)
    return spans


def _continues(line: str) -> bool:
    # Indented lines, blank lines and an indentless block sequence ("- item") belong to
    # the key above; a comment or anything else at column 0 does not.
    return line[:1] in (" ", "\t") or not line.strip() or line.startswith(("- ", "-\n", "-\r"))


def _replace_value(span: list[str], value: str, newline: str) -> str:
    key = KEY_LINE.match(span[0]).group(0)  # "status:" as written, spacing included
    rest = span[0][len(key) :]
    ending = rest[len(rest.rstrip("\r\n")) :] or newline
    rest = rest.rstrip("\r\n")
    if len(span) > 1 or rest.strip()[:1] in ("|", ">"):
        # A block value becomes one line; its lines (and comments inside) go with it.
        return f"{key} {yaml_scalar(value)}{ending}"
    old, tail = _split_comment(rest)
    lead = old[: len(old) - len(old.lstrip())] or " "
    return f"{key}{lead}{yaml_scalar(value, old.strip())}{tail}{ending}"


def _split_comment(rest: str) -> tuple[str, str]:
    """A one-line value and what follows it (spaces and a `# comment`), outside quotes."""
    stripped = rest.lstrip()
    offset = len(rest) - len(stripped)
    quote = stripped[:1] if stripped[:1] in ("'", '"') else ""
    i = 1 if quote else 0
    while i < len(stripped):
        ch = stripped[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch == "#" and stripped[i - 1] in " \t":
            value = stripped[:i].rstrip()
            return rest[: offset + len(value)], rest[offset + len(value) :]
        i += 1
    value = stripped.rstrip()
    return rest[: offset + len(value)], rest[offset + len(value) :]


def yaml_scalar(value: str, like: str = "") -> str:
    """YAML text for a string, quoted the way the value it replaces was quoted."""
    if like.startswith("'") and "\n" not in value:
        return "'" + value.replace("'", "''") + "'"
    if like.startswith('"') or not _plain_is_safe(value):
        return json.dumps(value, ensure_ascii=False)
    return value


def _plain_is_safe(value: str) -> bool:
    if not value or value != value.strip() or "\n" in value or " #" in value:
        return False
    try:
        return yaml.load(f"k: {value}", Loader=SafeLoader) == {"k": value}  # noqa: S506
    except yaml.YAMLError:
        return False


def atomic_write(path: str, data: bytes) -> os.stat_result:
    """Replace a file so that a crash leaves the old or the new one, never a torn one."""
    folder = os.path.dirname(path) or "."
    mode = os.stat(path).st_mode & 0o7777
    fd, temporary = tempfile.mkstemp(prefix=".triage-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return os.stat(path)
