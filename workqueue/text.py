"""Frontmatter values as a person reads them: never a Python repr."""

from __future__ import annotations


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
