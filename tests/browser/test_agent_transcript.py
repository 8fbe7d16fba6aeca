"""The live transcript of a running agent in a real Chromium: the drawer shows the fake
Claude Code's tool call while the agent still runs, as escaped text, without a reload."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from playwright.sync_api import expect

from tests.browser.conftest import screenshot, wait_until
from tests.conftest import start_manage
from tests.test_agent_profiles import FAKES, shipped_profile, task_files
from workqueue.models import Status, Task


def test_drawer_shows_the_agents_tool_call_while_it_runs(
    logged_in_page, live_url, process_env, settings, tmp_path, write_task
):
    page = logged_in_page
    # The live server reads transcripts where the worker writes them.
    settings.HYPERVISOR_DATA_DIR = Path(process_env["HYPERVISOR_DATA_DIR"])
    shipped_profile("claude", tmp_path / "ledger.jsonl")
    (task,) = task_files(write_task, "live", ["slow"])
    env = {**process_env, "PATH": f"{FAKES}{os.pathsep}{os.environ['PATH']}"}
    worker = start_manage(["work", "--queue", "live", "--profile", "claude"], env)
    try:
        wait_until(lambda: Task.objects.get(pk=task.pk).status == Status.CLAIMED, 30)
        page.goto(f"{live_url}/?queue=live")
        page.evaluate("window.__notReloaded = true")
        page.locator(f"#task-{task.pk} a.title").click()
        transcript = page.locator(f"#transcript-{task.pk}")
        tool = transcript.locator(".entry-tool")
        expect(tool.locator(".tool-name")).to_have_text("Read", timeout=20_000)
        # Still running: the fake agent waits for its release file.
        assert Task.objects.get(pk=task.pk).status == Status.CLAIMED
        assert worker.poll() is None
        expect(tool.locator(".text")).to_have_text("file_path=<img src=x onerror=alert(1)>.py")
        assert transcript.locator("img").count() == 0  # markup from the agent stays text
        assert "{" not in transcript.inner_text()  # never raw JSON
        screenshot(page, "agent-transcript-live")

        Path(task.source_path + ".release").touch()
        assert worker.wait(timeout=60) == 0
        # The drawer's polling picks up the end: no longer live, the final message shown.
        expect(transcript.locator(".entry-assistant").last).to_contain_text(
            f"COMPLETED: {task.key}", timeout=20_000
        )
        expect(transcript.locator("h2")).not_to_contain_text("live", timeout=20_000)
        assert page.evaluate("window.__notReloaded === true")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)


def test_the_drawers_transcript_is_put_in_again_only_when_it_changed(
    logged_in_page, live_url, settings, tmp_path
):
    """The drawer is a live region, and its running agent's transcript was put in anew
    every 2 s, the same or not: a screen reader could read it all out every 2 s."""
    from tests.test_agent_views import running_task, write_transcript

    settings.HYPERVISOR_DATA_DIR = tmp_path / "data"
    task = running_task()
    write_transcript(task, ("tool", "file_path=a.py", "Read"))
    page = logged_in_page
    page.goto(f"{live_url}/?queue=q")
    page.locator(f"#task-{task.pk} a.title").click()
    transcript = page.locator(f"#transcript-{task.pk}")
    expect(transcript.locator(".tool-name")).to_have_text("Read")
    page.evaluate(
        "() => { window.__polls = 0; window.__changes = 0;"
        " document.addEventListener('htmx:afterRequest', (e) => {"
        "   if (e.detail.pathInfo.requestPath.includes('/transcript/')) window.__polls++; });"
        " new MutationObserver(() => window.__changes++).observe("
        "   document.getElementById('drawer'), {childList: true, subtree: true,"
        "   characterData: true}); }"
    )
    wait_until(lambda: page.evaluate("window.__polls") >= 2, 10, "the transcript never polled")
    assert page.evaluate("window.__changes") == 0

    write_transcript(task, ("tool", "file_path=a.py", "Read"), ("tool", "b.py", "Edit"))
    expect(transcript.locator(".tool-name")).to_have_text(["Read", "Edit"])
    changes = page.evaluate("window.__changes")
    assert changes > 0
    page.evaluate("window.__polls = 0")
    wait_until(lambda: page.evaluate("window.__polls") >= 2, 10, "the transcript stopped polling")
    assert page.evaluate("window.__changes") == changes
