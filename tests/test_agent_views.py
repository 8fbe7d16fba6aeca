"""What people see of agents: transcripts, tokens and cost, sessions, quota, budgets,
the webhook. Logged in, with permissions, escaped, and never raw JSON."""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from herds import tasks as herd_tasks
from herds.models import ExitClass, Herd, HerdStatus
from tests.test_agent_profiles import FAKES, shipped_profile
from tests.test_herds_views import client_for, user_with
from workqueue.agents import Transcript
from workqueue.models import Status, Task
from workqueue.processing import Claim
from workqueue.processors import transcript_path

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path):
    settings.HYPERVISOR_DATA_DIR = tmp_path / "data"
    return settings.HYPERVISOR_DATA_DIR


@pytest.fixture
def watcher():
    return user_with("watcher", "view_task", "view_herd")


def running_task(queue="q", key="k1", herd=None) -> Task:
    return Task.objects.create(
        queue=queue,
        key=key,
        title="Fix it",
        status=Status.CLAIMED,
        fence=3,
        holder="herd1-w0",
        holder_herd=herd,
    )


def write_transcript(task: Task, *entries: tuple) -> None:
    transcript = Transcript(transcript_path(task.pk, task.fence))
    for entry in entries:
        transcript.add(*entry)
    transcript.write(force=True)


def test_transcript_needs_login_and_view_permission(watcher):
    task = running_task()
    url = reverse("task-transcript", args=[task.pk])
    assert client_for(None).get(url).status_code == 302
    assert client_for(user_with("nobody")).get(url).status_code == 403
    assert client_for(watcher).get(url).status_code == 200


def test_transcript_is_escaped_text_and_polls_only_while_claimed(watcher):
    task = running_task()
    write_transcript(
        task,
        ("tool", "file_path=<script>alert(1)</script>", "Read"),
        ("assistant", 'I said {"type": "json"} & <b>more</b>'),
    )
    page = client_for(watcher).get(reverse("task-transcript", args=[task.pk])).content.decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;more&lt;/b&gt;" in page and 'hx-trigger="every 2s"' in page
    assert '<strong class="tool-name">Read</strong>' in page

    Task.objects.filter(pk=task.pk).update(status=Status.DONE)
    page = client_for(watcher).get(reverse("task-transcript", args=[task.pk])).content.decode()
    assert "hx-trigger" not in page and "&lt;script&gt;" in page


def test_a_broken_transcript_file_shows_nothing_rather_than_an_error(watcher):
    task = running_task()
    path = transcript_path(task.pk, task.fence)
    path.parent.mkdir(parents=True)
    path.write_text('{"entries": [1, "x", {"kind": "tool"')
    response = client_for(watcher).get(reverse("task-transcript", args=[task.pk]))
    assert (
        response.status_code == 200 and "Nothing from the agent yet" in response.content.decode()
    )


def test_a_transcript_an_agent_swapped_for_a_fifo_or_a_link_is_not_read(watcher, tmp_path):
    """An agent runs as our user and can replace its transcript file: a FIFO held every
    request that read it (the drawer, its poll, the herd page with its cancel button) until
    something wrote to it, and a link was read through."""
    herd = Herd.objects.create(
        queue="q", profile=shipped_profile("claude", Path("/nonexistent")), size=1
    )
    task = running_task(herd=herd.pk)
    path = transcript_path(task.pk, task.fence)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    # Opened for writing, a FIFO waits for a reader: whether a page opened it shows here.
    read = threading.Event()

    def writer():
        with open(path, "wb"):
            read.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    client = client_for(watcher)
    urls = [reverse(name, args=[task.pk]) for name in ("task-transcript", "task-detail")]
    for url in [*urls, reverse("herds:detail", args=[herd.pk])]:
        response = client.get(url)
        assert response.status_code == 200, url
        assert not read.is_set(), f"{url} opened the FIFO"
    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
    thread.join()

    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"entries": [{"kind": "tool", "text": "not its own"}]}))
    path.unlink()
    path.symlink_to(elsewhere)
    for url in urls:
        assert "not its own" not in client.get(url).content.decode(), url


