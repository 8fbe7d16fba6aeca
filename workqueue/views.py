"""The board: four columns, live refresh, card actions, and the task detail drawer."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode, urlsplit

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db.models import Max, Q
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    QueryDict,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import patch_cache_control
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django.views.decorators.vary import vary_on_headers

from herds.models import Herd
from workqueue import authoring, bulk, dependencies, editing, importer, locks, triage_review
from workqueue.agents.base import read_transcript
from workqueue.forms import (
    ACTIONS,
    ROUTED_FIELDS,
    BoardFilterForm,
    BulkForm,
    LoadMoreForm,
    NewTaskForm,
    PostedFilterForm,
    SavedViewForm,
    ShownForm,
    TaskActionForm,
    TaskEditForm,
)
from workqueue.models import (
    BulkAction,
    Queue,
    SavedView,
    Status,
    Task,
    field_values,
    unmet_dependency_counts,
)
from workqueue.names import QUEUE_NAME
from workqueue.processors import transcript_path
from workqueue.rendering import render_body
from workqueue.templatetags.board import transcript_version
from workqueue.text import as_id

CHANGE = "queue.change_task"
# Acting on cards answers with the card, the drawer or the board: it takes seeing them too.
CHANGE_AND_VIEW = ["queue.view_task", CHANGE]
PAGE_SIZE = 25
# Ages and lease countdowns change with the clock, not the rows: re-render that often.
CLOCK_SECONDS = 15
# How old the filter dropdowns' counts may be while the board keeps changing (_facets).
FACETS_FRESH_SECONDS = 30
# The card's buttons and the bulk actions they are (workqueue.editing.STATE_ACTIONS).
CARD_ACTIONS = {"requeue": "requeue", "release": "release", "done": "close", "block": "block"}
DONE_MESSAGES = {
    "requeue": "requeued",
    "release": "claim released",
    "done": "marked done",
    "block": "blocked",
}
FILTER_LABELS = [
    ("project", "Project"),
    ("assignee", "Assignee"),
    ("tag", "Tag"),
    ("type", "Type"),
    ("complexity", "Complexity"),
]
CARD_FIELDS = (
    "id", "queue", "key", "title", "status", "priority", "project", "assignee", "type",
    "complexity", "tags", "has_dependencies",
    "created_at", "updated_at", "holder", "holder_host", "holder_pid", "holder_started",
    "lease_expires_at", "outcome", "reason", "result", "source_missing", "change_pending",
    "tokens", "cost_usd", "fence",
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

    Two index lookups, and no rendering. A deleted task, or a clock that runs behind
    another host's, shows by the next clock bucket at the latest.
    """
    # Two statements: SQLite answers a lone MAX from the index, not two in one query.
    newest = Task.objects.aggregate(newest=Max("updated_at"))["newest"]
    last = Task.objects.aggregate(last=Max("id"))["last"]
    stamp = newest.timestamp() if newest else 0
    return f"{last or 0}-{stamp:.6f}-{int(time.time() // CLOCK_SECONDS)}"


class View(NamedTuple):
    """What a request knows of the board it shows, read once per request."""

    version: str  # of this view: what the live refresh compares
    counts: dict[str, int] | None  # its columns' counts, None for the whole board
    whole: str  # board_version(): any task's change


def view_version(form: BoardFilterForm) -> View:
    """The version of what this filtered view shows: it changes when a task in the view
    changes, enters or leaves it, and not when a task outside it changes. With it, the
    view's columns' counts as of that version (None for a view without filters, whose
    columns are index ranges counted at each render).

    Reading the view is one count of it by column: it is done once per change anywhere
    (board_version) and filter, then kept in the cache, so a render after it counts
    nothing again (a text found in most tasks, or a tag at a million tasks, is a read of
    every task it finds or of the whole table).
    """
    whole = board_version()
    form.version = whole
    if not form.active:
        return View(whole, None, whole)
    key = "board-counts:" + hashlib.sha256(f"{form.querystring()}|{whole}".encode()).hexdigest()
    kept = cache.get(key)
    if kept is None:
        kept = form.counts_and_stamp()
        cache.set(key, kept, 2 * CLOCK_SECONDS)
    counts, stamp = kept
    return View(f"v{stamp}-{whole.rsplit('-', 1)[1]}", counts, whole)


