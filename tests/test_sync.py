"""A queue's folder read again: from the board's button, and by the consumer every minute."""

from __future__ import annotations

import time

import pytest
from django.contrib.messages import get_messages

from tests.conftest import start_manage
from tests.test_views_editing import login
from workqueue.importer import Importer
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent
from workqueue.tasks import sync_queue_folders

pytestmark = pytest.mark.django_db


def task_text(key: str, title: str, status: str = "inbox") -> str:
    return f"---\nid: {key}\ntitle: {title}\nstatus: {status}\n---\n# {title}\n"


@pytest.fixture
def inbox(settings, write_task):
    """A queue first imported from a folder inside the configured import roots."""
    write_task("a.md", task_text("ex-1", "A"))
    write_task("b.md", task_text("ex-2", "B"))
    settings.HYPERVISOR_IMPORT_ROOTS = [write_task.folder]
    assert not Importer("inbox").run([write_task.folder]).errors
    return write_task


@pytest.fixture
def author(client, django_user_model):
    return login(client, django_user_model, "view_task", "change_task", "add_task")


def said(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def test_the_board_reads_the_queues_folder_again(author, inbox):
    board = author.get("/?queue=inbox").content.decode()
    assert "Read the folder again</button>" in board
    assert f"new and edited files of {inbox.folder}" in board
    inbox("c.md", task_text("ex-3", "C, written by hand"))
    inbox("a.md", task_text("ex-1", "A, edited in an editor"))
    (inbox.folder / "b.md").unlink()
    response = author.post(
        "/queues/sync/", {"queue": "inbox"}, HTTP_REFERER="http://testserver/?queue=inbox"
    )
    assert (response.status_code, response["Location"]) == (302, "http://testserver/?queue=inbox")
    assert said(response) == [
        "Read the folder of inbox again: 1 imported, 1 updated, 0 unchanged, 0 closed, "
        "0 deferred (claimed), 1 missing, 0 errors."
    ]
    titles = dict(Task.objects.values_list("key", "title"))
    assert titles == {"ex-1": "A, edited in an editor", "ex-2": "B", "ex-3": "C, written by hand"}
    gone = Task.objects.get(key="ex-2")
    assert gone.source_missing
    assert TaskEvent.objects.filter(task=gone, kind=EventKind.MISSING).exists()
    # Nothing changed on disk: nothing changes in the queue.
    author.get(response["Location"])  # the board shows (and so uses up) the first answer
    again = author.post("/queues/sync/", {"queue": "inbox"})
    assert said(again) == [
        "Read the folder of inbox again: 0 imported, 0 updated, 2 unchanged, 0 closed, "
        "0 deferred (claimed), 0 missing, 0 errors."
    ]


def test_files_the_import_refuses_are_named(author, inbox):
    for n in range(7):
        inbox(f"bad-{n}.md", f"---\nid: bad-{n}\ntitle: [unclosed\n---\n")
    response = author.post("/queues/sync/", {"queue": "inbox"})
    lines = said(response)
    assert lines[0].endswith("7 errors.")
    assert len(lines) == 1 + 5 + 1
    assert all(line.startswith(str(inbox.folder / "bad-")) for line in lines[1:6])
    assert lines[-1] == "and 2 more: manage.py import_tasks lists them all."
    assert Task.objects.count() == 2


def test_a_folder_outside_the_import_roots_is_read_only_from_the_command_line(
    author, settings, write_task
):
    write_task("a.md", task_text("ex-1", "A"))
    # As `import_tasks FOLDER` does: the named folder is a root for that run only.
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    settings.HYPERVISOR_IMPORT_ROOTS = []
    write_task("c.md", task_text("ex-3", "C"))
    # Not offered where it cannot work; a page older than the change is told why.
    assert "Read the folder again" not in author.get("/?queue=inbox").content.decode()
    response = author.post("/queues/sync/", {"queue": "inbox"})
    assert said(response) == [
        f"Cannot read the folder of inbox again: {write_task.folder} is outside the import "
        "roots (HYPERVISOR_IMPORT_ROOTS: none); add it there to read it again from here (or "
        "run manage.py import_tasks)."
    ]
    assert not Task.objects.filter(key="ex-3").exists()


def test_a_folder_swapped_for_a_link_out_of_the_roots_is_not_followed(
    author, settings, write_task, tmp_path
):
    write_task("inbox/a.md", task_text("ex-1", "A"))
    settings.HYPERVISOR_IMPORT_ROOTS = [write_task.folder]
    Importer("inbox").run([write_task.folder / "inbox"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text(task_text("s-1", "Not for the queue"))
    (write_task.folder / "inbox").rename(tmp_path / "kept")
    (write_task.folder / "inbox").symlink_to(outside)
    response = author.post("/queues/sync/", {"queue": "inbox"})
    assert said(response) == [
        f"Cannot read the folder of inbox again: {write_task.folder / 'inbox'} is outside the "
        f"import roots (HYPERVISOR_IMPORT_ROOTS: {write_task.folder}); add it there to read it "
        "again from here (or run manage.py import_tasks)."
    ]
    assert not Task.objects.filter(key="s-1").exists()
    assert not Task.objects.filter(source_missing=True).exists()


def test_a_queue_without_a_folder_says_how_it_gets_one(author, settings):
    Queue.objects.create(name="bare")
    Task.objects.create(queue="bare", key="t1", title="T", status=Status.QUEUED)
    response = author.post("/queues/sync/", {"queue": "bare"})
    assert said(response) == [
        "Cannot read the folder of bare again: the queue 'bare' has no folder: its first "
        "import of a folder sets it (manage.py import_tasks FOLDER --queue bare)."
    ]
    assert author.post("/queues/sync/", {"queue": "nope"}).status_code == 404
    # A name no queue can have: PostgreSQL refused the NUL in its lookup, a server error.
    assert author.post("/queues/sync/", {"queue": "bare\x00"}).status_code == 404


def test_reading_a_folder_again_needs_the_add_and_change_permissions(
    client, django_user_model, inbox
):
    editor = login(client, django_user_model, "view_task", "change_task")
    assert "Read the folder again" not in editor.get("/?queue=inbox").content.decode()
    inbox("c.md", task_text("ex-3", "C"))
    assert editor.post("/queues/sync/", {"queue": "inbox"}).status_code == 403
    assert not Task.objects.filter(key="ex-3").exists()


def test_the_consumer_reads_every_folder_inside_the_roots_each_minute(settings, inbox, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.md").write_text(task_text("x-1", "X"))
    Importer("other", roots=[elsewhere]).run([elsewhere])
    inbox("c.md", task_text("ex-3", "C"))
    (elsewhere / "y.md").write_text(task_text("x-2", "Y"))
    settings.HYPERVISOR_SYNC_FOLDERS = False
    sync_queue_folders.call_local()
    assert not Task.objects.filter(key__in=["ex-3", "x-2"]).exists()
    settings.HYPERVISOR_SYNC_FOLDERS = True
    sync_queue_folders.call_local()
    assert Task.objects.filter(queue="inbox", key="ex-3").exists()
    # The other queue's folder lies outside the roots: only its command line reads it.
    assert not Task.objects.filter(key="x-2").exists()


@pytest.mark.django_db(transaction=True)
def test_a_running_consumer_brings_a_file_written_by_hand_onto_the_board(
    huey_env, write_task, tmp_path
):
    write_task("a.md", task_text("ex-1", "A"))
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    write_task("b.md", task_text("ex-2", "Written by hand"))
    env = {**huey_env, "HYPERVISOR_IMPORT_ROOTS": str(write_task.folder)}
    with open(tmp_path / "consumer.log", "w") as log:
        consumer = start_manage(["run_huey"], env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60  # Huey's periodic tasks run as it starts
        while not Task.objects.filter(key="ex-2").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        consumer.terminate()
        consumer.wait(timeout=15)
    assert Task.objects.get(key="ex-2").title == "Written by hand"
    assert "queue inbox: folder read again: 1 imported" in (tmp_path / "consumer.log").read_text()


def test_the_consumer_logs_a_broken_file_once_until_it_changes_or_is_mended(
    settings, inbox, caplog
):
    """Each minute's pass logged every broken file again, for ever."""
    settings.HYPERVISOR_SYNC_FOLDERS = True
    bad = inbox("bad.md", "---\nid: bad\ntitle: [unclosed\n---\n")

    def logged() -> list[str]:
        caplog.clear()
        with caplog.at_level("INFO", logger="workqueue.tasks"):
            sync_queue_folders.call_local()
        return [r.getMessage() for r in caplog.records]

    first = logged()
    assert first[0].endswith("0 missing, 1 errors")
    assert first[1:] == [
        f"queue inbox: {bad}: YAML syntax error at line 4, column 1: did not "
        "find expected ',' or ']'"
    ]
    assert logged() == []  # the next minute: nothing new
    # The board (and import_tasks) still name it each time a person asks.
    assert [e["path"] for e in Importer("inbox").run([inbox.folder]).errors] == [str(bad)]
    bad.write_text("---\nid: bad\ntitle: [still unclosed\n---\n")
    assert any(str(bad) in m for m in logged())  # changed, still broken: said again
    assert logged() == []
    bad.write_text(task_text("bad", "Mended"))
    assert logged() == [
        "queue inbox: folder read again: 1 imported, 0 updated, 2 unchanged, "
        "0 closed, 0 deferred (claimed), 0 missing, 0 errors"
    ]
    bad.write_text("---\nid: bad\ntitle: [broken again\n---\n")
    assert any(str(bad) in m for m in logged())  # mended, then broken again: said again
