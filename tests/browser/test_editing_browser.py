"""Triage in the browser: edit in the drawer, select many and act, undo, triage this view.

Every check reads the task files themselves: the files are the source of truth.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from herds.models import Herd, HerdStatus
from tests.browser.conftest import screenshot
from workqueue import views
from workqueue.importer import Importer
from workqueue.models import Task
from workqueue.processors import load_processor
from workqueue.worker import Worker

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


def test_escape_asks_before_it_throws_away_what_was_typed_in_the_editor(
    logged_in_page, live_url, inbox
):
    """Esc in a field of the editor (for a field's suggestions, or by habit) closed the
    drawer at once, everything typed gone."""
    inbox(1)
    task = Task.objects.get(key="t000")
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    drawer = open_drawer(page, task)
    drawer.get_by_role("link", name="Edit").click()
    body = drawer.get_by_label("Body")
    body.fill("A long description typed for ten minutes")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    body.press("Escape")
    expect(body).to_have_value("A long description typed for ten minutes")
    assert asked == ["Close the editor and lose what you typed?"]
    page.once("dialog", lambda dialog: dialog.accept())
    body.press("Escape")
    expect(drawer.locator("form")).to_have_count(0)
    drawer = open_drawer(page, task)
    page.keyboard.press("Escape")  # nothing typed: closes without a question
    expect(drawer.locator("header h1")).to_have_count(0)


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
    # The file's new priority, and the assignee the person had typed (it was thrown away).
    expect(page.get_by_label("Priority")).to_have_value("0")
    expect(page.get_by_label("Assignee")).to_have_value("bot")
    expect(page.locator(".notice")).to_contain_text("What you typed into assignee is kept")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".notice")).to_contain_text("Saved assignee.")
    assert path.read_text() == outside.replace("assignee: nic", "assignee: bot")


def test_closing_the_drawer_gives_focus_back_to_the_title_that_opened_it(
    logged_in_page, live_url, inbox
):
    inbox(3)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    title = page.locator("article.card a.title").nth(1)
    opener = title.get_attribute("id")
    title.focus()
    page.keyboard.press("Enter")  # the link, as a mouse click or a screen reader opens it
    expect(page.locator("aside#drawer h1").first).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("aside#drawer h1")).to_have_count(0)
    # It went to <body>: a keyboard user started again from the top of the page.
    expect(page.locator(f"#{opener}")).to_be_focused()
    page.locator(f"#{opener}").click()
    page.locator("aside#drawer [data-close-drawer]").first.click()
    expect(page.locator(f"#{opener}")).to_be_focused()


def test_select_three_cards_with_the_keyboard_and_assign_them(logged_in_page, live_url, inbox):
    paths = inbox(5)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    page.locator("body").focus()
    for _ in range(3):
        page.keyboard.press("j")
        page.keyboard.press("x")
    bar = page.get_by_role("region", name="Selected tasks")
    expect(bar.locator("#bulk-count")).to_have_text("3 selected")
    page.keyboard.press("a")
    dialog = page.get_by_role("dialog", name="Assign 3 tasks")
    expect(dialog).to_be_visible()
    field = dialog.get_by_label("Assignee")
    expect(field).to_be_focused()
    page.keyboard.type("carol")
    page.keyboard.press("Enter")
    expect(page.locator("#bulk-status")).to_contain_text("Assigned 3 tasks.")
    assigned = [p for p in paths if "assignee: carol\n" in p.read_text()]
    assert len(assigned) == 3
    # The cards in the board's own order: the first three of the queued column.
    firsts = page.locator('section[data-status="queued"] article.card').all()[:3]
    keys = {card.get_attribute("id") for card in firsts}
    tasks = Task.objects.filter(assignee="carol")
    assert {f"task-{t.pk}" for t in tasks} == keys
    expect(page.locator('section[data-status="queued"] .badges .who').first).to_contain_text(
        "@carol"
    )
    screenshot(page, "bulk-keyboard-assign")


def test_checkboxes_are_named_and_shift_click_selects_a_range(logged_in_page, live_url, inbox):
    inbox(6)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    first = Task.objects.get(key="t000")
    page.get_by_role("checkbox", name=f"Select {first.title}").check()
    page.get_by_role("checkbox", name="Select Task 4").click(modifiers=["Shift"])
    expect(page.locator("#bulk-count")).to_have_text("5 selected")
    expect(page.locator("input.pick:checked")).to_have_count(5)
    page.get_by_role("button", name="Clear selection").click()
    expect(page.get_by_role("region", name="Selected tasks")).to_be_hidden()


def test_select_all_matching_closes_every_task_of_the_filter_and_undo_restores_bytes(
    logged_in_page, live_url, inbox, consumer_huey, consumer
):
    paths = inbox(300)
    others = inbox.folder / "other.md"
    others.write_text(TASK.format(key="o1", title="Not in the filter").replace("webapp", "ops"))
    Importer("inbox").run([inbox.folder])
    before = {p: p.read_bytes() for p in [*paths, others]}
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox&project=webapp")
    # One page of cards shown of the 300 the filter matches.
    expect(page.locator("article.card")).to_have_count(views.PAGE_SIZE)
    page.locator("article.card input.pick").first.check()
    page.get_by_role("button", name="Select all 300 matching").click()
    expect(page.locator("#bulk-count")).to_have_text(
        "All 300 tasks of this view selected, in every column, shown or not"
    )
    page.get_by_role("button", name="Close…").click()
    dialog = page.get_by_role("dialog", name="Close 300 tasks")
    dialog.get_by_label("Reason for closing").fill("superseded by the 2.0 plan")
    dialog.get_by_role("button", name="Apply").click()
    status = page.locator("#bulk-status")
    expect(status).to_contain_text("Closed 300 tasks.", timeout=60_000)
    screenshot(page, "bulk-close-300")
    for path in paths:
        text = path.read_text()
        assert "status: done\n" in text and "close_reason: superseded by the 2.0 plan\n" in text
    assert others.read_bytes() == before[others]
    assert Task.objects.filter(status="done").count() == 300
    expect(page.locator('section[data-status="done"] .count')).to_have_text("300")
    status.get_by_role("button", name="Undo").click()
    expect(status).to_contain_text("Undid the changes to 300 tasks.", timeout=60_000)
    assert {p: p.read_bytes() for p in before} == before
    assert Task.objects.filter(status="queued").count() == 301


def test_triage_this_view_shows_diffs_and_applies_only_the_accepted(
    logged_in_page, live_url, inbox, consumer_huey, consumer, triage_profile
):
    folder = inbox.folder
    files = {
        "a.md": "---\nid: a\ntitle: Fix the bug in /src/x.py\nproject: web\n---\n# A\n\nText.\n",
        "b.md": "---\nid: b\ntitle: Rename the settings file\nproject: web\n---\n# B\n",
        "c.md": "---\nid: c\ntitle: Other project\nproject: ops\n---\n# C\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    Importer("inbox").run([folder])
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox&project=web")
    page.get_by_role("button", name="Triage this view").click()
    page.wait_for_url(lambda url: "/triage/" in url)
    proposals = page.locator("fieldset.proposal")
    expect(proposals).to_have_count(2, timeout=60_000)
    expect(page.locator(".herd-progress")).to_contain_text("2 of 2 tasks finished")
    a = proposals.filter(has_text="Fix the bug")
    expect(a.locator("pre.diff .d-add").first).to_be_visible()
    expect(a.locator("pre.diff")).to_contain_text("+complexity: mechanical")
    # The dry run wrote nothing.
    assert {n: (folder / n).read_text() for n in files} == files
    screenshot(page, "triage-review")
    page.get_by_role("button", name="Accept all").click()
    proposals.filter(has_text="Rename the settings").get_by_label("Reject").check()
    page.get_by_role("button", name="Apply the accepted").first.click()
    expect(page.get_by_role("status")).to_contain_text("Applied 1, rejected 1.")
    assert "complexity: mechanical" in (folder / "a.md").read_text()
    assert (folder / "b.md").read_text() == files["b.md"]
    assert (folder / "c.md").read_text() == files["c.md"]
    assert Task.objects.get(key="b").status == "queued"
    assert Task.objects.get(key="a").status == "done"


def test_a_review_longer_than_a_page_is_applied_at_once_on_the_consumer(
    logged_in_page, live_url, inbox, consumer_huey, consumer, triage_profile
):
    paths = inbox(130, title="Fix the bug in /src/x{i}.py")
    before = {path: path.read_text() for path in paths}
    herd = Herd.objects.create(
        queue="inbox", profile=triage_profile, size=1, dry_run=True, preflight={"ready": 130}
    )
    worker = Worker("inbox", load_processor("triage"), prefetch=50, herd=herd.pk, dry_run=True)
    while worker.work_one_batch():
        pass
    Herd.objects.filter(pk=herd.pk).update(status=HerdStatus.FINISHED)
    page = logged_in_page
    page.goto(f"{live_url}/triage/{herd.pk}/")
    expect(page.get_by_role("heading", name="130 proposed changes")).to_be_visible()
    expect(page.locator("fieldset.proposal")).to_have_count(100)
    screenshot(page, "triage-review-of-many")
    page.get_by_role("button", name="Apply all 130").click()
    expect(page.get_by_role("status")).to_contain_text("Applied 130, rejected 0.", timeout=60_000)
    expect(page.locator("fieldset.proposal")).to_have_count(0)
    expect(page.get_by_text("No proposal waits for a decision.")).to_be_visible()
    assert all(path.read_text() != before[path] for path in paths)
    assert set(Task.objects.values_list("result__review", flat=True)) == {"applied"}


def test_the_other_keys_edit_mark_done_search_and_list_the_keys(logged_in_page, live_url, inbox):
    paths = inbox(2)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    page.locator("body").focus()
    page.keyboard.press("?")
    expect(page.get_by_role("dialog", name="Keyboard")).to_be_visible()
    page.keyboard.press("Escape")
    page.keyboard.press("j")
    page.keyboard.press("e")
    expect(page.locator("aside#drawer").get_by_label("Title")).to_be_focused()
    page.keyboard.press("Escape")
    page.locator("body").focus()
    page.keyboard.press("j")
    page.keyboard.press("d")  # no selection: the card at hand is marked done
    expect(page.locator('section[data-status="done"] .count')).to_have_text("1")
    assert sum("status: done\n" in p.read_text() for p in paths) == 1
    page.keyboard.press("/")
    expect(page.get_by_role("searchbox", name="Search")).to_be_focused()


def test_d_on_a_card_a_worker_holds_asks_before_it_ends_the_agent(logged_in_page, live_url, inbox):
    """One stray key marked a claimed task done and ended its agent's run, no question."""
    inbox(1)
    Task.objects.update(status="claimed", holder="w1", holder_pid=None)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    page.locator("body").focus()
    page.keyboard.press("j")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.keyboard.press("d")
    page.wait_for_timeout(500)
    assert asked == ["A worker holds this task: end its agent and mark it done?"]
    assert Task.objects.get().status == "claimed"


def test_the_drawer_is_not_read_out_whole_and_its_notice_describes_what_has_the_focus(
    logged_in_page, live_url, inbox
):
    """The drawer was a live region: opening a task read out the whole task (body,
    history) besides its heading, which has the focus; and what the drawer says after a
    save or a reload ("Saved assignee.") was not tied to what had the focus."""
    (path,) = inbox(1)
    task = Task.objects.get(key="t000")
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    drawer = page.locator("aside#drawer")
    assert drawer.get_attribute("aria-live") is None
    open_drawer(page, task)
    heading = drawer.locator("header h1")
    expect(heading).to_be_focused()
    expect(heading).to_have_accessible_description("")
    drawer.get_by_role("link", name="Edit").click()
    drawer.get_by_label("Assignee").fill("bot")
    drawer.get_by_role("button", name="Save").click()
    expect(heading).to_be_focused()
    expect(heading).to_have_accessible_description("Saved assignee.")

    drawer.get_by_role("link", name="Edit").click()
    drawer.get_by_label("Assignee").fill("carol")
    path.write_text(path.read_text().replace("priority: 2", "priority: 0"))
    drawer.get_by_role("button", name="Save").click()
    drawer.get_by_role("button", name="Reload from disk and edit again").click()
    edit = drawer.get_by_role("heading", name="Edit t000")
    expect(edit).to_be_focused()
    expect(edit).to_have_accessible_description(re.compile("What you typed into assignee is kept"))


def test_the_one_letter_keys_can_be_turned_off_and_stay_off(logged_in_page, live_url, inbox):
    """j, x, d and the rest acted on any letter typed outside a field, with no way to
    turn them off: a speech-input user's words, or a stray key, selected and closed tasks."""
    inbox(2)
    page = logged_in_page
    page.goto(f"{live_url}/?queue=inbox")
    page.get_by_role("button", name="Keys (?)").click()
    dialog = page.get_by_role("dialog", name="Keyboard")
    use = dialog.get_by_role("checkbox", name="Use these keys")
    expect(use).to_be_checked()
    use.press("Space")
    dialog.get_by_role("button", name="Close").click()
    page.reload()
    page.locator("body").focus()
    for key in ["j", "x", "?"]:
        page.keyboard.press(key)
    expect(page.locator("#bulk-bar")).to_be_hidden()
    expect(page.locator("dialog[open]")).to_have_count(0)
    assert page.evaluate("document.activeElement === document.body")

    page.get_by_role("button", name="Keys (?)").click()
    expect(use).not_to_be_checked()
    use.press("Space")
    dialog.get_by_role("button", name="Close").click()
    page.locator("body").focus()
    page.keyboard.press("j")
    page.keyboard.press("x")
    expect(page.locator("#bulk-count")).to_have_text("1 selected")
