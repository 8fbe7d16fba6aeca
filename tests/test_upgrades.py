"""An install that has run for a while: its folders moved, its data made by older code."""

from __future__ import annotations

import io
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from herds.models import Herd, HerdStatus, HerdWorker, Profile
from tests.conftest import make_tasks
from workqueue.authoring import create_task_file
from workqueue.importer import Importer
from workqueue.management.commands import start
from workqueue.models import EventKind, Queue, Task, TaskEvent
from workqueue.tasks import sync_queue_folders

pytestmark = pytest.mark.django_db


def task_text(key: str, title: str, status: str = "inbox") -> str:
    return f"---\nid: {key}\ntitle: {title}\nstatus: {status}\n---\n# {title}\n"


def test_a_queue_whose_folder_was_moved_follows_the_folder_imported_now(
    settings, write_task, tmp_path
):
    """An operator moves (or renames) a queue's folder and imports it from its new place:
    the consumer's minute, Read the folder again and New task follow it there. They kept
    the folder the queue was first imported from, gone, and read and wrote nowhere."""
    write_task("a.md", task_text("ex-1", "A"))
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    assert not Importer("inbox").run([write_task.folder]).errors
    moved = tmp_path / "moved"
    write_task.folder.rename(moved)
    report = Importer("inbox").run([moved])
    assert not report.errors and report.missing == 0
    assert Queue.objects.get(name="inbox").folder == str(moved.resolve())
    (moved / "b.md").write_text(task_text("ex-2", "B"))
    sync_queue_folders.call_local()
    assert Task.objects.get(key="ex-2").source_path == str(moved / "b.md")
    made = create_task_file("inbox", "C", actor="ann")
    assert made.source_path.startswith(str(moved.resolve()))


def test_a_queue_keeps_its_folder_while_that_folder_is_there(settings, write_task, tmp_path):
    """A queue's folder is its first: importing another folder into it (a folder of
    older tasks, say) does not send its new tasks there while the first is still there."""
    write_task("a.md", task_text("ex-1", "A"))
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    Importer("inbox").run([write_task.folder])
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.md").write_text(task_text("ex-2", "B"))
    assert not Importer("inbox").run([other]).errors
    assert Queue.objects.get(name="inbox").folder == str(write_task.folder.resolve())


def test_an_install_that_imported_the_repositorys_examples_moves_them_to_its_data_folder(
    settings, tmp_path, monkeypatch
):
    """A first start before examples were copied imported the repository's examples/inbox
    itself, and an upgrade kept it: finishes and the board went on writing the repository's
    own files (which `git pull` then meets). The next start moves the queue to the copy,
    with the files as they are now."""
    repository = tmp_path / "repository" / "examples" / "inbox"
    shutil.copytree(start.EXAMPLES, repository)
    monkeypatch.setattr(start, "EXAMPLES", repository)
    data = tmp_path / "var"
    data.mkdir()
    settings.HYPERVISOR_DATA_DIR = data
    settings.HYPERVISOR_IMPORT_ROOTS = [data / "examples"]  # the default
    # What such a start did (and an upgrade's migrate leaves as it was):
    assert not Importer("examples", roots=[repository]).run([repository]).errors
    (data / ".examples-imported").write_text("examples/inbox was imported on first start\n")
    first = Task.objects.filter(queue="examples").order_by("key").first()
    finished = Path(first.source_path)
    finished.write_text(finished.read_text().replace("status: inbox", "status: done"))
    keys = sorted(Task.objects.filter(queue="examples").values_list("key", flat=True))
    said = io.StringIO()
    call_command("start", "--setup-only", stdout=said)
    copy = (data / "examples" / "inbox").resolve()
    assert Queue.objects.get(name="examples").folder == str(copy)
    paths = Task.objects.filter(queue="examples").values_list("source_path", flat=True)
    assert all(Path(path).is_relative_to(copy) for path in paths), list(paths)
    assert str(copy) in said.getvalue()
    # The same tasks, read from the copy as they were left (nothing to import again), and
    # the finish written into the repository's file is there too.
    sync_queue_folders.call_local()
    assert sorted(Task.objects.filter(queue="examples").values_list("key", flat=True)) == keys
    assert not Task.objects.filter(queue="examples", source_missing=True).exists()
    moved = Path(Task.objects.get(pk=first.pk).source_path)
    assert "status: done" in moved.read_text()
    # Moved once: the next start leaves it.
    call_command("start", "--setup-only", stdout=io.StringIO())
    assert Queue.objects.get(name="examples").folder == str(copy)


