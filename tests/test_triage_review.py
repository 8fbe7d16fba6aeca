"""Triage this view: a dry-run herd of the triage rules, reviewed, then only the accepted
changes written."""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission

from herds.models import Herd, HerdStatus, Profile
from herds.supervision import worker_argv
from workqueue import editing, triage_review
from workqueue.importer import Importer
from workqueue.models import BulkAction, EventKind, Queue, Status, Task, TaskEvent
from workqueue.processors import load_processor
from workqueue.routing import TaskFilter
from workqueue.templatetags.board import bulk_summary, change_words, decision_words
from workqueue.triage import rules_for
from workqueue.triage_rules import triage_bytes
from workqueue.worker import Worker

pytestmark = pytest.mark.django_db

FILES = {
    "a.md": "---\nid: a\ntitle: Fix the bug in /src/x.py\nproject: web\n---\n# A\n\nText.\n",
    "b.md": "---\nid: b\ntitle: Rename the settings file\nproject: web\n---\n# B\n",
    "c.md": "---\nid: c\ntitle: Review the budget\nproject: web\n---\n# C\n\nDecide.\n",
    "d.md": "---\nid: d\ntitle: Other project\nproject: ops\n---\n# D\n",
}


@pytest.fixture
def inbox(write_task):
    for name, text in FILES.items():
        write_task(name, text)
    report = Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    assert not report.errors
    inbox.folder = write_task.folder
    return write_task.folder


def dry_run(herd: Herd) -> None:
    """What the herd's workers do, in this process: the triage processor, dry."""
    worker = Worker(
        herd.queue,
        load_processor("triage"),
        prefetch=10,
        herd=herd.pk,
        dry_run=True,
        filters=TaskFilter.parse(herd.all_filters()),
    )
    while worker.work_one_batch():
        pass
    Herd.objects.filter(pk=herd.pk).update(status=HerdStatus.FINISHED)
    herd.refresh_from_db()


def triage_herd(user=None, conditions=("project=web",), status=HerdStatus.PENDING) -> Herd:
    return Herd.objects.create(
        queue="inbox",
        profile=Profile.objects.get(name="triage"),
        size=1,
        filters=list(conditions),
        dry_run=True,
        created_by=user,
        preflight={"ready": 3},
        status=status,
    )


def test_a_fresh_install_has_the_triage_profile():
    profile = Profile.objects.get(name="triage")
    assert (profile.processor, profile.command) == ("triage", [])


def test_a_dry_run_herd_passes_dry_run_to_its_workers():
    herd = triage_herd()
    argv = worker_argv(herd, herd.workers.create(index=0, name="w0", host="h"))
    assert "--dry-run" in argv
    assert "--where=project=web" in argv
    herd.dry_run = False
    assert "--dry-run" not in worker_argv(herd, herd.workers.get())


def test_only_the_accepted_changes_are_written(inbox, monkeypatch):
    # The proposals are looked up a batch at a time (a statement takes only so many
    # values): three in batches of two.
    monkeypatch.setattr(editing, "BATCH", 2)
    originals = {name: (inbox / name).read_bytes() for name in FILES}
    herd = triage_herd()
    dry_run(herd)
    # The dry run writes nothing and proposes a diff per task of the view.
    assert {name: (inbox / name).read_bytes() for name in FILES} == originals
    proposals = {t.key: t for t in triage_review.proposals(herd)}
    assert sorted(proposals) == ["a", "b", "c"]  # d is another project: not in the view
    assert "+complexity: mechanical" in proposals["a"].result["diff"]

    outcome = triage_review.review(
        herd, [proposals["a"].pk, proposals["b"].pk], [proposals["c"].pk], "user:alice"
    )
    assert (sorted(outcome.applied), outcome.rejected, outcome.skipped) == (["a", "b"], ["c"], [])
    rules = rules_for(herd.queue)
    for name in ("a.md", "b.md"):
        expected, _decision, _doc = triage_bytes(
            originals[name], name[:-3], lambda _: False, rules
        )
        assert (inbox / name).read_bytes() == expected  # exactly what triage would write
        assert expected != originals[name]
    assert (inbox / "c.md").read_bytes() == originals["c.md"]
    assert (inbox / "d.md").read_bytes() == originals["d.md"]

    a = Task.objects.get(key="a")
    assert (a.status, a.outcome, a.complexity) == (Status.DONE, "success", "mechanical")
    assert a.result["review"] == "applied" and "diff" not in a.result
    assert a.source_sha256 == hashlib.sha256((inbox / "a.md").read_bytes()).hexdigest()
    event = TaskEvent.objects.get(task=a, kind=EventKind.EDITED)
    assert event.message.startswith("triage applied: ")
    c = Task.objects.get(key="c")
    assert (c.status, c.result["review"]) == (Status.QUEUED, "rejected")
    assert TaskEvent.objects.filter(task=c, kind=EventKind.REQUEUED).exists()
    assert triage_review.proposals(herd).count() == 0
    # Rows and files agree: a re-import finds nothing to do.
    report = Importer("inbox", roots=[inbox]).run([inbox])
    assert (report.updated, report.unchanged) == (0, 4)