def test_a_link_at_a_transcripts_temporary_name_is_not_written_through(tmp_path):
    """The worker writes the transcript through `.<name>.<pid>.tmp` beside it, a name the
    agent (our user) can guess: a link planted there had what it led to overwritten."""
    path = tmp_path / "t" / "transcript.json"
    path.parent.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("kept")
    (path.parent / f".{path.name}.{os.getpid()}.tmp").symlink_to(victim)
    transcript = Transcript(path)
    transcript.add("tool", "ran ls")
    transcript.close()
    assert victim.read_text() == "kept"
    assert [e["text"] for e in json.loads(path.read_text())["entries"]] == ["ran ls"]


def test_drawer_and_card_show_tokens_cost_session_and_resume_command(watcher):
    task = Task.objects.create(
        queue="q",
        key="k2",
        title="Done one",
        status=Status.DONE,
        fence=1,
        tokens=187172,
        cost_usd=Decimal("0.2416735"),
        result={
            "agent": "claude",
            "tokens": {
                "input": 18,
                "output": 2577,
                "cache_read": 169817,
                "cache_write": 14760,
                "total": 187172,
            },
            "session_id": "22795ca6",
            "resume": "claude --resume 22795ca6",
            "model": "claude-opus-4-6",
            "turns": 15,
            "final_message": "Done.\n\nCOMPLETED: k2",
        },
    )
    drawer = client_for(watcher).get(reverse("task-detail", args=[task.pk])).content.decode()
    assert "cache read 169817" in drawer and "$0.2417" in drawer
    assert "<code>claude --resume 22795ca6</code>" in drawer and "15 turns" in drawer
    board = client_for(watcher).get(reverse("board") + "?queue=q").content.decode()
    assert "187172 tokens · $0.2417" in board


def test_herd_page_shows_cost_quota_reset_resume_webhook_and_live_transcripts(watcher):
    profile = shipped_profile("claude", Path("/nonexistent"))
    resets = timezone.now() + timedelta(hours=1)
    herd = Herd.objects.create(
        queue="q",
        profile=profile,
        size=1,
        status=HerdStatus.RUNNING,
        quota_resets_at=resets,
        resume_after_quota=True,
        cost_budget_usd=Decimal("5"),
        webhook_result="webhook failed: HTTP 500 Internal Server Error",
    )
    herd.workers.create(index=0, name="herd1-w0", host="h", cost_usd=Decimal("0.125"))
    task = running_task(herd=herd.pk)
    write_transcript(task, ("tool", "command=<i>ls</i>", "Bash"))
    page = client_for(watcher).get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "$0.1250" in page and "Budgets:" in page and "$5" in page
    assert "Quota or rate limit reached; it resets at" in page
    assert resets.strftime("%Y-%m-%d %H:%M") in page
    assert "webhook failed: HTTP 500" in page
    assert "What the agents are doing" in page and "&lt;i&gt;ls&lt;/i&gt;" in page


def test_a_herd_page_shows_its_agents_transcripts_only_to_those_who_may_see_the_tasks():
    """A task's transcript and title take queue.view_task on the task's page and its
    poll: the herd page showed them to anyone who may see herds."""
    herd = Herd.objects.create(
        queue="q", profile=shipped_profile("claude", Path("/nonexistent")), size=1
    )
    task = running_task(herd=herd.pk)
    write_transcript(task, ("tool", "cat secrets.env", "Bash"))
    herds_only = client_for(user_with("herds-only", "view_herd", "add_herd"))
    urls = [reverse(name, args=[herd.pk]) for name in ("herds:detail", "herds:live")]
    for url in urls:
        page = herds_only.get(url).content.decode()
        assert "cat secrets.env" not in page and "Fix it" not in page, url
    drained = herds_only.post(reverse("herds:drain", args=[herd.pk]), HTTP_HX_REQUEST="true")
    assert drained.status_code == 200 and "cat secrets.env" not in drained.content.decode()
    watcher = client_for(user_with("watcher", "view_herd", "view_task"))
    assert "cat secrets.env" in watcher.get(urls[0]).content.decode()


