"""`manage.py prune`: old task events, agents' logs and transcripts and herds' worker logs
go; what is in use and what is recent stays."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from herds.models import Herd, HerdStatus, Profile
from tests.conftest import make_tasks
from workqueue.models import EventKind, Status, Task, TaskEvent

pytestmark = pytest.mark.django_db


def prune(*args: str) -> dict:
    out = StringIO()
    call_command("prune", *args, "--json", stdout=out)
    return json.loads(out.getvalue())


def aged(path, days: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    then = time.time() - days * 86400
    os.utime(path, (then, then))
    return path


def test_events_older_than_the_cutoff_go_in_batches_and_the_rest_stay(monkeypatch):
    old_task, new_task = make_tasks("q", 2)
    now = timezone.now()
    TaskEvent.objects.bulk_create(
        [
            TaskEvent(task=old_task, kind=EventKind.NOTE, at=now - timedelta(days=40 + i))
            for i in range(5)
        ]
        + [TaskEvent(task=new_task, kind=EventKind.NOTE, at=now - timedelta(days=1))]
    )
    assert prune("--days", "30", "--dry-run")["events"] == 5
    assert TaskEvent.objects.count() == 6
    deleted = TaskEvent.objects.prune(now - timedelta(days=30), batch=2)
    assert deleted == 5
    assert list(TaskEvent.objects.values_list("task", flat=True)) == [new_task.pk]
    assert prune("--days", "30")["events"] == 0


def test_old_logs_and_transcripts_go_but_a_held_claims_and_a_running_herds_stay(
    settings, tmp_path
):
    settings.HYPERVISOR_DATA_DIR = tmp_path
    agents, herds = tmp_path / "logs" / "agents", tmp_path / "logs" / "herds"
    held, idle = make_tasks("q", 2)
    Task.objects.filter(pk=held.pk).update(status=Status.CLAIMED, fence=7)
    old_log = aged(agents / f"task-{idle.pk}-3.log", 40)
    old_transcript = aged(agents / f"task-{idle.pk}-3.transcript.json", 40)
    held_log = aged(agents / f"task-{held.pk}-7.log", 40)
    recent = aged(agents / f"task-{idle.pk}-4.log", 1)
    stranger = aged(agents / "notes.txt", 40)
    pull_log = aged(agents / "pull-web1-4242.log", 40)
    pull_recent = aged(agents / "pull-web1-4243.log", 1)
    profile = Profile.objects.get(name="noop")
    now = timezone.now()
    ended = Herd.objects.create(
        queue="q", profile=profile, size=1, status=HerdStatus.FINISHED,
        finished_at=now - timedelta(days=40),
    )  # fmt: skip
    running = Herd.objects.create(queue="q", profile=profile, size=1, status=HerdStatus.RUNNING)
    lately = Herd.objects.create(
        queue="q", profile=profile, size=1, status=HerdStatus.FAILED, finished_at=now
    )
    for herd in (ended, running, lately):
        aged(herds / str(herd.pk) / "worker-0.log", 40)

    assert prune("--days", "30", "--dry-run") == {
        "events": 0, "claim_files": 3, "herd_folders": 1, "bytes": 4,
    }  # fmt: skip
    assert old_log.exists() and (herds / str(ended.pk)).exists()

    prune("--days", "30")
    assert not old_log.exists() and not old_transcript.exists() and not pull_log.exists()
    assert pull_recent.exists()
    assert held_log.exists() and recent.exists() and stranger.exists()
    assert not (herds / str(ended.pk)).exists()
    assert (herds / str(running.pk)).exists() and (herds / str(lately.pk)).exists()


def test_a_symlink_among_the_logs_is_left_alone(settings, tmp_path):
    settings.HYPERVISOR_DATA_DIR = tmp_path / "data"
    elsewhere = aged(tmp_path / "elsewhere" / "keep.txt", 40)
    agents = tmp_path / "data" / "logs" / "agents"
    agents.mkdir(parents=True)
    link = agents / "task-1-1.log"
    link.symlink_to(elsewhere)
    os.utime(link, (0, 0), follow_symlinks=False)
    assert prune("--days", "30")["claim_files"] == 0
    assert link.is_symlink() and elsewhere.exists()


def test_days_must_be_at_least_one():
    with pytest.raises(CommandError, match="at least 1"):
        call_command("prune", "--days", "0")
