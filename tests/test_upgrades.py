"""An install that has run for a while: its folders moved, its data made by older code."""

from __future__ import annotations

import pytest

from workqueue.authoring import create_task_file
from workqueue.importer import Importer
from workqueue.models import Queue, Task
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
