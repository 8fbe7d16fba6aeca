"""Huey tasks of the queue app: bulk actions from the board run here, off the request."""

from __future__ import annotations

from huey.contrib.djhuey import on_commit_task

from workqueue import bulk


@on_commit_task()
def run_bulk_action(bulk_id: int) -> None:
    bulk.run(bulk_id)