def test_a_file_changed_since_the_dry_run_is_not_written(inbox):
    herd = triage_herd()
    dry_run(herd)
    a = Task.objects.get(key="a")
    edited = FILES["a.md"].replace("Text.", "A person's text.")
    (inbox / "a.md").write_text(edited)
    outcome = triage_review.review(herd, [a.pk], [], "user:alice")
    assert outcome.applied == []
    assert [(s["key"], s["why"]) for s in outcome.skipped] == [
        ("a", "changed on disk since import")
    ]
    assert (inbox / "a.md").read_text() == edited


def test_a_proposal_the_rules_no_longer_make_is_not_applied(inbox, settings):
    herd = triage_herd()
    dry_run(herd)
    # The queue's rules changed since the dry run.
    Queue.objects.filter(name="inbox").update(bot_assignee="robot")
    a = Task.objects.get(key="a")
    outcome = triage_review.review(herd, [a.pk], [], "user:alice")
    assert outcome.skipped[0]["why"].startswith("the rules now propose something else")
    assert (inbox / "a.md").read_text() == FILES["a.md"]


def test_herd_progress_counts_tasks_unblocked_during_the_run():
    herd = triage_herd()
    herd.preflight = {"ready": 5}
    assert herd.progress_line(3) == "3 of 5 tasks finished"
    assert herd.progress_line(6) == "6 finished: 5 ready at the start, 1 unblocked"


# The pages ------------------------------------------------------------------------


def login(client, django_user_model, *codenames):
    user = django_user_model.objects.create_user("u" + str(len(codenames)), password="pw-1234")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return user


def test_triage_of_a_queue_there_is_not_is_refused_naming_the_queues(
    client, django_user_model, inbox
):
    """The board of ?queue=nosuch offered "Triage this view", and a herd ran on nothing."""
    login(client, django_user_model, "view_task", "change_task", "add_herd")
    response = client.post("/triage/", {"filters": "queue=nosuch"}, follow=True)
    assert not Herd.objects.exists()
    assert "Cannot triage this view: no task is in a queue named &#x27;nosuch&#x27; (queues:" in (
        response.content.decode()
    )


