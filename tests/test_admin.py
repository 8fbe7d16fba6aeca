"""The admin: task filters and actions, the filesystem locks page, read-only events."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from django import forms
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import deletion
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from herds.models import Profile
from tests.conftest import make_tasks
from workqueue import claims, locks, transitions
from workqueue.admin import CappedCountPaginator, TaskAdmin
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent, field_values
from workqueue.processing import Result

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/queue/task/"
LOCKS = "/admin/queue/task/locks/"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def claim_with_lock(task: Task, pid: int, host: str | None = None) -> Task:
    host = host or settings.HYPERVISOR_HOST
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        started = time.time()
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(
        status=Status.CLAIMED,
        holder=f"{host}:{pid}",
        holder_host=host,
        holder_pid=pid,
        holder_started=started,
        fence=5,
        attempts=1,
        claimed_at=now,
        lease_expires_at=now + timedelta(minutes=5),
        updated_at=now,
    )
    directory = locks.lock_dir(task.queue, task.key)
    directory.mkdir(parents=True)
    (directory / "owner.json").write_text(
        json.dumps({"host": host, "pid": pid, "started": started, "worker": f"{host}:{pid}"})
    )
    task.refresh_from_db()
    return task


def test_task_changelist_filters_and_search(admin_client):
    live, stale = make_tasks("q", 2)
    claim_with_lock(stale, dead_pid())
    response = admin_client.get(CHANGELIST, {"stale": "yes"})
    assert response.status_code == 200
    assert list(response.context["cl"].queryset) == [Task.objects.get(pk=stale.pk)]
    response = admin_client.get(CHANGELIST, {"stale": "no", "status__exact": "queued"})
    assert list(response.context["cl"].queryset) == [live]
    response = admin_client.get(CHANGELIST, {"q": "t000001"})
    assert [t.key for t in response.context["cl"].queryset] == ["t000001"]
    for query in ({"queue": "q"}, {"project": ""}, {"assignee": ""}, {"stale": "bogus"}):
        assert admin_client.get(CHANGELIST, query).status_code == 200


def test_task_changelist_reads_no_whole_table_at_a_million_tasks(admin_client):
    """Its filters' values, its order and its search each read every task: 1.5 s a page
    at a million tasks on PostgreSQL."""
    tasks = make_tasks("q", 4)
    make_tasks("r", 1)
    for task, project in zip(tasks, ["web", "api", "", "web"], strict=True):
        Task.objects.filter(pk=task.pk).update(project=project)
    Task.objects.filter(pk=tasks[3].pk).update(status=Status.CLAIMED, holder="host:4242")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(CHANGELIST)
    sql = [q["sql"] for q in queries]
    assert not [s for s in sql if "DISTINCT" in s]
    (listing,) = [s for s in sql if '"queue_task"."frontmatter"' in s]
    # The board's order, which its indexes hold, not priority alone: a sort of every task.
    order = '"queue_task"."status" ASC, "queue_task"."priority" ASC, "queue_task"."id" ASC'
    assert f"ORDER BY {order}" in listing
    # A full count: "Select all N tasks" names how many an action changes.
    assert 'SELECT COUNT(*) AS "__count" FROM "queue_task"' in sql
    choices = {
        spec.title: [c["display"] for c in spec.choices(page.context["cl"])]
        for spec in page.context["cl"].filter_specs
    }
    assert choices["project"] == ["All", "api", "web"] and choices["queue"] == ["All", "q", "r"]
    chosen = admin_client.get(CHANGELIST, {"project__exact": "web"}).context["cl"].queryset
    assert sorted(t.pk for t in chosen) == [tasks[0].pk, tasks[3].pk]
    with CaptureQueriesContext(connection) as queries:
        held = admin_client.get(CHANGELIST, {"q": "4242"}).context["cl"].queryset
    assert [t.pk for t in held] == [tasks[3].pk]
    assert not [q for q in queries if '"queue_task"."title" LIKE' in q["sql"]]


def test_field_values_are_a_fields_values_in_order_without_the_empty_one():
    Queue.objects.get_or_create(name="q")
    Task.objects.bulk_create(
        Task(queue="q", key=f"k{i}", project=p) for i, p in enumerate(["b", "a", "", "b", "c"])
    )
    Task.objects.create(queue="r", key="k", project="d")
    assert field_values("project") == ["a", "b", "c", "d"]
    assert field_values("project", limit=2) == ["a", "b"]
    assert field_values("project", queue="q") == ["a", "b", "c"]
    assert field_values("project", queue="r") == ["d"]
    assert field_values("project", queue="none") == []
    assert field_values("assignee") == []


TASK = """---
id: ex-1
title: 'Fix the login bug'   # keep this comment
status: inbox
priority: P1
tags:
  - bug
