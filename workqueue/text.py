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
