"""The board in a real Chromium against a live server, with real worker processes."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import psutil
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone
from playwright.sync_api import expect

from herds.models import Herd, HerdStatus, Profile
from tests.browser.conftest import PASSWORD, screenshot, wait_until
from tests.conftest import make_tasks, start_manage
from workqueue import locks, views
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "inbox"


def column(page, status: str):
    return page.locator(f'section.column[data-status="{status}"]')


def column_count(page, status: str) -> int:
    return int(column(page, status).locator(".count").inner_text())


def test_imported_tasks_show_in_their_columns(logged_in_page, live_url):
    call_command("import_tasks", str(EXAMPLES), queue="examples", verbosity=0)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=examples")
    expected = Task.objects.filter(queue="examples").counts()
    assert sum(expected.values()) >= 5
    for status, count in expected.items():
        assert column_count(page, status) == count
        for task in Task.objects.filter(queue="examples", status=status):
            card = column(page, status).locator(f'article[data-id="{task.pk}"]')
            assert card.count() == 1, (task.key, status)
            assert (task.title or task.key) in card.inner_text()
    screenshot(page, "board-imported-examples")


def test_cards_move_to_done_without_a_reload_while_workers_run(
    logged_in_page, live_url, process_env
):
    make_tasks("herd", 24)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=herd")
    assert column_count(page, "queued") == 24
    page.evaluate("window.__notReloaded = true")
    workers = [
        start_manage(
            ["work", "--queue", "herd", "--processor", "command", "--", "sleep", "0.3"],
            process_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        wait_until(lambda: column_count(page, "done") > 0, 60, "board never showed progress")
        screenshot(page, "board-workers-midway")
        # Generous: on a loaded machine each agent's start and end cost more than its sleep.
        wait_until(lambda: column_count(page, "done") == 24, 180, "cards never all reached done")
    finally:
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    assert [w.returncode for w in workers] == [0, 0], [w.stderr.read() for w in workers]
    assert column_count(page, "queued") == 0
    assert column(page, "done").locator("article.card").count() == 24
    assert page.evaluate("window.__notReloaded") is True
    screenshot(page, "board-workers-finished")


def test_card_buttons_and_drag_and_drop_act_on_tasks(logged_in_page, live_url):
    first, second, third = make_tasks("acts", 3)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=acts")

    # A button: mark done.
    card = column(page, "queued").locator(f'article[data-id="{first.pk}"]')
    card.get_by_role("button", name="Mark done").click()
    column(page, "done").locator(f'article[data-id="{first.pk}"]').wait_for()
    assert Task.objects.get(pk=first.pk).status == Status.DONE
    assert TaskEvent.objects.filter(task=first, kind=EventKind.DONE, actor="user:browser").exists()

    # Drag and drop: done back to queued (requeue).
    column(page, "done").locator(f'article[data-id="{first.pk}"]').drag_to(
        column(page, "queued").locator(".cards")
    )
    column(page, "queued").locator(f'article[data-id="{first.pk}"]').wait_for()
    assert Task.objects.get(pk=first.pk).status == Status.QUEUED

    # Block needs a reason: the drawer's form.
    column(page, "queued").locator(f'article[data-id="{second.pk}"]').get_by_role(
        "link", name="Block…"
    ).click()
    drawer = page.locator("aside#drawer")
    drawer.locator("input[name=reason]").fill("waiting for the design review")
    drawer.get_by_role("button", name="Block").click()
    column(page, "blocked").locator(f'article[data-id="{second.pk}"]').wait_for()
    assert "waiting for the design review" in column(page, "blocked").inner_text()
    second.refresh_from_db()
    assert second.status == Status.BLOCKED
    assert second.reason == "waiting for the design review"

    # Escape closes the drawer; dragging to "blocked" asks for the reason too.
    page.keyboard.press("Escape")
    assert drawer.is_hidden()
    page.once("dialog", lambda dialog: dialog.accept("flaky dependency"))
    column(page, "queued").locator(f'article[data-id="{third.pk}"]').drag_to(
        column(page, "blocked").locator(".cards")
    )
    column(page, "blocked").locator(f'article[data-id="{third.pk}"]').wait_for()
    assert Task.objects.get(pk=third.pk).reason == "flaky dependency"
    screenshot(page, "board-after-actions")


def test_hostile_task_is_inert_in_the_drawer(logged_in_page, live_url):
    (task,) = make_tasks(
        "hostile",
        1,
        body=(
            "<script>window.__pwned = 1</script>\n\n"
            '<img src=x onerror="window.__pwned = 2">\n\n'
            "[click me](javascript:window.__pwned=3)\n\n"
            '<svg onload="window.__pwned = 4"><script>window.__pwned = 5</script></svg>\n'
        ),
    )
    Task.objects.filter(pk=task.pk).update(title='<img src=x onerror="window.__pwned = 6">')
    page = logged_in_page
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{live_url}/?queue=hostile")
    page.locator(f'article[data-id="{task.pk}"] a.title').click()
    drawer = page.locator("aside#drawer .markdown")
    drawer.wait_for()
    assert drawer.locator("script, svg, img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    screenshot(page, "drawer-hostile-task")


def test_release_a_stale_lock_from_the_admin(logged_in_page, live_url, process_env, lock_root):
    make_tasks("crash", 1)
    # A worker that is killed mid-task leaves its claim and its lock directory behind.
    worker = start_manage(
        ["work", "--queue", "crash", "--processor", "command", "--", "sleep", "600"],
        process_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        task = wait_until(
            lambda: Task.objects.filter(queue="crash", status=Status.CLAIMED).first(), 60
        )
        wait_until(lambda: locks.lock_dir("crash", task.key).exists(), 30)
    finally:
        for child in psutil.Process(worker.pid).children(recursive=True):
            child.kill()
        worker.kill()
        worker.wait()
    page = logged_in_page
    page.goto(f"{live_url}/admin/queue/task/locks/")
    row = page.locator("#locks tbody tr", has_text=task.key)
    assert "dead" in row.inner_text()
    assert "stale" in row.inner_text()
    assert "1 claim(s) back to queued" in page.locator("#dry-run").inner_text()
    screenshot(page, "admin-locks-before")
    page.get_by_role("button", name="Release stale locks").click()
    page.wait_for_url(f"{live_url}/admin/queue/task/locks/")
    assert "1 requeued" in page.locator(".messagelist").inner_text()
    assert "No lock directories." in page.locator("#locks").inner_text()
    task.refresh_from_db()
    assert task.status == Status.QUEUED
    assert not locks.lock_dir("crash", task.key).exists()
    assert TaskEvent.objects.filter(task=task, kind=EventKind.REAPED).exists()
    screenshot(page, "admin-locks-after")


def test_a_claim_left_by_a_dead_pid_shows_stale_on_the_board(logged_in_page, live_url):
    (task,) = make_tasks("dead", 1)
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(
        status=Status.CLAIMED,
        holder="w-dead",
        holder_host=settings.HYPERVISOR_HOST,
        holder_pid=gone.pid,
        holder_started=time.time(),
        claimed_at=now,
        lease_expires_at=now + timedelta(minutes=5),
        updated_at=now,
    )
    directory = locks.lock_dir("dead", task.key)
    directory.mkdir(parents=True)
    (directory / "owner.json").write_text(
        json.dumps({"host": settings.HYPERVISOR_HOST, "pid": gone.pid, "worker": "w-dead"})
    )
    page = logged_in_page
    page.goto(f"{live_url}/?queue=dead")
    card = column(page, "claimed").locator(f'article[data-id="{task.pk}"]')
    assert "stale claim" in card.inner_text().lower()
    assert f"pid {gone.pid}" in card.inner_text()


def test_live_refresh_keeps_the_cards_loaded_with_load_more(logged_in_page, live_url):
    shown = views.PAGE_SIZE + 20
    make_tasks("more", shown)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=more")
    queued = column(page, "queued").locator("article.card")
    assert queued.count() == views.PAGE_SIZE
    column(page, "queued").locator("a.more").click()
    wait_until(lambda: queued.count() == shown, 10, "Load more never added the cards")
    page.evaluate("window.__notReloaded = true")
    # A card only "Load more" brought.
    Task.objects.filter(key=f"t{shown - 5:06d}").update(
        title="Renamed meanwhile", updated_at=timezone.now()
    )
    wait_until(
        lambda: "Renamed meanwhile" in column(page, "queued").inner_text(),
        20,
        "the live refresh never showed the change",
    )
    assert queued.count() == shown
    assert page.evaluate("window.__notReloaded") is True
    screenshot(page, "board-refresh-keeps-loaded-cards")


def test_the_filter_dropdowns_arrive_after_the_board_and_filter_it(logged_in_page, live_url):
    Queue.objects.create(name="bar")
    for key, project in (("a", "web"), ("b", "web"), ("c", "api")):
        Task.objects.create(queue="bar", key=key, title=f"Task {key}", project=project)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=bar")
    # Nothing counted since the tasks came: the board is sent first, the dropdowns follow.
    web = page.locator('select[name=project] option[value="web"]')
    web.wait_for(state="attached", timeout=10_000)
    assert web.inner_text() == "web (2)"
    assert page.locator("#facets").get_attribute("aria-busy") is None
    page.select_option("select[name=project]", "api")
    page.locator("form.filters button[type=submit]").click()
    page.wait_for_url("**queue=bar&project=api**")
    assert column_count(page, "queued") == 1
    assert page.locator('select[name=project] option[value="api"]').inner_text() == "api (1)"
    screenshot(page, "board-filter-dropdowns")


def test_a_session_ended_elsewhere_takes_the_page_to_the_login_form(logged_in_page, live_url):
    """Logged out in another tab (or the session expired): the board's live refresh and a
    drawer's save must not swap the login page into the board, nor send the person, once
    logged in again, to the fragment a refresh asked for."""
    from django.contrib.sessions.models import Session

    make_tasks("gone", 3)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=gone")
    assert column(page, "queued").locator("article.card").count() == 3
    Session.objects.all().delete()
    page.wait_for_url(f"{live_url}/login/?next=%2F%3Fqueue%3Dgone", timeout=20_000)
    assert page.locator("section.column").count() == 0
    assert page.locator("input[name=password]").count() == 1
    page.fill("input[name=username]", "browser")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(f"{live_url}/?queue=gone")
    assert column(page, "queued").locator("article.card").count() == 3


def test_a_refusal_is_said_in_one_line_that_a_refused_refresh_does_not_repeat(
    logged_in_page, live_url, browser_user
):
    """No dialogs: a card's action on a task deleted meanwhile names it in the page's
    refusal line, which stays through the board's refreshes and goes with the person's
    next action; a refresh refused every two seconds (the permission taken away) says so
    in the same line, and the line goes when the refresh succeeds again."""
    make_tasks("refused", 2)
    page = logged_in_page
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{live_url}/?queue=refused")
    line = page.locator("#refusal")
    assert line.is_hidden()
    gone = Task.objects.get(queue="refused", key="t000000")
    pk = gone.pk
    card = column(page, "queued").locator(f'article[data-id="{pk}"]')
    gone.delete()
    card.get_by_role("button", name="Done").click()
    wait_until(line.is_visible, 10, "the refusal was not shown")
    assert line.locator("span").inner_text() == (
        f"Not found: /tasks/{pk}/action/ (deleted meanwhile?). Reload the page."
    )
    time.sleep(2.5)  # the board's refresh succeeds meanwhile: not a reason to hide it
    assert line.is_visible()
    other = Task.objects.get(queue="refused", key="t000001")
    column(page, "queued").locator(f'article[data-id="{other.pk}"]').get_by_role(
        "button", name="Done"
    ).click()
    wait_until(line.is_hidden, 10, "the person's next action did not clear the line")

    browser_user.is_superuser = False
    browser_user.save()
    wait_until(line.is_visible, 10, "the refused refresh was not shown")
    assert "does not have the permission" in line.inner_text()
    line.get_by_role("button", name="Dismiss").click()
    assert line.is_hidden()
    wait_until(line.is_visible, 10, "a refresh refused again was not said again")
    # The board changed meanwhile: the refresh that succeeds replaces its own element.
    Task.objects.filter(pk=other.pk).update(title="Changed meanwhile", updated_at=timezone.now())
    browser_user.is_superuser = True
    browser_user.save()
    wait_until(line.is_hidden, 10, "the line stayed after the refresh succeeded")
    assert "Changed meanwhile" in column(page, "done").inner_text()
    assert dialogs == []


def test_a_phone_width_screen_keeps_titles_clear_of_checkboxes_and_scrolls_tables_not_pages(
    logged_in_page, live_url
):
    page = logged_in_page
    page.set_viewport_size({"width": 390, "height": 800})
    (task,) = make_tasks("q", 1)
    Task.objects.filter(pk=task.pk).update(title="Migrate payment webhook " * 4)
    page.goto(f"{live_url}/?queue=q")
    card = page.locator(f'article[data-id="{task.pk}"]')
    title, pick = card.locator("a.title").bounding_box(), card.locator(".pick").bounding_box()
    assert title["height"] > 40  # the long title wraps
    assert title["x"] + title["width"] <= pick["x"], (title, pick)  # every line clear of it

    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=2, status=HerdStatus.RUNNING)
    for index in range(2):
        herd.workers.create(index=index, name=f"herd{herd.pk}-w{index}", host="h")
    page.goto(f"{live_url}/herds/{herd.pk}/")
    assert page.locator(".worker-table").count() == 1
    width = page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= 390, width
    screenshot(page, "herd-page-phone")


def test_the_first_tab_stops_skip_to_the_cards_and_to_the_content(logged_in_page, live_url):
    # Fourteen tab stops (the menu, the filters, the tools) came before the first card.
    make_tasks("q", 3)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to the content")
    expect(skip).to_be_focused()
    expect(skip).to_be_visible()
    page.keyboard.press("Tab")
    cards = page.get_by_role("link", name="Skip to the cards")
    expect(cards).to_be_focused()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    first = Task.objects.filter(queue="q").order_by("priority", "id").first()
    focused = page.evaluate("document.activeElement.closest('article.card')?.dataset.id")
    assert focused == str(first.pk)
    screenshot(page, "board-skip-link")

    page.goto(f"{live_url}/herds/")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to the content")).to_be_focused()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # Out of sight until the keyboard reaches it.
    page.keyboard.press("Tab")
    box = page.get_by_role("link", name="Skip to the content").bounding_box()
    assert box is None or box["x"] + box["width"] < 0


def test_a_file_written_on_disk_reaches_the_board_with_read_the_folder_again(
    logged_in_page, live_url, tmp_path, settings
):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.md").write_text("---\nid: s-1\ntitle: Imported first\nstatus: inbox\n---\n")
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    call_command("import_tasks", str(inbox), queue="synced", verbosity=0)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=synced")
    expect(column(page, "queued").locator("article")).to_have_count(1)
    (inbox / "b.md").write_text("---\nid: s-2\ntitle: Written by hand\nstatus: inbox\n---\n")
    page.get_by_role("button", name="Read the folder again").click()
    expect(page.locator(".messages")).to_contain_text(
        "Read the folder of synced again: 1 imported, 0 updated, 1 unchanged"
    )
    expect(column(page, "queued").locator("article", has_text="Written by hand")).to_have_count(1)
    assert page.url == f"{live_url}/?queue=synced"
    screenshot(page, "board-folder-read-again")


# Selection and focus across the board's own refresh (a helper's audit, stop 35).


def board_changes(page, task: Task) -> None:
    """Another person or a worker changes a task; the board's refresh swaps it in."""
    version = page.get_attribute("#board", "data-version")
    Task.objects.filter(pk=task.pk).update(title="Changed meanwhile", updated_at=timezone.now())
    wait_until(lambda: page.get_attribute("#board", "data-version") != version, 20, "no refresh")
    page.wait_for_timeout(300)


