"""Bulk actions: the board's endpoints, Huey in the background, undo to the byte."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import OperationalError
from django.test import Client
from django.utils import timezone

from workqueue import bulk, editing
from workqueue.importer import Importer
from workqueue.models import BulkAction, BulkChange, EventKind, SavedView, Status, Task, TaskEvent

TASK = (
    "---\nid: {key}\ntitle: Task {n}  # a comment\nstatus: inbox\nproject: {project}\n"
    "tags: [bug]\n---\nBody {n}\n"
)


@pytest.fixture
def inbox(write_task):
    def make(count: int, project: str = "web") -> list[Task]:
        for n in range(count):
            write_task(f"t{n:03d}.md", TASK.format(key=f"t{n:03d}", n=n, project=project))
        report = Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
        assert not report.errors
        return list(Task.objects.filter(queue="inbox").order_by("key"))

    make.path = lambda task: write_task.folder / f"{task.key}.md"
    return make


def user_with(django_user_model, name: str, *codenames):
    user = django_user_model.objects.create_user(name, password="pw-12345")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def alice(db, client, django_user_model):
    client.force_login(user_with(django_user_model, "alice", "view_task", "change_task"))
    return client


def post(client, action: str, value: str = "", tasks=(), **extra):
    data = {"action": action, "value": value, "ids": ",".join(str(t.pk) for t in tasks), **extra}
    return client.post("/bulk/", data, HTTP_HX_REQUEST="true")


def snapshot(inbox, tasks) -> dict:
    return {t.key: inbox.path(t).read_bytes() for t in tasks}


def test_a_small_action_runs_in_the_request_with_one_event_per_task(alice, inbox):
    tasks = inbox(5)
    response = post(alice, "assign", "bot", tasks[:3])
    html = response.content.decode()
    assert response.status_code == 200
    assert "Assigned 3 tasks." in html
    assert 'hx-post="/bulk/' in html and "Undo" in html
    assert response["HX-Trigger"] == "board-changed"
    for task in tasks:
        assert ("assignee: bot\n" in inbox.path(task).read_text()) == (task in tasks[:3])
    assert TaskEvent.objects.filter(kind=EventKind.EDITED).count() == 3
    action = BulkAction.objects.get()
    assert (action.status, action.total, action.changed, action.actor) == (
        "done",
        3,
        3,
        "user:alice",
    )
    assert BulkChange.objects.filter(action=action).count() == 3


def test_every_task_of_the_filter_is_selected_not_only_the_cards_shown(alice, inbox):
    tasks = inbox(60)
    Task.objects.filter(pk__in=[t.pk for t in tasks[50:]]).update(project="other")
    bulk.INLINE_LIMIT, limit = 1000, bulk.INLINE_LIMIT
    try:
        response = post(alice, "priority", "0", all="on", filters="queue=inbox&project=web")
    finally:
        bulk.INLINE_LIMIT = limit
    assert "Set the priority of 50 tasks." in response.content.decode()
    assert Task.objects.filter(priority=0).count() == 50
    assert set(Task.objects.filter(priority=0).values_list("project", flat=True)) == {"web"}


def test_changed_files_are_skipped_and_listed(alice, inbox):
    tasks = inbox(4)
    changed = inbox.path(tasks[2])
    changed.write_text(changed.read_text() + "edited outside\n")
    html = post(alice, "close", "duplicate", tasks).content.decode()
    assert "Closed 3 tasks." in html
    assert "1 skipped" in html
    assert "<code>t002</code>: changed on disk since import" in html
    assert changed.read_text().endswith("edited outside\n")
    assert Task.objects.get(pk=tasks[2].pk).status == Status.QUEUED


def test_undo_restores_the_bytes_and_the_rows(alice, inbox):
    tasks = inbox(4)
    before = snapshot(inbox, tasks)
    rows = {t.pk: (t.status, t.project, t.tags) for t in tasks}
    post(alice, "tags", "+urgent -bug", tasks)
    post(alice, "close", "wontfix", tasks[:2])  # the latest action is the one undone
    action = BulkAction.objects.first()
    assert action.action == "close"
    response = alice.post(f"/bulk/{action.pk}/undo/", HTTP_HX_REQUEST="true")
    assert "Undid the changes to 2 tasks." in response.content.decode()
    tagged = snapshot(inbox, tasks)
    for task in tasks:
        assert b"tags: [urgent]\n" in tagged[task.key]
        assert b"close_reason" not in tagged[task.key]
    for task in Task.objects.filter(pk__in=[t.pk for t in tasks[:2]]):
        assert task.status == Status.QUEUED
        assert task.source_sha256 == hashlib.sha256(tagged[task.key]).hexdigest()
    # Undo once only; the tag action before it is no longer the latest.
    assert alice.post(f"/bulk/{action.pk}/undo/").status_code == 409
    first = BulkAction.objects.get(action="tags")
    assert alice.post(f"/bulk/{first.pk}/undo/").status_code == 409
    # An action undone straight away gives back the very bytes.
    post(alice, "project", "mobile", tasks)
    latest = BulkAction.objects.filter(action="project").get()
    alice.post(f"/bulk/{latest.pk}/undo/")
    assert snapshot(inbox, tasks) == tagged
    assert {t.pk: t.project for t in Task.objects.filter(pk__in=rows)} == {
        pk: "web" for pk in rows
    }
    assert before != tagged


def test_undo_leaves_alone_what_changed_since(alice, inbox):
    tasks = inbox(3)
    post(alice, "assign", "bot", tasks)
    action = BulkAction.objects.get()
    edited = inbox.path(tasks[0])
    edited.write_text(edited.read_text() + "a person's line\n")
    from workqueue import editing

    editing.edit_task(tasks[1], {"priority": 4}, "user:bob")
    html = alice.post(f"/bulk/{action.pk}/undo/", HTTP_HX_REQUEST="true").content.decode()
    assert "Undid the changes to 1 task." in html
    assert "<code>t000</code>: changed on disk since import" in html
    assert "<code>t001</code>: changed since" in html
    assert edited.read_text().endswith("a person's line\n")
    assert "assignee: bot" in edited.read_text()
    assert "assignee" not in inbox.path(tasks[2]).read_text()


def test_undo_of_a_close_puts_claimed_tasks_back_in_the_queue(alice, inbox):
    from workqueue import claims
    from workqueue.locks import Identity, OwnerFile

    tasks = inbox(2)
    before = snapshot(inbox, tasks)
    identity = Identity.current("w-1")
    claims.claim_ready_tasks("inbox", identity, OwnerFile(identity), limit=1)
    post(alice, "close", "not needed", tasks)
    assert Task.objects.filter(status=Status.DONE).count() == 2
    action = BulkAction.objects.get()
    alice.post(f"/bulk/{action.pk}/undo/")
    assert snapshot(inbox, tasks) == before
    assert Task.objects.filter(status=Status.QUEUED).count() == 2


def test_a_tag_with_a_space_is_added_and_removed_whole(alice, inbox):
    tasks = inbox(2)
    post(alice, "tags", '+"needs review", +"a,b"', tasks)
    assert {tuple(t.tags) for t in Task.objects.filter(pk__in=[t.pk for t in tasks])} == {
        ("bug", "needs review", "a,b")
    }
    assert b'tags: [bug, needs review, "a,b"]\n' in snapshot(inbox, tasks)[tasks[0].key]
    post(alice, "tags", '-"needs review"', tasks)
    assert Task.objects.get(pk=tasks[0].pk).tags == ["bug", "a,b"]


def test_bad_requests_are_named(alice, inbox):
    tasks = inbox(2)
    cases = [
        ({"action": "assign", "value": "", "ids": ""}, "Select at least one task."),
        ({"action": "explode", "value": "x", "ids": "1"}, "explode"),
        ({"action": "priority", "value": "soon", "ids": str(tasks[0].pk)}, "priority:"),
        ({"action": "close", "value": " ", "ids": str(tasks[0].pk)}, "reason: say why"),
        ({"action": "tags", "value": "-", "ids": str(tasks[0].pk)}, "tags:"),
        ({"action": "tags", "value": '+"open', "ids": str(tasks[0].pk)}, "a quote is left open"),
        ({"action": "assign", "value": "x", "ids": "1,two"}, "ids are task numbers"),
        # Past a database integer (SQLite: a server error), a digit int() cannot read.
        ({"action": "assign", "value": "x", "ids": "9" * 20}, "ids are task numbers"),
        ({"action": "assign", "value": "x", "ids": "1,\u00b2"}, "ids are task numbers"),
        ({"action": "assign", "value": "x", "all": "on", "filters": "tag=a|b"}, "filters"),
    ]
    for data, problem in cases:
        response = alice.post("/bulk/", data, HTTP_HX_REQUEST="true")
        assert response.status_code == 422, data
        assert problem in response.content.decode(), (data, response.content)
    assert not BulkAction.objects.exists()


def test_select_all_with_filters_that_are_not_the_boards_is_refused(alice, inbox):
    # Garbage parsed leniently was no filter at all: every task of every queue assigned.
    tasks = inbox(3)
    before = snapshot(inbox, tasks)
    for filters in ("%%%&&&==", "project=web&&", "==", "colour=red", "queue=inbox&x=1"):
        response = post(alice, "assign", "x", all="on", filters=filters)
        assert response.status_code == 422, filters
        assert "The board&#x27;s filters are not valid." in response.content.decode(), filters
    assert snapshot(inbox, tasks) == before
    assert not Task.objects.filter(assignee="x").exists()
    assert not BulkAction.objects.exists()
    # The board's own bar sends the filters as the server read them, not the page's URL.
    html = alice.get("/?queue=inbox&project=web&x=1").content.decode()
    assert 'data-filters="queue=inbox&amp;project=web"' in html


def test_an_empty_priority_is_refused_not_read_as_the_default(alice, inbox):
    task = inbox(1)[0]
    Task.objects.filter(pk=task.pk).update(priority=-5)
    response = post(alice, "priority", "", [task])
    assert response.status_code == 422
    assert "priority: give a number" in response.content.decode()
    assert Task.objects.get(pk=task.pk).priority == -5
    assert not BulkAction.objects.exists()


def test_the_bulk_priority_takes_what_the_editor_takes(alice, inbox):
    # The dialog said min=0 while the editor and a file's YAML take -5: more urgent than P0.
    tasks = inbox(2)
    html = alice.get("/?queue=inbox").content.decode()
    assert 'name="value" type="number" required autocomplete="off" step="1"' in html
    assert "Priority (lower is more urgent)" in html
    assert post(alice, "priority", "-5", tasks[:1]).status_code == 200
    assert Task.objects.get(pk=tasks[0].pk).priority == -5


def test_a_view_only_person_gets_403_and_sees_no_bulk_controls(client, django_user_model, inbox):
    tasks = inbox(2)
    before = snapshot(inbox, tasks)
    bob = user_with(django_user_model, "bob", "view_task")
    client.force_login(bob)
    html = client.get("/?queue=inbox").content.decode()
    for control in ('class="pick"', "bulk-bar", "dialog-assign", "Select all", 'data-bulk="'):
        assert control not in html, control
    assert post(client, "assign", "bot", tasks).status_code == 403
    assert client.get("/bulk/1/").status_code == 403
    assert client.post("/bulk/1/undo/").status_code == 403
    assert snapshot(inbox, tasks) == before


def test_the_board_offers_the_latest_actions_undo_again_after_a_reload(
    client, django_user_model, alice, inbox
):
    """The Undo button came only with the action's answer: a reload lost it."""
    tasks = inbox(2)
    post(alice, "assign", "bot", tasks)
    action = BulkAction.objects.get()
    undo = f'action="/bulk/{action.pk}/undo/"'
    assert undo in alice.get("/").content.decode()
    client.force_login(user_with(django_user_model, "carol", "view_task", "change_task"))
    assert "/undo/" not in client.get("/").content.decode()  # not another person's
    client.force_login(django_user_model.objects.get(username="alice"))
    BulkAction.objects.filter(pk=action.pk).update(
        finished_at=timezone.now() - bulk.UNDO_OFFERED - timedelta(seconds=1)
    )
    assert "/undo/" not in client.get("/").content.decode()  # offered for an hour
    BulkAction.objects.filter(pk=action.pk).update(finished_at=timezone.now())
    client.post(f"/bulk/{action.pk}/undo/", HTTP_HX_REQUEST="true")
    assert "/undo/" not in client.get("/").content.decode()  # once


