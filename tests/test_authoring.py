"""New task files: the queue's folder and conventions, confinement, never overwriting."""

from __future__ import annotations

import os

import pytest

from workqueue import authoring
from workqueue.authoring import AuthoringError, create_task_file
from workqueue.importer import Importer
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def inbox(settings, write_task):
    """A queue imported from a folder inside the configured import root."""
    write_task("a.md", "---\nid: ex-001\ntitle: A\nstatus: inbox\n---\n# A\n")
    write_task("b.md", "---\nid: ex-007\ntitle: B\nstatus: inbox\n---\n# B\n")
    write_task("notes.md", "---\nid: notes\ntitle: Notes\nstatus: todo\n---\n")
    settings.HYPERVISOR_IMPORT_ROOTS = [write_task.folder]
    report = Importer("inbox").run([write_task.folder])
    assert not report.errors
    return write_task.folder


def test_new_task_continues_the_queues_series_and_conventions(inbox):
    task = create_task_file(
        "inbox",
        "Fix the: login bug",
        "Users land on the wrong page.\n",
        {"priority": "P1", "tags": "bug, auth", "assignee": "nic", "depends_on": ["ex-001"]},
        actor="user:alice",
    )
    path = inbox / "fix-the-login-bug.md"
    assert path.read_text() == (
        "---\n"
        "id: ex-008\n"
        'title: "Fix the: login bug"\n'
        "status: inbox\n"
        "priority: 1\n"
        "assignee: nic\n"
        "tags: [bug, auth]\n"
        "depends_on: [ex-001]\n"
        "---\n"
        "# Fix the: login bug\n"
        "\n"
        "Users land on the wrong page.\n"
    )
    assert (task.queue, task.key, task.title, task.status) == (
        "inbox",
        "ex-008",
        "Fix the: login bug",
        Status.QUEUED,
    )
    assert (task.priority, task.tags, task.assignee, task.depends_on) == (
        1,
        ["bug", "auth"],
        "nic",
        ["ex-001"],
    )
    assert task.source_path == str(path)
    created = TaskEvent.objects.get(task=task, kind=EventKind.CREATED)
    assert created.actor == "user:alice"
    assert TaskEvent.objects.filter(task=task, kind=EventKind.IMPORTED).exists()
    # The file is an ordinary task now: a re-import finds it unchanged.
    assert Importer("inbox").run([inbox]).unchanged == 4


def test_an_existing_file_is_never_replaced(inbox):
    taken = inbox / "same-title.md"
    taken.write_text("a person's draft, not a task yet\n")
    task = create_task_file("inbox", "Same title")
    assert taken.read_text() == "a person's draft, not a task yet\n"
    assert task.source_path == str(inbox / "same-title-2.md")
    second = create_task_file("inbox", "Same title")
    assert second.source_path == str(inbox / "same-title-3.md")
    assert second.key != task.key
    assert not [p for p in os.listdir(inbox) if p.startswith(".")]  # no temporary left


def test_a_queue_without_tasks_numbers_from_its_name(settings, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    Queue.objects.create(name="ops", folder=str(folder))
    task = create_task_file("ops", "First")
    assert task.key == "ops-001"
    assert (folder / "first.md").read_text().startswith("---\nid: ops-001\n")


def test_the_folder_must_be_inside_an_import_root(settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path / "root"]
    (tmp_path / "root").mkdir()
    Queue.objects.create(name="q", folder=str(outside))
    with pytest.raises(AuthoringError) as refused:
        create_task_file("q", "Escape")
    assert list(refused.value.errors) == ["folder"]
    assert list(outside.iterdir()) == []


def test_a_symlink_out_of_the_root_is_not_followed(settings, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    settings.HYPERVISOR_IMPORT_ROOTS = [root]
    Queue.objects.create(name="q", folder=str(root / "link"))
    with pytest.raises(AuthoringError, match="outside the import roots") as refused:
        create_task_file("q", "Escape")
    assert list(outside.iterdir()) == []
    # The refusal says which setting to change, and what it holds now.
    assert f"(HYPERVISOR_IMPORT_ROOTS: {root}); add it there" in str(refused.value)


def test_a_queue_without_a_folder_is_refused(settings, tmp_path):
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    with pytest.raises(AuthoringError) as refused:
        create_task_file("nowhere", "A task")
    assert list(refused.value.errors) == ["queue"]


@pytest.mark.parametrize(
    ("queue", "title", "fields", "field"),
    [
        ("inbox", "", {}, "title"),
        ("inbox", "two\nlines", {}, "title"),
        ("inbox", "ok", {"priority": "whenever"}, "priority"),
        ("inbox", "ok", {"tags": ["a|b"]}, "tags"),
        ("inbox", "ok", {"status": "done"}, "status"),
        ("inbox", "ok", {"colour": "red"}, "colour"),
        ("../etc", "ok", {}, "queue"),
        ("", "ok", {}, "queue"),
    ],
)
def test_bad_input_names_the_field_and_leaves_no_file(inbox, queue, title, fields, field):
    before = sorted(os.listdir(inbox))
    with pytest.raises(AuthoringError) as refused:
        create_task_file(queue, title, fields=fields)
    assert list(refused.value.errors) == [field]
    assert sorted(os.listdir(inbox)) == before
    assert Task.objects.count() == 3


def test_a_file_the_import_refuses_is_removed(inbox, monkeypatch):
    monkeypatch.setattr(authoring, "_render", lambda *a: "---\nid: [unclosed\n---\n")
    before = sorted(os.listdir(inbox))
    with pytest.raises(AuthoringError) as refused:
        create_task_file("inbox", "Broken")
    assert list(refused.value.errors) == ["file"]
    assert sorted(os.listdir(inbox)) == before


def test_the_first_import_of_a_folder_sets_the_queues_folder(inbox):
    assert Queue.objects.get(name="inbox").folder == str(inbox.resolve())