def test_a_shift_click_after_a_refresh_selects_the_range(logged_in_page, live_url):
    """The first checkbox was remembered as an element, gone with the refresh that
    replaced it: 2 selected instead of 6 (a refresh every 2 s while workers run)."""
    tasks = make_tasks("q", 10)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    cards = column(page, "queued").locator("article.card")
    ids = [cards.nth(i).get_attribute("data-id") for i in range(6)]
    page.locator(f"#task-{ids[0]} input.pick").check()
    board_changes(page, tasks[-1])
    page.locator(f"#task-{ids[5]} input.pick").click(modifiers=["Shift"])
    expect(page.locator("#bulk-count")).to_have_text("6 selected")


def test_shift_x_selects_a_range_from_the_keyboard(logged_in_page, live_url):
    """A real Shift+x sends "X", which no key case took: no range without a mouse."""
    make_tasks("q", 6)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    page.locator("body").focus()
    for key in ["j", "x", "j", "j", "j", "Shift+KeyX"]:
        page.keyboard.press(key)
    expect(page.locator("#bulk-count")).to_have_text("4 selected")


def test_the_focus_stays_on_the_board_across_a_refresh_an_apply_and_load_more(
    logged_in_page, live_url
):
    """Each sent a keyboard or screen-reader user back to the top of the page: a
    focused checkbox replaced by the refresh, Apply in a dialog whose opener the cleared
    selection hides, and "Load more" replacing itself with the next cards."""
    tasks = make_tasks("q", views.PAGE_SIZE + 5)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    first = column(page, "queued").locator("article.card").first
    first_id = first.get_attribute("data-id")
    first.locator("input.pick").focus()
    board_changes(page, tasks[-1])
    focused = "(document.activeElement.closest('article.card') || {}).id"
    assert page.evaluate(focused) == f"task-{first_id}"

    first.locator("input.pick").check()
    page.get_by_role("button", name="Assign…").click()
    dialog = page.get_by_role("dialog", name="Assign 1 task")
    dialog.get_by_label("Assignee").fill("carol")
    dialog.get_by_role("button", name="Apply").click()
    expect(page.locator("#bulk-status")).to_contain_text("Assigned 1 task")
    page.wait_for_timeout(300)
    assert page.evaluate("document.activeElement.id") == "bulk-status"

    more = column(page, "queued").locator("a.more")
    more.focus()
    page.keyboard.press("Enter")
    expect(column(page, "queued").locator("article.card")).to_have_count(views.PAGE_SIZE + 5)
    page.wait_for_timeout(300)
    cards = column(page, "queued").locator("article.card")
    assert page.evaluate(focused) == cards.nth(views.PAGE_SIZE).get_attribute("id")


