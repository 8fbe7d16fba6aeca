from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from workqueue.models import Task


@login_required
@permission_required("queue.view_task", raise_exception=True)
def board(request: HttpRequest) -> HttpResponse:
    return render(request, "workqueue/board.html", {"counts": Task.objects.counts()})