def test_prune_keeps_the_events_a_running_herd_counts_its_claims_from():
    """`prune --days 1` from cron while a herd has run for two days: the herd's run summary
    counts its claims from their events, and lost those older than a day."""
    profile = Profile.objects.get(name="noop")
    now = timezone.now()
    herd = Herd.objects.create(
        queue="q", profile=profile, size=1, status=HerdStatus.RUNNING,
        started_at=now - timedelta(days=2),
    )  # fmt: skip
    Herd.objects.filter(pk=herd.pk).update(created_at=now - timedelta(days=2))
    worker = HerdWorker.objects.create(herd=herd, index=0, name="herd-w0")
    early, late, before = make_tasks("q", 3)
    TaskEvent.objects.bulk_create(
        [
            TaskEvent(task=before, kind=EventKind.NOTE, at=now - timedelta(days=3)),
            TaskEvent(
                task=early,
                kind=EventKind.CLAIMED,
                actor=worker.name,
                at=now - timedelta(days=2) + timedelta(minutes=1),
            ),
            TaskEvent(task=late, kind=EventKind.CLAIMED, actor=worker.name, at=now),
        ]  # fmt: skip
    )
    assert herd.claims_given_back()[0] == 2
    call_command("prune", "--days", "1", stdout=io.StringIO())
    assert herd.claims_given_back()[0] == 2
    # What is older than the herd goes as before; once it has ended, its events go too.
    assert not TaskEvent.objects.filter(task=before).exists()
    Herd.objects.filter(pk=herd.pk).update(
        status=HerdStatus.FINISHED, finished_at=now - timedelta(hours=1)
    )
    call_command("prune", "--days", "1", stdout=io.StringIO())
    assert herd.claims_given_back()[0] == 1


def test_the_consumer_says_once_that_a_queues_folder_is_gone(settings, write_task, caplog):
    """A queue's folder moved or renamed without an import from its new place: each
    minute's pass skipped it without a word, and the board stood still."""
    write_task("a.md", task_text("ex-1", "A"))
    settings.HYPERVISOR_IMPORT_ROOTS = [write_task.folder.parent]
    settings.HYPERVISOR_SYNC_FOLDERS = True
    Importer("inbox").run([write_task.folder])
    folder = str(write_task.folder.resolve())
    write_task.folder.rename(write_task.folder.parent / "renamed")

    def logged() -> list[str]:
        caplog.clear()
        with caplog.at_level("INFO", logger="workqueue.tasks"):
            sync_queue_folders.call_local()
        return [r.getMessage() for r in caplog.records]

    assert logged() == [
        f"queue inbox: its folder {folder} is gone (moved or renamed?): import it from "
        "where it is now (import_tasks FOLDER --queue inbox), and the queue follows it"
    ]
    assert logged() == []  # once
    (write_task.folder.parent / "renamed").rename(write_task.folder)
    assert logged() == []  # back, unchanged: nothing to say
    write_task.folder.rename(write_task.folder.parent / "renamed")
    assert len(logged()) == 1  # gone again: said again


OLD = [("queue", "0020_board_field_indexes_hold_values_only"), ("herds", "0009_profile_pull_kind")]


@pytest.mark.django_db(transaction=True)
def test_tasks_of_an_install_at_migration_0020_migrate_to_today_and_are_found_on_the_board(
    client, django_user_model
):
    """The rows older code made, through every migration since (search copies, their
    generation, kept searches, the board's indexes): found as a fresh import's are, and
    those read before keys were read in any case marked to be read again."""
    executor = MigrationExecutor(connection)
    executor.migrate(OLD)
    try:
        apps = executor.loader.project_state(OLD).apps
        OldTask, OldBody = apps.get_model("queue", "Task"), apps.get_model("queue", "TaskBody")
        for i, (title, frontmatter) in enumerate(
            [("Webhook retry", {"title": "Webhook retry"}), ("Shout", {"Status": "done"})]
            + [(f"Filler {i}", {"title": f"Filler {i}"}) for i in range(30)]
        ):
            task = OldTask.objects.create(
                queue="up", key=f"up-{i}", title=title, status="queued", priority=2,
                project="web", source_path=f"/tasks/up-{i}.md", source_size=10,
                source_sha256="ab" * 32, frontmatter=frontmatter,
            )  # fmt: skip
            OldBody.objects.create(task=task, text=f"# {title}\n\nbody of {i}")
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
    # Read again by the next import: only the row whose keys were capitalised.
    assert list(Task.objects.filter(source_sha256="").values_list("key", flat=True)) == ["up-1"]
    assert Task.objects.get(key="up-0").source_size == 10
    assert list(Task.objects.matching_text("hook ret").values_list("key", flat=True)) == ["up-0"]
    assert Task.objects.matching_text("body of").count() == 32
    login = django_user_model.objects.create_superuser("ann", "", "x")
    client.force_login(login)
    for text in ("webhook", "fi"):  # one task; two letters in most
        page = client.get("/", {"q": text, "queue": "up"}).content.decode()
        assert ("Webhook retry" in page) == (text == "webhook"), text
        assert ("Filler 1<" in page) == (text == "fi"), text