def test_the_close_and_block_dialogs_say_how_many_of_the_selection_are_being_worked(
    logged_in_page, live_url
):
    """ "Select all N matching" spans every column: a bulk Close over a filter ended the
    agents of its claimed tasks without a word in the dialog that asked for the reason."""
    tasks = make_tasks("q", 5)
    now = timezone.now()
    Task.objects.filter(pk__in=[t.pk for t in tasks[:2]]).update(
        status=Status.CLAIMED, holder="w-1", claimed_at=now, updated_at=now
    )
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    column(page, "queued").locator("article.card input.pick").first.check()
    page.get_by_role("button", name="Close…").click()
    dialog = page.get_by_role("dialog", name="Close 1 task")
    expect(dialog.locator("[data-dialog-claimed]")).to_be_hidden()
    dialog.get_by_role("button", name="Cancel").click()

    page.get_by_role("button", name="Select all 5 matching").click()
    page.get_by_role("button", name="Close…").click()
    dialog = page.get_by_role("dialog", name="Close 5 tasks")
    expect(dialog.locator("[data-dialog-claimed]")).to_have_text(
        "2 of them are being worked: their agents are ended."
    )
    dialog.get_by_role("button", name="Cancel").click()

    page.get_by_role("button", name="Clear selection").click()
    column(page, "claimed").locator("article.card input.pick").first.check()
    page.get_by_role("button", name="Block…").click()
    dialog = page.get_by_role("dialog", name="Block 1 task")
    expect(dialog.locator("[data-dialog-claimed]")).to_have_text(
        "It is being worked: its agent is ended."
    )