def test_triage_this_view_launches_a_dry_run_herd_and_reviews_it(client, django_user_model, inbox):
    user = login(client, django_user_model, "view_task", "change_task", "add_herd")
    board = client.get("/?queue=inbox&project=web").content.decode()
    assert "Triage this view</button>" in board
    response = client.post("/triage/", {"filters": "queue=inbox&project=web"})
    herd = Herd.objects.get()
    assert response["Location"] == f"/triage/{herd.pk}/"
    assert (herd.queue, herd.filters, herd.dry_run, herd.profile.name, herd.created_by) == (
        "inbox",
        ["project=web"],
        True,
        "triage",
        user,
    )
    running = client.get(f"/triage/{herd.pk}/").content.decode()
    assert 'hx-trigger="every 2s"' in running
    Herd.objects.filter(pk=herd.pk).update(preflight={"ready": 3})
    dry_run(herd)
    page = client.get(f"/triage/{herd.pk}/").content.decode()
    assert "3 proposed changes" in page
    assert '<span class="d-add">+complexity: mechanical\n</span>' in page
    # The decisions in words, not the codes the results record ("assign:bot").
    assert "assign:" not in page and "->" not in page
    assert '<p class="meta">assign to bot · complexity set to mechanical' in page
    a, b, c = (Task.objects.get(key=k) for k in "abc")
    done = client.post(
        f"/triage/{herd.pk}/apply/",
        {
            f"decision-{a.pk}": "accept",
            f"decision-{c.pk}": "reject",
            # Not a task number: ignored (each was a server error).
            "decision-\u00b2": "accept",
            "decision-" + "9" * 20: "accept",
        },
        follow=True,
    ).content.decode()
    assert "Applied 1, rejected 1." in done
    assert "complexity: mechanical" in (inbox / "a.md").read_text()
    assert (inbox / "c.md").read_text() == FILES["c.md"]
    assert "1 proposed change" in done  # b still waits for a decision
    assert Task.objects.get(pk=b.pk).status == Status.DONE
    # Left and come back to: the herd's page and b's page lead to the review; the
    # rejected c, queued again, shows its dry run as its last run.
    review = f'<a href="/triage/{herd.pk}/">'
    user.user_permissions.add(Permission.objects.get(codename="view_herd"))
    assert review + "the triage review</a>" in client.get(f"/herds/{herd.pk}/").content.decode()
    waiting = client.get(f"/tasks/{b.pk}/").content.decode()
    assert f"waits for a decision in {review}the triage review of herd {herd.pk}</a>" in waiting
    applied = client.get(f"/tasks/{a.pk}/").content.decode()
    assert "waits for a decision" not in applied
    assert "<dt>Action</dt><dd>assign to bot · complexity set to mechanical" in applied
    assert (
        "proposed: <strong>assign to bot</strong>" in client.get("/?queue=inbox").content.decode()
    )
    assert "<h2>Last run</h2>" in client.get(f"/tasks/{c.pk}/").content.decode()


@pytest.mark.parametrize(
    ("filters", "why"),
    [
        ("project=web", "choose a queue first"),
        ("queue=inbox&q=bug", "clear the search first"),
        ("queue=inbox&tag=a|b", "not valid"),
        # Not the board's own keys: read leniently it was the whole queue.
        ("queue=inbox&colour=red", "not valid"),
        ("queue=inbox&&&", "not valid"),
    ],
)
def test_a_view_that_cannot_be_triaged_says_why(client, django_user_model, inbox, filters, why):
    login(client, django_user_model, "view_task", "change_task", "add_herd")
    response = client.post("/triage/", {"filters": filters}, follow=True)
    assert why in response.content.decode()
    assert not Herd.objects.exists()


def test_triage_needs_change_and_launch_permissions(client, django_user_model, inbox):
    login(client, django_user_model, "view_task", "change_task")
    assert "Triage this view" not in client.get("/?queue=inbox").content.decode()
    assert client.post("/triage/", {"filters": "queue=inbox"}).status_code == 403
    herd = triage_herd()
    client.logout()
    login(client, django_user_model, "view_task")
    assert client.get(f"/triage/{herd.pk}/").status_code == 403
    assert client.post(f"/triage/{herd.pk}/apply/").status_code == 403
    assert not Herd.objects.exclude(pk=herd.pk).exists()


def test_a_herd_that_is_not_a_dry_run_has_no_review(client, django_user_model):
    login(client, django_user_model, "view_task", "change_task")
    herd = Herd.objects.create(queue="q", profile=Profile.objects.get(name="noop"), size=1)
    assert client.get(f"/triage/{herd.pk}/").status_code == 404
    assert client.post(f"/triage/{herd.pk}/apply/").status_code == 404


