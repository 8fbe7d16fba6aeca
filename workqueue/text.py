"""Frontmatter values as a person reads them: never a Python repr."""

from __future__ import annotations

import difflib
import json
import re

# Every control character but a tab and a newline: C0, DEL and C1 (ECMA-48's escape and
# control sequences, which move a terminal's cursor, clear it or write its clipboard).
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` as a terminal shows it and never obeys: each control character written as its
    escape (`\\x1b`), the way Python writes it in a string."""
    return CONTROLS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def as_text(value) -> str:
    """`[bug, auth]` reads "bug, auth"; `{a: 1}` reads "a: 1"; None reads ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(as_text(item) for item in value)
    if isinstance(value, dict):
        return "; ".join(f"{key}: {as_text(item)}" for key, item in value.items())
    return str(value)


LIST_ITEM = re.compile(r'([+-]?)"((?:[^"\\]|\\.)*)"|[^,\s"]+')
# The same, an item without quotes running to the next comma, spaces and all.
COMMA_ITEM = re.compile(r'([+-]?)"((?:[^"\\]|\\.)*)"|[^,"]+')


def list_text(items: list[str]) -> str:
    """A list as a person edits it: comma separated, an item with a space, a comma or a
    quote in JSON's quotes, so that list_items gives the same list back."""
    return ", ".join(
        json.dumps(item, ensure_ascii=False) if re.search(r'[,\s"\\]', item) else item
        for item in items
    )


def list_items(text: str, words: bool = True) -> list[str]:
    """The items of a list as a person typed it (list_text); a + or - before a quoted item
    stays in front of it. With words False an item without quotes is all up to the next
    comma (a task file's `bug, needs review`). ValueError for a quote left open."""
    items, end = [], 0
    for match in (LIST_ITEM if words else COMMA_ITEM).finditer(text):
        if text[end : match.start()].strip(", \t\r\n"):
            break
        end = match.end()
        if match.group(2) is None:
            items.append(match.group(0).strip())
        else:
            items.append(match.group(1) + json.loads(f'"{match.group(2)}"'))
    if text[end:].strip(", \t\r\n"):
        raise ValueError(f"a quote is left open: {text[end:].strip()[:40]}")
    return [item for item in items if item.strip()]


MAX_ID = 2**63 - 1  # the largest id a database's bigint holds


def ascii_number(text: str) -> int | None:
    """`text` as a whole number when it is ASCII digits alone (spaces around allowed), else
    None: `str.isdigit()` also takes "²", which `int()` refuses."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def as_id(text: str) -> int | None:
    """A task's or a herd's id from a form or a field name, or None."""
    number = ascii_number(text)
    return number if number is not None and number <= MAX_ID else None


DIFF_CONTEXT = 3  # lines around each change, as `diff -u`
DIFF_LINES = 5000  # lines on a side past which two texts are not compared line by line
HUNK = re.compile(r"@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@")


def unified_diff(before: list[str], after: list[str], fromfile: str, tofile: str) -> str:
    """A unified diff of two texts' lines. Their common start and end are set aside first:
    an edit leaves all but a few lines alike, and difflib is quadratic on some long inputs
    (60,000 interleaved lines took 213 s)."""
    same = min(len(before), len(after))
    head = next((i for i in range(same) if before[i] != after[i]), same)
    tail = next((i for i in range(same - head) if before[-1 - i] != after[-1 - i]), same - head)
    start = max(0, head - DIFF_CONTEXT)
    keep = max(0, tail - DIFF_CONTEXT)
    old, new = before[start : len(before) - keep], after[start : len(after) - keep]
    if max(len(old), len(new)) > DIFF_LINES:
        return (
            f"--- {fromfile}\n+++ {tofile}\n"
            f"(lines {head + 1:,} to {len(before) - tail:,} against {head + 1:,} to "
            f"{len(after) - tail:,} differ: more than {DIFF_LINES:,} lines to compare)\n"
        )
    lines = difflib.unified_diff(old, new, fromfile, tofile, n=DIFF_CONTEXT)
    return "".join(_shift(line, start) if line.startswith("@@") else line for line in lines)


def _shift(hunk: str, by: int) -> str:
    """A hunk header of a slice, numbered as in the whole text."""

    def number(found: re.Match) -> str:
        a, a_len, b, b_len = found.groups()
        return f"@@ -{int(a) + by}{a_len or ''} +{int(b) + by}{b_len or ''} @@"

    return HUNK.sub(number, hunk, count=1)
