"""Two people triaging one board in two browsers while real workers take its tasks.

One is staff (every permission), the other has only what a triager needs (to see the
board and change tasks). Each check reads the database or the task files afterwards.
"""

from __future__ import annotations

import subprocess

import psutil
import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, screenshot, wait_until
from tests.conftest import make_tasks, start_manage
from workqueue.importer import Importer
from workqueue.models import EventKind, Status, Task


@pytest.fixture
def people(browser, login, transactional_db, django_user_model, request):
    """Two logged-in pages: (staff, triager)."""
    django_user_model.objects.create_superuser("staff", "staff@example.invalid", PASSWORD)
    triager = django_user_model.objects.create_user("tri", "tri@example.invalid", PASSWORD)
    triager.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_task", "change_task"])
    )
    contexts, pages = [], []
    for name in ("staff", "tri"):
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.set_default_timeout(15_000)
        page = context.new_page()
        login(page, name)
        contexts.append(context)
        pages.append(page)
    yield pages
    for page, name in zip(pages, ("staff", "tri"), strict=True):
        screenshot(page, f"{request.node.name}-{name}-last")
    for context in contexts:
        context.close()


def column(page, status: str):
    return page.locator(f'section.column[data-status="{status}"]')


def stop(worker: subprocess.Popen) -> None:
    for child in psutil.Process(worker.pid).children(recursive=True):
        child.kill()
    worker.kill()
    worker.wait()


def test_a_stale_card_is_not_closed_or_dragged_once_a_worker_holds_its_task(
    people, live_url, process_env
):
    """The triager's page had not refreshed since a worker took the first task: its card
    still stood in Queued, and both its "Mark done" and a drag to Done closed the task and
    ended the worker's run, which no one on the page had seen start."""
    staff, tri = people
    make_tasks("herd", 200)
    first = Task.objects.get(key="t000000")
    for page in people:
        page.goto(f"{live_url}/?queue=herd")
    # The triager's board does not refresh from here (a tab in the background, a slow link).
    tri.route("**/*since=*", lambda route: route.fulfill(status=204))
    tri.wait_for_load_state("networkidle")
    worker = start_manage(
        ["work", "--queue", "herd", "--processor", "command", "--", "sleep", "600"],
        process_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: Task.objects.filter(pk=first.pk, status=Status.CLAIMED).exists(), 60)
        expect(column(staff, "claimed").locator(f"#task-{first.pk}")).to_be_visible()
        card = column(tri, "queued").locator(f"#task-{first.pk}")
        line = tri.locator("#refusal")
        card.get_by_role("button", name="Mark done").click()
        expect(line).to_contain_text(
            "t000000 moved since your page showed it (it is claimed, held by"
        )
        line.get_by_role("button", name="Dismiss").click()
        card.drag_to(column(tri, "done").locator(".cards"))
        expect(line).to_be_visible()
        expect(line).to_contain_text("t000000 moved since your page showed it")
        line.get_by_role("button", name="Dismiss").click()
        # Selected with the two cards after it and closed: those two only.
        cards = column(tri, "queued").locator("article.card")
        cards.nth(0).locator("input.pick").check()
        cards.nth(2).locator("input.pick").click(modifiers=["Shift"])
        tri.get_by_role("button", name="Close…").click()
        dialog = tri.get_by_role("dialog", name="Close 3 tasks")
        expect(dialog.locator("[data-dialog-claimed]")).to_be_hidden()  # as the page shows
        dialog.get_by_label("Reason for closing").fill("duplicates")
        dialog.get_by_role("button", name="Apply").click()
        status = tri.locator("#bulk-status")
        expect(status.locator("p[role=status]")).to_have_text("Closed 2 tasks.")
        expect(status.locator("details.skipped")).to_contain_text(
            "t000000: moved since your page showed it (it is claimed, held by"
        )
        assert Task.objects.filter(status=Status.DONE).count() == 2
        first.refresh_from_db()
        assert first.status == Status.CLAIMED
        assert not first.events.filter(kind=EventKind.DONE).exists()
        sleeps = psutil.Process(worker.pid).children(recursive=True)
        assert any("sleep" in p.name() for p in sleeps), "the worker's run was ended"
        # Once the page refreshes, the card is where the task is.
        tri.unroute("**/*since=*")
        expect(column(tri, "claimed").locator(f"#task-{first.pk}")).to_be_visible()
        screenshot(tri, "two-people-stale-card-refused")
    finally:
        stop(worker)


