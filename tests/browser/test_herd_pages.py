"""Herds in a real Chromium: launch from the button, watch the board, cancel from the herd page.

The live server runs in this process, so its Huey is the one django settings built at import
time (the shared `var/` file or the `hypervisor` Redis name). `consumer_huey` points that Huey at
the private storage the test's `run_huey` consumer reads, as the consumer itself reports it,
so a launch from the browser reaches that consumer and nobody else's.
"""

from __future__ import annotations

import re
import sys

import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect

from herds import processes
from herds.models import ExitClass, Herd, HerdStatus, Profile
from tests.browser.conftest import PASSWORD, screenshot, wait_until
from tests.conftest import ROOT, make_tasks
from workqueue import views
from workqueue.models import Status, Task

AGENT = str(ROOT / "examples" / "agents" / "example_agent.py")
OPERATOR_PERMISSIONS = [
    ("queue", "view_task"),
    ("queue", "change_task"),
    ("herds", "view_herd"),
    ("herds", "add_herd"),
]


@pytest.fixture
def operator(transactional_db, django_user_model):
    """Not a superuser: exactly the permissions viewing, acting and launching need."""
    user = django_user_model.objects.create_user("operator", "op@example.invalid", PASSWORD)
    perms = [
        Permission.objects.get(content_type__app_label=app, codename=codename)
        for app, codename in OPERATOR_PERMISSIONS
    ]
    user.user_permissions.add(*perms)
    return user


def column(page, status: str):
    return page.locator(f'section.column[data-status="{status}"]')


def column_count(page, status: str) -> int:
    return int(column(page, status).locator(".count").inner_text())


def mark_not_reloaded(page) -> None:
    page.evaluate("window.__notReloaded = true")


def was_not_reloaded(page) -> bool:
    return page.evaluate("window.__notReloaded === true")


def consumer_log(tmp_path) -> str:
    path = tmp_path / "consumer.log"
    return path.read_text(errors="replace")[-3000:] if path.is_file() else "(no consumer log)"


def test_launch_a_herd_from_the_button_and_watch_the_board_fill_done(
    page, login, operator, live_url, consumer_huey, consumer, tmp_path
):
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop", "prefetch": 5})
    make_tasks("herdui", 30)
    login(page, operator.username)

    # The board stays open in its own tab for the whole run and is never reloaded.
    board = page
    board.goto(f"{live_url}/?queue=herdui")
    assert column_count(board, "queued") == 30
    assert column_count(board, "done") == 0
    mark_not_reloaded(board)
    screenshot(board, "herd-board-before-launch")

    # A second tab of the same session launches the herd through the UI.
    launcher = page.context.new_page()
    launcher.goto(f"{live_url}/?queue=herdui")
    launcher.get_by_role("link", name="Herds", exact=True).click()
    launcher.get_by_role("link", name="Launch a herd").click()
    launcher.wait_for_url("**/herds/launch/")
    # The inputs line up in one column whatever their labels' widths.
    fields = launcher.locator(".herd-form p > select, .herd-form p > input:not([type=checkbox])")
    assert len({round(field.bounding_box()["x"]) for field in fields.all()}) == 1
    launcher.select_option("select[name=queue]", "herdui")
    launcher.select_option("select[name=profile]", "noop")
    launcher.fill("input[name=workers]", "3")
    launcher.fill("input[name=batch]", "0")
    launcher.get_by_role("button", name="Pre-flight check").click()
    expect(launcher.locator(".preflight")).to_contain_text(
        "30 ready, 0 skipped (already complete), 0 waiting on dependencies, 0 locks held"
    )
    assert not Herd.objects.exists(), "the pre-flight must not start anything"
    screenshot(launcher, "herd-launch-preflight")

    launcher.get_by_role("button", name="Start 3 workers").click()
    launcher.wait_for_url(re.compile(r"/herds/\d+/$"))
    herd = Herd.objects.get()
    assert (herd.queue, herd.profile.name, herd.size, herd.created_by) == (
        "herdui",
        "noop",
        3,
        operator,
    )
    expect(launcher.locator("h1")).to_contain_text(f"Herd {herd.pk}: 3 × noop on herdui")
    mark_not_reloaded(launcher)

    board.bring_to_front()
    wait_until(
        lambda: column_count(board, "done") == 30,
        45,
        "the board never showed all 30 cards done\n" + consumer_log(tmp_path),
    )
    screenshot(board, "herd-board-all-done")
    assert column_count(board, "queued") == 0
    assert column_count(board, "claimed") == 0
    # The column's count says 30; it shows its first page of cards.
    assert column(board, "done").locator("article.card").count() == min(30, views.PAGE_SIZE)
    assert was_not_reloaded(board)

    # The herd page follows the run to its end on its own, then shows the summary. The
    # herd ends at the next supervision pass; on a machine busy with a second suite a
    # pass has come up to a minute late, so the page is given that long.
    launcher.bring_to_front()
    expect(launcher.locator(".herd-progress .herd-status")).to_have_text(
        "Finished", timeout=90_000
    )
    expect(launcher.locator(".herd-progress")).to_contain_text("30 of 30 tasks finished")
    expect(launcher.locator(".herd-summary")).to_contain_text("30 done, 0 blocked")
    assert was_not_reloaded(launcher)
    screenshot(launcher, "herd-page-finished")

    herd.refresh_from_db()
    assert herd.status == HerdStatus.FINISHED
    assert herd.summary["done"] == 30 and herd.summary["counts"] == {"success": 30}
    assert Task.objects.filter(queue="herdui", status=Status.DONE).count() == 30


