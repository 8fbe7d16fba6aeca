"""The board, its live refresh, card actions and the task detail, through the test client."""

from __future__ import annotations

import html as html_lib
import json
import re
import subprocess
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.utils import timezone

from tests.conftest import make_tasks
from workqueue import claims, locks, transitions, views
from workqueue.locks import Identity, OwnerFile
from workqueue.models import Dependency, EventKind, Queue, Status, Task, TaskEvent

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def still_clock(monkeypatch):
    """The version includes a clock bucket; keep it from turning over mid-test."""
    monkeypatch.setattr(views, "CLOCK_SECONDS", 10**9)


@pytest.fixture
def viewer(client, django_user_model):
    user = django_user_model.objects.create_user("viewer", password="pw-viewer-123")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(user)
    return client


@pytest.fixture
def operator(client, django_user_model):
    user = django_user_model.objects.create_user("operator", password="pw-operator-123")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_task", "change_task"])
    )
    client.force_login(user)
    return client


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def claim(task: Task, pid: int | None = None, lease_seconds: int = 300, **fields) -> Task:
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(
        status=Status.CLAIMED,
        holder=fields.pop("holder", "worker-7"),
        holder_host=settings.HYPERVISOR_HOST,
        holder_pid=pid,
        fence=task.fence + 1,
        claimed_at=now,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        updated_at=now,
        **fields,
    )
    task.refresh_from_db()
    return task


def board_version(response) -> str:
    """The version the board's live refresh sends back as `since`."""
    return re.search(r'data-version="([^"]+)"', response.content.decode()).group(1)


def column_html(content: bytes, status: str) -> str:
    html = content.decode()
    start = html.index(f'data-status="{status}" aria-labelledby')
    end = html.find("</section>", start)
    return html[start:end]


def test_board_shows_each_column_with_its_exact_count(viewer):
    tasks = make_tasks("q", 7)
    Task.objects.filter(pk__in=[tasks[0].pk, tasks[1].pk]).update(status=Status.DONE)
    Task.objects.filter(pk=tasks[2].pk).update(status=Status.BLOCKED, reason="needs a human")
    claim(tasks[3], pid=None)
    response = viewer.get("/")
    assert response.status_code == 200
    counts = dict(
        re.findall(
            r'<h2 id="col-(\w+)">\w+ <span class="count">(\d+)</span>', response.content.decode()
        )
    )
    assert counts == {"queued": "3", "claimed": "1", "done": "2", "blocked": "1"}
    assert "Task 2" in column_html(response.content, "blocked")
    assert "needs a human" in column_html(response.content, "blocked")
    assert "Task 6" in column_html(response.content, "queued")


