"""Two people on one board while workers take its tasks, through the test client.

Each test posts what the page a person has open would post (its forms' own fields, read
from the page), after the task moved under that page.
"""

from __future__ import annotations

import hashlib
import threading
import time
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import F
from django.utils import timezone

from tests.conftest import make_tasks
from workqueue import claims, editing, transitions
from workqueue.forms import TaskEditForm
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import BulkAction, EventKind, Status, Task
from workqueue.processing import Result

pytestmark = pytest.mark.django_db

HX_BOARD = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "board"}


class FormFields(HTMLParser):
    """The fields of the first form inside the element with id `inside`."""

    def __init__(self, inside: str):
        super().__init__()
        self.inside, self.depth, self.done = inside, 0, False
        self.action, self.fields = "", {}
        self.in_form = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.done:
            return
        if attrs.get("id") == self.inside:
            self.depth = 1
            return
        if not self.depth:
            return
        if tag == "form" and not self.action:
            self.in_form, self.action = True, attrs.get("action", "")
        elif tag == "input" and self.in_form and attrs.get("type") == "hidden":
            self.fields[attrs["name"]] = attrs.get("value", "")

    def handle_endtag(self, tag):
        if self.in_form and tag == "form":
            self.in_form, self.done = False, True


def card_form(html: str, task: Task) -> tuple[str, dict]:
    parser = FormFields(f"task-{task.pk}")
    parser.feed(html)
    assert parser.action, f"no form on the card of {task.key}"
    return parser.action, parser.fields


@pytest.fixture
def triager(client, django_user_model):
    """A person with only what triage needs: to see the board and change tasks."""
    user = django_user_model.objects.create_user("tri", password="pw-12345")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_task", "change_task"])
    )
    client.force_login(user)
    return client


def claim(task: Task, holder: str) -> None:
    """A worker's claim, as the claim query makes it: a new fence."""
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(
        status=Status.CLAIMED,
        holder=holder,
        fence=F("fence") + 1,
        claimed_at=now,
        lease_expires_at=now + timezone.timedelta(minutes=5),
        updated_at=now,
    )


def test_mark_done_on_a_card_a_worker_took_after_the_page_showed_it_is_refused(triager):
    """The board showed the task queued; a worker claimed it before the page refreshed.
    "Mark done" on that card closed the task and ended the worker's run: the question a
    claimed card asks first ("A worker holds this task...") was never asked."""
    task, other = make_tasks("q", 2)
    action, fields = card_form(triager.get("/?queue=q").content.decode(), task)
    claim(task, "w-2")
    answer = triager.post(action, {**fields, "action": "done"}, **HX_BOARD)
    assert answer.status_code == 409
    assert answer.content.decode() == (
        "t000000 moved since your page showed it (it is claimed, held by w-2); nothing done."
    )
    assert answer["HX-Trigger"] == "board-changed"
    task.refresh_from_db()
    assert (task.status, task.holder) == (Status.CLAIMED, "w-2")
    assert not task.events.filter(kind=EventKind.DONE).exists()
    # A card the page shows as it is is acted on.
    action, fields = card_form(triager.get("/?queue=q").content.decode(), other)
    answer = triager.post(action, {**fields, "action": "done"}, **HX_BOARD)
    assert answer.status_code == 200
    assert Task.objects.get(pk=other.pk).status == Status.DONE


def test_release_from_a_stale_page_leaves_the_claim_taken_after_the_one_it_showed(triager):
    """The page showed w-1's claim; w-1 finished, the task was requeued and w-2 took it.
    "Release claim" on the old card released w-2's claim, a run the person never saw."""
    (task,) = make_tasks("q", 1)
    claim(task, "w-1")
    page = triager.get(f"/tasks/{task.pk}/").content.decode()
    Task.objects.filter(pk=task.pk).update(status=Status.QUEUED, holder="")
    claim(task, "w-2")
    parser = FormFields("main")
    parser.feed(page.replace('class="actions"', 'class="actions" id="main"', 1))
    assert parser.action == f"/tasks/{task.pk}/action/"
    answer = triager.post(parser.action, {**parser.fields, "action": "release"})
    assert answer.status_code == 302
    messages = [str(m) for m in answer.wsgi_request._messages]
    assert messages == [
        "t000000 moved since your page showed it (it is claimed, held by w-2); nothing done."
    ]
    task.refresh_from_db()
    assert (task.status, task.holder) == (Status.CLAIMED, "w-2")


