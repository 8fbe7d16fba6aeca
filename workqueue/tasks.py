"""Huey tasks of the queue app: bulk actions from the board, the queues' folders read
again, and the planner's statistics, run here, off the request."""

from __future__ import annotations

import logging
import os
import threading

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import db_periodic_task, on_commit_task

from workqueue import bulk, importer
from workqueue.models import Queue, Task

log = logging.getLogger(__name__)


@on_commit_task()
def run_bulk_action(bulk_id: int) -> None:
    bulk.run(bulk_id)


@db_periodic_task(crontab(minute="*/10"))
def keep_planner_statistics() -> None:
    # Tasks also arrive one by one (new task, MCP, small imports); a count every ten
    # minutes notices when they add up.
    Task.objects.keep_statistics()


# A pass over a large folder may outlast its minute: the next tick then passes. (Huey's
# lock_task would outlive a consumer killed mid-pass: its SQLite storage has no expiry.)
_syncing = threading.Lock()


@db_periodic_task(crontab())
def sync_queue_folders() -> None:
    if not settings.HYPERVISOR_SYNC_FOLDERS or not _syncing.acquire(blocking=False):
        return
    try:
        _sync_queue_folders()
    finally:
        _syncing.release()


def _sync_queue_folders() -> None:
    for queue, folder in Queue.objects.exclude(folder="").values_list("name", "folder"):
        if not _folder_is_there(queue, folder):
            continue
        try:
            report = importer.sync_folder(queue, folder)
        except importer.ImportRefused:
            continue  # outside the import roots: read from the command line only
        news = _errors_not_logged(queue, report.errors)
        if report.changed or news:
            log.info("queue %s: folder read again: %s", queue, report.summary())
        for error in news:
            log.warning("queue %s: %s: %s", queue, error["path"], error["error"])


# The queues whose folder a pass found gone, and said so: once, not every minute.
_gone: set[tuple[str, str]] = set()


def _folder_is_there(queue: str, folder: str) -> bool:
    if os.path.isdir(folder):
        _gone.discard((queue, folder))
        return True
    if (queue, folder) not in _gone:
        # Moved or renamed: without a word its board would stand still for good.
        _gone.add((queue, folder))
        log.warning(
            "queue %s: its folder %s is gone (moved or renamed?): import it from where it "
            "is now (import_tasks FOLDER --queue %s), and the queue follows it",
            queue,
            folder,
            queue,
        )
    return False


# Per queue, the errors the passes have logged, each with its file's size and mtime then: a
# broken file was logged every minute for ever. It is logged again once it changes, or
# breaks again after it was mended; the board and import_tasks name it each time.
_logged_errors: dict[str, dict[tuple[str, str], tuple[int, int] | None]] = {}


def _errors_not_logged(queue: str, errors: list[dict]) -> list[dict]:
    before = _logged_errors.get(queue, {})
    now, news = {}, []
    for error in errors:
        said = (error["path"], error["error"])
        now[said] = _file_state(error["path"])
        if said not in before or before[said] != now[said]:
            news.append(error)
    _logged_errors[queue] = now  # a mended file is forgotten
    return news


def _file_state(path: str) -> tuple[int, int] | None:
    try:
        stat = os.lstat(path)
    except (OSError, ValueError):  # gone, a queue file's line (`list.txt:3`), a NUL
        return None
    return stat.st_size, stat.st_mtime_ns