def test_another_persons_action_cannot_be_undone(client, django_user_model, alice, inbox):
    tasks = inbox(2)
    post(alice, "assign", "bot", tasks)
    action = BulkAction.objects.get()
    client.force_login(user_with(django_user_model, "carol", "view_task", "change_task"))
    assert client.post(f"/bulk/{action.pk}/undo/").status_code == 409


def test_many_tasks_run_on_the_huey_consumer_with_progress(
    transactional_db, client, django_user_model, consumer_huey, consumer, inbox
):
    tasks = inbox(120)
    client.force_login(user_with(django_user_model, "dora", "view_task", "change_task"))
    response = post(client, "close", "out of scope", tasks)
    action = BulkAction.objects.get()
    html = response.content.decode()
    assert f'hx-get="/bulk/{action.pk}/" hx-trigger="every 1s"' in html  # it polls
    deadline = time.monotonic() + 90
    while not BulkAction.objects.get().finished and time.monotonic() < deadline:
        time.sleep(0.2)
    action.refresh_from_db()
    assert (action.status, action.changed, action.processed) == ("done", 120, 120), action.error
    for task in tasks:
        assert "close_reason: out of scope\n" in inbox.path(task).read_text()
    assert Task.objects.filter(status=Status.DONE).count() == 120
    assert TaskEvent.objects.filter(kind=EventKind.DONE, message="out of scope").count() == 120
    final = client.get(f"/bulk/{action.pk}/").content.decode()
    assert "Closed 120 tasks." in final and "every 1s" not in final