def test_the_herd_page_never_says_6_of_5(client, django_user_model):
    login(client, django_user_model, "view_herd")
    herd = Herd.objects.create(
        queue="q", profile=Profile.objects.get(name="noop"), size=1, preflight={"ready": 5}
    )
    herd.workers.create(index=0, name="w0", host="h", done=5, blocked=1)
    html = client.get(f"/herds/{herd.pk}/live/").content.decode()
    assert "6 finished: 5 ready at the start, 1 unblocked" in html
    assert "6 of 5" not in html
    assert 'value="100"' in html  # the bar is full, not past full


def test_a_review_of_thousands_shows_a_page_and_applies_them_all_on_the_consumer(
    transactional_db, client, django_user_model, write_task, consumer_huey, consumer
):
    """ "Triage this view" over an inbox of thousands: the page shows the first hundred
    diffs, not megabytes of them; "Apply all" sends one field, and the consumer writes
    every file while the page says how far it got."""
    Profile.objects.get_or_create(
        name="triage", defaults={"processor": "triage", "prefetch": 50, "max_workers": 8}
    )
    for n in range(1100):
        write_task(
            f"t{n}.md", f"---\nid: t{n}\ntitle: Fix the bug in /src/x{n}.py\nproject: web\n---\n"
        )
    assert not Importer("inbox", roots=[write_task.folder]).run([write_task.folder]).errors
    login(client, django_user_model, "view_task", "change_task", "add_herd")
    # Run here, in this process: made pending, it was launched again by the consumer if
    # the consumer's start (which launches every pending herd) came after it.
    herd = triage_herd(status=HerdStatus.FINISHED)
    dry_run(herd)
    page = client.get(f"/triage/{herd.pk}/").content.decode()
    assert "1,100 proposed changes" in page
    assert page.count('<fieldset class="proposal"') == triage_review.PAGE == 100
    assert "Apply all 1,100</button>" in page and "Accept these 100</button>" in page
    response = client.post(f"/triage/{herd.pk}/apply/", {"everything": "accept"})
    assert response["Location"] == f"/triage/{herd.pk}/"
    decision = BulkAction.objects.get(action="triage")
    assert decision.total == 1100
    deadline = time.monotonic() + 90
    while not BulkAction.objects.get(pk=decision.pk).finished and time.monotonic() < deadline:
        time.sleep(0.2)
    decision.refresh_from_db()
    assert (decision.status, decision.changed, decision.processed) == ("done", 1100, 1100)
    done = client.get(f"/triage/{herd.pk}/").content.decode()
    assert "Applied 1,100, rejected 0." in done and "No proposal waits" in done
    assert "every 1s" not in done
    assert "complexity: mechanical" in (write_task.folder / "t1099.md").read_text()
    # The bodies the rules changed (a link to the project) are stored and searched.
    body = Task.objects.get(key="t7").body
    assert "[[web]]" in body and body in (write_task.folder / "t7.md").read_text()
    assert client.get("/", {"queue": "inbox", "q": "[[web]]"}).context["total"] == 1100


def test_reject_all_puts_every_proposal_back_and_no_decision_is_no_change(
    client, django_user_model, inbox
):
    user = login(client, django_user_model, "view_task", "change_task", "add_herd")
    herd = triage_herd()
    dry_run(herd)
    running = BulkAction.objects.create(
        user=user, action="triage", params={"herd": herd.pk}, total=5, processed=2
    )
    page = client.get(f"/triage/{herd.pk}/").content.decode()
    assert "Carrying out your decisions … 2 of 5 done." in page
    assert 'hx-trigger="every 1s"' in page and "fieldset" not in page  # no deciding twice
    running.delete()
    nothing = client.post(f"/triage/{herd.pk}/apply/", {}, follow=True).content.decode()
    assert "Nothing was applied: choose Accept or Reject for a proposal." in nothing
    assert not BulkAction.objects.exists()
    page = client.post(f"/triage/{herd.pk}/apply/", {"everything": "reject"}, follow=True)
    assert "Applied 0, rejected 3." in page.content.decode()
    assert set(Task.objects.filter(status=Status.QUEUED).values_list("key", flat=True)) == {
        "a",
        "b",
        "c",
        "d",
    }
    assert {n: (inbox / n).read_text() for n in FILES} == FILES
    # A decision sent again (a second tab, a reload) finds nothing left to decide.
    again = client.post(f"/triage/{herd.pk}/apply/", {"everything": "accept"}, follow=True)
    assert "Nothing was applied" in again.content.decode()
    a = Task.objects.get(key="a")
    stale_tab = client.post(
        f"/triage/{herd.pk}/apply/", {f"decision-{a.pk}": "accept"}, follow=True
    )
    assert "Applied 0, rejected 0, 1 skipped." in stale_tab.content.decode()
    # Named by its key, as everywhere else (it said "task 6", the row's id).
    assert "<code>a</code>: no longer waits for a decision" in stale_tab.content.decode()
    assert {n: (inbox / n).read_text() for n in FILES} == FILES