def test_a_double_click_on_start_launches_one_herd(page, login, operator, live_url, consumer_huey):
    """No consumer: the herd stays pending; what counts is that there is one."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("herdtwice", 4)
    login(page, operator.username)
    page.goto(f"{live_url}/herds/launch/")
    page.select_option("select[name=queue]", "herdtwice")
    page.select_option("select[name=profile]", "noop")
    page.fill("input[name=workers]", "2")
    page.get_by_role("button", name="Pre-flight check").click()
    start = page.get_by_role("button", name="Start 2 workers")
    expect(start).to_be_enabled()

    start.dblclick()
    page.wait_for_url(re.compile(r"/herds/\d+/$"))
    herd = Herd.objects.get()
    expect(page.locator("h1")).to_contain_text(f"Herd {herd.pk}: 2 × noop on herdtwice")
    # The second click's request (if the page let one go) is turned away, not launched.
    page.wait_for_timeout(500)
    assert Herd.objects.count() == 1

    # Sent again anyway (back, then Start once more): the first herd, said so.
    page.go_back()
    page.get_by_role("button", name="Start 2 workers").click()
    page.wait_for_url(re.compile(r"/herds/\d+/$"))
    expect(page.locator("body")).to_contain_text(
        f"Herd {herd.pk} was launched from this form already"
    )
    assert Herd.objects.count() == 1


def test_cancel_a_running_herd_from_its_page(
    page, login, operator, live_url, consumer_huey, consumer, lock_root, tmp_path
):
    profile = Profile.objects.update_or_create(
        name="sleepy",
        defaults={
            "processor": "command",
            "command": [sys.executable, AGENT, "{path}", "--sleep", "30"],
            "timeout_seconds": 120,
            "prefetch": 1,
        },
    )[0]
    make_tasks("herdcancel", 6)
    herd = Herd.launch("herdcancel", profile, 2, created_by=operator)

    login(page, operator.username)
    page.goto(f"{live_url}/herds/{herd.pk}/")
    mark_not_reloaded(page)

    # The page's own polling shows both workers running, each holding a task.
    running = page.locator(".worker-table tbody tr", has_text="Running")
    wait_until(
        lambda: running.count() == 2,
        45,
        "the herd page never showed two running workers\n" + consumer_log(tmp_path),
    )
    wait_until(
        lambda: Task.objects.filter(queue="herdcancel", status=Status.CLAIMED).count() == 2,
        30,
        "two claims",
    )
    tree = wait_until(
        lambda: (found := descendants(herd)) and len(found) >= 4 and found,
        30,
        "two workers with an agent child each",
    )
    pids = [(p.pid, p.create_time()) for p in tree]
    expect(page.locator(".herd-progress .herd-status")).to_have_text("Running")
    screenshot(page, "herd-page-running")

    dialogs = []

    def accept(dialog):
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.get_by_role("button", name="Cancel").click()

    # Said at once, and still there after the polls that follow.
    expect(page.locator("#herd-notice")).to_have_text(f"Herd {herd.pk} is being cancelled.")
    expect(page.locator(".herd-progress .herd-status")).to_have_text("Cancelled", timeout=30_000)
    expect(page.locator("#herd-notice")).to_have_text(f"Herd {herd.pk} is being cancelled.")
    assert dialogs and f"Cancel herd {herd.pk}?" in dialogs[0]
    expect(page.locator(".herd-progress")).to_contain_text(f"cancelled by {operator.username}")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator(".herd-summary")).to_be_visible()
    assert was_not_reloaded(page)
    screenshot(page, "herd-page-cancelled")

    herd.refresh_from_db()
    assert herd.status == HerdStatus.CANCELLED and herd.cancel_requested
    assert herd.summary["status"] == "cancelled"
    assert {w.exit_class for w in herd.workers.all()} == {ExitClass.CANCELLED}
    assert Task.objects.filter(status=Status.CLAIMED).count() == 0
    assert Task.objects.filter(queue="herdcancel", status=Status.QUEUED).count() == 6
    survivors = [pid for pid, started in pids if processes.leader(pid, started) is not None]
    assert survivors == []
    queue_locks = lock_root / "herdcancel"
    assert not queue_locks.exists() or list(queue_locks.iterdir()) == []


def descendants(herd: Herd) -> list:
    found = []
    for worker in herd.workers.all():
        found += processes.tree(worker.pid, worker.process_started)
    return found


def test_the_herd_page_keeps_the_focus_across_its_refresh_and_says_a_change_of_state_once(
    logged_in_page, live_url
):
    """Drain and Cancel, reached with Tab, lost the focus to the top of the page with each
    refresh (every 2 s), and a Drain took its own button away with the focus; the herd's
    state changed (running to finished) without a word to a screen reader."""
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1, status=HerdStatus.RUNNING)
    herd.workers.create(index=0, name=f"herd{herd.pk}-w0", host="h")
    page = logged_in_page
    page.goto(f"{live_url}/herds/{herd.pk}/")
    said = page.get_by_role("status").and_(page.locator("#herd-state"))
    drain = page.get_by_role("button", name="Drain")
    drain.focus()
    page.evaluate("window.__refreshes = 0")
    page.evaluate("document.addEventListener('htmx:afterSettle', () => window.__refreshes++)")
    wait_until(lambda: page.evaluate("window.__refreshes") >= 2, 10, "no refresh")
    expect(drain).to_be_focused()
    expect(said).to_have_text("")  # a refresh that changes nothing says nothing

    page.keyboard.press("Enter")
    expect(page.locator("#herd-notice")).to_contain_text("is draining")
    expect(page.locator("#herd-notice")).to_be_focused()

    Herd.objects.filter(pk=herd.pk).update(status=HerdStatus.FINISHED)
    expect(said).to_have_text(f"Herd {herd.pk} is now finished.")
    page.evaluate("window.__refreshes = 0")
    page.wait_for_timeout(2500)
    expect(said).to_have_text(f"Herd {herd.pk} is now finished.")


def test_the_launch_form_ties_help_and_errors_to_their_fields_and_focuses_the_first_error(
    logged_in_page, live_url
):
    """The fields named help texts that had no id (aria-describedby pointed at nothing), and
    a form sent back with an error left the focus at the top of a page that looked unchanged."""
    make_tasks("q", 1)
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    page = logged_in_page
    page.goto(f"{live_url}/herds/launch/")
    page.get_by_label("Profile").select_option("noop")
    page.get_by_label("Filters").fill("nonsense")
    page.get_by_role("button", name="Pre-flight check").click()
    where = page.get_by_label("Filters")
    expect(where).to_have_attribute("aria-invalid", "true")
    expect(where).to_be_focused()
    expect(where).to_have_accessible_description(re.compile(r"^Optional, space separated.*\S"))
    described = where.get_attribute("aria-describedby").split()
    assert described == ["id_where_helptext", "id_where_error"]
    for ident in described:
        expect(page.locator(f"#{ident}")).to_be_visible()
    for field in page.locator("form.herd-form [aria-describedby]").all():
        for ident in field.get_attribute("aria-describedby").split():
            assert page.locator(f"#{ident}").count() == 1, ident
    screenshot(page, "herd-launch-error")


def test_a_wide_table_on_a_phone_scrolls_from_the_keyboard_and_stays_scrolled(
    logged_in_page, live_url
):
    """At 360 px the worker and herd tables scroll sideways, but the keyboard could not
    reach the scrolling box, and the herd page's refresh threw a table scrolled to its
    right half back to its start every 2 s."""
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=2, status=HerdStatus.RUNNING)
    for index in range(2):
        herd.workers.create(index=index, name=f"herd{herd.pk}-w{index}", host="h")
    page = logged_in_page
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(f"{live_url}/herds/")
    expect(page.get_by_role("region", name="Herds").get_by_role("table")).to_be_visible()
    page.goto(f"{live_url}/herds/{herd.pk}/")
    box = page.get_by_role("region", name="Workers")
    expect(box.get_by_role("table")).to_be_visible()
    page.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Tab")
    expect(box).to_be_focused()
    for _ in range(6):
        page.keyboard.press("ArrowRight")
    wait_until(lambda: box.evaluate("b => b.scrollLeft") > 100, 5, "the arrows did not scroll")
    page.wait_for_timeout(500)  # the arrows scroll smoothly
    left = box.evaluate("b => b.scrollLeft")
    page.evaluate("window.__refreshes = 0")
    page.evaluate("document.addEventListener('htmx:afterSettle', () => window.__refreshes++)")
    wait_until(lambda: page.evaluate("window.__refreshes") >= 2, 10, "no refresh")
    # Within a pixel or two: a refreshed row may be a little wider or narrower.
    assert abs(box.evaluate("b => b.scrollLeft") - left) <= 3
    expect(box).to_be_focused()