def test_saved_view_keeps_only_valid_filters(alice, inbox):
    inbox(1)
    response = alice.post("/views/", {"name": "web bugs", "query": "project=web&tag=bug&x=1"})
    assert response.status_code == 302
    html = alice.get("/").content.decode()
    assert '<a href="/?project=web&amp;tag=bug">web bugs</a>' in html
    alice.post("/views/", {"name": "web bugs", "query": "tag=a|b"})
    assert alice.get("/").content.decode().count(">web bugs</a>") == 1


@pytest.mark.parametrize("name", ["", " ", "x" * 150])
def test_a_view_not_saved_goes_back_to_the_same_filtered_board(alice, inbox, name):
    # It went back to the unfiltered board: the person lost the filters they had.
    inbox(1)
    response = alice.post("/views/", {"name": name, "query": "queue=inbox&project=web"})
    assert response.status_code == 302
    assert response["Location"] == "/?queue=inbox&project=web"
    html = alice.get(response["Location"]).content.decode()
    assert "View not saved: name:" in html
    assert not SavedView.objects.exists()


def test_a_saved_view_replaced_says_so_and_one_can_be_deleted(alice, inbox, django_user_model):
    # Saving under a name in use replaced the view without a word, and none could go.
    inbox(1)
    alice.post("/views/", {"name": "mine", "query": "assignee=nic"})
    replaced = alice.post("/views/", {"name": "mine", "query": ""}, follow=True)
    assert (
        "Replaced the view &#x27;mine&#x27; (it showed ?assignee=nic)."
        in replaced.content.decode()
    )
    view = SavedView.objects.get(name="mine")
    bob = django_user_model.objects.create_superuser("bob", "", "pw")
    other = Client()
    other.force_login(bob)
    assert other.post(f"/views/{view.pk}/delete/").status_code == 404  # alice's, not his
    assert alice.get(f"/views/{view.pk}/delete/").status_code == 405
    gone = alice.post(f"/views/{view.pk}/delete/", follow=True).content.decode()
    assert "Deleted the view &#x27;mine&#x27;." in gone
    assert not SavedView.objects.exists()