def test_the_focus_on_a_card_button_or_load_more_survives_the_refresh(logged_in_page, live_url):
    """A card's "Mark done" or "Load more", reached with Tab, lost the focus to the page's
    top with the next refresh (every 2 s while workers run): they had no id to find again."""
    tasks = make_tasks("q", views.PAGE_SIZE + 5)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    second = column(page, "queued").locator("article.card").nth(1)
    for focused in (
        second.get_by_role("button", name="Mark done"),
        second.get_by_role("link", name="Block…"),
        column(page, "queued").locator("a.more"),
    ):
        focused.focus()
        board_changes(page, tasks[-1])
        expect(focused).to_be_focused()


def test_select_all_says_what_it_selects_and_the_count_is_not_rewritten_by_a_refresh(
    logged_in_page, live_url
):
    """ "Select all 5 matching" said only "5 selected" with one card shown of five, in
    two columns; it and Clear selection hid themselves with the focus on them, which fell
    to the top of the page; and every refresh wrote the count, a live region, again."""
    tasks = make_tasks("q", 5)
    Task.objects.filter(pk=tasks[0].pk).update(status=Status.DONE, updated_at=timezone.now())
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    count = page.locator("#bulk-count")
    first = column(page, "queued").locator("article.card input.pick").first
    first.focus()
    page.keyboard.press("Space")
    expect(count).to_have_text("1 selected")
    page.evaluate(
        "window.__writes = 0; new MutationObserver(() => window.__writes++).observe("
        "document.getElementById('bulk-count'), {childList: true, characterData: true,"
        " subtree: true})"
    )
    board_changes(page, tasks[-1])
    assert page.evaluate("window.__writes") == 0

    page.get_by_role("button", name="Select all 5 matching").focus()
    page.keyboard.press("Enter")
    expect(count).to_have_text("All 5 tasks of this view selected, in every column, shown or not")
    expect(page.get_by_role("button", name="Clear selection")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#bulk-bar")).to_be_hidden()
    expect(first).to_be_focused()


def test_nothing_is_cut_off_at_360_px(logged_in_page, live_url):
    """On a 360 px phone the menu ran 20 px past the screen (Log out half cut off), and an
    empty bordered box stood under the filters where a bulk action's status goes."""
    (task,) = make_tasks("q", 1)
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1, status=HerdStatus.RUNNING)
    herd.workers.create(index=0, name=f"herd{herd.pk}-w0", host="h")
    page = logged_in_page
    page.set_viewport_size({"width": 360, "height": 740})
    past = (
        "Array.from(document.querySelectorAll('body *')).filter(e => {"
        " const box = e.getBoundingClientRect();"
        " return box.width > 0 && box.right > 360 && !e.closest('.table-scroll'); })"
        ".map(e => e.outerHTML.slice(0, 60))"
    )
    for url in ("/?queue=q", f"/herds/{herd.pk}/", "/herds/", "/herds/launch/"):
        page.goto(live_url + url)
        assert page.evaluate(past) == [], url
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 360, url
        expect(page.get_by_role("button", name="Log out")).to_be_in_viewport(ratio=1)
    page.goto(f"{live_url}/?queue=q")
    expect(page.locator("#bulk-status")).to_be_hidden()
    page.locator(f"#task-{task.pk} input.pick").check()
    assert page.evaluate(past) == []
    screenshot(page, "board-phone-selection")