TASK = """---
id: ex-1
title: Fix the login bug
status: inbox
priority: 1
assignee: nic
---
# Fix the login bug
"""


@pytest.fixture
def task(write_task) -> Task:
    write_task("a.md", TASK)
    report = Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    assert not report.errors
    found = Task.objects.get(key="ex-1")
    found.path = write_task.folder / "a.md"
    return found


def edit_form(task: Task, **typed) -> dict:
    """What the drawer's editor posts: the form as it was shown, with what was typed."""
    shown = TaskEditForm.for_task(task).initial
    return {name: str(value) for name, value in {**shown, **typed}.items()}


def test_a_save_that_lands_while_anothers_save_of_the_same_field_is_under_way_is_refused(
    triager, task, monkeypatch
):
    """Both opened the task with assignee nic. The other person's save of the assignee
    was written between this save's look at the task (nobody had changed the field) and
    its write: this one wrote over it, and both were told "Saved assignee."."""
    posted = edit_form(task, assignee="carol")
    original = editing.edit_task

    def the_other_save_lands_first(*args, **kwargs):
        original(Task.objects.get(pk=task.pk), {"assignee": "alice"}, "user:staff")
        return original(*args, **kwargs)

    monkeypatch.setattr(editing, "edit_task", the_other_save_lands_first)
    answer = triager.post(f"/tasks/{task.pk}/edit/", posted, HTTP_HX_REQUEST="true")
    assert answer.status_code == 409
    assert "The task changed since you opened it" in answer.content.decode()
    text = task.path.read_text()
    assert "assignee: alice\n" in text and "carol" not in text
    assert Task.objects.get(pk=task.pk).assignee == "alice"


def test_a_bulk_assign_leaves_the_file_of_a_task_a_worker_claimed_while_it_ran(
    write_task, monkeypatch
):
    """A worker claimed one of the selected tasks after the bulk action had read them and
    before it wrote them: its file was rewritten under the worker (a triage worker then
    blocked the task, "changed on disk since claim"), where an edit of a claimed task
    waits for the claim to end."""
    for key in ("a", "b"):
        write_task(f"{key}.md", TASK.replace("ex-1", key))
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    first, second = Task.objects.order_by("key")
    before = (write_task.folder / "a.md").read_bytes()
    identity = Identity.current("w-test")
    owner_file = OwnerFile(identity)
    original = editing._write_temporaries
    taken = []

    def a_worker_claims_first(plans, skip):
        if not taken:
            taken.extend(claims.claim_ready_tasks("inbox", identity, owner_file, limit=1))
        return original(plans, skip)

    monkeypatch.setattr(editing, "_write_temporaries", a_worker_claims_first)
    report = editing.edit_tasks([first.pk, second.pk], "user:tri", {"assignee": "carol"})
    assert [claim.key for claim in taken] == ["a"]
    assert (report.changed, report.skipped) == (2, [])
    assert (write_task.folder / "a.md").read_bytes() == before  # the worker's, untouched
    assert "assignee: carol\n" in (write_task.folder / "b.md").read_text()
    first.refresh_from_db()
    assert (first.status, first.assignee, first.change_pending) == (Status.CLAIMED, "carol", True)
    # The claim ends: the file gets the edit, then its status.
    claims.finish_claims(identity, [(claim, Result()) for claim in taken], owner_file)
    text = (write_task.folder / "a.md").read_text()
    assert "assignee: carol\n" in text and "status: done\n" in text


