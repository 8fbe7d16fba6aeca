from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from django.views.decorators.vary import vary_on_headers

from herds.charts import throughput_chart
from herds.forms import LaunchForm
from herds.models import LAUNCH_UNSENT_SAID, Herd, LaunchRepeated
from workqueue.models import Task
from workqueue.text import as_id
from workqueue.views import task_transcript_of

VIEW = "herds.view_herd"
SEE_TASKS = "queue.view_task"
OPERATE = "herds.add_herd"  # launching, draining and cancelling
# Each of those answers with the herd's page: operating a herd takes seeing it too.
OPERATE_AND_VIEW = [OPERATE, VIEW]
LISTED = 100  # herds a page of the list, newest first


def _get_herd(pk: int) -> Herd:
    return get_object_or_404(Herd.objects.select_related("profile", "created_by"), pk=pk)


def _live_context(herd: Herd, user) -> dict:
    planned = herd.planned_tasks()
    finished = herd.finished_tasks()
    return {
        "herd": herd,
        "workers": list(herd.workers.select_related("replaces")),
        "planned": planned,
        "finished": finished,
        # Tasks that became ready during the run count too: never "6 of 5".
        "percent": round(100 * finished / max(planned, finished))
        if max(planned, finished)
        else (100 if herd.ended else 0),
        "progress_line": herd.progress_line(finished),
        "tokens": herd.total_tokens(),
        "cost": herd.total_cost_usd(),
        "chart": throughput_chart(herd.samples, planned),
        # The tasks' titles and transcripts take seeing tasks, as on the tasks' own pages.
        "transcripts": live_transcripts(herd)
        if not herd.ended and user.has_perm(SEE_TASKS)
        else [],
    }


TRANSCRIPT_ENTRIES_ON_HERD_PAGE = 8


def live_transcripts(herd: Herd) -> list[dict]:
    """The last entries of each running agent's transcript: a file read per claimed task."""
    claimed = Task.objects.claimed().filter(holder_herd=herd.pk).order_by("holder")
    return [
        {"task": task, "transcript": task_transcript_of(task, TRANSCRIPT_ENTRIES_ON_HERD_PAGE)}
        for task in claimed.only("id", "key", "title", "holder", "status", "fence")[:50]
    ]


@login_required
@permission_required(VIEW, raise_exception=True)
def herd_list(request: HttpRequest) -> HttpResponse:
    # A page of the newest, then older ones by id: an index range however many herds ran.
    herds = Herd.objects.listed()
    before = as_id(request.GET.get("before", ""))
    if before is not None:
        herds = herds.filter(pk__lt=before)
    herds = list(herds[: LISTED + 1])
    older = herds[LISTED - 1].pk if len(herds) > LISTED else None
    context = {"herds": herds[:LISTED], "older": older, "paged": before is not None}
    return render(request, "herds/herd_list.html", context)


@login_required
@permission_required(OPERATE_AND_VIEW, raise_exception=True)
@require_http_methods(["GET", "POST"])
def launch(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return render(request, "herds/launch.html", {"form": LaunchForm()})
    form = LaunchForm(request.POST)
    if not form.is_valid():
        return render(request, "herds/launch.html", {"form": form}, status=400)
    data = form.cleaned_data
    if "confirm" not in request.POST:
        # Pre-flight first: the person sees what the herd would find before starting it.
        plan = Herd(queue=data["queue"], profile=data["profile"], filters=data["where"])
        preflight = plan.compute_preflight()
        return render(
            request, "herds/launch.html", {"form": form, "preflight": preflight, "plan": data}
        )
    try:
        herd = Herd.launch(
            data["queue"],
            data["profile"],
            data["workers"],
            batch=data["batch"],
            filters=data["where"],
            created_by=request.user,
            token_budget=data["token_budget"],
            wall_clock_limit=data["wall_clock_limit"],
            cost_budget_usd=data["cost_budget_usd"],
            resume_after_quota=data["resume_after_quota"],
            launch_token=data["launch_token"],
        )
    except LaunchRepeated as repeat:
        messages.info(
            request,
            f"Herd {repeat.herd.pk} was launched from this form already: not launched again. "
            "To launch another herd, open the launch form again.",
        )
        return redirect(repeat.herd)
    except ValidationError as exc:
        form.add_error(None, exc)
        return render(request, "herds/launch.html", {"form": form}, status=400)
    if herd.launch_sent:
        messages.success(request, f"Herd {herd.pk} launched.")
    else:
        messages.warning(request, f"Herd {herd.pk} {LAUNCH_UNSENT_SAID}.")
    return redirect("herds:detail", pk=herd.pk)


@login_required
@permission_required(VIEW, raise_exception=True)
def detail(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "herds/detail.html", _page_context(request, pk))


@login_required
@permission_required(VIEW, raise_exception=True)
@vary_on_headers("HX-Request")
def live(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "herds/live.html", _page_context(request, pk))


def _page_context(request: HttpRequest, pk: int) -> dict:
    context = _live_context(_get_herd(pk), request.user)
    context["can_operate"] = request.user.has_perm(OPERATE)
    return context


@login_required
@permission_required(VIEW, raise_exception=True)
def summary_json(request: HttpRequest, pk: int) -> HttpResponse:
    herd = _get_herd(pk)
    if not herd.ended:
        return HttpResponse("The run summary is written when the last worker exits.", status=409)
    response = HttpResponse(
        json.dumps(herd.summary, indent=2), content_type="application/json; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="herd-{herd.pk}-summary.json"'
    return response


def _after_action(request: HttpRequest, herd: Herd) -> HttpResponse:
    if request.htmx:
        herd.refresh_from_db()
        context = _live_context(herd, request.user)
        context["can_operate"] = True
        # The herd's section, and what the action did said beside it (not by the poll,
        # which would take it away 2 s later, nor by the next page of another herd).
        return render(request, "herds/after_action.html", context)
    return redirect("herds:detail", pk=herd.pk)


@login_required
@permission_required(OPERATE_AND_VIEW, raise_exception=True)
@require_POST
def drain(request: HttpRequest, pk: int) -> HttpResponse:
    herd = _get_herd(pk)
    if herd.drain(f"drained by {request.user.get_username()}"):
        messages.info(request, f"Herd {herd.pk} is draining: current tasks finish, no new claims.")
    return _after_action(request, herd)


@login_required
@permission_required(OPERATE_AND_VIEW, raise_exception=True)
@require_POST
def cancel(request: HttpRequest, pk: int) -> HttpResponse:
    herd = _get_herd(pk)
    if herd.cancel(f"cancelled by {request.user.get_username()}"):
        messages.info(request, f"Herd {herd.pk} is being cancelled.")
    return _after_action(request, herd)