def test_a_form_of_more_fields_than_the_server_reads_is_refused_in_words(
    client, django_user_model, settings
):
    login(client, django_user_model, "view_task", "change_task", "add_herd")
    herd = triage_herd()
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    decisions = {f"decision-{n}": "accept" for n in range(20)}
    refused = client.post(f"/triage/{herd.pk}/apply/", decisions)
    assert (refused.status_code, refused["Content-Type"]) == (413, "text/plain; charset=utf-8")
    assert refused.content.decode() == (
        "The form sent has more than 10 fields, the most this server reads: nothing was saved."
    )


def test_decisions_recorded_twice_are_carried_out_once_and_the_second_says_so(
    client, django_user_model, inbox
):
    """Two tabs (or two people) press "Apply all" before the consumer runs either."""
    from workqueue import bulk

    user = login(client, django_user_model, "view_task", "change_task", "add_herd")
    herd = triage_herd()
    dry_run(herd)
    ids = list(triage_review.proposals(herd).values_list("pk", flat=True))
    first, second = (
        BulkAction.objects.create(
            user=user,
            actor="user:alice",
            action="triage",
            params={"herd": herd.pk, "accepted": ids, "rejected": []},
            total=len(ids),
        )
        for _ in range(2)
    )
    bulk.run(first.pk)
    bulk.run(second.pk)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.changed, first.skipped_count) == (3, 0)
    assert (second.changed, second.processed, second.skipped_count) == (0, 3, 3)
    assert {s["why"] for s in second.skipped} == {"no longer waits for a decision"}
    page = client.get(f"/triage/{herd.pk}/").content.decode()
    assert "Applied 0, rejected 0, 3 skipped." in page
    first_key = Task.objects.get(pk=ids[0]).key
    assert f"<code>{first_key}</code>: no longer waits for a decision" in page
    assert TaskEvent.objects.filter(kind=EventKind.EDITED).count() == 3  # written once


@pytest.mark.parametrize(
    ("result", "decision", "changes"),
    [
        (
            {"action": "assign:bot", "changes": ["complexity->mechanical", "assignee->bot"]},
            "assign to bot",
            "complexity set to mechanical, assignee set to bot",
        ),
        (
            {"action": "close", "close_reason": "close_reason_section", "changes": []},
            "close: its body has a Close Reason section",
            "",
        ),
        (
            {"action": "close", "close_reason": "status_cancelled", "changes": ["status->done"]},
            "close: its status is cancelled",
            "status set to done",
        ),
        (
            {"action": "assign:nic", "changes": ["added_wikilink", "something new"]},
            "keep nic as assignee",
            "project link added to the body, something new",
        ),
        ({"action": "assign:nic"}, "assign to nic", ""),
    ],
)
def test_triage_decisions_read_as_words(result, decision, changes):
    assert decision_words(result) == decision
    assert change_words(result) == changes