def test_a_title_saved_while_a_bulk_assign_is_writing_the_same_task_saves_too(
    transactional_db, write_task, monkeypatch
):
    """The bulk action had renamed the task's new file into place and not yet committed
    its row (on a busy board the commit waits its turn behind the workers' writes) when
    the staff member saved the title: the save found a file newer than its row and was
    refused as "The file changed on disk", though nobody had touched the title."""
    write_task("a.md", TASK)
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    task = Task.objects.get(key="ex-1")
    renamed = threading.Event()
    original = editing._save_rows

    def a_slow_commit(updates):
        if threading.current_thread().name == "bulk":
            renamed.set()
            time.sleep(0.5)
        return original(updates)

    monkeypatch.setattr(editing, "_save_rows", a_slow_commit)

    def bulk():
        try:
            editing.edit_tasks([task.pk], "user:tri", {"assignee": "carol"})
        finally:
            connection.close()

    thread = threading.Thread(target=bulk, name="bulk")
    thread.start()
    try:
        assert renamed.wait(10)
        posted = edit_form(task, title="Renamed by staff")
        form = TaskEditForm(posted)
        assert form.is_valid()
        result = editing.edit_task(task, form.changes(), "user:staff", check=form.changes)
    finally:
        thread.join()
    assert result.changed == ["title"]
    text = (write_task.folder / "a.md").read_text()
    assert "title: Renamed by staff\n" in text and "assignee: carol\n" in text
    task.refresh_from_db()
    assert (task.title, task.assignee) == ("Renamed by staff", "carol")
    assert task.source_sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_closing_a_task_in_the_editor_after_a_worker_took_it_names_its_state(triager, task):
    """The editor showed the task queued; a worker claimed it; the person set the status
    to done and saved. Refused, rightly, but the conflict said "status is now: " and
    nothing after it: a claimed task's form has no status to show."""
    posted = edit_form(task, status="done", reason="a duplicate")
    claim(task, "w-2")
    answer = triager.post(f"/tasks/{task.pk}/edit/", posted, HTTP_HX_REQUEST="true")
    assert answer.status_code == 409
    assert "status is now: claimed (held by w-2)" in answer.content.decode()
    assert Task.objects.get(pk=task.pk).status == Status.CLAIMED
    assert "status: inbox\n" in task.path.read_text()


def test_a_bulk_close_leaves_a_selected_task_a_worker_took_after_the_page_showed_it(triager):
    """Three cards selected in Queued, and the Close dialog said none was being worked;
    a worker took one before Apply: the bulk close ended its run anyway, and the summary
    said "Closed 3 tasks."."""
    tasks = make_tasks("q", 3)
    page = triager.get("/?queue=q").content.decode()
    seen = ",".join(f"{t.pk}={card_form(page, t)[1]['seen']}" for t in tasks)
    claim(tasks[1], "w-2")
    ids = ",".join(str(t.pk) for t in tasks)
    posted = {"action": "close", "value": "duplicates", "ids": ids, "seen": seen}
    answer = triager.post("/bulk/", posted, HTTP_HX_REQUEST="true")
    assert answer.status_code == 200
    bulk = BulkAction.objects.get()
    assert (bulk.changed, bulk.skipped_count) == (2, 1)
    assert [(s["key"], s["why"]) for s in bulk.skipped] == [
        ("t000001", "moved since your page showed it (it is claimed, held by w-2)")
    ]
    assert "Closed 2 tasks." in answer.content.decode()
    statuses = dict(Task.objects.values_list("key", "status"))
    assert statuses == {"t000000": "done", "t000001": "claimed", "t000002": "done"}
    # An assignment is no state action: the task a worker holds is assigned too.
    posted = {"action": "assign", "value": "carol", "ids": ids, "seen": seen}
    triager.post("/bulk/", posted, HTTP_HX_REQUEST="true")
    assert set(Task.objects.values_list("assignee", flat=True)) == {"carol"}


def test_an_edit_recorded_while_its_claim_was_ending_reaches_the_file(write_task, monkeypatch):
    """The bulk assign found the task claimed and kept its change for the claim's end. The
    worker finished and looked for waiting edits just before the bulk recorded it, then
    wrote `status: done` into the file: the row said carol, the file nic, and nothing
    was left to write it (until an import of the folder came by)."""
    write_task("a.md", TASK)
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    task = Task.objects.get()
    identity = Identity.current("w-test")
    owner_file = OwnerFile(identity)
    taken = claims.claim_ready_tasks("inbox", identity, owner_file, limit=1)
    original = editing._write_temporaries

    def the_claim_ends_first(plans, skip):
        # finish_claims' first half: the finish, then its look for waiting edits.
        report = transitions.finish(identity, [(claim, Result()) for claim in taken])
        claims.apply_pending_changes(report.finished)
        return original(plans, skip)

    monkeypatch.setattr(editing, "_write_temporaries", the_claim_ends_first)
    report = editing.edit_tasks([task.pk], "user:tri", {"assignee": "carol"})
    assert report.changed == 1
    editing.write_finished_status([task.pk], identity.worker)  # and its second half
    text = (write_task.folder / "a.md").read_text()
    assert "assignee: carol\n" in text and "status: done\n" in text
    task.refresh_from_db()
    assert (task.status, task.assignee, task.change_pending) == (Status.DONE, "carol", False)
    assert task.source_sha256 == hashlib.sha256(text.encode()).hexdigest()