def test_dismissing_a_bulk_status_or_a_refusal_keeps_the_focus_on_the_page(
    logged_in_page, live_url
):
    """Both Dismiss buttons went with what they dismissed, and the focus with them, to the
    top of the page: a keyboard user tabbed through the menu and filters again."""
    tasks = make_tasks("q", 2)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    page.locator(f"#task-{tasks[0].pk} input.pick").check()
    page.get_by_role("button", name="Assign…").click()
    dialog = page.get_by_role("dialog", name="Assign 1 task")
    dialog.get_by_label("Assignee").fill("carol")
    dialog.get_by_role("button", name="Apply").click()
    status = page.locator("#bulk-status")
    expect(status).to_contain_text("Assigned 1 task")
    status.get_by_role("button", name="Dismiss").focus()
    page.keyboard.press("Enter")
    expect(status).to_be_hidden()
    expect(page.locator("#board")).to_be_focused()

    gone = Task.objects.get(pk=tasks[1].pk)
    card = page.locator(f"#task-{gone.pk}")
    # No refresh from here (each answered "unchanged"), and the one the Assign set off
    # over with: a refresh between the delete and the click took the card away from under
    # the pointer, and the click went to nothing.
    page.route("**/*since=*", lambda route: route.fulfill(status=204))
    page.wait_for_load_state("networkidle")
    gone.delete()
    card.get_by_role("button", name="Mark done").click()
    line = page.locator("#refusal")
    expect(line).to_be_visible()
    line.get_by_role("button", name="Dismiss").focus()
    page.keyboard.press("Enter")
    expect(line).to_be_hidden()
    expect(page.locator("main")).to_be_focused()