def test_decisions_on_a_review_can_be_undone_once(client, django_user_model, inbox):
    user = login(client, django_user_model, "view_task", "change_task", "add_herd")
    herd = triage_herd(user)
    dry_run(herd)
    a, b, c = (Task.objects.get(key=k) for k in "abc")
    proposal = {k: Task.objects.get(key=k).result for k in "abc"}
    page = client.post(
        f"/triage/{herd.pk}/apply/",
        {f"decision-{a.pk}": "accept", f"decision-{b.pk}": "accept", f"decision-{c.pk}": "reject"},
        follow=True,
    ).content.decode()
    assert "Applied 2, rejected 1." in page
    assert "Undo the 2 applied</button>" in page
    assert (inbox / "a.md").read_text() != FILES["a.md"]
    # Someone edits b's file meanwhile: its undo is refused, a's goes ahead.
    (inbox / "b.md").write_text((inbox / "b.md").read_text() + "\nMore.\n")

    undone = client.post(f"/triage/{herd.pk}/undo/", follow=True).content.decode()
    assert (
        "Undone: 1 applied proposal put back as it was, waiting for a decision again; "
        "1 changed since, left as it is. The 1 rejected stay in the queue."
    ) in undone
    assert "<code>b</code>: changed on disk since import" in undone
    assert (inbox / "a.md").read_text() == FILES["a.md"]
    a.refresh_from_db()
    assert (a.status, a.result) == (Status.DONE, proposal["a"])
    assert list(triage_review.proposals(herd)) == [a]
    assert "1 proposed change" in undone and f'name="decision-{a.pk}"' in undone
    assert Task.objects.get(pk=c.pk).status == Status.QUEUED
    assert "Undo the" not in undone
    again = client.post(f"/triage/{herd.pk}/undo/", follow=True).content.decode()
    assert "Only your latest decisions can be undone, once." in again
    assert (inbox / "a.md").read_text() == FILES["a.md"]

    # Accepted again, the proposal is written as the first time.
    client.post(f"/triage/{herd.pk}/apply/", {f"decision-{a.pk}": "accept"})
    assert "complexity: mechanical" in (inbox / "a.md").read_text()


def test_a_bulk_action_after_the_decisions_takes_their_undo_away(client, django_user_model, inbox):
    user = login(client, django_user_model, "view_task", "change_task", "add_herd")
    herd = triage_herd(user)
    dry_run(herd)
    a = Task.objects.get(key="a")
    client.post(f"/triage/{herd.pk}/apply/", {f"decision-{a.pk}": "accept"})
    d = Task.objects.get(key="d")
    client.post("/bulk/", {"action": "assign", "value": "nic", "ids": str(d.pk)})
    assert Task.objects.get(pk=d.pk).assignee == "nic"
    page = client.get(f"/triage/{herd.pk}/").content.decode()
    assert "Applied 1, rejected 0." in page and "Undo the" not in page
    refused = client.post(f"/triage/{herd.pk}/undo/", follow=True).content.decode()
    assert "Only your latest decisions can be undone, once." in refused
    assert "complexity: mechanical" in (inbox / "a.md").read_text()


def test_the_board_says_what_a_reviews_decisions_did_in_a_sentence():
    """The bar after Apply read "triage 17 tasks." (the action's name)."""
    bulk = SimpleNamespace(action="triage", finished=True, changed=17, unchanged=0)
    assert bulk_summary(bulk) == "Applied triage's decisions to 17 tasks."
    # The proposals not applied were rejected, not "already so".
    bulk = SimpleNamespace(action="triage", finished=True, changed=3, unchanged=11)
    assert bulk_summary(bulk) == "Applied triage's decisions to 3 tasks; 11 rejected."
    bulk = SimpleNamespace(action="assign", finished=True, changed=3, unchanged=11)
    assert bulk_summary(bulk) == "Assigned 3 tasks; 11 already so."


def test_a_herds_review_and_summary_read_its_tasks_from_their_index():
    """Each read every task (0.7 s a poll of the review at a million tasks)."""
    from django.db import connection

    herd = Herd.objects.create(
        queue="q", profile=Profile.objects.get(name="triage"), size=1, dry_run=True
    )
    if connection.vendor == "postgresql":  # a test's few rows: any plan would do
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
    finished = Task.objects.filter(
        holder_herd=herd.pk, status__in=(Status.DONE, Status.BLOCKED)
    )  # as Herd.task_rows
    for tasks in (triage_review.proposals(herd), triage_review.refused(herd), finished):
        assert "task_herd" in tasks.explain()