def test_the_page_of_a_herd_whose_agents_report_no_cost_says_so_not_zero(watcher):
    profile = shipped_profile("gemini", Path("/nonexistent"))
    herd = Herd.objects.create(queue="q", profile=profile, size=1, status=HerdStatus.RUNNING)
    herd.workers.create(index=0, name="herd1-w0", host="h", tokens=3624)
    page = client_for(watcher).get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "3,624 tokens · no cost reported" in page and "$0.0000" not in page


def test_launch_form_takes_budgets_and_resume_after_quota(
    watcher, django_capture_on_commit_callbacks
):
    operator = user_with("op", "view_herd", "add_herd")
    shipped_profile("claude", Path("/nonexistent"))
    Task.objects.create(queue="inbox", key="a")
    form = {
        "queue": "inbox",
        "profile": "claude",
        "workers": 1,
        "batch": 0,
        "where": "",
        "token_budget": 5000,
        "wall_clock_limit": 600,
        "cost_budget_usd": "2.50",
        "resume_after_quota": "on",
        "confirm": "1",
    }
    with django_capture_on_commit_callbacks(execute=False):
        response = client_for(operator).post(reverse("herds:launch"), form)
    assert response.status_code == 302
    herd = Herd.objects.get()
    assert (herd.token_budget, herd.wall_clock_limit, herd.cost_budget_usd) == (
        5000,
        600,
        Decimal("2.50"),
    )
    assert herd.resume_after_quota
    bad = client_for(operator).post(reverse("herds:launch"), {**form, "cost_budget_usd": "-1"})
    assert bad.status_code == 400 and Herd.objects.count() == 1


def test_launch_preflight_says_when_the_cli_is_missing_and_offers_no_start(monkeypatch):
    operator = user_with("op", "view_herd", "add_herd")
    shipped_profile("gemini", Path("/nonexistent"))
    Task.objects.create(queue="inbox", key="a")
    form = {"queue": "inbox", "profile": "gemini", "workers": 1, "batch": 0}
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    page = client_for(operator).post(reverse("herds:launch"), form).content.decode()
    assert "Cannot start: gemini is not on the workers&#x27; PATH" in page
    assert 'name="confirm"' not in page
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}/usr/bin:/bin")
    page = client_for(operator).post(reverse("herds:launch"), form).content.decode()
    assert "gemini: gemini fake 1.0" in page and 'name="confirm"' in page


class Receiver(BaseHTTPRequestHandler):
    status = 204
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def ended_herd(status=HerdStatus.FINISHED, **fields) -> Herd:
    profile = shipped_profile("codex", Path("/nonexistent"))
    herd = Herd.objects.create(
        queue="q", profile=profile, size=1, status=HerdStatus.RUNNING, **fields
    )
    herd.finish(status, "all done")
    return herd


def test_webhook_posts_the_run_summary_when_a_herd_ends(receiver, settings, watcher):
    settings.HYPERVISOR_HERD_WEBHOOK = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    herd = ended_herd()
    herd_tasks.herd_ended.call_local(herd.pk)
    ((content_type, summary),) = Receiver.received
    assert content_type == "application/json"
    assert summary["herd"] == herd.pk and summary["status"] == "finished"
    assert "total_cost_usd" in summary and "total_tokens" in summary
    herd.refresh_from_db()
    assert herd.webhook_result == "webhook delivered (HTTP 204)"


def test_a_failing_webhook_is_logged_and_shown(receiver, settings, watcher, caplog):
    Receiver.status = 500
    settings.HYPERVISOR_HERD_WEBHOOK = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    herd = ended_herd()
    herd_tasks.herd_ended.call_local(herd.pk)
    Receiver.status = 204
    herd.refresh_from_db()
    assert herd.webhook_result.startswith("webhook failed: HTTP 500")
    assert "webhook failed" in caplog.text
    page = client_for(watcher).get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "webhook failed: HTTP 500" in page


def test_an_unreachable_webhook_fails_fast(settings):
    settings.HYPERVISOR_HERD_WEBHOOK = "http://127.0.0.1:9/nothing-listens"
    settings.HYPERVISOR_HERD_WEBHOOK_TIMEOUT = 2
    herd = ended_herd()
    herd_tasks.herd_ended.call_local(herd.pk)
    herd.refresh_from_db()
    assert herd.webhook_result.startswith("webhook failed:")