def _cards(
    form,
    status: str,
    count: int,
    offset: int = 0,
    limit: int = PAGE_SIZE,
    after: tuple[int, int] | None = None,
) -> list[Task]:
    """One page of a column of `count` cards, plus one card to tell whether there is more:
    from `offset`, or after the card `after` (its priority and id) when given, `offset`
    then saying only how deep the page is."""
    tasks = form.apply(Task.objects.all(), page=(offset + limit + 1, count))
    tasks = tasks.filter(status=status)
    start = offset
    if after is not None:
        priority, pk = after
        tasks = tasks.filter(Q(priority__gt=priority) | Q(pk__gt=pk), priority__gte=priority)
        start = 0
    return list(tasks.order_by("priority", "id").only(*CARD_FIELDS)[start : start + limit + 1])


def _more_url(form, status: str, cards: list[Task], shown: int, offset: int) -> str:
    """Where "Load more" gets the cards after the last of the `shown` (the column's
    `offset`th) in the view of `form`, or "" when `cards`, those and one more, end the
    column."""
    if len(cards) <= shown:
        return ""
    last = cards[shown - 1]
    page = urlencode({"offset": offset, "after_priority": last.priority, "after_id": last.pk})
    query = form.querystring()
    return f"{reverse('board-column', args=[status])}?{page}{'&' + query if query else ''}"


def _columns(form, shown: dict[str, int], counts: dict[str, int] | None) -> list[dict]:
    if counts is None:
        # The whole board: one index range per column, cheaper than a GROUP BY, which
        # reads every row on PostgreSQL. A filtered view's counts come with its version.
        counts = form.apply(Task.objects.all()).counts_by_index()
    columns = []
    for status in Status.values:
        limit = shown[status]
        cards = _cards(form, status, counts[status], limit=limit) if counts[status] else []
        _note_waiting(cards)
        columns.append(
            {
                "status": status,
                "label": Status(status).label,
                "count": counts[status],
                "cards": cards[:limit],
                "more_url": _more_url(form, status, cards, limit, limit),
                "actions": card_actions(status),
            }
        )
    return columns


def _note_waiting(cards: list[Task]) -> None:
    """`waiting_on`: how many of a queued card's dependencies are not done yet."""
    waiting = [c.pk for c in cards if c.status == Status.QUEUED and c.has_dependencies]
    counts = unmet_dependency_counts(waiting) if waiting else {}
    for card in cards:
        card.waiting_on = counts.get(card.pk, 0)


def _board_context(
    request: HttpRequest,
    form: BoardFilterForm,
    shown: ShownForm,
    whole: bool = True,
    view: View | None = None,
) -> dict:
    view = view or view_version(form)
    columns = _columns(form, shown.per_column(PAGE_SIZE), view.counts)
    context = {
        "form": form,
        "query": form.querystring(),
        "version": view.version,
        "columns": columns,
        "total": sum(c["count"] for c in columns),
        "can_change": request.user.has_perm("queue.change_task"),
    }
    if whole:
        # What the filter bar and the dialogs offer; the live refresh renders the board only.
        # Dropdowns not counted since the last change are left for the page to fetch
        # (board_filters): the board itself is shown without waiting for them.
        facets = _facets(form, view, count=False)
        queues = list(Queue.objects.order_by("name").values_list("name", flat=True))
        chosen = form.cleaned_data.get("queue")
        context.update(
            queues=queues,
            unknown_queue=chosen if chosen and chosen not in queues else "",
            not_filters=form.not_filters,
            facets=facets,
            facets_pending=len(facets) < len(ROUTED_FIELDS),
            saved_views=SavedView.objects.filter(user=request.user),
            bulk_actions=bulk.BUTTONS,
            filter_fields=FILTER_LABELS,
            can_triage=request.user.has_perms([CHANGE, LAUNCH]),
            can_add=request.user.has_perm("queue.add_task"),
            sync_folder=_sync_folder(request, chosen),
            new_task_form=NewTaskForm(initial={"queue": form.cleaned_data.get("queue")}),
            last_bulk=bulk.offered_undo(request.user) if context["can_change"] else None,
        )
    return context


