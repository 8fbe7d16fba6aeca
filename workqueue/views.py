"""The board: four columns, live refresh, card actions, and the task detail drawer."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import Max
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    QueryDict,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import patch_cache_control
from django.views.decorators.http import require_GET, require_POST
from django.views.decorators.vary import vary_on_headers

from workqueue import claims, locks
from workqueue.agents.base import read_transcript
from workqueue.forms import ACTIONS, BoardFilterForm, LoadMoreForm, TaskActionForm
from workqueue.models import Queue, Status, Task
from workqueue.processors import transcript_path
from workqueue.rendering import render_markdown

PAGE_SIZE = 50
# Ages and lease countdowns change with the clock, not the rows: re-render that often.
CLOCK_SECONDS = 15
DONE_MESSAGES = {
    "requeue": "requeued",
    "release": "claim released",
    "done": "marked done",
    "block": "blocked",
}
CARD_FIELDS = (
    "id", "queue", "key", "title", "status", "priority", "project", "assignee", "type",
    "created_at", "updated_at", "holder", "holder_host", "holder_pid", "holder_started",
    "lease_expires_at", "outcome", "reason", "result", "source_missing", "change_pending",
    "tokens", "cost_usd",
)  # fmt: skip


def _filters(data: QueryDict) -> BoardFilterForm | None:
    form = BoardFilterForm(data)
    return form if form.is_valid() else None


def _bad_filters(data: QueryDict) -> HttpResponse:
    form = BoardFilterForm(data)
    form.is_valid()
    problems = "; ".join(f"{name}: {' '.join(errs)}" for name, errs in form.errors.items())
    return HttpResponseBadRequest(f"Bad filter: {problems}", content_type="text/plain")


def board_version() -> str:
    """Changes whenever any task is added or changed (every write sets updated_at).

    Two index lookups whatever the filters, and no rendering: the live refresh compares it
    and answers 204. A change outside the filtered view only costs one needless render.
    A deleted task, or a clock that runs behind another host's, shows by the next clock
    bucket at the latest.
    """
    # Two statements: SQLite answers a lone MAX from the index, not two in one query.
    newest = Task.objects.aggregate(newest=Max("updated_at"))["newest"]
    last = Task.objects.aggregate(last=Max("id"))["last"]
    stamp = newest.timestamp() if newest else 0
    return f"{last or 0}-{stamp:.6f}-{int(time.time() // CLOCK_SECONDS)}"


def _cards(tasks, status: str, offset: int = 0) -> list[Task]:
    """One page of a column, plus one card to tell whether there is more."""
    return list(
        tasks.filter(status=status)
        .order_by("priority", "id")
        .only(*CARD_FIELDS)[offset : offset + PAGE_SIZE + 1]
    )


def _column_counts(tasks, form: BoardFilterForm) -> dict[str, int]:
    if form.only_indexed:
        # One index range per column: cheaper than a GROUP BY, which reads every row on
        # PostgreSQL.
        return tasks.counts_by_index()
    return tasks.counts()


def _columns(tasks, form: BoardFilterForm) -> list[dict]:
    counts = _column_counts(tasks, form)
    columns = []
    for status in Status.values:
        cards = _cards(tasks, status) if counts[status] else []
        columns.append(
            {
                "status": status,
                "label": Status(status).label,
                "count": counts[status],
                "cards": cards[:PAGE_SIZE],
                "more": len(cards) > PAGE_SIZE,
                "next_offset": PAGE_SIZE,
                "actions": card_actions(status),
            }
        )
    return columns


def _board_context(request: HttpRequest, form: BoardFilterForm) -> dict:
    tasks = form.apply(Task.objects.all())
    version = board_version()
    return {
        "form": form,
        "query": form.querystring(),
        "version": version,
        "columns": _columns(tasks, form),
        "queues": Queue.objects.order_by("name").values_list("name", flat=True),
        "can_change": request.user.has_perm("queue.change_task"),
    }


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_GET
@vary_on_headers("HX-Request")
def board(request: HttpRequest) -> HttpResponse:
    form = _filters(request.GET)
    if form is None:
        return _bad_filters(request.GET)
    # The live refresh: compare versions before anything is rendered.
    since = request.GET.get("since")
    if since and since == board_version():
        return HttpResponse(status=204)
    context = _board_context(request, form)
    template = "workqueue/board.html"
    if request.htmx and request.htmx.target == "board":
        template += "#board"
    response = render(request, template, context)
    response["ETag"] = f'"{context["version"]}"'
    patch_cache_control(response, no_cache=True, private=True)
    return response


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_GET
def column(request: HttpRequest, status: str) -> HttpResponse:
    """The next cards of one column: what "load more" fetches."""
    if status not in Status.values:
        return HttpResponse("Unknown column", status=404, content_type="text/plain")
    form = _filters(request.GET)
    if form is None:
        return _bad_filters(request.GET)
    page = LoadMoreForm(request.GET)
    if not page.is_valid():
        return HttpResponseBadRequest("offset must be a whole number", content_type="text/plain")
    offset = page.cleaned_data["offset"]
    cards = _cards(form.apply(Task.objects.all()), status, offset)
    context = {
        "column": {
            "status": status,
            "cards": cards[:PAGE_SIZE],
            "more": len(cards) > PAGE_SIZE,
            "next_offset": offset + PAGE_SIZE,
            "actions": card_actions(status),
        },
        "form": form,
        "query": form.querystring(),
        "can_change": request.user.has_perm("queue.change_task"),
    }
    return render(request, "workqueue/board.html#cards", context)


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_GET
@vary_on_headers("HX-Request")
def task_detail(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(Task.objects.select_related("content"), pk=pk)
    template = "workqueue/task_detail.html"
    if request.htmx and request.htmx.target == "drawer":
        template += "#drawer"
    return render(request, template, _detail_context(request, task))


def _detail_context(request: HttpRequest, task: Task) -> dict:
    return {
        "task": task,
        "body_html": render_markdown(task.body),
        "events": task.events.all()[:200],
        "lock_owner": locks.read_owner(locks.lock_dir(task.queue, task.key)),
        "stale": task.is_stale(),
        "can_change": request.user.has_perm("queue.change_task"),
        "actions": card_actions(task.status),
        "diff": task.result.get("diff") if isinstance(task.result, dict) else None,
        "agent": agent_report(task),
        "transcript": task_transcript_of(task),
    }


def agent_report(task: Task) -> dict | None:
    """What an agent CLI's adapter recorded on the task, for the drawer."""
    data = task.result if isinstance(task.result, dict) else {}
    if not isinstance(data.get("tokens"), dict) and not data.get("session_id"):
        return None
    return data