def test_no_template_comment_shows_on_a_page(viewer):
    """`{# … #}` is a comment only on one line: one over two lines was shown at the foot
    of the board as text."""
    templates = Path(__file__).resolve().parent.parent / "templates"
    for path in templates.rglob("*.html"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "{#" in line:
                assert "#}" in line.split("{#", 1)[1], f"{path.name}:{number}"
    make_tasks("q", 1)
    assert "{#" not in viewer.get("/").content.decode()


def test_cards_are_ordered_by_priority_then_age(viewer):
    make_tasks("q", 3)
    Task.objects.filter(key="t000002").update(priority=0)
    html = column_html(viewer.get("/").content, "queued")
    assert html.index("Task 2") < html.index("Task 0") < html.index("Task 1")


def test_a_queue_that_does_not_exist_is_said_not_shown_as_an_empty_board(viewer):
    # A typo in a bookmarked ?queue= showed four empty columns and the dropdown at "all".
    make_tasks("q", 1)
    make_tasks("r", 1)
    page = viewer.get("/?queue=qq").content.decode()
    assert "There is no queue named <code>qq</code>: the queues are q, r." in page
    assert "There is no queue" not in viewer.get("/?queue=q").content.decode()


def test_keys_that_are_not_the_boards_filters_are_said_not_silently_left_out(viewer):
    # `?status=done` or a misspelt `?assigne=` showed every task without a word.
    make_tasks("q", 2)
    page = viewer.get("/?status=done&assigne=bob&queue=q").content.decode()
    assert (
        "Not filters of the board, so left out: <code>assigne</code>, <code>status</code>. "
        "The filters are queue, project, assignee, tag, type, complexity, and q (the search)."
    ) in page
    assert "Task 0" in page and "Task 1" in page  # every task, as without the keys
    many = "&".join(f"k{n:02}=1" for n in range(12))
    assert "<code>k09</code> and 2 more." in viewer.get(f"/?{many}").content.decode()
    own = "/?queue=q&q=Task&since=1-2-3&shown_queued=40&shown_done=0"
    assert "Not filters" not in viewer.get(own).content.decode()


def test_a_task_in_progress_in_its_file_says_so_not_an_empty_live_transcript(viewer):
    # Its card said "no lease" and its page "Agent transcript (live): Nothing from the agent
    # yet", for a task no agent of ours will ever run.
    (task,) = make_tasks("q", 1)
    transitions.hold_for_outside([task], "li")
    card = column_html(viewer.get("/?queue=q").content, "claimed")
    assert "held by li · in progress in its file" in card
    page = viewer.get(f"/tasks/{task.pk}/").content.decode()
    assert "in progress in its file: no worker or agent of Hypervisor has it" in page
    assert "Agent transcript" not in page


def test_first_page_of_cards_then_load_more(viewer):
    size = views.PAGE_SIZE
    make_tasks("q", 2 * size + 20)
    response = viewer.get("/")
    queued = column_html(response.content, "queued")
    assert queued.count('<article class="card"') == size
    assert "Load more" in queued
    more = viewer.get(f"/board/queued/?offset={size}&queue=q")
    assert more.status_code == 200
    assert more.content.decode().count('<article class="card"') == size
    assert f"offset={2 * size}" in more.content.decode()
    last = viewer.get(f"/board/queued/?offset={2 * size}")
    assert last.content.decode().count('<article class="card"') == 20
    assert "Load more" not in last.content.decode()


def _more_link(html: str) -> str:
    return html_lib.unescape(re.search(r'class="more"[^>]* href="([^"]+)"', html).group(1))


def test_load_more_goes_on_after_the_last_card_shown_while_a_herd_moves_cards(viewer):
    """From an offset alone, cards leaving the column above the page made "Load more"
    skip as many, and cards coming in repeat the last ones shown."""
    size = views.PAGE_SIZE
    tasks = make_tasks("q", 3 * size)
    tasks[size + 3].priority = 0  # the order is priority then id, wherever the id is
    tasks[size + 3].save(update_fields=["priority"])
    order = list(Task.objects.order_by("priority", "id").values_list("key", flat=True))
    shown = order[:size]
    assert (
        re.findall(r"<code>(t\d+)</code>", column_html(viewer.get("/").content, "queued")) == shown
    )
    link = _more_link(column_html(viewer.get("/").content, "queued"))
    # Meanwhile workers claim five of the cards shown, and a person requeues a done task
    # that sorts among them.
    Task.objects.filter(key__in=shown[:5]).update(status=Status.CLAIMED)
    Task.objects.create(queue="q", key="a-new-one", title="New", status=Status.QUEUED, priority=0)
    more = viewer.get(link).content.decode()
    assert re.findall(r"<code>([^<]+)</code>", more) == order[size : 2 * size]
    after = viewer.get(_more_link(more)).content.decode()
    assert re.findall(r"<code>([^<]+)</code>", after) == order[2 * size :]
    assert "Load more" not in after


def test_load_more_after_the_extreme_last_cards_a_column_can_name(viewer):
    make_tasks("q", 3)
    for priority, pk, cards in (
        (2**31 - 1, 2**63 - 1, 0),  # after every card
        (-(2**31), 2**63 - 1, 3),  # every card's priority comes after
        (2, 2**63 - 1, 0),
        (1, 1, 3),
    ):
        page = {"offset": 25, "after_priority": priority, "after_id": pk}
        response = viewer.get("/board/queued/", page)
        assert response.status_code == 200
        assert response.content.decode().count('class="card"') == cards, (priority, pk)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("queue=other", {"Other 0"}),
        ("project=web", {"Task 0"}),
        ("assignee=ann", {"Task 1"}),
        ("tag=auth", {"Task 2"}),
        ("type=bug", {"Task 3"}),
        ("complexity=hard", {"Task 4"}),
        ("q=t000001", {"Task 1"}),
        ("q=task+4", {"Task 4"}),
        ("project=web&assignee=ann", set()),
    ],
)
def test_filters_live_in_the_url(viewer, query, expected):
    make_tasks("q", 5)
    Task.objects.create(queue="other", key="o0", title="Other 0")
    Task.objects.filter(key="t000000").update(project="web")
    Task.objects.filter(key="t000001").update(assignee="ann")
    Task.objects.filter(key="t000002").update(tags=["auth", "bug"], tag_index="|auth|bug|")
    Task.objects.filter(key="t000003").update(type="bug")
    Task.objects.filter(key="t000004").update(complexity="hard")
    response = viewer.get(f"/?{query}")
    assert response.status_code == 200
    titles = set(re.findall(r'class="title"[^>]*>([^<]+)</a>', response.content.decode()))
    assert titles == expected


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("q=" + "x" * 500, b"Bad filter: q"),
        ("queue=%00", b"'queue' holds a NUL"),  # refused before any view (middleware)
        ("project=" + "p" * 300, b"Bad filter: project"),
        ("tag=a%00b", b"'tag' holds a NUL"),
    ],
)
def test_bad_filter_values_are_a_clear_400(viewer, query, names):
    response = viewer.get(f"/?{query}")
    assert response.status_code == 400
    assert names in response.content


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("offset=abc", "offset: Enter a whole number."),
        ("offset=-1", "offset: Ensure this value is greater than or equal to 0."),
        ("offset=", "offset: This field is required."),
        ("offset=1e99", "offset: Enter a whole number."),
        # It said "offset must be a whole number" of a whole number, and of no offset.
        ("offset=99999999999", "offset: Ensure this value is less than or equal to 10000000."),
        ("limit=10", "offset: This field is required."),
        # The last card shown, which the next cards come after.
        ("offset=25&after_id=7", "after_priority: Give it with after_id: the last card shown."),
        (
            "offset=25&after_priority=1",
            "after_id: Give it with after_priority: the last card shown.",
        ),
        (
            "offset=25&after_priority=1&after_id=0",
            "after_id: Ensure this value is greater than or equal to 1.",
        ),
        (
            "offset=25&after_priority=99999999999&after_id=1",
            "after_priority: Ensure this value is less than or equal to 2147483647.",
        ),
        ("offset=25&after_priority=1&after_id=x", "after_id: Enter a whole number."),
    ],
)
def test_bad_load_more_offset_is_a_400_that_says_what_is_wrong(viewer, query, said):
    response = viewer.get(f"/board/queued/?{query}")
    assert (response.status_code, response.content.decode()) == (400, said)