@pytest.fixture
def inbox(tmp_path, settings):
    """Task files in a folder, imported into the queue `inbox`."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]

    def make(count: int) -> list:
        paths = []
        for i in range(count):
            path = folder / f"t{i:03d}.md"
            path.write_text(f"---\nid: t{i:03d}\ntitle: Task {i}\nassignee: nic\n---\n")
            paths.append(path)
        report = Importer("inbox").run([folder])
        assert not report.errors, report.errors
        return paths

    return make


def log_out_in_another_tab(page, live_url) -> object:
    other = page.context.new_page()
    other.goto(f"{live_url}/")
    other.get_by_role("button", name="Log out").click()
    other.wait_for_url("**/login/**")
    return other


def test_a_session_ended_in_another_tab_keeps_what_was_typed_and_sends_it_after_a_login(
    people, live_url, login, inbox
):
    """Logged out in another tab while typing into the editor: the board's refresh, two
    seconds later, took the page to the login form and the typing was gone, without a
    word. Sent after that, a save or a bulk action went the same way. Now the page stays,
    says so, and what was typed is sent once the person has logged in again elsewhere."""
    staff, tri = people
    paths = inbox(3)
    task = Task.objects.get(key="t000")
    page = tri
    page.goto(f"{live_url}/?queue=inbox")
    page.locator(f"#task-{task.pk} a.title").click()
    drawer = page.locator("aside#drawer")
    drawer.get_by_role("link", name="Edit").click()
    body = drawer.get_by_label("Body")
    body.fill("# Task 0\n\nTen minutes of notes on what was found.\n")
    other = log_out_in_another_tab(page, live_url)
    line = page.locator("#refusal")
    expect(line).to_contain_text("Your session has ended", timeout=10_000)
    page.wait_for_timeout(2500)  # another refresh: the page stays
    assert "/login/" not in page.url
    expect(body).to_have_value("# Task 0\n\nTen minutes of notes on what was found.\n")
    drawer.get_by_role("button", name="Save").click()  # not logged in yet: nothing saved
    expect(line).to_contain_text("nothing was saved or done")
    assert "Ten minutes" not in paths[0].read_text()
    assert "/login/" not in page.url

    login(other, "tri")  # a new session, and a new CSRF token
    drawer.get_by_role("button", name="Save").click()
    expect(drawer.locator(".notice")).to_have_text("Saved body.")
    assert "Ten minutes of notes on what was found." in paths[0].read_text()
    expect(line).to_be_hidden()

    # A bulk action: its dialog open, and applied after the session ended.
    page.keyboard.press("Escape")
    for key in ("t001", "t002"):
        page.locator(f"#task-{Task.objects.get(key=key).pk} input.pick").check()
    page.get_by_role("button", name="Assign…").click()
    dialog = page.get_by_role("dialog", name="Assign 2 tasks")
    dialog.get_by_label("Assignee").fill("carol")
    log_out_in_another_tab(page, live_url).close()
    expect(line).to_contain_text("Your session has ended", timeout=10_000)
    dialog.get_by_role("button", name="Apply").click()
    expect(line).to_contain_text("nothing was saved or done")
    page.wait_for_timeout(2500)  # a refresh: the selection stays
    assert "/login/" not in page.url
    assert not Task.objects.filter(assignee="carol").exists()
    expect(page.locator("#bulk-count")).to_have_text("2 selected")
    login(other, "tri")
    page.get_by_role("button", name="Assign…").click()
    expect(dialog.get_by_label("Assignee")).to_have_value("carol")
    dialog.get_by_role("button", name="Apply").click()
    expect(page.locator("#bulk-status")).to_contain_text("Assigned 2 tasks.")
    assert ["assignee: carol" in p.read_text() for p in paths] == [False, True, True]


def test_a_bulk_assign_of_50_while_workers_finish_them_and_another_person_edits_one(
    people, live_url, inbox, process_env, consumer_huey, consumer
):
    """The triager assigns 50 cards while two workers claim and finish tasks of the same
    queue and the staff member saves an edit of one of the 50: the summary's counts and
    its skipped list are what happened to each task, and each file says what its row does."""
    staff, tri = people
    paths = inbox(300)
    tri.goto(f"{live_url}/?queue=inbox")
    queued = column(tri, "queued")
    queued.locator("a.more").click()
    cards = queued.locator("article.card")
    expect(cards).to_have_count(50)
    picked = [cards.nth(i).get_attribute("data-id") for i in range(50)]
    cards.nth(0).locator("input.pick").check()
    cards.nth(49).locator("input.pick").click(modifiers=["Shift"])
    expect(tri.locator("#bulk-count")).to_have_text("50 selected")
    workers = [
        start_manage(
            ["work", "--queue", "inbox", "--processor", "command", "--", "sleep", "0.2"],
            process_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        # The herd works the selected tasks first (the board's order is the claim order).
        wait_until(lambda: Task.objects.filter(status=Status.DONE).count() >= 5, 60)
        # The staff member edits the last of them meanwhile.
        edited = Task.objects.get(pk=picked[-1])
        staff.goto(f"{live_url}/tasks/{edited.pk}/")
        staff.get_by_role("link", name="Edit").click()
        staff.get_by_label("Title").fill("Renamed by staff")
        tri.get_by_role("button", name="Assign…").click()
        dialog = tri.get_by_role("dialog", name="Assign 50 tasks")
        dialog.get_by_label("Assignee").fill("carol")
        dialog.get_by_role("button", name="Apply").click()
        staff.get_by_role("button", name="Save").click()
        status = tri.locator("#bulk-status")
        expect(status).to_contain_text("Assigned", timeout=60_000)
        expect(status).not_to_contain_text("…")
        screenshot(tri, "two-people-bulk-assign-50")
    finally:
        for worker in workers:
            stop(worker)
    expect(staff.get_by_text("Saved title.")).to_be_visible()
    from workqueue.models import BulkAction

    bulk = BulkAction.objects.get(action="assign")
    tasks = Task.objects.in_bulk([int(pk) for pk in picked])
    skipped = {s["task"] for s in bulk.skipped}
    carol = {pk for pk, t in tasks.items() if t.assignee == "carol"}
    assert bulk.changed == len(carol) and carol.isdisjoint(skipped)
    assert bulk.changed + bulk.unchanged + len(skipped) == 50
    summary = status.locator("p[role=status]").inner_text()
    assert summary == f"Assigned {bulk.changed} task{'s' if bulk.changed != 1 else ''}."
    if skipped:
        expect(status.locator("details.skipped summary")).to_have_text(f"{len(skipped)} skipped")
    assert Task.objects.get(pk=edited.pk).title == "Renamed by staff"
    for pk, task in tasks.items():
        path = paths[int(task.key[1:])]
        text = path.read_text()
        # One version each: the row's (or an edit waiting for a claim that still runs).
        if task.status != Status.CLAIMED:
            import hashlib

            assert hashlib.sha256(path.read_bytes()).hexdigest() == task.source_sha256, task.key
            assert ("assignee: carol\n" in text) == (pk in carol), task.key
        if task.status == Status.DONE:
            assert "status: done\n" in text, task.key
    assert "title: Renamed by staff\n" in paths[int(edited.key[1:])].read_text() or (
        Task.objects.get(pk=edited.pk).status == Status.CLAIMED
    )


def test_a_permission_taken_away_while_the_page_is_open_refuses_each_action_in_words(
    people, live_url, inbox
):
    """The staff member takes the triager's "Can change task" away while the triager's
    board, editor and selection are open: each action is refused in the page's line,
    with no error page, and nothing changes in the database or the files."""
    _staff, tri = people
    paths = inbox(3)
    before = [p.read_bytes() for p in paths]
    first, second, third = Task.objects.order_by("key")
    Task.objects.filter(pk=third.pk).update(status=Status.DONE)
    tri.goto(f"{live_url}/?queue=inbox")
    tri.locator(f"#task-{second.pk} input.pick").check()
    tri.locator(f"#task-{first.pk} a.title").click()
    drawer = tri.locator("aside#drawer")
    drawer.get_by_role("link", name="Edit").click()
    drawer.get_by_label("Assignee").fill("carol")
    from django.contrib.auth.models import User

    User.objects.get(username="tri").user_permissions.remove(
        Permission.objects.get(codename="change_task")
    )
    line = tri.locator("#refusal")
    refused = "Refused: your account does not have the permission this needs"
    drawer.get_by_role("button", name="Save").click()
    expect(line).to_contain_text(refused)
    expect(drawer.get_by_label("Assignee")).to_have_value("carol")
    line.get_by_role("button", name="Dismiss").click()
    tri.locator(f"#task-{second.pk}").get_by_role("button", name="Mark done").click()
    expect(line).to_contain_text(refused)
    line.get_by_role("button", name="Dismiss").click()
    tri.once("dialog", lambda dialog: dialog.accept())  # "lose what you typed?"
    drawer.get_by_label("Assignee").press("Escape")
    expect(drawer.locator("form")).to_have_count(0)
    tri.locator(f"#task-{third.pk}").drag_to(column(tri, "queued").locator(".cards"))
    expect(line).to_contain_text(refused)
    line.get_by_role("button", name="Dismiss").click()
    tri.get_by_role("button", name="Assign…").click()
    dialog = tri.get_by_role("dialog", name="Assign 1 task")
    dialog.get_by_label("Assignee").fill("dave")
    dialog.get_by_role("button", name="Apply").click()
    expect(line).to_contain_text(refused)
    expect(tri.locator("#bulk-count")).to_have_text("1 selected")
    assert "/login/" not in tri.url and tri.locator("h1", has_text="Not permitted").count() == 0
    assert [p.read_bytes() for p in paths] == before
    assert list(Task.objects.order_by("key").values_list("status", "assignee")) == [
        (Status.QUEUED, "nic"),
        (Status.QUEUED, "nic"),
        (Status.DONE, "nic"),
    ]
    assert not Task.objects.filter(events__actor="user:tri").exists()


def test_a_refresh_answered_after_load_more_keeps_the_cards_it_brought(people, live_url):
    """While a herd works the queue the board refreshes every two seconds. A refresh sent
    just before "Load more" and answered just after it rendered the 25 cards per column
    it was asked for, and the 25 that "Load more" had brought were gone again."""
    _staff, tri = people
    tasks = make_tasks("herd", 300)
    tri.goto(f"{live_url}/?queue=herd")
    queued = column(tri, "queued").locator("article.card")
    expect(queued).to_have_count(25)
    held = []
    tri.route("**/*since=*", lambda route: held.append(route))
    # The herd changes a task: the next refresh is a render.
    Task.objects.filter(pk=tasks[-1].pk).update(title="Changed", updated_at=timezone.now())
    for _ in range(50):
        if held:
            break
        tri.wait_for_timeout(100)
    assert held, "no refresh was sent"
    column(tri, "queued").locator("a.more").click()
    expect(queued).to_have_count(50)
    held[0].continue_()  # the refresh sent with 25 shown is answered now
    tri.wait_for_timeout(1000)
    expect(queued).to_have_count(50)
    tri.unroute("**/*since=*")  # and the refreshes after it
    tri.wait_for_timeout(2500)
    expect(queued).to_have_count(50)
    assert len(set(queued.evaluate_all("cards => cards.map(c => c.id)"))) == 50


def test_the_same_person_in_two_tabs_undoes_only_their_latest_action_and_is_told(
    browser, people, live_url, login
):
    """Held up: Undo in the tab of an earlier action, after a later one in another tab of
    the same person, is refused in words and undoes nothing; a save from the older of two
    editors of the same task names the other tab's change."""
    staff, _tri = people
    tasks = make_tasks("q", 3)
    other = staff.context.new_page()  # the same person, a second tab
    for page in (staff, other):
        page.goto(f"{live_url}/?queue=q")

    def assign(page, task, name):
        page.locator(f"#task-{task.pk} input.pick").check()
        page.get_by_role("button", name="Assign…").click()
        dialog = page.get_by_role("dialog", name="Assign 1 task")
        dialog.get_by_label("Assignee").fill(name)
        dialog.get_by_role("button", name="Apply").click()
        expect(page.locator("#bulk-status")).to_contain_text("Assigned 1 task.")

    assign(staff, tasks[0], "carol")
    assign(other, tasks[1], "dave")
    staff.locator("#bulk-status").get_by_role("button", name="Undo").click()
    expect(staff.locator("#refusal")).to_contain_text(
        "Only your latest bulk action can be undone, once."
    )
    assert list(Task.objects.order_by("key").values_list("assignee", flat=True)) == [
        "carol",
        "dave",
        "",
    ]
    # Both tabs edit the third task's assignee: the second save is refused, naming it.
    drawers = []
    for page in (staff, other):
        page.locator(f"#task-{tasks[2].pk} a.title").click()
        drawer = page.locator("aside#drawer")
        drawer.get_by_role("link", name="Edit").click()
        drawers.append(drawer)
    drawers[1].get_by_label("Assignee").fill("erin")
    drawers[1].get_by_role("button", name="Save").click()
    expect(drawers[1].locator(".notice")).to_have_text("Saved assignee.")
    drawers[0].get_by_label("Assignee").fill("frank")
    drawers[0].get_by_role("button", name="Save").click()
    expect(drawers[0].get_by_role("alert")).to_contain_text("The task changed since you opened it")
    expect(drawers[0].locator("pre.diff")).to_contain_text("assignee is now: erin")
    assert Task.objects.get(pk=tasks[2].pk).assignee == "erin"
