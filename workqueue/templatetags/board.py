from __future__ import annotations

import functools
import hashlib
import json
from datetime import datetime, timedelta

import jinja2
from django import template
from django.template import engines
from django.template.defaultfilters import floatformat, truncatechars
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe

from workqueue.forms import ACTIONS
from workqueue.text import as_text as _as_text

SENTINEL = 2_147_483_647

register = template.Library()


def _short(seconds: float) -> str:
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


@register.filter
def age(moment: datetime | None) -> str:
    """How long ago, in a few characters: "5m 02s", "3d 4h"."""
    if not moment:
        return ""
    return _short((timezone.now() - moment).total_seconds())


@register.filter
def lease(left: timedelta | None) -> str:
    if left is None:
        return "no lease"
    seconds = left.total_seconds()
    if seconds < 0:
        return f"lease expired {_short(seconds)} ago"
    return f"lease {_short(seconds)} left"


@functools.cache
def _url_format(name: str) -> str:
    return reverse(name, args=[SENTINEL]).replace(str(SENTINEL), "{}")


@register.filter
def task_url(pk: int, name: str = "task-detail") -> str:
    """reverse() once per process, not several times per card: the board has 200 cards."""
    return _url_format(name).format(int(pk))


@register.filter
def can_block(status: str) -> bool:
    return status in ACTIONS["block"][1]


@register.filter
def as_text(value) -> str:
    """A frontmatter value as text: lists joined with commas, never a Python repr."""
    return _as_text(value)


DONE_WORDS = {
    "assign": "Assigned",
    "priority": "Set the priority of",
    "complexity": "Set the complexity of",
    "tags": "Tagged",
    "project": "Set the project of",
    "close": "Closed",
    "block": "Blocked",
    "requeue": "Requeued",
    "release": "Released the claims of",
    "undo": "Undid the changes to",
    "triage": "Applied triage's decisions to",  # a triage review's (triage_review.ACTION)
}


@register.filter
def bulk_summary(bulk) -> str:
    """One line for a bulk action: what it does, how far it got."""
    what = DONE_WORDS.get(bulk.action, bulk.action)
    if not bulk.finished:
        return f"{what} … {bulk.processed:,} of {bulk.total:,} tasks done"
    tasks = "task" if bulk.changed == 1 else "tasks"
    line = f"{what} {bulk.changed:,} {tasks}"
    if bulk.unchanged:
        # A triage review's unchanged tasks are the proposals a person rejected.
        left = "rejected" if bulk.action == "triage" else "already so"
        line += f"; {bulk.unchanged:,} {left}"
    return line + "."


@register.filter
def get(mapping, key):
    """mapping[key], or None: `form.cleaned_data|get:name` in a loop over names."""
    return mapping.get(key) if mapping else None


@register.filter
def split(text: str) -> list[str]:
    return text.split()


@register.filter
def diff_lines(diff: str) -> list[tuple[str, str]]:
    """A unified diff's lines, each with its kind (add, del, hunk, file, same)."""
    lines = []
    for line in diff.splitlines(keepends=True):
        if line.startswith(("+++", "---")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "same"
        lines.append((kind, line))
    return lines


# Triage's decisions are recorded in the old script's codes (what its JSON readers
# expect); people read them in words.
CLOSE_REASONS = {
    "close_reason_section": "its body has a Close Reason section",
    "status_done": "its status is done",
    "status_closed": "its status is closed",
    "status_cancelled": "its status is cancelled",
    "close_reason_field": "it has a close_reason",
}
CHANGES = {
    "complexity": "complexity set to {}",
    "assignee": "assignee set to {}",
    "status": "status set to {}",
}


@register.filter
def decision_words(result: dict) -> str:
    """ "assign:bot" as "assign to bot", "close" with its reason."""
    action = str(result.get("action", ""))
    if action == "close":
        reason = result.get("close_reason", "")
        return f"close: {CLOSE_REASONS.get(reason, reason)}" if reason else "close"
    if action.startswith("assign:"):
        name = action.removeprefix("assign:")
        changes = result.get("changes")
        if changes is None or f"assignee->{name}" in changes:
            return f"assign to {name}"
        return f"keep {name} as assignee"  # the task had them already: no line changes
    return action


@register.filter
def change_words(result: dict) -> str:
    """ "complexity->mechanical, added_wikilink" as "complexity set to mechanical,
    project link added to the body"."""
    words = []
    for change in result.get("changes") or []:
        field, arrow, value = str(change).partition("->")
        if arrow and field in CHANGES:
            words.append(CHANGES[field].format(value))
        elif change == "added_wikilink":
            words.append("project link added to the body")
        else:
            words.append(str(change))
    return ", ".join(words)


@register.filter
def transcript_version(transcript: dict | None, status: str) -> str:
    """What the drawer's transcript shows, in a few characters: its refresh sends it back,
    and is answered with nothing to swap while it is the same (the drawer is a live region:
    the same transcript put in again every 2 s was read out again)."""
    shown = json.dumps([status, transcript], sort_keys=True, default=str)
    return hashlib.sha256(shown.encode()).hexdigest()[:16]


@register.simple_tag(takes_context=True)
def cards(context, column: dict) -> str:
    """A column's cards, rendered by Jinja2 (templates/jinja2/workqueue/cards.html): the
    board shows up to a hundred, and Django's engine spent about 0.4 ms on each, most of
    the board's render."""
    form = context.get("form")
    return mark_safe(  # noqa: S308 - Jinja2 escaped every value (autoescape)
        engines["jinja2"]
        .get_template("workqueue/cards.html")
        .render(
            {
                "cards": column["cards"],
                "actions": column["actions"],
                "can_change": context.get("can_change"),
                "show_queue": not (form and form.cleaned_data.get("queue")),
                # The page's own token, made once: the engine's, given a request, is
                # made again (masked anew) at each card.
                "csrf_token": context.get("csrf_token"),
            }
        )
    )


def jinja_environment(**options) -> jinja2.Environment:
    """The Jinja2 engine's (settings.TEMPLATES), with the filters the cards use."""
    environment = jinja2.Environment(**options)  # noqa: S701 - Django turns autoescape on
    environment.filters.update(
        age=age,
        lease=lease,
        decision_words=decision_words,
        truncatechars=truncatechars,
        floatformat=floatformat,
    )
    environment.globals["task_url"] = task_url
    return environment