def test_unknown_column_and_unknown_task_are_404(viewer):
    assert viewer.get("/board/nonsense/?offset=0").status_code == 404
    assert viewer.get("/tasks/999999/").status_code == 404


def test_unchanged_board_answers_204_without_rendering(viewer, django_assert_max_num_queries):
    make_tasks("q", 10)
    version = board_version(viewer.get("/"))
    # Session, user and two permission lookups, then the version: a max and a count.
    with django_assert_max_num_queries(6):
        response = viewer.get("/", {"since": version})
    assert response.status_code == 204
    assert response.content == b""


def test_changed_board_answers_with_the_new_board(viewer):
    tasks = make_tasks("q", 10)
    version = board_version(viewer.get("/"))
    Task.objects.filter(pk=tasks[0].pk).update(status=Status.DONE, updated_at=timezone.now())
    response = viewer.get("/", {"since": version}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="board")
    assert response.status_code == 200
    assert response.content.decode().lstrip().startswith('<div id="board"')
    assert "Task 0" in column_html(response.content, "done")
    assert response["Vary"] and "HX-Request" in response["Vary"]


def test_filtered_board_answers_204_until_a_task_of_its_view_changes(viewer):
    tasks = make_tasks("q", 3)
    Task.objects.filter(pk=tasks[0].pk).update(tags=["x"], tag_index="|x|")
    version = board_version(viewer.get("/?queue=q&tag=x"))
    assert viewer.get("/", {"queue": "q", "tag": "x", "since": version}).status_code == 204
    # A change outside the view leaves its version alone (tests/test_board_search.py has
    # more); one inside it does not.
    Task.objects.create(queue="elsewhere", key="x", title="Elsewhere", tag_index="|x|")
    assert viewer.get("/", {"queue": "q", "tag": "x", "since": version}).status_code == 204
    Task.objects.filter(pk=tasks[0].pk).update(status=Status.DONE, updated_at=timezone.now())
    assert viewer.get("/", {"queue": "q", "tag": "x", "since": version}).status_code == 200


