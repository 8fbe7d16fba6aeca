"""Two people triaging one board in two browsers while real workers take its tasks.

One is staff (every permission), the other has only what a triager needs (to see the
board and change tasks). Each check reads the database or the task files afterwards.
"""

from __future__ import annotations

import subprocess

import psutil
import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, screenshot, wait_until
from tests.conftest import make_tasks, start_manage
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
