"""Writing a task file back without damage.

Only the frontmatter lines of changed keys are rewritten; every other byte (other keys,
their order and quoting, comments, the body) stays as it was. The edited frontmatter must
load as exactly the expected mapping, or nothing is written: it is parsed again, unless its
lines alone show it (see _linewise).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass

import yaml

from workqueue import taskfile
from workqueue.taskfile import SafeLoader

BOM = "\ufeff"
KEY_LINE = re.compile(r"([A-Za-z_][\w.-]*)[ \t]*:(?=[ \t\r\n]|$)")
BLOCK_ITEM = re.compile(r"([ \t]*)-[ \t]")
# What can make YAML's structure differ from its lines: an indicator where a value may
# begin (quotes, anchors, aliases, tags, block scalars, directives, complex and merge
# keys), a tab, or a line break that Python and YAML count differently.
NOT_LINEWISE = re.compile(
    r"""(?:^|[\s\[{,])['"&*!|>%@`?<]|[\t\x0b\x0c\x1c-\x1e\x85\u2028\u2029]""", re.M
)
FLOW = re.compile(r"[\[\]{}]")
# A value set_keys can write: a string, a whole number, a flag, a list of strings.
Value = str | int | bool | list[str]


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
    known: bool = False  # frontmatter came from the caller, not from loading yaml_text

    @classmethod
    def parse(cls, raw: bytes, known: dict | None = None) -> Document:
        """`known`: the frontmatter already loaded from these bytes (taskfile.parse), so
        the YAML is not loaded again. An edit still loads its result and compares; where
        `known` was not these bytes' after all, the YAML is loaded and the edit judged
        against it (see set_keys)."""
        parsed = taskfile.parse(raw, known)
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
            known=known is not None,
        )

    def frontmatter_end(self) -> int:
        """Where the YAML text ends in the rendered bytes."""
        return len(((BOM if self.bom else "") + self.head + self.yaml_text).encode("utf-8"))

    def render(self) -> bytes:
        head, closing = self.head, self.closing
        if self.yaml_text and not head:
            # A file without frontmatter that now needs one.
            head, closing = "---" + self.newline, "---" + self.newline
        return ((BOM if self.bom else "") + head + self.yaml_text + closing + self.body).encode(
            "utf-8"
        )

    def set_keys(self, changes: dict[str, Value | None]) -> None:
        """Set (or, with None, remove) top-level keys in place; new keys go at the end.

        A list keeps the style it had: a block sequence stays one, anything else becomes
        a flow list (`[a, b]`).
        """
        edited = edit_yaml(self.yaml_text, changes, self.newline)
        if _linewise(self.yaml_text, self.frontmatter, changes):
            self.yaml_text, self.known = edited, False
            self.frontmatter = _with_changes(self.frontmatter, changes)
            return
        try:
            result = taskfile.load_yaml(edited)
        except taskfile.TaskFileError:
            result = None
        expected = _with_changes(self.frontmatter, changes)
        if result != expected and self.known and result is not None:
            # The caller's frontmatter was not this file's (a row edited in the admin):
            # judge the edit against the file's own.
            expected = _with_changes(taskfile.load_yaml(self.yaml_text), changes)
        if result != expected:
            raise EditRefused("cannot edit this frontmatter in place without changing other keys")
        self.yaml_text, self.frontmatter, self.known = edited, expected, False


def _linewise(yaml_text: str, frontmatter: dict, changes: dict[str, Value | None]) -> bool:
    """Whether the edit's result is known without loading it: each top-level key's value
    is the text of its own lines (block style, plain values, any flow collection closed on
    its line), every key loaded is a key line, and each changed key is one line, or new,
    and gets a plain word. Then whole lines replaced change those keys and no other.
    (A finish's status and triage's keys: a YAML load was two thirds of their edit.)"""
    if NOT_LINEWISE.search(yaml_text):
        return False
    lines = yaml_text.splitlines(keepends=True)
    commented = False  # a comment at the left edge ends a key's lines (_key_spans), not YAML's
    key_lines = 0
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip() and line[:1] in (" ", "-") and (commented or not key_lines):
            return False  # a value's line after a comment at the edge, or before any key
        commented = line[:1] == "#" or (commented and not line.strip())
        is_key = KEY_LINE.match(line) is not None
        key_lines += is_key
        depth = 0
        for found in FLOW.finditer(line):
            depth += 1 if found[0] in "[{" else -1
            if depth < 0:
                return False
        if depth:
            return False
        # At the left edge: a key, an item of a key's list, a comment, or nothing.
        if not (is_key or line[:1] in ("", " ", "#") or line[:2] in ("-", "- ")):
            return False
    spans = _key_spans(lines)
    if spans.keys() != frontmatter.keys() or key_lines != len(spans):
        return False
    for key, value in changes.items():
        start, end = spans.get(key.lower(), (0, 1))
        if end - start != 1 or not (
            value is None or (isinstance(value, str) and _plain_is_safe(value))
        ):
            return False
    return True


def _with_changes(frontmatter: dict, changes: dict[str, Value | None]) -> dict:
    expected = dict(frontmatter)
    for key, value in changes.items():
        if value is None:
            expected.pop(key.lower(), None)
        else:
            expected[key.lower()] = value  # as load_yaml names it, whatever its spelling
    return expected


def edit_yaml(yaml_text: str, changes: dict[str, Value | None], newline: str = "\n") -> str:
    lines = yaml_text.splitlines(keepends=True)
    spans = _key_spans(lines)
    # Edit from the bottom up so that earlier spans keep their line numbers.
    edits = []
    for key, value in changes.items():
        if key.lower() in spans:
            start, end = spans[key.lower()]
            if value is None:
                edits.append((start, end, []))
            else:
                edits.append((start, end, [_replace_value(lines[start:end], value, newline)]))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    added = [
        f"{key}: {yaml_value(value)}{newline}"
        for key, value in changes.items()
        if key.lower() not in spans and value is not None
    ]
    if added and lines and not lines[-1].endswith("\n"):
        lines[-1] += newline
    return "".join(lines + added)


def _key_spans(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Top-level key, in lower case -> (first line, end line) of its value, continuation
    lines included. A key is read in any case (taskfile.load_yaml): a change of `status`
    edits the file's `Status:` line, spelt as it is."""
    spans: dict[str, tuple[int, int]] = {}
    current, start, last = None, 0, 0
    for i, line in enumerate(lines):
        found = KEY_LINE.match(line)
        if found:
            if current is not None:
                spans[current] = (start, last + 1)
            current, start, last = found.group(1).lower(), i, i
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
    item = line.startswith("- ") or line.rstrip("\r\n") == "-"  # the last line may end bare
    return line[:1] in (" ", "\t") or not line.strip() or item


def _replace_value(span: list[str], value: Value, newline: str) -> str:
    key = KEY_LINE.match(span[0]).group(0)  # "status:" as written, spacing included
    rest = span[0][len(key) :]
    ending = rest[len(rest.rstrip("\r\n")) :] or newline
    rest = rest.rstrip("\r\n")
    indent = _block_sequence_indent(span)
    if isinstance(value, list) and value and indent is not None:
        # A block sequence stays one, indented as it was.
        items = "".join(f"{indent}- {yaml_scalar(str(v))}{ending}" for v in value)
        return f"{key}{rest}{ending}{items}"
    if len(span) > 1 or rest.strip()[:1] in ("|", ">"):
        # A block value becomes one line; its lines (and comments inside) go with it.
        return f"{key} {yaml_value(value)}{ending}"
    old, tail = _split_comment(rest)
    lead = old[: len(old) - len(old.lstrip())] or " "
    if tail[:1] == "#":  # `key: # note` had no value: the comment keeps its space
        tail = " " + tail
    elif not tail.strip():  # spaces alone (a status written in place padded its line)
        tail = ""
    return f"{key}{lead}{yaml_value(value, old.strip())}{tail}{ending}"


def _block_sequence_indent(span: list[str]) -> str | None:
    """The indentation of a block sequence's items ("- a" lines under the key), or None."""
    first = span[0][len(KEY_LINE.match(span[0]).group(0)) :]
    if len(span) < 2 or _split_comment(first.rstrip("\r\n"))[0].strip():
        return None
    items = [BLOCK_ITEM.match(line) for line in span[1:] if line.strip()]
    if not items or not all(items) or len({m.group(1) for m in items}) != 1:
        return None
    return items[0].group(1)


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
        elif ch == "#" and (i == 0 or stripped[i - 1] in " \t"):
            value = stripped[:i].rstrip()
            return rest[: offset + len(value)], rest[offset + len(value) :]
        i += 1
    value = stripped.rstrip()
    return rest[: offset + len(value)], rest[offset + len(value) :]


def yaml_value(value: Value, like: str = "") -> str:
    """YAML text for a value on one line: strings as yaml_scalar, lists in flow style."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_flow_item(str(v)) for v in value) + "]"
    return yaml_scalar(value, like)


def _flow_item(value: str) -> str:
    # Inside [...] a comma or a bracket ends a plain scalar: quote those.
    if _plain_is_safe(value) and not any(c in value for c in ",[]{}"):
        return value
    return json.dumps(value, ensure_ascii=False)


def yaml_scalar(value: str, like: str = "") -> str:
    """YAML text for a string, quoted the way the value it replaces was quoted."""
    if like.startswith("'") and "\n" not in value:
        return "'" + value.replace("'", "''") + "'"
    if like.startswith('"') or not _plain_is_safe(value):
        return json.dumps(value, ensure_ascii=False)
    return value


@functools.lru_cache(maxsize=1024)
def _plain_is_safe(value: str) -> bool:
    if not value or value != value.strip() or "\n" in value or " #" in value:
        return False
    try:
        return yaml.load(f"k: {value}", Loader=SafeLoader) == {"k": value}  # noqa: S506
    except yaml.YAMLError:
        return False


def atomic_write(
    path: str, data: bytes, seen: tuple[int, int, int], mode: int
) -> os.stat_result | None:
    """Replace a file so that a crash leaves the old or the new one, never a torn one,
    unless it is no longer the one read (`seen`, file_identity): then None."""
    return replace_if_unchanged(write_temporary(path, data, mode), path, seen)


def write_temporary(path: str, data: bytes, mode: int, sync: bool = True) -> str:
    """The new content in a temporary file beside `path`, with the file's permissions
    (`mode`, as read); none for a file no one may write.

    With sync=False the caller makes it durable (sync_files) before renaming it.
    """
    if not mode & 0o222:
        # Made read-only (git lfs locks a file so, a person's chmod): a writer in place
        # would be refused, and a rename must not go round that.
        raise PermissionError(errno.EACCES, "the file is read-only", path)
    folder, name = os.path.split(path)
    # Unique per write: the board's threads and a worker may write beside one file at once.
    # The pid in the name lets the reaper find what a dead worker left (TEMPORARY).
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # A new file, or nothing: whatever already lies at the name (a link) is not followed.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode & 0o7777)
            if sync:
                os.fsync(f.fileno())
    except BaseException:
        discard(temporary)
        raise
    return temporary


def sync_files(paths: list[str]) -> None:
    """Put a batch of written files on disk (temporaries before any of them is renamed).

    On Linux one syncfs per filesystem: a fsync per file costs several times the CPU
    (measured in bench/bench_triage.py). Elsewhere, a fsync per file.
    """
    if _syncfs is None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    folders = {os.path.dirname(p) or "." for p in paths}
    devices = {os.stat(folder).st_dev: folder for folder in folders}
    for folder in devices.values():
        fd = os.open(folder, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error), folder)
        finally:
            os.close(fd)


def _load_syncfs():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).syncfs
    except (OSError, AttributeError, TypeError):
        return None


_syncfs = _load_syncfs()


# What a disk writes whole: a crash leaves a sector's old bytes or its new ones.
SECTOR = 512


def overwrite_spot(
    raw: bytes, new: bytes, frontmatter_end: int, pad: bool = False
) -> tuple[int, bytes] | None:
    """Where `new` differs from `raw` in one frontmatter line only, and that line's change
    fits in one sector and in the bytes it replaces: its offset and bytes, to write over
    the file in place. With `pad`, a shorter top-level value (`status: inbox` -> `done`)
    is padded with spaces at the end of its line, which YAML ignores. None: replace the
    file whole.

    `frontmatter_end`: where the frontmatter's YAML ends in `new`."""
    if len(new) > len(raw) or raw == new or (len(new) < len(raw) and not pad):
        return None
    start = next((i for i, (a, b) in enumerate(zip(raw, new, strict=False)) if a != b), len(new))
    if start >= frontmatter_end:
        return None
    line = raw.rfind(b"\n", 0, start) + 1
    old_end, new_end = raw.find(b"\n", start), new.find(b"\n", start)
    if old_end < 0 or new_end < 0 or new_end > frontmatter_end:
        return None
    if raw[old_end:] != new[new_end:]:  # more than this line changed
        return None
    cr = raw[old_end - 1 : old_end] == b"\r" and new[new_end - 1 : new_end] == b"\r"
    spaces = old_end - new_end
    if spaces and not KEY_LINE.match(raw[line:old_end].decode()):
        return None  # only a top-level key's line takes padding without meaning anything
    data = new[start : new_end - cr] + b" " * spaces + (b"\r" if cr else b"")
    if start // SECTOR != (start + len(data) - 1) // SECTOR:
        return None
    return start, data


def overwrite_if_unchanged(
    path: str, seen: tuple[int, int, int], offset: int, data: bytes
) -> os.stat_result | None:
    """Write `data` over the file at `offset` unless it is no longer the one we read (nor
    a lone regular file: a link elsewhere would be written through)."""
    if file_identity(os.lstat(path)) != seen:  # not opened: a device swapped in has effects
        return None
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if file_identity(before) != seen or not stat.S_ISREG(before.st_mode):
            return None
        if before.st_nlink != 1:  # given a second name since it was read
            return None
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(errno.EIO, "short write", path)
        return os.fstat(fd)
    finally:
        os.close(fd)


def file_identity(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def replace_if_unchanged(
    temporary: str, path: str, seen: tuple[int, int, int]
) -> os.stat_result | None:
    """Rename the temporary over `path` unless the file is no longer the one we read (a
    link to it now is another file: the rename would replace the link, not it)."""
    try:
        unchanged = file_identity(os.lstat(path)) == seen
        if unchanged:
            os.replace(temporary, path)
            return os.stat(path)
    except BaseException:
        discard(temporary)
        raise
    discard(temporary)
    return None


def discard(temporary: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)


# A name write_temporary gives: the file's name, the writer's pid, 8 hex digits.
TEMPORARY = re.compile(r"\.(.+)\.([0-9]+)\.[0-9a-f]{8}\.tmp")


def remove_temporaries(folder: str, left: dict[str, set[int]]) -> list[str]:
    """Remove the temporaries that dead processes of ours left in `folder` (a worker
    killed between writing a batch's temporaries and renaming them): `left` maps a task
    file's name to the pids that may have written beside it. Only regular files of ours
    whose whole name matches go; the folder is not followed if it is a symlink, and a
    name is never followed either (unlink removes a link, not what it points to)."""
    removed = []
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return removed  # gone, or a symlink now: nothing of ours to remove there
    try:
        with os.scandir(fd) as entries:
            found = [(e.name, TEMPORARY.fullmatch(e.name)) for e in entries]
        for entry, match in found:
            if not match or int(match[2]) not in left.get(match[1], ()):
                continue
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if info.st_uid == os.getuid() and stat.S_ISREG(info.st_mode):
                    os.unlink(entry, dir_fd=fd)
                    removed.append(os.path.join(folder, entry))
    finally:
        os.close(fd)
    return removed