def test_claimed_card_shows_holder_lease_and_stale_in_words(viewer):
    live, stale, expired = make_tasks("q", 3)
    claim(live, pid=None, holder="herd-1-w1")
    claim(stale, pid=dead_pid(), holder="herd-1-w2")
    claim(expired, pid=None, lease_seconds=-60, holder="herd-1-w3")
    html = column_html(viewer.get("/").content, "claimed")
    cards = {
        key: next(card for card in html.split("<article")[1:] if key in card)
        for key in ("t000000", "t000001", "t000002")
    }
    assert "held by herd-1-w1 on " + settings.HYPERVISOR_HOST in cards["t000000"]
    assert "left" in cards["t000000"]
    assert "stale claim" not in cards["t000000"]
    assert "stale claim" in cards["t000001"]
    assert "pid " in cards["t000001"]
    assert "lease expired" in cards["t000002"]
    assert "stale claim" in cards["t000002"]


def every_kind_of_card() -> dict[str, int]:
    """A card of each thing a card can say (queue "k"), titles and reasons with markup;
    each one's id by its key."""
    keys = [
        "plain",
        "badges",
        "waiting",
        "quota",
        "missing",
        "live",
        "stale",
        "outside",
        "over-http",
        "pending",
        "outcome",
        "proposal",
        "rejected",
        "blocked",
        "untitled",
    ]
    Queue.objects.create(name="k")
    tasks = {}
    for key in keys:
        tasks[key] = Task.objects.create(
            queue="k", key=key, title=f"<b>{key}</b> \"quoted\" & 'said'", status=Status.QUEUED
        )
    Task.objects.filter(key="untitled").update(title="")
    Task.objects.filter(key="badges").update(
        assignee="ann", complexity="large", tags=["ui", "<x>"], project="atlas"
    )
    Task.objects.filter(key="waiting").update(has_dependencies=True)
    Dependency.objects.create(task=tasks["waiting"], key="nowhere")
    Task.objects.filter(key="quota").update(
        result={"quota": True, "resets_at": "2026-12-07T03:00Z"}
    )
    Task.objects.filter(key="missing").update(source_missing=True)
    claim(tasks["live"], pid=None, holder="herd-1-w1")
    claim(tasks["stale"], pid=dead_pid(), holder="herd-1-w2")
    claim(tasks["pending"], pid=None, holder="herd-1-w3", change_pending=True)
    transitions.hold_for_outside([tasks["outside"]], "li")
    claim(tasks["over-http"], pid=4242, holder="puller")
    Task.objects.filter(key="over-http").update(holder_host="http:10.0.0.9")
    Task.objects.filter(key="outcome").update(
        status=Status.DONE, outcome="merged <ok>", tokens=1234, cost_usd=Decimal("0.0123456")
    )
    Task.objects.filter(key="proposal").update(
        status=Status.DONE,
        result={"action": "assign:bot", "dry_run": True, "changes": ["assignee->bot"]},
    )
    # A proposal a person rejected: back in the queue, its dry run kept for the timeline.
    Task.objects.filter(key="rejected").update(
        result={"action": "assign:bot", "dry_run": True, "review": "rejected"},
    )
    Task.objects.filter(key="blocked").update(status=Status.BLOCKED, reason="<why> " + "x" * 200)
    return {key: task.pk for key, task in tasks.items()}