def test_the_focus_given_to_a_running_bulk_status_survives_its_refresh(
    logged_in_page, live_url, browser_user
):
    """After Apply the focus goes to the bulk action's status; while it ran, its refresh
    every second replaced it with an element that could not take the focus, which fell to
    the top of the page."""
    from workqueue.models import BulkAction, BulkStatus

    make_tasks("q", 1)
    bulk = BulkAction.objects.create(
        user=browser_user,
        actor="user:browser",
        action="assign",
        status=BulkStatus.RUNNING,
        total=10,
        processed=2,
        started_at=timezone.now(),
    )
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    page.evaluate(
        "(url) => htmx.ajax('GET', url, {target: '#bulk-status', swap: 'outerHTML'})",
        f"/bulk/{bulk.pk}/",
    )
    status = page.locator("#bulk-status")
    expect(status).to_contain_text("10")
    # As Apply does.
    page.evaluate(
        "() => { const s = document.getElementById('bulk-status'); s.tabIndex = -1; s.focus(); }"
    )
    expect(status).to_be_focused()
    page.evaluate("window.__swaps = 0")
    page.evaluate("document.addEventListener('htmx:afterSettle', () => window.__swaps++)")
    wait_until(lambda: page.evaluate("window.__swaps") >= 2, 10, "no refresh")
    expect(status).to_be_focused()


def test_the_first_pick_and_a_cleared_selection_are_said_in_a_region_that_is_not_hidden(
    logged_in_page, live_url
):
    """The selected count was a live region inside the bulk bar, which is hidden until
    something is selected: the first pick, shown and changed at once, was not said, nor
    was the end of a selection (the bar hid again)."""
    tasks = make_tasks("q", 3)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    said = page.get_by_role("status").and_(page.locator("#bulk-said"))
    expect(said).to_have_text("")
    assert said.evaluate("e => !e.closest('[hidden]')")
    page.locator(f"#task-{tasks[0].pk} input.pick").check()
    expect(said).to_have_text("1 selected")
    page.locator(f"#task-{tasks[1].pk} input.pick").check()
    expect(said).to_have_text("2 selected")
    board_changes(page, tasks[2])
    expect(said).to_have_text("2 selected")
    page.get_by_role("button", name="Clear selection").click()
    expect(said).to_have_text("Selection cleared")
