"""Huey tasks of the queue app: bulk actions from the board, and the planner's
statistics, run here, off the request."""

from __future__ import annotations

from huey import crontab
from huey.contrib.djhuey import db_periodic_task, on_commit_task

from workqueue import bulk
from workqueue.models import Task


@on_commit_task()
def run_bulk_action(bulk_id: int) -> None:
    bulk.run(bulk_id)


@db_periodic_task(crontab(minute="*/10"))
def keep_planner_statistics() -> None:
    # Tasks also arrive one by one (new task, MCP, small imports); a count every ten
    # minutes notices when they add up.
    Task.objects.keep_statistics()