def test_each_kind_of_card_says_what_it_is_with_its_text_escaped(operator):
    pks = every_kind_of_card()
    page = operator.get("/?queue=k").content.decode()
    cards = {
        re.search(r"<code>([^<]+)</code>", card).group(1): card
        for card in page.split('<article class="card"')[1:]
    }
    assert len(cards) == 15
    for key, card in cards.items():
        assert "<b>" not in card and "&lt;b&gt;" in card or key == "untitled", key
        assert card.count('name="csrfmiddlewaretoken"') == 1, key
        assert f'hx-post="/tasks/{pks[key]}/action/"' in card, key
    assert '<a class="title" id="t' in cards["untitled"] and ">untitled</a>" in cards["untitled"]
    assert (
        '<p class="badges"><span class="who">@ann</span><span class="cx">large</span></p>'
        in cards["badges"]
    )
    assert "<li>ui<li>&lt;x&gt;</ul>" in cards["badges"] and "· atlas ·" in cards["badges"]
    assert '<span class="wait">waiting on 1</span>' in cards["waiting"]
    assert "given back on quota, resets 2026-12-07T03:00Z" in cards["quota"]
    assert "file missing: not worked until it is back" in cards["missing"]
    assert "held by herd-1-w1 on " in cards["live"] and " left</p>" in cards["live"]
    assert "stale claim" not in cards["live"] and "stale claim" in cards["stale"]
    assert "pid " in cards["stale"] and "pid " not in cards["over-http"]
    assert "held by li · in progress in its file" in cards["outside"]
    assert "file changed while claimed" in cards["pending"]
    assert '<p class="outcome">merged &lt;ok&gt;</p>' in cards["outcome"]
    assert '<p class="usage">1234 tokens · $0.0123</p>' in cards["outcome"]
    assert "proposed: <strong>assign to bot</strong>" in cards["proposal"]
    assert "assign to bot" not in cards["rejected"]
    reason = re.search(r'<p class="reason">([^<]*)</p>', cards["blocked"]).group(1)
    assert reason.startswith("&lt;why&gt; xxx") and reason.endswith("…")
    assert len(html_lib.unescape(reason)) == 120
    # What a person may do to each, by its column.
    assert 'value="release"' in cards["live"] and 'value="requeue"' in cards["blocked"]
    assert 'id="block-' in cards["plain"] and 'draggable="true"' in cards["plain"]


def test_a_viewer_s_cards_have_no_controls(viewer):
    every_kind_of_card()
    page = viewer.get("/?queue=k").content.decode()
    assert page.count('<article class="card"') == 15
    for needle in ('draggable="true"', 'class="pick"', 'class="acts"', "csrfmiddlewaretoken"):
        assert needle not in page.split('<div id="board"')[1], needle


def test_card_shows_the_triage_action(viewer):
    (task,) = make_tasks("q", 1)
    Task.objects.filter(pk=task.pk).update(
        status=Status.DONE, result={"action": "close", "changes": [{"field": "status"}]}
    )
    assert "action: <strong>close</strong>" in viewer.get("/").content.decode()


def test_viewer_sees_no_action_buttons_and_cannot_act(viewer):
    (task,) = make_tasks("q", 1)
    assert "Mark done" not in viewer.get("/").content.decode()
    assert viewer.post(f"/tasks/{task.pk}/action/", {"action": "done"}).status_code == 403
    assert Task.objects.get(pk=task.pk).status == Status.QUEUED


@pytest.mark.parametrize(
    ("start", "action", "end", "kind"),
    [
        (Status.QUEUED, "done", Status.DONE, EventKind.DONE),
        (Status.BLOCKED, "requeue", Status.QUEUED, EventKind.REQUEUED),
        (Status.DONE, "requeue", Status.QUEUED, EventKind.REQUEUED),
        (Status.CLAIMED, "release", Status.QUEUED, EventKind.RELEASED),
        (Status.CLAIMED, "done", Status.DONE, EventKind.DONE),
        (Status.QUEUED, "block", Status.BLOCKED, EventKind.BLOCKED),
    ],
)
def test_card_action_changes_status_and_records_an_event(operator, start, action, end, kind):
    (task,) = make_tasks("q", 1)
    if start == Status.CLAIMED:
        claim(task, pid=None)
    else:
        Task.objects.filter(pk=task.pk).update(status=start)
    response = operator.post(
        f"/tasks/{task.pk}/action/", {"action": action, "reason": "waiting on design"}
    )
    assert response.status_code == 302
    task.refresh_from_db()
    assert task.status == end
    event = TaskEvent.objects.filter(task=task).first()
    assert event.kind == kind
    assert event.actor == "user:operator"
    if action == "block":
        assert task.reason == "waiting on design"