def test_webhook_setting_must_be_http(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from hypervisor_site.env import envurl

    monkeypatch.setenv("HYPERVISOR_HERD_WEBHOOK", "file:///etc/passwd")
    with pytest.raises(ImproperlyConfigured, match="http:// or https://"):
        envurl("HYPERVISOR_HERD_WEBHOOK")


def test_a_quota_end_schedules_the_same_herd_at_the_reset_time(monkeypatch):
    scheduled = []
    monkeypatch.setattr(
        herd_tasks.resume_herd, "schedule", lambda args, delay: scheduled.append((args, delay))
    )
    resets = timezone.now() + timedelta(minutes=30)
    herd = ended_herd(HerdStatus.QUOTA, resume_after_quota=True, quota_resets_at=resets)
    herd.workers.create(index=0, name="w", host="h", exit_class=ExitClass.QUOTA)

    herd_tasks.herd_ended.call_local(herd.pk)
    herd_tasks.herd_ended.call_local(herd.pk)  # once only

    herd.refresh_from_db()
    assert herd.resume_at == resets
    ((args, delay),) = scheduled
    assert args == (herd.pk,) and 1790 < delay <= 1800
    monkeypatch.setattr(herd_tasks, "launch_herd", lambda pk: None)  # no consumer here
    resumed = herd.resume()
    assert herd.resume() is None  # once
    assert (resumed.queue, resumed.size, resumed.profile, resumed.resumed_from) == (
        "q",
        1,
        herd.profile,
        herd,
    )
    assert resumed.resume_after_quota and resumed.status == HerdStatus.PENDING


def test_without_a_reset_time_the_backoff_decides(monkeypatch, settings):
    settings.HYPERVISOR_QUOTA_BACKOFF = 120
    scheduled = []
    monkeypatch.setattr(
        herd_tasks.resume_herd, "schedule", lambda args, delay: scheduled.append(delay)
    )
    herd = ended_herd(HerdStatus.QUOTA, resume_after_quota=True)
    herd_tasks.herd_ended.call_local(herd.pk)
    assert len(scheduled) == 1 and 110 < scheduled[0] <= 120


def test_no_resume_unless_asked_or_ended_by_quota(monkeypatch):
    scheduled = []
    monkeypatch.setattr(herd_tasks.resume_herd, "schedule", lambda *a, **k: scheduled.append(a))
    herd_tasks.herd_ended.call_local(ended_herd(HerdStatus.QUOTA).pk)
    herd_tasks.herd_ended.call_local(ended_herd(resume_after_quota=True).pk)
    assert scheduled == []


def test_admin_makes_an_agent_profile_and_refuses_a_command_for_it():
    from django.contrib.auth.models import User

    from herds.models import Profile

    admin = User.objects.create_superuser("admin", password="pw-for-tests")
    form = {
        "name": "claude-fast",
        "processor": "command",
        "adapter": "claude",
        "model": "haiku",
        "extra_args": '["--fallback-model", "sonnet"]',
        "max_turns": 20,
        "command": "[]",
        "env": "{}",
        "pass_env": '["ANTHROPIC_API_KEY"]',
        "filters": "[]",
        "prefetch": 1,
        "max_workers": 2,
        "worktree_base": "main",
        "created_at_0": "2026-12-01",
        "created_at_1": "10:00:00",
    }
    client = client_for(admin)
    bad = client.post(reverse("admin:herds_profile_add"), {**form, "command": '["claude"]'})
    assert bad.status_code == 200 and "builds its own command line" in bad.content.decode()
    done = client.post(reverse("admin:herds_profile_add"), form)
    assert done.status_code == 302, done.context["adminform"].form.errors
    profile = Profile.objects.get(name="claude-fast")
    args = profile.build_processor().arguments(Claim(1, "q", "k", "t", "/p.md", 1))
    assert args[:2] == ["claude", "-p"] and args[args.index("--model") + 1] == "haiku"
    assert args[args.index("--max-turns") + 1] == "20" and "--fallback-model" in args
    listing = client.get(reverse("admin:herds_profile_changelist")).content.decode()
    assert "claude-fast" in listing and "Claude Code" in listing
