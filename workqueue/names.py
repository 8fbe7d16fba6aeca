"""Queue names: one rule wherever a name enters (commands, forms, the model, the importer).

A queue name becomes a folder of the lock root, so it must be one safe path component:
never empty (locks would land in the lock root itself), never `.` or `..`, no `/`.
"""

from __future__ import annotations

import argparse
import re

from django.core.exceptions import ValidationError

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def validate_queue_name(name) -> None:
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise ValidationError(
            "queue name %(name)r is not allowed: use %(rule)s.",
            code="invalid_queue_name",
            params={"name": name, "rule": RULE},
        )


def queue_name_argument(value: str) -> str:
    """An argparse `type=`: a bad name becomes a usage error (a CommandError in call_command)."""
    try:
        validate_queue_name(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.messages[0]) from None
    return value