def test_release_removes_the_holders_lock_and_leaves_an_outside_one(operator, lock_root):
    make_tasks("q", 2)
    me = Identity.current("worker-7")
    [ours] = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=1)
    mine = locks.lock_dir("q", ours.key)
    assert mine.is_dir()
    # Held in its file by someone outside (no pid), whose own tool made a lock.
    outside = claim(Task.objects.get(key="t000001"), pid=None, holder="nic")
    theirs = locks.lock_dir("q", outside.key)
    theirs.mkdir(parents=True)
    (theirs / "owner.json").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    for pk in (ours.id, outside.pk):
        operator.post(f"/tasks/{pk}/action/", {"action": "release"})
    assert set(Task.objects.values_list("status", flat=True)) == {Status.QUEUED}
    assert not mine.exists()
    assert (theirs / "owner.json").exists()


def test_htmx_action_answers_with_the_board(operator):
    (task,) = make_tasks("q", 1)
    response = operator.post(
        f"/tasks/{task.pk}/action/",
        {"action": "done"},
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="board",
        HTTP_HX_CURRENT_URL="http://testserver/?queue=q",
    )
    assert response.status_code == 200
    assert response.content.decode().lstrip().startswith('<div id="board"')
    assert "Task 0" in column_html(response.content, "done")


def test_block_needs_a_reason(operator):
    (task,) = make_tasks("q", 1)
    response = operator.post(f"/tasks/{task.pk}/action/", {"action": "block", "reason": "  "})
    assert response.status_code == 400
    assert response.content.decode() == "Say why the task is blocked."
    assert Task.objects.get(pk=task.pk).status == Status.QUEUED
    # A reason too long is said as such, not as a reason missing as well.
    long = operator.post(f"/tasks/{task.pk}/action/", {"action": "block", "reason": "x" * 2001})
    assert long.content.decode() == "Ensure this value has at most 2000 characters (it has 2001)."


@pytest.mark.parametrize(
    ("status", "action"),
    [(Status.QUEUED, "requeue"), (Status.QUEUED, "release"), (Status.DONE, "done")],
)
def test_action_that_does_not_fit_the_status_is_a_409(operator, status, action):
    (task,) = make_tasks("q", 1)
    Task.objects.filter(pk=task.pk).update(status=status)
    response = operator.post(f"/tasks/{task.pk}/action/", {"action": action})
    assert response.status_code == 409
    assert not TaskEvent.objects.filter(task=task).exists()


def test_unknown_action_and_unknown_task(operator):
    (task,) = make_tasks("q", 1)
    assert operator.post(f"/tasks/{task.pk}/action/", {"action": "rm"}).status_code == 400
    assert operator.post("/tasks/999999/action/", {"action": "done"}).status_code == 404
    assert operator.get(f"/tasks/{task.pk}/action/").status_code == 405


def test_action_redirect_ignores_an_offsite_next(operator):
    (task,) = make_tasks("q", 1)
    response = operator.post(
        f"/tasks/{task.pk}/action/", {"action": "done", "next": "https://evil.example/"}
    )
    assert response["Location"] == "/"


@pytest.mark.parametrize(
    ("next_page", "location"),
    [("-1", "/"), ("board", "/"), ("a|b", "/"), ("/?tag=ui", "/?tag=ui"), ("", "/")],
)
def test_action_redirect_goes_to_a_page_of_the_site_or_the_board(operator, next_page, location):
    """A word that is not a path was taken for the name of a view: a server error."""
    (task,) = make_tasks("q", 1)
    response = operator.post(f"/tasks/{task.pk}/action/", {"action": "done", "next": next_page})
    assert response.status_code == 302
    assert response["Location"] == location