def _sync_folder(request: HttpRequest, queue: str | None) -> str:
    """The chosen queue's folder, when the person may read it again (queue_sync)."""
    if not queue or not request.user.has_perms(["queue.add_task", CHANGE]):
        return ""
    folder = Queue.objects.filter(name=queue).values_list("folder", flat=True).first()
    try:
        return folder and str(importer.folder_inside_roots(folder, importer.SYNC_PURPOSE))
    except importer.ImportRefused:
        return ""


def _facets(form: BoardFilterForm, view: View, count: bool = True) -> dict:
    """What the filter dropdowns offer, with counts: for each field, among every task the
    other filters leave, outside the view too, so any change of the board can change them.

    Each field's counts are kept under the other filters alone: the project dropdown of
    `?project=a` is the unfiltered board's, so moving between filters counts only what
    the new filter narrows (an index range). Counting a whole table takes 0.1 s a field at
    a million tasks, so while the board keeps changing (a running herd changes it many
    times a second) they are counted again at most every FACETS_FRESH_SECONDS; the
    columns' counts are always exact, and so is a chosen value's: it is the view's total.
    With `count=False`, only the dropdowns found kept.
    """
    version = view.whole.rsplit("-", 1)[0]
    now = time.time()
    keys = {
        name: "board-facet:"
        + hashlib.sha256(f"{name}|{form.querystring(leave_out=name)}".encode()).hexdigest()
        for name in ROUTED_FIELDS
    }
    kept = cache.get_many(keys.values())
    facets = {}
    for name, key in keys.items():
        found = kept.get(key)
        if found and (found["version"] == version or now - found["at"] < FACETS_FRESH_SECONDS):
            facets[name] = found["values"]
    missing = [name for name in ROUTED_FIELDS if name not in facets]
    if count and missing:
        # The missing ones in one go: PostgreSQL counts several in one read of the tasks.
        counted = form.facets(missing)
        fresh = {"version": version, "at": now}
        cache.set_many({keys[name]: {**fresh, "values": v} for name, v in counted.items()}, 300)
        facets.update(counted)
    total = sum(view.counts.values()) if view.counts is not None else 0
    return {
        name: _with_chosen(values, form.cleaned_data.get(name), total)
        for name, values in facets.items()
    }


def _with_chosen(values: list[tuple[str, int]], chosen: str, total: int) -> list:
    """A dropdown's values with the chosen one among them, counted as the view's total:
    the others may be counts from before the last change, or not include it yet."""
    if not chosen:
        return values
    others = [(value, n) for value, n in values if value != chosen]
    return sorted([*others, (chosen, total)], key=lambda item: item[0].lower())


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_GET
@vary_on_headers("HX-Request")
def board(request: HttpRequest) -> HttpResponse:
    form = _filters(request.GET)
    if form is None:
        return _bad_filters(request.GET)
    # The live refresh: compare versions before anything is rendered.
    view = view_version(form)
    since = request.GET.get("since")
    if since and since == view.version:
        return HttpResponse(status=204)
    partial = bool(request.htmx and request.htmx.target == "board")
    shown = ShownForm(request.GET)
    etag = _board_etag(request, view, shown, partial)
    if etag in _if_none_match(request) and not len(messages.get_messages(request)):
        response = HttpResponse(status=304)
    else:
        context = _board_context(request, form, shown, whole=not partial, view=view)
        template = "workqueue/board.html#board" if partial else "workqueue/board.html"
        response = render(request, template, context)
    response["ETag"] = etag
    patch_cache_control(response, no_cache=True, private=True)
    return response


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_GET
def board_filters(request: HttpRequest) -> HttpResponse:
    """The filter dropdowns with their counts: what a board sent before they were counted
    fetches once it is shown."""
    form = _filters(request.GET)
    if form is None:
        return _bad_filters(request.GET)
    context = {
        "form": form,
        "facets": _facets(form, view_version(form)),
        "filter_fields": FILTER_LABELS,
        "can_change": request.user.has_perm("queue.change_task"),
    }
    response = render(request, "workqueue/board.html#facets", context)
    patch_cache_control(response, no_cache=True, private=True)
    return response