def task_transcript_of(task: Task, last: int | None = None) -> dict | None:
    if not task.fence:
        return None
    return read_transcript(transcript_path(task.pk, task.fence), last)


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_GET
def task_transcript(request: HttpRequest, pk: int) -> HttpResponse:
    """The live transcript of a task's agent: what the drawer polls while it runs."""
    task = get_object_or_404(Task.objects.only("id", "status", "fence"), pk=pk)
    context = {"task": task, "transcript": task_transcript_of(task)}
    return render(request, "workqueue/transcript.html", context)


def card_actions(status: str) -> list[tuple[str, str]]:
    """(action, label) for what a person may do to a task in this status."""
    return [(a, label) for a, (label, states) in ACTIONS.items() if status in states]


@login_required
@permission_required("queue.change_task", raise_exception=True)
@require_POST
def task_action(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(Task, pk=pk)
    form = TaskActionForm(request.POST)
    if not form.is_valid():
        problems = "; ".join(" ".join(errs) for errs in form.errors.values())
        return HttpResponseBadRequest(problems, content_type="text/plain")
    action = form.cleaned_data["action"]
    if task.status not in ACTIONS[action][1]:
        return HttpResponse(
            f"Cannot {ACTIONS[action][0].lower()} a {task.status} task.",
            status=409,
            content_type="text/plain",
        )
    actor = f"user:{request.user.get_username()}"
    try:
        if action in ("requeue", "release"):
            changed = claims.release_task(task, actor, f"{action} from the board")
        elif action == "done":
            changed = claims.set_task_status(task, Status.DONE, actor)
        else:
            changed = claims.set_task_status(
                task, Status.BLOCKED, actor, form.cleaned_data["reason"].strip()
            )
        message = f"{task.key} changed meanwhile; nothing done."
    except claims.AgentStillRunning as exc:
        changed, message = False, str(exc)
    if not changed:
        # Someone (a worker, another person) moved the task in the meantime, or its
        # agent could not be ended.
        if request.htmx:
            return HttpResponse(message, status=409, content_type="text/plain")
        messages.error(request, message)
    elif not request.htmx:
        messages.success(request, f"{task.key}: {DONE_MESSAGES[action]}.")
    if request.htmx and request.htmx.target == "board":
        return _board_after_action(request)
    if request.htmx and request.htmx.target == "drawer":
        return _drawer_after_action(request, task.pk)
    return redirect(_safe_next(request))


def _board_after_action(request: HttpRequest) -> HttpResponse:
    # The board's own URL (with its filters) comes in HX-Current-URL.
    query = QueryDict(urlsplit(request.htmx.current_url or "").query)
    form = _filters(query)
    if form is None:
        form = _filters(QueryDict())
    return render(request, "workqueue/board.html#board", _board_context(request, form))


def _drawer_after_action(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(Task, pk=pk)
    response = render(request, "workqueue/task_detail.html#drawer", _detail_context(request, task))
    # The board behind the drawer refreshes itself at once.
    response["HX-Trigger"] = "board-changed"
    return response


def _safe_next(request: HttpRequest) -> str:
    for candidate in (request.POST.get("next"), request.headers.get("Referer")):
        if candidate and url_has_allowed_host_and_scheme(
            candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            return candidate
    return "board"