HOSTILE = """# Plan

<script>alert('body')</script>
<img src=x onerror="alert('img')">
<svg onload="alert('svg')"><script>alert('svg2')</script></svg>
<a href="javascript:alert('raw')">raw link</a>

[click](javascript:alert('md'))
[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)
![pic](javascript:alert('img2'))
[vb](vbscript:msgbox)
[fine](https://example.com/ok)
"""


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def assert_inert(html: str) -> list[tuple[str, dict]]:
    """No element that runs code: no script/svg/iframe, no on* handler, no unsafe URL."""
    parser = _Elements()
    parser.feed(html)
    for tag, attrs in parser.elements:
        assert tag not in {"script", "svg", "iframe", "object", "embed", "math", "style"}, tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in {"href", "src", "action", "formaction", "xlink:href"} and value:
                scheme = urlsplit(value.strip()).scheme.lower()
                assert scheme in {"", "http", "https", "mailto"}, (tag, name, value)
    return parser.elements


def test_hostile_markdown_is_rendered_inert(viewer):
    (task,) = make_tasks("q", 1, body=HOSTILE)
    html = viewer.get(f"/tasks/{task.pk}/").content.decode()
    start = html.index('<div class="markdown">')
    body = html[start : html.index("</section>", start)]
    elements = assert_inert(body)
    assert ("a", {"href": "https://example.com/ok", "rel": "noopener noreferrer nofollow"}) in (
        elements
    )
    assert "<h1>Plan</h1>" in body
    # The raw HTML is still readable, as text.
    assert "&lt;script&gt;" in body


def test_hostile_title_key_and_frontmatter_are_escaped(viewer):
    Task.objects.create(
        queue="q",
        key="<img src=x onerror=alert(1)>",
        title="<script>alert('title')</script>",
        project='"><svg onload=alert(1)>',
        frontmatter={"note": "<script>alert('fm')</script>"},
    )
    for url in ("/", f"/tasks/{Task.objects.get().pk}/"):
        html = viewer.get(url).content.decode()
        assert "<script>alert" not in html
        assert "<img src=x" not in html
        assert "<svg onload" not in html
        assert "&lt;script&gt;alert" in html


def test_detail_shows_frontmatter_timeline_lock_owner_and_result(viewer):
    (task,) = make_tasks("q", 1)
    task = claim(task, pid=4242, holder="herd-3-w1")
    Task.objects.filter(pk=task.pk).update(
        frontmatter={"id": "t000000", "estimate": "2h"},
        outcome="verified complete",
        evidence="tests pass",
        next_step="ship it",
        commit="caecab8b",
        tokens=1234,
        output_tail="last line of output",
        result={"action": "close", "diff": "-old\n+new <b>"},
    )
    TaskEvent.objects.create(task=task, kind=EventKind.CLAIMED, actor="herd-3-w1", fence=1)
    directory = locks.lock_dir(task.queue, task.key)
    directory.mkdir(parents=True)
    (directory / "owner.json").write_text(
        json.dumps({"host": "build-7", "pid": 4242, "worker": "herd-3-w1"})
    )
    html = viewer.get(f"/tasks/{task.pk}/").content.decode()
    for text in (
        "estimate",
        "2h",
        "claimed</strong> by herd-3-w1",
        "host build-7 · pid 4242 · worker herd-3-w1",
        "verified complete",
        "tests pass",
        "ship it",
        "caecab8b",
        "1234",
        "last line of output",
        "-old\n+new &lt;b&gt;",
    ):
        assert text in html, text


def test_detail_drawer_fragment_for_htmx(viewer):
    (task,) = make_tasks("q", 1)
    response = viewer.get(f"/tasks/{task.pk}/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="drawer")
    html = response.content.decode()
    assert html.lstrip().startswith('<article class="task-detail"')
    assert "<html" not in html
    assert "HX-Request" in response["Vary"]


def test_a_full_column_shows_one_page_of_cards_and_a_way_to_the_rest(operator):
    make_tasks("q", 400, project="project-name", assignee="someone")
    html = operator.get("/").content.decode()
    assert html.count('<article class="card"') == views.PAGE_SIZE
    assert '<span class="count">400</span>' in html
    assert f"?offset={views.PAGE_SIZE}" in html and "Load more" in html
    assert len(html) < 200_000  # one page of cards, not the whole queue