def _board_etag(request: HttpRequest, view: View, shown: ShownForm, partial: bool) -> str:
    """The view's version and the cards shown, who asks (the buttons follow permissions),
    and for the whole page what else it shows: the facets (any task's change) and the
    person's saved views."""
    parts = [
        repr(sorted(shown.per_column(PAGE_SIZE).items())),
        str(request.user.pk),
        repr(sorted(request.user.get_all_permissions())),
    ]
    if not partial:
        views = SavedView.objects.filter(user=request.user).values_list("id", "name", "query")
        parts += [view.whole, repr(list(views))]
    return f'"{view.version}.{hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]}"'


def _if_none_match(request: HttpRequest) -> list[str]:
    header = request.headers.get("If-None-Match", "")
    return [tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()]


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
        problems = "; ".join(f"{name}: {' '.join(e)}" for name, e in page.errors.items())
        return HttpResponseBadRequest(problems, content_type="text/plain")
    offset = page.cleaned_data["offset"]
    counts = view_version(form).counts  # kept with the view's version since its render
    cards = _cards(form, status, counts[status] if counts else 0, offset, after=page.after)
    context = {
        "column": {
            "status": status,
            "cards": cards[:PAGE_SIZE],
            "more_url": _more_url(form, status, cards, PAGE_SIZE, offset + PAGE_SIZE),
            "actions": card_actions(status),
        },
        "form": form,
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


def _detail_context(request: HttpRequest, task: Task, **extra) -> dict:
    waited = dependencies.waits_on(task)
    return {
        **extra,
        "task": task,
        "body_html": render_body(task.body),
        "events": task.events.all()[:200],
        "lock_owner": locks.read_owner(locks.lock_dir(task.queue, task.key)),
        "stale": task.is_stale(),
        "can_change": request.user.has_perm("queue.change_task"),
        "actions": card_actions(task.status),
        "diff": task.result.get("diff") if isinstance(task.result, dict) else None,
        "agent": agent_report(task),
        "transcript": task_transcript_of(task),
        "waits_on": waited,
        "cannot_become_ready": dependencies.why_stuck(task) if waited else "",
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
    if request.GET.get("shown") == transcript_version(context["transcript"], task.status):
        return HttpResponse(status=204)  # nothing new: htmx leaves the drawer as it is
    return render(request, "workqueue/transcript.html", context)


def card_actions(status: str) -> list[tuple[str, str]]:
    """(action, label) for what a person may do to a task in this status."""
    return [(a, label) for a, (label, states) in ACTIONS.items() if status in states]


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_POST
def task_action(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(Task, pk=pk)
    form = TaskActionForm(request.POST)
    if not form.is_valid():
        problems = "; ".join(" ".join(errs) for errs in form.errors.values())
        return HttpResponseBadRequest(problems, content_type="text/plain")
    action = form.cleaned_data["action"]
    seen = form.cleaned_data["seen"]
    if moved := task.moved_since(seen):
        return _moved_meanwhile(request, f"{task.key} {moved}; nothing done.")
    if task.status not in ACTIONS[action][1]:
        return HttpResponse(
            f"Cannot {ACTIONS[action][0].lower()} a {task.status} task.",
            status=409,
            content_type="text/plain",
        )
    # The same transition as the bulk actions: the file gets the new status too.
    report = editing.edit_tasks(
        [task.pk],
        _actor(request),
        action=CARD_ACTIONS[action],
        reason=form.cleaned_data["reason"].strip(),
    )
    changed = report.changed == 1
    message = f"{task.key} changed meanwhile; nothing done."
    if report.skipped:
        message = f"{task.key}: {report.skipped[0]['why']}; nothing done."
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


def _moved_meanwhile(request: HttpRequest, message: str) -> HttpResponse:
    """A card's action from a page that showed the task in another state: nothing done."""
    if not request.htmx:
        messages.error(request, message)
        return redirect(_safe_next(request))
    response = HttpResponse(message, status=409, content_type="text/plain")
    response["HX-Trigger"] = "board-changed"  # the board shows where it is now
    return response


def _board_after_action(request: HttpRequest) -> HttpResponse:
    # The board's own URL (with its filters) comes in HX-Current-URL.
    query = QueryDict(urlsplit(request.htmx.current_url or "").query)
    form = _filters(query)
    if form is None:
        form = _filters(QueryDict())
    # The cards each column shows come with the action (static/js/board.js).
    context = _board_context(request, form, ShownForm(request.POST), whole=False)
    return render(request, "workqueue/board.html#board", context)


def _drawer_after_action(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(Task, pk=pk)
    response = render(request, "workqueue/task_detail.html#drawer", _detail_context(request, task))
    # The board behind the drawer refreshes itself at once.
    response["HX-Trigger"] = "board-changed"
    return response


def _safe_next(request: HttpRequest) -> str:
    """Where to go back to: `next` or the page the request came from, when it is a page
    of this site; else the board. A path only: `redirect` takes any other word for the
    name of a view ("-1" was a server error)."""
    for candidate in (request.POST.get("next"), request.headers.get("Referer")):
        if not candidate or not (candidate.startswith("/") or "://" in candidate):
            continue
        if url_has_allowed_host_and_scheme(
            candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            return candidate
    return reverse("board")


# Edit mode ----------------------------------------------------------------------


def _actor(request: HttpRequest) -> str:
    return f"user:{request.user.get_username()}"


def _render_part(request: HttpRequest, part: str, context: dict, status: int = 200):
    """A part of the task page: alone for the drawer, in the whole page otherwise."""
    if request.htmx:
        return render(request, f"workqueue/task_detail.html#{part}", context, status=status)
    return render(request, "workqueue/task_detail.html", {**context, "mode": part}, status=status)


def _edit_context(request: HttpRequest, task: Task, form: TaskEditForm, **extra) -> dict:
    return _detail_context(request, task, form=form, choices=_field_choices(task.queue), **extra)


def _field_choices(queue: str) -> dict[str, list[str]]:
    """Values the queue already uses, offered as suggestions while editing."""
    return {
        name: sorted(field_values(name, limit=200, queue=queue))
        for name in ("project", "assignee", "complexity", "type")
    }


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_http_methods(["GET", "POST"])
@vary_on_headers("HX-Request")
def task_edit(request: HttpRequest, pk: int) -> HttpResponse:
    task = get_object_or_404(Task.objects.select_related("content"), pk=pk)
    if request.method == "GET":
        return _render_part(
            request, "edit", _edit_context(request, task, TaskEditForm.for_task(task))
        )
    form = TaskEditForm(request.POST)
    if not form.is_valid():
        return _render_part(request, "edit", _edit_context(request, task, form), status=422)
    data = form.cleaned_data
    try:
        result = editing.edit_task(
            task,
            form.changes(),
            _actor(request),
            reason=data["reason"],
            # With the fields' own fingerprints, two people's edits of different fields
            # both save; without them (an older form), any change since refuses it.
            base_sha256=None if data["base_values"] is not None else data["base_sha256"] or None,
            # A field someone else changed since the form was shown, checked against the
            # task as the save reads it (as the view read it, a save landing in between
            # was written over).
            check=form.changes,
        )
    except editing.EditError as exc:
        for name, problem in exc.errors.items():
            form.add_error(name if name in form.fields else None, f"{name}: {problem}")
        return _render_part(request, "edit", _edit_context(request, task, form), status=422)
    except editing.FileChanged as exc:
        typed = form.typed(task)
        context = _detail_context(request, task, why=exc.why, difference=exc.diff, typed=typed)
        return _render_part(request, "conflict", context, status=409)
    except editing.Conflict as exc:
        form.add_error(None, f"{exc}; reload the task and try again.")
        return _render_part(request, "edit", _edit_context(request, task, form), status=409)
    notice = _saved_notice(result)
    if not request.htmx:
        messages.success(request, notice)
        return redirect("task-detail", pk=task.pk)
    response = _render_part(
        request, "drawer", _detail_context(request, result.task, notice=notice)
    )
    response["HX-Trigger"] = "board-changed"
    return response


def _saved_notice(result: editing.EditResult) -> str:
    if not result.changed:
        return "Nothing changed."
    names = ", ".join(name.replace("_", " ") for name in result.changed)
    if result.deferred:
        return f"Saved {names}; a worker holds the task, so its file is written when it lets go."
    return f"Saved {names}."


TYPED = "typed-"  # the reload form's fields: what the person typed into the refused save


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_POST
def task_reload(request: HttpRequest, pk: int) -> HttpResponse:
    """Read the task's file again after a refused save, and edit from what it says now."""
    task = editing.reload_from_disk(get_object_or_404(Task, pk=pk))
    form = TaskEditForm.for_task(task)
    # What the person had typed into the refused save goes on top of the file's values.
    typed = {
        name: value
        for key, value in request.POST.items()
        if key.startswith(TYPED)
        and (name := key.removeprefix(TYPED)) in form.initial
        and name not in ("base_sha256", "base_values")
    }
    form.initial.update(typed)
    notice = "Reloaded from the file on disk."
    if task.source_missing:  # a save would be refused again: say so, no loop
        notice = (
            f"The task's file is missing on disk ({task.source_path}): there is nothing to "
            "reload, and an edit is saved only once the file is back."
        )
    elif typed:
        notice += f" What you typed into {', '.join(typed)} is kept: check it, then save."
    return _render_part(request, "edit", _edit_context(request, task, form, notice=notice))


# Bulk actions -------------------------------------------------------------------


def _bulk_status(request: HttpRequest, bulk_action: BulkAction | None, status: int = 200, **extra):
    context = {
        "bulk": bulk_action,
        "undoable": bulk_action is not None and bulk.can_undo(bulk_action, request.user),
        **extra,
    }
    response = render(request, "workqueue/bulk_status.html", context, status=status)
    if bulk_action is not None and bulk_action.finished:
        response["HX-Trigger"] = "board-changed"
    return response


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_POST
def bulk_start(request: HttpRequest) -> HttpResponse:
    form = BulkForm(request.POST)
    if not form.is_valid():
        problems = "; ".join(" ".join(errs) for errs in form.errors.values())
        return _bulk_status(request, None, status=422, error=problems)
    try:
        ids = form.task_ids()
        bulk_action = bulk.start(
            request.user,
            form.cleaned_data["action"],
            form.cleaned_data["value"],
            ids,
            seen=form.cleaned_data["seen"],
        )
    except forms.ValidationError as exc:
        return _bulk_status(request, None, status=422, error=" ".join(exc.messages))
    except editing.EditError as exc:
        return _bulk_status(request, None, status=422, error=str(exc))
    bulk_action.refresh_from_db()
    return _bulk_status(request, bulk_action)


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_GET
def bulk_status(request: HttpRequest, pk: int) -> HttpResponse:
    return _bulk_status(request, get_object_or_404(BulkAction, pk=pk))


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_POST
def bulk_undo(request: HttpRequest, pk: int) -> HttpResponse:
    original = get_object_or_404(BulkAction, pk=pk)
    if not bulk.can_undo(original, request.user):
        return HttpResponse(
            "Only your latest bulk action can be undone, once.",
            status=409,
            content_type="text/plain",
        )
    undo = bulk.start_undo(request.user, original)
    undo.refresh_from_db()
    return _bulk_status(request, undo)


# Saved views ----------------------------------------------------------------------


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_POST
def saved_view(request: HttpRequest) -> HttpResponse:
    """Save the board's current filters under a name (the same name replaces it)."""
    form = SavedViewForm(request.POST)
    if not form.is_valid():
        problems = "; ".join(f"{n}: {' '.join(e)}" for n, e in form.errors.items())
        messages.error(request, f"View not saved: {problems}")
        return redirect(form.board_url())
    name, query = form.cleaned_data["name"], form.cleaned_data["query"]
    mine = SavedView.objects.filter(user=request.user, name=name)
    old = mine.values_list("query", flat=True).first()
    SavedView.objects.update_or_create(user=request.user, name=name, defaults={"query": query})
    if old is None:
        messages.success(request, f"Saved the view {name!r}.")
    elif old != query:
        messages.success(request, f"Replaced the view {name!r} (it showed ?{old}).")
    else:
        messages.info(request, f"The view {name!r} was saved already.")
    return redirect(form.board_url())


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_POST
def delete_saved_view(request: HttpRequest, pk: int) -> HttpResponse:
    """One of the person's own saved views, gone."""
    view = get_object_or_404(SavedView, pk=pk, user=request.user)
    view.delete()
    messages.success(request, f"Deleted the view {view.name!r}.")
    return redirect("board")


# Triage this view ---------------------------------------------------------------

LAUNCH = "herds.add_herd"


@login_required
@permission_required([*CHANGE_AND_VIEW, LAUNCH], raise_exception=True)
@require_POST
def triage_start(request: HttpRequest) -> HttpResponse:
    """A dry-run herd of the triage rules over the board's current view."""
    form = PostedFilterForm(request.POST.get("filters", ""))
    problem = ""
    if not form.is_valid():
        problem = "the board's filters are not valid"
    elif not form.cleaned_data["queue"]:
        problem = "choose a queue first: a herd works one queue"
    elif form.cleaned_data["q"]:
        problem = "clear the search first: a herd takes tasks by their fields, not by text"
    if not problem:
        try:
            herd = triage_review.start(
                request.user, form.cleaned_data["queue"], form.routing().as_list()
            )
        except (triage_review.CannotTriage, ValidationError) as exc:
            problem = "; ".join(getattr(exc, "messages", [str(exc)]))
    if problem:
        messages.error(request, f"Cannot triage this view: {problem}.")
        return redirect(_safe_next(request))
    return redirect("triage-detail", pk=herd.pk)


def _triage_context(request: HttpRequest, herd) -> dict:
    finished = herd.finished_tasks()
    decision = triage_review.latest_decision(herd)
    undo = BulkAction.objects.filter(undo_of=decision).first() if decision else None
    applying = decision is not None and not decision.finished
    undoing = undo is not None and not undo.finished
    waiting = triage_review.proposals(herd) if herd.ended and not applying else None
    return {
        "herd": herd,
        "progress_line": herd.progress_line(finished),
        "decision": decision,
        "applying": applying or undoing,
        "undo": undo,
        "undoable": decision is not None and bulk.can_undo(decision, request.user),
        "proposals": list(waiting[: triage_review.PAGE]) if waiting is not None else [],
        "proposal_count": waiting.count() if waiting is not None else 0,
        "refused": list(triage_review.refused(herd)) if herd.ended else [],
    }


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_GET
@vary_on_headers("HX-Request")
def triage_detail(request: HttpRequest, pk: int) -> HttpResponse:
    herd = get_object_or_404(Herd.objects.select_related("profile"), pk=pk, dry_run=True)
    template = "workqueue/triage.html"
    if request.htmx:
        template += "#review"
    return render(request, template, _triage_context(request, herd))


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_POST
def triage_apply(request: HttpRequest, pk: int) -> HttpResponse:
    """The decisions on the proposals shown, or on every one ("Apply all", "Reject
    all"): carried out here when few, else on the consumer while the page shows how far."""
    herd = get_object_or_404(Herd.objects.select_related("profile"), pk=pk, dry_run=True)
    everything = request.POST.get("everything")
    if everything in ("accept", "reject"):
        waiting = list(triage_review.proposals(herd).values_list("pk", flat=True))
        accepted, rejected = (waiting, []) if everything == "accept" else ([], waiting)
    else:
        decisions = {
            as_id(name.removeprefix("decision-")): value
            for name, value in request.POST.items()
            if name.startswith("decision-")
        }
        decisions.pop(None, None)  # not a task's id
        accepted = [pk for pk, value in decisions.items() if value == "accept"]
        rejected = [pk for pk, value in decisions.items() if value == "reject"]
    if not accepted and not rejected:
        messages.error(request, "Nothing was applied: choose Accept or Reject for a proposal.")
    else:
        triage_review.decide(request.user, herd, accepted, rejected)
    return redirect("triage-detail", pk=herd.pk)


@login_required
@permission_required(CHANGE_AND_VIEW, raise_exception=True)
@require_POST
def triage_undo(request: HttpRequest, pk: int) -> HttpResponse:
    """Undo the latest decisions on a review: the applied proposals' files and rows as
    they were, waiting for a decision again (the rejected stay in the queue)."""
    herd = get_object_or_404(Herd, pk=pk, dry_run=True)
    decision = triage_review.latest_decision(herd)
    if decision is None or not bulk.can_undo(decision, request.user):
        messages.error(request, "Only your latest decisions can be undone, once.")
    else:
        bulk.start_undo(request.user, decision)
    return redirect("triage-detail", pk=herd.pk)


# A queue's folder read again ------------------------------------------------------

SYNC_ERRORS_SHOWN = 5


@login_required
@permission_required(["queue.add_task", *CHANGE_AND_VIEW], raise_exception=True)
@require_POST
def queue_sync(request: HttpRequest) -> HttpResponse:
    """Import the queue's folder again now: files added, edited, moved or deleted on disk
    since its last import (the consumer also does it every minute)."""
    name = request.POST.get("queue", "")
    if not QUEUE_NAME.fullmatch(name):  # none has it; and PostgreSQL refuses a NUL in text
        raise Http404("no queue by that name")
    queue = get_object_or_404(Queue, name=name)
    try:
        report = importer.sync_folder(queue.name)
    except importer.ImportRefused as exc:
        messages.error(request, f"Cannot read the folder of {queue.name} again: {exc}.")
        return redirect(_safe_next(request))
    level = messages.warning if report.errors else messages.success
    level(request, f"Read the folder of {queue.name} again: {report.summary()}.")
    for error in report.errors[:SYNC_ERRORS_SHOWN]:
        messages.warning(request, f"{error['path']}: {error['error']}")
    if len(report.errors) > SYNC_ERRORS_SHOWN:
        more = len(report.errors) - SYNC_ERRORS_SHOWN
        messages.warning(request, f"and {more} more: manage.py import_tasks lists them all.")
    return redirect(_safe_next(request))


# New tasks ------------------------------------------------------------------------


@login_required
@permission_required("queue.add_task", raise_exception=True)
@require_http_methods(["GET", "POST"])
@vary_on_headers("HX-Request")
def task_new(request: HttpRequest) -> HttpResponse:
    """A new task file in the queue's folder, imported at once."""
    if request.method == "GET":
        form = NewTaskForm(initial={"queue": request.GET.get("queue", "")})
        return _new_task_form(request, form)
    form = NewTaskForm(request.POST)
    if not form.is_valid():
        return _new_task_form(request, form, status=422)
    data = form.cleaned_data
    try:
        task = authoring.create_task_file(
            data["queue"], data["title"], data["body"], form.fields_given(), _actor(request)
        )
    except authoring.AuthoringError as exc:
        for name, problem in exc.errors.items():
            form.add_error(name if name in form.fields else None, f"{name}: {problem}")
        return _new_task_form(request, form, status=422)
    notice = f"Created {task.key} in {Path(task.source_path).name}."
    if not request.htmx:
        messages.success(request, notice)
        return redirect("task-detail", pk=task.pk)
    task = Task.objects.select_related("content").get(pk=task.pk)
    response = render(
        request, "workqueue/task_detail.html#drawer", _detail_context(request, task, notice=notice)
    )
    response["HX-Retarget"] = "#drawer"
    response["HX-Reswap"] = "innerHTML"
    response["HX-Trigger"] = "board-changed, task-created"
    return response


def _new_task_form(request: HttpRequest, form: NewTaskForm, status: int = 200) -> HttpResponse:
    template = "workqueue/new_task.html"
    if request.htmx:
        template += "#new-task-form"
    context = {"form": form, "in_dialog": request.POST.get("in_dialog") == "1"}
    return render(request, template, context, status=status)