---
# Fix the login bug
"""


@pytest.fixture
def task_file(write_task) -> tuple[Task, Path]:
    path = write_task("ex-1.md", TASK)
    report = Importer("inbox", roots=[path.parent]).run([path.parent])
    assert not report.errors, report.errors
    return Task.objects.get(key="ex-1"), path


def saved_as_shown(admin_client, task: Task) -> tuple[str, dict]:
    """The change page's URL and POST data that saves the task as the page shows it."""
    url = reverse("admin:queue_task_change", args=[task.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    form = response.context["adminform"].form
    return url, {name: form.initial[name] for name in form.fields}


def test_an_admin_edit_is_written_into_the_task_file_then_the_row(admin_client, task_file):
    task, path = task_file
    url, data = saved_as_shown(admin_client, task)
    assert data["body"] == "# Fix the login bug\n" and data["tags"] == "bug"
    data.update(title="Fix the logout bug", tags="bug, auth", body="# Fix the logout bug\n")
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert path.read_text() == TASK.replace(
        "'Fix the login bug'   #", "'Fix the logout bug'   #"
    ).replace("  - bug\n", "  - bug\n  - auth\n").replace("login bug\n", "logout bug\n")
    task.refresh_from_db()
    assert (task.title, task.tags, task.body) == (
        "Fix the logout bug",
        ["bug", "auth"],
        "# Fix the logout bug\n",
    )
    event = TaskEvent.objects.get(task=task, kind=EventKind.EDITED)
    assert event.actor == "admin:admin"
    report = Importer("inbox", roots=[path.parent]).run([path.parent]).as_dict()
    assert report["updated"] == 0  # row and file agree


def test_an_admin_save_of_the_title_leaves_a_tag_with_a_space_whole(admin_client, write_task):
    path = write_task("sp.md", "---\nid: sp-1\ntitle: Spaced\ntags: [needs review, bug]\n---\n")
    Importer("inbox", roots=[path.parent]).run([path.parent])
    task = Task.objects.get(key="sp-1")
    url, data = saved_as_shown(admin_client, task)
    assert data["tags"] == '"needs review", bug'
    assert admin_client.post(url, {**data, "title": "Renamed"}).status_code == 302
    assert path.read_text() == "---\nid: sp-1\ntitle: Renamed\ntags: [needs review, bug]\n---\n"
    assert Task.objects.get(pk=task.pk).tags == ["needs review", "bug"]


def test_the_admins_save_writes_only_the_columns_it_changed(admin_client, task_file):
    """A whole-row save writes back the status, holder, fence and lease the page found: a
    worker's claim or finish in between would be undone."""
    task, _path = task_file
    url, data = saved_as_shown(admin_client, task)
    data["assignee"] = "nic"
    with CaptureQueriesContext(connection) as captured:
        assert admin_client.post(url, data).status_code == 302
    writes = [q["sql"] for q in captured if 'UPDATE "queue_task" SET' in q["sql"]]
    assert writes, "the edit updated the row"
    for sql in writes:
        assert not re.search(r'"(status|holder|fence|lease_expires_at|attempts)" =', sql), sql
    assert Task.objects.get(pk=task.pk).assignee == "nic"


def test_an_admin_edit_of_a_claimed_task_reaches_its_file_when_the_claim_ends(
    admin_client, task_file
):
    task, path = task_file
    url, data = saved_as_shown(admin_client, task)
    identity = Identity.current("w-admin")
    owner_file = OwnerFile(identity)
    [taken] = claims.claim_ready_tasks("inbox", identity, owner_file, limit=1)
    data["priority"] = "2"
    response = admin_client.post(url, data, follow=True)
    assert "A worker holds the task" in response.content.decode()
    task.refresh_from_db()
    assert (task.status, task.holder, task.fence, task.priority) == (
        Status.CLAIMED,
        identity.worker,
        taken.fence,
        2,
    )
    assert path.read_text() == TASK  # the worker's file until it lets go
    claims.finish_claims(identity, [(taken, Result())], owner_file)
    assert "priority: P2\n" in path.read_text()  # in the file's own style
    assert Task.objects.get(pk=task.pk).status == Status.DONE


def test_a_file_changed_on_disk_is_not_overwritten_from_the_admin(admin_client, task_file):
    task, path = task_file
    url, data = saved_as_shown(admin_client, task)
    outside = TASK.replace("priority: P1", "priority: P3")
    path.write_text(outside)
    data["title"] = "Mine"
    response = admin_client.post(url, data, follow=True)
    page = response.content.decode()
    assert response.redirect_chain == [(url, 302)]
    assert f"Not saved: {path.resolve()} changed on disk since import" in page
    assert reverse("task-detail", args=[task.pk]) in page
    assert path.read_text() == outside
    assert Task.objects.get(pk=task.pk).title == "Fix the login bug"
    assert not LogEntry.objects.filter(object_id=str(task.pk)).exists()


def test_bad_values_are_errors_naming_the_field_and_nothing_is_written(admin_client, task_file):
    task, path = task_file
    url, data = saved_as_shown(admin_client, task)
    wide = "".join(chr(0x4E00 + i * 7) for i in range(200))  # 600 bytes in UTF-8
    for name, value, error in [
        ("title", "", "title: a task needs a title"),
        ("title", "\u200f\u200b", "title: a task needs a title"),  # nothing to see
        ("title", "two\nlines", "title: one line only"),
        ("depends_on", "ex-1", "depends_on: a task cannot depend on itself"),
        ("body", "a\x00b", "Null characters are not allowed."),
    ]:
        response = admin_client.post(url, {**data, name: value})
        assert response.status_code == 200, name
        assert response.context["adminform"].form.errors[name] == [error]
    # Each within its column, together over a PostgreSQL index entry (before the rule, the
    # save was a server error).
    together = {"tags": f"{wide}, {wide[::-1]}", "project": wide, "assignee": wide[::-1]}
    response = admin_client.post(url, {**data, **together})
    assert response.context["adminform"].form.errors["tags"] == [
        "tags: tags, project and assignee: 2,403 bytes together in UTF-8, "
        "over the 2,400 the board's indexes hold"
    ]
    assert path.read_text() == TASK
    assert not TaskEvent.objects.filter(kind=EventKind.EDITED).exists()


def test_a_task_is_added_as_a_file_from_the_board_not_as_a_row(admin_client):
    assert admin_client.get(reverse("admin:queue_task_add")).status_code == 403
    page = admin_client.get(CHANGELIST).content.decode()
    assert f'href="{reverse("task-new")}"' in page


def test_requeue_and_block_actions_record_events(admin_client):
    done, queued = make_tasks("q", 2)
    Task.objects.filter(pk=done.pk).update(status=Status.DONE)
    admin_client.post(CHANGELIST, {"action": "requeue_tasks", "_selected_action": [done.pk]})
    assert Task.objects.get(pk=done.pk).status == Status.QUEUED
    assert TaskEvent.objects.filter(task=done, kind=EventKind.REQUEUED).exists()
    admin_client.post(CHANGELIST, {"action": "block_tasks", "_selected_action": [queued.pk]})
    queued.refresh_from_db()
    assert queued.status == Status.BLOCKED
    assert queued.reason == "blocked by admin:admin"
    assert TaskEvent.objects.filter(task=queued, kind=EventKind.BLOCKED).exists()


def test_the_admins_state_actions_write_the_status_into_the_file_as_the_boards_do(
    admin_client, task_file
):
    """Mark done, Block and Requeue changed the row only: the file still said `status:
    inbox`, and a fresh import brought a closed task back to be worked again."""
    task, path = task_file
    steps = [
        ("mark_done", Status.DONE, ["status: done\n", "close_reason: closed by admin:admin\n"]),
        ("requeue_tasks", Status.QUEUED, ["status: queued\n"]),
        ("block_tasks", Status.BLOCKED, ["status: blocked\n", "blocked_reason: blocked by"]),
    ]
    for action, status, lines in steps:
        response = admin_client.post(
            CHANGELIST, {"action": action, "_selected_action": [task.pk]}, follow=True
        )
        assert Task.objects.get(pk=task.pk).status == status
        text = path.read_text()
        assert all(line in text for line in lines), (action, text)
    messages = [str(m) for m in response.context["messages"]]
    assert messages == ["Blocked 1 task(s)."]
    response = admin_client.post(
        CHANGELIST, {"action": "block_tasks", "_selected_action": [task.pk]}, follow=True
    )
    messages = [str(m) for m in response.context["messages"]]
    assert messages == [
        "Blocked 0 task(s).",
        "1 selected task(s) not claimed or queued: left alone.",
    ]


def test_an_admin_release_writes_the_edit_that_waited_for_the_claim(admin_client, task_file):
    task, path = task_file
    task = claim_with_lock(task, os.getpid())
    url, data = saved_as_shown(admin_client, task)
    data["title"] = "Two"
    assert admin_client.post(url, data).status_code == 302
    assert "title: 'Fix the login bug'" in path.read_text()  # the holder's file
    admin_client.post(CHANGELIST, {"action": "release_claims", "_selected_action": [task.pk]})
    task.refresh_from_db()
    assert (task.status, task.title, task.change_pending) == (Status.QUEUED, "Two", False)
    assert "title: 'Two'   # keep this comment" in path.read_text()


def test_release_stale_claims_action(admin_client, lock_root):
    (task,) = make_tasks("q", 1)
    task = claim_with_lock(task, dead_pid())
    response = admin_client.post(
        CHANGELIST, {"action": "release_stale", "_selected_action": [task.pk]}, follow=True
    )
    assert "1 requeued" in response.content.decode()
    task.refresh_from_db()
    assert task.status == Status.QUEUED
    assert not locks.lock_dir(task.queue, task.key).exists()
    assert TaskEvent.objects.filter(task=task, kind=EventKind.REAPED).exists()


def test_locks_page_shows_owner_liveness_age_and_staleness(admin_client, lock_root):
    stale, live, remote = make_tasks("q", 3)
    claim_with_lock(stale, dead_pid())
    claim_with_lock(live, 1)  # pid 1 lives as long as the machine does
    claim_with_lock(remote, 4242, host="another-host")
    response = admin_client.get(LOCKS)
    assert response.status_code == 200
    rows = {row["key"]: row for row in response.context["rows"]}
    assert rows["t000000"]["alive"] is False and rows["t000000"]["stale"] is True
    assert rows["t000001"]["alive"] is True and rows["t000001"]["stale"] is False
    assert rows["t000002"]["alive"] is None and rows["t000002"]["stale"] is False
    html = response.content.decode()
    assert "dead" in html and "alive" in html and "unknown (other host)" in html
    assert "holder pid" in html  # the dry run says why
    assert "1 claim(s) back to queued" in html
    # The dry run changed nothing.
    assert Task.objects.get(pk=stale.pk).status == Status.CLAIMED
    assert locks.lock_dir("q", "t000000").exists()


def test_release_stale_locks_button(admin_client, lock_root):
    stale, live = make_tasks("q", 2)
    claim_with_lock(stale, dead_pid())
    claim_with_lock(live, 1)
    orphan = locks.lock_dir("q", "no-claim-behind-it")
    orphan.mkdir(parents=True)
    (orphan / "owner.json").write_text(
        json.dumps({"host": settings.HYPERVISOR_HOST, "pid": dead_pid(), "started": 1.0})
    )
    response = admin_client.post(LOCKS, follow=True)
    assert "1 requeued" in response.content.decode()
    assert Task.objects.get(pk=stale.pk).status == Status.QUEUED
    assert Task.objects.get(pk=live.pk).status == Status.CLAIMED
    assert not locks.lock_dir("q", "t000000").exists()
    assert locks.lock_dir("q", "t000001").exists()
    assert not orphan.exists()
    # Again, with nothing left: not "0 requeued, 0 blocked, 0 … removed".
    again = admin_client.post(LOCKS, follow=True).content.decode()
    assert "Nothing to release: no claim or lock directory was stale by now" in again


def test_locks_page_needs_task_permissions(django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get(LOCKS).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_task"))
    assert client.get(LOCKS).status_code == 200
    assert client.post(LOCKS).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="change_task"))
    assert client.post(LOCKS).status_code == 302


def test_task_events_are_read_only(admin_client):
    (task,) = make_tasks("q", 1)
    event = TaskEvent.objects.create(task=task, kind=EventKind.NOTE, message="hello")
    assert admin_client.get("/admin/queue/taskevent/").status_code == 200
    assert admin_client.get("/admin/queue/taskevent/add/").status_code == 403
    response = admin_client.post(
        f"/admin/queue/taskevent/{event.pk}/change/", {"message": "changed"}
    )
    assert response.status_code == 403
    assert admin_client.get(f"/admin/queue/taskevent/{event.pk}/delete/").status_code == 403
    assert TaskEvent.objects.get(pk=event.pk).message == "hello"


def test_the_event_list_counts_no_further_than_its_cap(admin_client, monkeypatch):
    # Counting every event of a kind read millions of rows for a number on the page.
    monkeypatch.setattr(CappedCountPaginator, "CAP", 5)
    (task,) = make_tasks("q", 1)
    TaskEvent.objects.bulk_create(
        TaskEvent(task=task, kind=EventKind.NOTE, message=f"n{i}") for i in range(8)
    )
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/queue/taskevent/", {"kind__exact": "note"})
    assert page.status_code == 200
    assert "More than 5 task events" in page.content.decode()
    counts = [q["sql"] for q in queries if "COUNT(" in q["sql"]]
    assert counts and all("LIMIT 6" in sql for sql in counts)
    # Newest first by the primary key's index, not a sort of every event by its time.
    (listing,) = [q["sql"] for q in queries if '"queue_taskevent"."message"' in q["sql"]]
    assert 'ORDER BY "queue_taskevent"."id" DESC' in listing
    assert '"queue_taskevent"."at" DESC' not in listing
    few = admin_client.get("/admin/queue/taskevent/", {"kind__exact": "created"})
    assert "0 task events" in few.content.decode()


def test_events_are_searched_by_their_tasks_key_through_the_timeline(admin_client):
    first, second = make_tasks("q", 2)
    TaskEvent.objects.create(task=first, kind=EventKind.NOTE, message="of the first")
    TaskEvent.objects.create(task=second, kind=EventKind.NOTE, message="of the second")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/queue/taskevent/", {"q": first.key.upper()})
    text = page.content.decode()
    assert "of the first" in text and "of the second" not in text
    # No text search of every event's message, nor a join of every event with its task.
    searched = [q["sql"] for q in queries if "LIKE" in q["sql"] or "UPPER" in q["sql"]]
    assert searched and all("queue_taskevent" not in sql for sql in searched)


def test_queue_is_editable(admin_client):
    Queue.objects.create(name="inbox")
    response = admin_client.post(
        "/admin/queue/queue/inbox/change/",
        {
            "name": "inbox",
            "max_attempts": 7,
            "stamp_claims": "on",
            "human_assignee": "ada",
            "bot_assignee": "bot",
            "project_links": '{"osb": "[[oversight-board]]"}',
        },
    )
    assert response.status_code == 302
    queue = Queue.objects.get(name="inbox")
    assert (queue.max_attempts, queue.human_assignee) == (7, "ada")
    assert queue.project_links == {"osb": "[[oversight-board]]"}


# Every form of the admin against values a column cannot hold ---------------------------


def change_form(admin_client, url: str) -> tuple[dict, dict]:
    """The form's fields by name, and POST data that saves the object as it is."""
    response = admin_client.get(url)
    assert response.status_code == 200
    form = response.context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form.initial.get(name)
        if isinstance(field, forms.JSONField):
            data[name] = json.dumps(value if value is not None else field.initial)
        elif isinstance(field, forms.BooleanField):
            if value:
                data[name] = "on"
        elif isinstance(field, forms.SplitDateTimeField) and value is not None:
            shown = timezone.localtime(value)
            data[f"{name}_0"], data[f"{name}_1"] = shown.date(), shown.time()
        elif value is not None:
            data[name] = value
    for inline in response.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        data.update({management.add_prefix(k): v for k, v in management.initial.items()})
    return form.fields, data


HOSTILE = {
    forms.JSONField: ['{"a": "\\u0000"}', '["\\u0000"]', "[1e999]", "NaN"],
    forms.CharField: ["a\x00b"],
}


def admin_forms():
    Queue.objects.create(name="inbox")
    profile = Profile.objects.create(name="probe", processor="noop")
    (task,) = make_tasks("inbox", 1)
    return [
        reverse("admin:queue_task_change", args=[task.pk]),
        reverse("admin:queue_queue_change", args=["inbox"]),
        reverse("admin:herds_profile_change", args=[profile.pk]),
    ]


def test_no_admin_form_answers_a_server_error_to_what_a_column_cannot_hold(admin_client):
    """A NUL character anywhere, NaN or Infinity in JSON: PostgreSQL refuses them all, and
    each was a server error from the task's JSON fields before the admin checked them."""
    tried = 0
    for url in admin_forms():
        fields, data = change_form(admin_client, url)
        saved = admin_client.post(url, data)
        assert saved.status_code == 302, (url, saved.context and saved.context["adminform"])
        for name, field in fields.items():
            kind = next((k for k in HOSTILE if isinstance(field, k)), None)
            if kind is None or field.disabled:
                continue
            for value in HOSTILE[kind]:
                response = admin_client.post(url, {**data, name: value})
                tried += 1
                assert response.status_code == 200, (url, name, value)
                assert name in response.context["adminform"].form.errors, (url, name, value)
    assert tried > 40


def test_a_claimed_task_is_not_deleted_from_under_its_worker(admin_client):
    queued, held = make_tasks("q", 2)
    claim_with_lock(held, os.getpid())
    assert admin_client.get(reverse("admin:queue_task_delete", args=[held.pk])).status_code == 403
    selected = {"action": "delete_selected", "_selected_action": [queued.pk, held.pk]}
    confirm = admin_client.post(CHANGELIST, selected)
    assert confirm.status_code == 200
    assert "Left 1 claimed task(s)" in confirm.content.decode()
    response = admin_client.post(CHANGELIST, {**selected, "post": "yes"}, follow=True)
    assert "Deleted 1 task(s)." in response.content.decode()
    assert list(Task.objects.values_list("key", "status")) == [(held.key, Status.CLAIMED)]
    assert locks.lock_dir(held.queue, held.key).is_dir()


@pytest.mark.django_db(transaction=True)
def test_a_claim_landing_while_the_admin_deletes_is_never_deleted(admin_client, monkeypatch):
    """A worker claims while the admin's delete runs (here: right after the rows to
    delete are read): the claimed task keeps its row, or the claim finds nothing."""
    tasks = make_tasks("q", 3)
    claimed, workers = [], []

    def worker_claims():
        try:
            claimed.extend(transitions.claim("q", Identity.current("w-race"), 3, 300))
        finally:
            connection.close()

    read_rows = deletion.Collector.collect

    def collect_then_a_worker_claims(collector, objs, *args, **kwargs):
        read_rows(collector, objs, *args, **kwargs)
        # The delete's own reading of the rows, not the confirmation page's (a subclass).
        if type(collector) is deletion.Collector and getattr(objs, "model", None) is Task:
            workers.append(threading.Thread(target=worker_claims))
            workers[-1].start()
            workers[-1].join(timeout=2)  # it may wait for the delete's write lock

    monkeypatch.setattr(deletion.Collector, "collect", collect_then_a_worker_claims)
    selected = {"action": "delete_selected", "_selected_action": [t.pk for t in tasks]}
    response = admin_client.post(CHANGELIST, {**selected, "post": "yes"}, follow=True)
    for worker in workers:
        worker.join(timeout=30)
    assert workers
    assert response.status_code == 200
    held = {c.id for c in claimed}
    assert set(Task.objects.values_list("pk", flat=True)) == held
    assert set(Task.objects.filter(status=Status.CLAIMED).values_list("pk", flat=True)) == held
    logged = LogEntry.objects.filter(action_flag=3).values_list("object_id", flat=True)
    assert sorted(int(i) for i in logged) == sorted({t.pk for t in tasks} - held)


def test_a_task_claimed_before_its_delete_page_is_confirmed_is_kept(admin_client, monkeypatch):
    (task,) = make_tasks("q", 1)
    url = reverse("admin:queue_task_delete", args=[task.pk])
    assert admin_client.get(url).status_code == 200
    delete_model = TaskAdmin.delete_model

    def claimed_first(admin, request, obj):
        claim_with_lock(obj, os.getpid())
        delete_model(admin, request, obj)

    monkeypatch.setattr(TaskAdmin, "delete_model", claimed_first)
    response = admin_client.post(url, {"post": "yes"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("admin:queue_task_change", args=[task.pk])
    assert "claimed by a worker meanwhile and were not deleted" in response.content.decode()
    assert Task.objects.get(pk=task.pk).status == Status.CLAIMED
    assert not LogEntry.objects.filter(action_flag=3).exists()


@pytest.mark.parametrize("how", ["page", "action"])
def test_a_task_with_events_is_deleted_with_them_its_events_counted_not_listed(admin_client, how):
    # Every imported task has an event, and the events' admin deletes none on its own:
    # Django refused each such delete for a permission no one has.
    doomed, kept = make_tasks("q", 2)
    TaskEvent.objects.bulk_create(
        TaskEvent(task=task, kind=EventKind.NOTE, actor="t", message=f"note {n}")
        for task in (doomed, kept)
        for n in range(30)
    )
    if how == "page":
        url, confirm = reverse("admin:queue_task_delete", args=[doomed.pk]), {}
    else:
        url, confirm = CHANGELIST, {"action": "delete_selected", "_selected_action": [doomed.pk]}
    page = admin_client.post(url, confirm) if confirm else admin_client.get(url)
    text = page.content.decode()
    assert page.status_code == 200
    assert "permission to delete" not in text
    assert "<li>Tasks: 1</li>" in text and "<li>Task events: 30</li>" in text
    assert "note 1" not in text  # counted, not listed
    admin_client.post(url, {**confirm, "post": "yes"})
    assert list(Task.objects.values_list("pk", flat=True)) == [kept.pk]
    assert TaskEvent.objects.filter(task=kept).count() == 30
    assert TaskEvent.objects.count() == 30


def test_the_delete_action_says_how_many_it_deleted_and_logs_each(admin_client):
    tasks = make_tasks("q", 3)
    selected = {"action": "delete_selected", "_selected_action": [t.pk for t in tasks[:2]]}
    response = admin_client.post(CHANGELIST, {**selected, "post": "yes"}, follow=True)
    assert "Deleted 2 task(s)." in response.content.decode()
    assert list(Task.objects.values_list("pk", flat=True)) == [tasks[2].pk]
    logged = LogEntry.objects.filter(action_flag=3).values_list("object_id", flat=True)
    assert sorted(int(i) for i in logged) == sorted(t.pk for t in tasks[:2])