def test_an_action_no_consumer_picks_up_says_what_it_waits_for(alice, inbox):
    """A server started on its own (no Huey consumer beside it): the action would sit at
    "0 of N" for ever; after a few seconds the status says what it waits for."""
    tasks = inbox(3)
    action = BulkAction.objects.create(actor="alice", action="close", total=len(tasks))
    assert "consumer" not in alice.get(f"/bulk/{action.pk}/").content.decode()
    BulkAction.objects.filter(pk=action.pk).update(
        created_at=timezone.now() - timedelta(seconds=42)
    )
    html = alice.get(f"/bulk/{action.pk}/").content.decode()
    assert "Waiting 42 s for the task consumer" in html
    assert "python manage.py run_huey" in html
    BulkAction.objects.filter(pk=action.pk).update(status="running")
    assert "consumer" not in alice.get(f"/bulk/{action.pk}/").content.decode()


def test_a_batch_the_database_fails_leaves_no_temporary_beside_its_files(
    db, inbox, write_task, monkeypatch
):
    """The batch's temporaries are written before its transaction: a database error there
    (a lost connection, "database is locked") left one beside every file, and nothing
    ever removed them (the reaper removes dead workers' only)."""
    tasks = inbox(3)
    before = snapshot(inbox, tasks)

    def lost(*args):
        raise OperationalError("database is locked")

    monkeypatch.setattr(editing, "_transitions", lost)
    with pytest.raises(OperationalError):
        editing.edit_tasks([t.pk for t in tasks], "me", action="close", reason="done")
    assert sorted(p.name for p in write_task.folder.iterdir()) == ["t000.md", "t001.md", "t002.md"]
    assert snapshot(inbox, tasks) == before
