"""Accessibility: axe-core finds no serious or critical violation on the board, the drawer
(view and edit), the bulk dialogs, the triage review and the herd pages; the view-only
person sees no edit or bulk controls.

axe-core is vendored in tests/browser/vendor/axe-core (its version, integrity and hash in
axe-core.json) and injected by Playwright as an init script, which the page's
Content-Security-Policy does not apply to; the pages keep their policy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect

from herds.models import Herd, HerdStatus
from tests.browser.conftest import PASSWORD, screenshot
from workqueue.importer import Importer
from workqueue.models import Task

VENDOR = Path(__file__).resolve().parent / "vendor" / "axe-core"
AXE = VENDOR / "axe.min.js"
SERIOUS = ("serious", "critical")
TASK = """---
id: {key}
title: {title}
status: inbox
priority: 1
project: webapp
assignee: nic
complexity: mechanical
tags: [bug, auth]
depends_on: [{dep}]
---
# {title}

- [ ] reproduce it
- [x] find the file

| a | b |
|---|---|
| 1 | 2 |
"""


def test_the_vendored_axe_is_the_recorded_version():
    meta = json.loads((VENDOR / "axe-core.json").read_text())
    assert meta["package"] == "axe-core" and meta["version"].count(".") == 2
    assert hashlib.sha256(AXE.read_bytes()).hexdigest() == meta["sha256"]
    assert f"axe v{meta['version']}" in AXE.read_text()[:300]


@pytest.fixture
def axe_page(page):
    page.context.add_init_script(path=str(AXE))
    return page


def serious_violations(page, context: str = "document") -> list[dict]:
    results = page.evaluate(
        "async (selector) => {"
        "  const where = selector === 'document' ? document : document.querySelector(selector);"
        "  const found = await axe.run(where, {resultTypes: ['violations']});"
        "  return found.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        "    nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}));"
        "}",
        context,
    )
    return [v for v in results if v["impact"] in SERIOUS]


def check(page, name: str, context: str = "document") -> None:
    screenshot(page, f"a11y-{name}")
    found = serious_violations(page, context)
    assert found == [], f"{name}: {json.dumps(found, indent=1)}"


@pytest.fixture
def tasks(tmp_path, settings):
    folder = tmp_path / "inbox"
    folder.mkdir()
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    for i in range(6):
        title = f"Task <{i}> with a long title that wraps onto a second line of the card"
        (folder / f"t{i}.md").write_text(TASK.format(key=f"t{i}", title=title, dep=f"t{i + 1}"))
    assert not Importer("inbox").run([folder]).errors
    Task.objects.filter(key="t5").update(status="blocked", reason="waiting for a review")
    Task.objects.filter(key="t4").update(status="done", outcome="closed")
    return folder


def test_board_drawer_and_dialogs_have_no_serious_violation(
    axe_page, live_url, login, browser_user, tasks
):
    page = axe_page
    login(page, browser_user.username)
    page.goto(f"{live_url}/?queue=inbox")
    check(page, "board")

    first = Task.objects.get(key="t0")
    page.get_by_role("checkbox", name=f"Select {first.title}").check()
    expect(page.get_by_role("region", name="Selected tasks")).to_be_visible()
    check(page, "board-with-selection")
    for button, dialog in [
        ("Assign…", "Assign 1 task"),
        ("Priority…", "Priority for 1 task"),
        ("Complexity…", "Complexity for 1 task"),
        ("Tags…", "Tags for 1 task"),
        ("Project…", "Project for 1 task"),
        ("Close…", "Close 1 task"),
        ("Block…", "Block 1 task"),
    ]:
        page.get_by_role("button", name=button, exact=True).click()
        expect(page.get_by_role("dialog", name=dialog)).to_be_visible()
        check(page, f"dialog-{button.rstrip('…').lower()}")
        page.keyboard.press("Escape")
    page.get_by_role("button", name="New task").click()
    expect(page.get_by_role("dialog", name="New task")).to_be_visible()
    check(page, "dialog-new-task")
    page.keyboard.press("Escape")
    page.keyboard.press("?")
    expect(page.get_by_role("dialog", name="Keyboard")).to_be_visible()
    check(page, "dialog-keys")
    page.keyboard.press("Escape")

    page.locator(f'article[data-id="{first.pk}"] a.title').click()
    drawer = page.locator("aside#drawer")
    expect(drawer.locator("header h1")).to_be_visible()
    check(page, "drawer")
    drawer.get_by_role("link", name="Edit").click()
    expect(drawer.get_by_label("Title")).to_be_focused()
    check(page, "drawer-edit")
    drawer.get_by_label("Title").fill("")
    drawer.get_by_role("button", name="Save").click()
    expect(drawer.locator("#id_title-error")).to_have_text("title: a task needs a title")
    expect(drawer.get_by_label("Title")).to_be_focused()
    check(page, "drawer-edit-errors")

    # The bulk status with its skipped list and Undo.
    page.keyboard.press("Escape")
    (tasks / "t1.md").write_text((tasks / "t1.md").read_text() + "outside\n")
    page.get_by_role("checkbox", name="Select Task <1>", exact=False).check()
    page.get_by_role("button", name="Assign…").click()
    page.get_by_role("dialog").get_by_label("Assignee").fill("bot")
    page.get_by_role("dialog").get_by_role("button", name="Apply").click()
    expect(page.locator("#bulk-status")).to_contain_text("skipped")
    check(page, "bulk-status")


def test_triage_review_and_herd_pages_have_no_serious_violation(
    axe_page, live_url, login, browser_user, tasks, triage_profile
):
    page = axe_page
    login(page, browser_user.username)
    herd = Herd.objects.create(
        queue="inbox",
        profile=triage_profile,
        size=2,
        dry_run=True,
        status=HerdStatus.FINISHED,
        preflight={"ready": 5, "skipped_complete": 1, "waiting": 0, "locks_held": 0},
        summary={
            "done": 6,
            "blocked": 0,
            "runtime_seconds": 1.5,
            "items_per_second": 4,
            "total_tokens": 0,
            "counts": {"skipped": 6},
        },
    )
    Task.objects.filter(key__in=["t0", "t1"]).update(
        status="done",
        outcome="skipped",
        holder_herd=herd.pk,
        result={
            "action": "assign:bot",
            "changes": ["assignee->bot"],
            "dry_run": True,
            "diff": "--- a/t0.md\n+++ b/t0.md\n@@ -1 +1 @@\n-assignee: nic\n+assignee: bot\n",
        },
    )
    page.goto(f"{live_url}/triage/{herd.pk}/")
    expect(page.locator("fieldset.proposal")).to_have_count(2)
    check(page, "triage-review")
    for url in ("/herds/", f"/herds/{herd.pk}/", "/herds/launch/"):
        page.goto(live_url + url)
        check(page, "herds" + url.replace("/", "-"))


def test_a_view_only_person_sees_no_edit_or_bulk_controls(
    page, live_url, login, tasks, django_user_model
):
    viewer = django_user_model.objects.create_user("viewer", password=PASSWORD)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    login(page, "viewer")
    page.goto(f"{live_url}/?queue=inbox")
    expect(page.locator("article.card")).to_have_count(6)
    for hidden in ("input.pick", "#bulk-bar", "dialog.bulk-dialog", "[data-new-task]", ".acts"):
        expect(page.locator(hidden)).to_have_count(0)
    page.keyboard.press("j")
    page.keyboard.press("x")
    page.keyboard.press("a")
    expect(page.locator("dialog[open]")).to_have_count(0)
    page.locator("article.card a.title").first.click()
    expect(page.locator("aside#drawer header h1")).to_be_visible()
    expect(page.locator("aside#drawer").get_by_role("link", name="Edit")).to_have_count(0)
    task = Task.objects.get(key="t0")
    status = page.request.get(f"{live_url}/tasks/{task.pk}/edit/").status
    assert status == 403


def test_the_check_finds_a_planted_violation(axe_page, live_url, login, browser_user, tasks):
    page = axe_page
    login(page, browser_user.username)
    page.goto(f"{live_url}/?queue=inbox")
    page.evaluate(
        "() => { const b = document.createElement('button');"
        " document.querySelector('main').append(b); }"
    )
    assert "button-name" in {v["id"] for v in serious_violations(page)}
