"""Triage in the browser: edit in the drawer, select many and act, undo, triage this view.

Every check reads the task files themselves: the files are the source of truth.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from workqueue.importer import Importer
from workqueue.models import Task

TASK = """---
id: {key}
title: {title}   # the title as the person wrote it
status: inbox
priority: 2
project: webapp
assignee: nic
tags: [bug, auth]
---
# {title}

- [ ] reproduce it
- [x] find the file
"""


@pytest.fixture
def inbox(tmp_path, settings):
    """A folder of task files imported into the queue `inbox`."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]

    def make(count: int, title: str = "Task {i}") -> list[Path]:
        paths = []
        for i in range(count):
            path = folder / f"t{i:03d}.md"
            path.write_text(TASK.format(key=f"t{i:03d}", title=title.format(i=i)))
            paths.append(path)
        report = Importer("inbox").run([folder])
        assert not report.errors, report.errors
        return paths

    make.folder = folder
    return make


def changed_lines(before: str, after: str) -> list[str]:
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return [d for d in diff if d[:1] == "-"] + [d for d in diff if d[:1] == "+"]


def open_drawer(page, task: Task):
    page.locator(f'article[data-id="{task.pk}"] a.title').click()
    drawer = page.locator("aside#drawer")
    expect(drawer.locator("header h1")).to_be_visible()
    return drawer


def test_edit_assignee_and_title_in_the_drawer_changes_exactly_those_lines(
    logged_in_page, live_url, inbox
):
    (path,) = inbox(1, title="Fix the login bug")
    task = Task.objects.get(key="t000")
    before = path.read_text()
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    drawer = open_drawer(page, task)
    # The drawer reads well: tags as text, checklists as checkboxes.
    expect(drawer.locator(".frontmatter")).to_contain_text("bug, auth")
    expect(drawer.locator(".markdown input[type=checkbox]")).to_have_count(2)
    drawer.get_by_role("link", name="Edit").click()
    title = drawer.get_by_label("Title")
    expect(title).to_be_focused()
    title.fill("Fix the logout bug")
    drawer.get_by_label("Assignee").fill("bot")
    drawer.get_by_role("button", name="Save").click()
    expect(drawer.locator(".notice")).to_have_text("Saved title, assignee.")
    after = path.read_text()
    assert changed_lines(before, after) == [
        "- title: Fix the login bug   # the title as the person wrote it",
        "- assignee: nic",
        "+ title: Fix the logout bug   # the title as the person wrote it",
        "+ assignee: bot",
    ]
    # The board behind the drawer shows the new title without a reload.
    expect(page.locator(f'article[data-id="{task.pk}"] a.title')).to_have_text(
        "Fix the logout bug"
    )
    screenshot(page, "drawer-edit-saved")


def test_a_save_over_an_outside_edit_is_refused_and_the_outside_edit_kept(
    logged_in_page, live_url, inbox
):
    (path,) = inbox(1)
    task = Task.objects.get(key="t000")
    page = logged_in_page
    page.goto(f"{live_url}/tasks/{task.pk}/")
    page.get_by_role("link", name="Edit").click()
    page.get_by_label("Assignee").fill("bot")
    outside = path.read_text().replace("priority: 2", "priority: 0")
    path.write_text(outside)  # someone edits the file meanwhile
    page.get_by_role("button", name="Save").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The file changed on disk")
    expect(page.locator("pre.diff")).to_contain_text("+priority: 0")
    assert path.read_text() == outside
    screenshot(page, "drawer-edit-conflict")
    page.get_by_role("button", name="Reload from disk and edit again").click()
    expect(page.get_by_label("Priority")).to_have_value("0")
    expect(page.get_by_label("Assignee")).to_have_value("nic")
    page.get_by_label("Assignee").fill("bot")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".notice")).to_contain_text("Saved assignee.")
    assert path.read_text() == outside.replace("assignee: nic", "assignee: bot")
