"""Herds of pulling agents: each worker process serves its own MCP session on 127.0.0.1
and runs one agent that claims tasks over it until QUEUE EMPTY."""

from __future__ import annotations

import json
import signal
import stat
import sys
from pathlib import Path

import psutil
import pytest

from herds.models import ExitClass, Herd, HerdStatus, Profile
from tests.conftest import ROOT, make_tasks, run_manage, start_manage
from tests.test_herds_processes import descendants, launch, processes, wait_until, worker_logs
from workqueue import reaper
from workqueue.models import EventKind, Status, Task, TaskEvent
from workqueue.pull_agent import fill, pull_prompt, write_configs

PULL_AGENT = str(ROOT / "examples" / "agents" / "pull_agent.py")
pytestmark = pytest.mark.slow


def pull_profile(name: str, *agent_args: str, **fields) -> Profile:
    values = {
        "processor": "pull",
        "command": [sys.executable, PULL_AGENT, "--mcp-config", "{mcp_config}", *agent_args],
        "timeout_seconds": 300,
        **fields,
    }
    return Profile.objects.update_or_create(name=name, defaults=values)[0]


def test_a_pull_herd_drains_the_queue_each_task_once_with_summary_and_tokens(huey_env, consumer):
    pull_profile("puller", "--tokens", "7")
    make_tasks("pullq", 30)
    result = run_manage(
        ["herd", "--queue", "pullq", "--profile", "puller", "--workers", "3", "--wait", "--json"],
        huey_env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished", summary
    assert summary["done"] == 30 and summary["blocked"] == 0
    assert len({row["task_id"] for row in summary["workers"]}) == 30
    assert summary["total_tokens"] == 30 * 7
    workers = summary["worker_processes"]
    assert len(workers) == 3
    assert {w["exit_class"] for w in workers} == {ExitClass.FINISHED}
    assert sum(w["done"] for w in workers) == 30  # counted live by the herd's receivers
    assert sum(w["tokens"] for w in workers) == 30 * 7
    herd = Herd.objects.get(pk=summary["herd"])
    names = {f"mcp:herd{herd.pk}-w{w['index']}" for w in workers}
    assert set(Task.objects.values_list("holder", flat=True)) <= names
    assert TaskEvent.objects.filter(kind=EventKind.CLAIMED).count() == 30
    assert Task.objects.filter(status=Status.DONE).count() == 30


def test_a_token_budget_drains_a_pull_herd(huey_env, consumer):
    # Slow enough that the 40 tasks take 20 s: a supervision pass (every 2 s) sees the
    # budget spent long before the queue would be empty, even on a loaded machine.
    pull_profile("costly", "--tokens", "1000", "--sleep", "1")
    make_tasks("budgetq", 40)
    herd_id = launch(
        huey_env,
        *["--queue", "budgetq", "--profile", "costly", "--workers", "2"],
        *["--token-budget", "3000"],
    )
    wait_until(
        lambda: Herd.objects.get(pk=herd_id).ended, 120, what="the herd to end on its budget"
    )
    herd = Herd.objects.get(pk=herd_id)
    assert herd.status == HerdStatus.FINISHED, worker_logs()
    assert herd.reason == "token budget of 3000 reached"
    done = Task.objects.filter(queue="budgetq", status=Status.DONE).count()
    assert 3 <= done < 40
    assert Task.objects.filter(queue="budgetq", status=Status.CLAIMED).count() == 0


def test_cancel_ends_the_pull_workers_and_their_agents_and_puts_tasks_back(
    huey_env, consumer, lock_root
):
    pull_profile("holder", "--hold")
    make_tasks("pullcancel", 5)
    herd_id = launch(huey_env, "--queue", "pullcancel", "--profile", "holder", "--workers", "2")
    herd = Herd.objects.get(pk=herd_id)
    wait_until(
        lambda: Task.objects.filter(queue="pullcancel", status=Status.CLAIMED).count() == 2,
        60,
        what="two claims",
    )
    tree = wait_until(
        lambda: (found := descendants(herd)) and len(found) >= 4 and found,
        30,
        what="two workers with an agent each",
    )
    pids = [(p.pid, p.create_time()) for p in tree]
    herd.request_cancel("cancelled by the test")
    wait_until(
        lambda: Herd.objects.get(pk=herd_id).status == HerdStatus.CANCELLED,
        60,
        what="the herd to be cancelled",
    )
    assert [pid for pid, started in pids if processes.leader(pid, started)] == []
    assert Task.objects.filter(queue="pullcancel", status=Status.QUEUED).count() == 5
    assert list((lock_root / "pullcancel").iterdir()) == []


def test_the_agent_gets_only_its_sessions_url_and_secret(tmp_path, process_env):
    """What a pull agent can see: no database URL, no secret key, a 0600 config; and its
    session's secret is masked in what the worker logs."""
    make_tasks("q", 1)
    probe, seen_file = tmp_path / "probe.py", tmp_path / "seen.json"
    probe.write_text(
        "import json, os, stat, sys\n"
        "config, out = sys.argv[1], sys.argv[3]\n"
        "seen = {'env': dict(os.environ), 'mode': stat.S_IMODE(os.stat(config).st_mode),\n"
        "        'config': json.load(open(config)), 'prompt': sys.argv[2], 'path': config,\n"
        "        'folder': stat.S_IMODE(os.stat(os.path.dirname(config)).st_mode)}\n"
        "open(out, 'w').write(json.dumps(seen))\n"
        "print('my token is', os.environ['HYPERVISOR_MCP_TOKEN'])\n"
    )
    env = {**process_env, "SECRET_KEY": "s3cret-key-never-for-agents", "OTHER_TOKEN": "x" * 20}
    result = run_manage(
        ["work", "--queue", "q", "--processor", "pull", "--",
         sys.executable, str(probe), "{mcp_config}", "{prompt}", str(seen_file)],
        env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(seen_file.read_text())
    agent_env = seen["env"]
    assert "DATABASE_URL" not in agent_env and "SECRET_KEY" not in agent_env
    assert "OTHER_TOKEN" not in agent_env
    assert agent_env["HYPERVISOR_MCP_URL"].startswith("http://127.0.0.1:")
    assert seen["mode"] == 0o600
    # Not below /tmp: Gemini CLI skips a settings file any other user could have written.
    run = Path(process_env["HYPERVISOR_DATA_DIR"], "run")
    assert Path(seen["path"]).parent.parent == run and seen["folder"] == 0o700
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert not list(run.iterdir())  # the session's folder went with it
    server = seen["config"]["mcpServers"]["hypervisor"]
    assert server["url"] == agent_env["HYPERVISOR_MCP_URL"]
    assert server["headers"]["Authorization"] == "Bearer " + agent_env["HYPERVISOR_MCP_TOKEN"]
    assert "queue `q`" in seen["prompt"] and "claim_next_task" in seen["prompt"]
    assert "my token is ********" in result.stdout
    assert agent_env["HYPERVISOR_MCP_TOKEN"] not in result.stdout + result.stderr
    assert Task.objects.get().status == Status.QUEUED


def test_the_local_server_refuses_a_request_without_the_sessions_secret(process_env):
    """Another local user's process that finds the port gets 401."""
    make_tasks("q", 1)
    script = (
        "import os, sys, urllib.request, urllib.error\n"
        "req = urllib.request.Request(os.environ['HYPERVISOR_MCP_URL'], b'{}', "
        "{'Content-Type': 'application/json', 'Authorization': 'Bearer wrong'})\n"
        "try:\n    urllib.request.urlopen(req)\nexcept urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    result = run_manage(
        ["work", "--queue", "q", "--processor", "pull", "--", sys.executable, "-c", script],
        process_env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "401"


def test_placeholders_and_configs(tmp_path):
    paths = write_configs(tmp_path, "http://127.0.0.1:1/mcp", "abc")
    with open(paths["gemini_settings"]) as f:
        gemini = json.load(f)
    assert gemini == {
        "mcpServers": {
            "hypervisor": {
                "httpUrl": "http://127.0.0.1:1/mcp",
                "headers": {"Authorization": "Bearer abc"},
            }
        }
    }
    assert fill(["-p", "{prompt}", "{mcp_config}", "{unknown}"], {"prompt": "{mcp_config}",
                "mcp_config": "/x"}) == ["-p", "{mcp_config}", "/x", "{unknown}"]  # fmt: skip
    assert "{queue}" not in pull_prompt("inbox") and "`inbox`" in pull_prompt("inbox")


def test_gemini_gets_a_home_of_its_own_with_the_users_settings_and_files(tmp_path):
    """Gemini CLI skipped the system settings file we gave it (root owns none of ours):
    its session's server goes into a Gemini home of its own, beside the user's files."""
    user = tmp_path / "user" / ".gemini"
    user.mkdir(parents=True)
    theirs = {"security": {"auth": {"selectedType": "oauth-personal"}}, "mcpServers": {"x": {}}}
    (user / "settings.json").write_text(json.dumps(theirs))
    (user / "oauth_creds.json").write_text("{}")
    (tmp_path / "session").mkdir()
    paths = write_configs(tmp_path / "session", "http://127.0.0.1:1/mcp", "abc", user)
    home = Path(paths["gemini_home"]) / ".gemini"
    assert paths["gemini_settings"] == str(home / "settings.json")
    settings = json.loads((home / "settings.json").read_text())
    assert settings["security"] == theirs["security"]
    assert settings["mcpServers"] == {
        "x": {},
        "hypervisor": {
            "httpUrl": "http://127.0.0.1:1/mcp",
            "headers": {"Authorization": "Bearer abc"},
        },
    }
    assert stat.S_IMODE((home / "settings.json").stat().st_mode) == 0o600
    assert (home / "oauth_creds.json").readlink() == user / "oauth_creds.json"
    assert json.loads((user / "settings.json").read_text()) == theirs  # theirs untouched
    # Settings we cannot read (Gemini also takes comments) give way to ours alone.
    (user / "settings.json").write_text("// a comment\n{}")
    (tmp_path / "again").mkdir()
    paths = write_configs(tmp_path / "again", "http://127.0.0.1:1/mcp", "abc", user)
    assert list(json.loads(Path(paths["gemini_settings"]).read_text())) == ["mcpServers"]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_pull_workers_agent_never_outlives_it_onto_a_task_given_to_another(
    process_env, how, settings
):
    """A pull worker recorded no agent on its claims and had no SIGTERM handler: once it
    was gone its agent (in a session of its own) worked on, while the reaper gave its task
    to the next worker. Now SIGTERM ends the agent and gives the task back; after a
    SIGKILL the reaper ends the agent it finds on the claim before the task goes back."""
    make_tasks("q", 1)
    agent = str(ROOT / "examples" / "agents" / "pull_agent.py")
    worker = start_manage(
        [
            "work", "--queue", "q", "--processor", "pull", "--name", "pull-1", "--",
            sys.executable, agent, "--mcp-config", "{mcp_config}", "--hold",
        ],
        process_env,
    )  # fmt: skip
    try:
        wait_until(lambda: Task.objects.filter(status=Status.CLAIMED).exists(), 60)
        task = Task.objects.get()
        agents = psutil.Process(worker.pid).children(recursive=True)
        assert task.agent_pgid in [p.pid for p in agents]
        worker.send_signal(how)
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    settings.HYPERVISOR_DATA_DIR = process_env["HYPERVISOR_DATA_DIR"]
    sessions = Path(process_env["HYPERVISOR_DATA_DIR"], "run")
    if how == signal.SIGKILL:
        assert Task.objects.get().status == Status.CLAIMED  # held by a dead pid
        left = list(sessions.glob("pull-*"))  # its config files: nothing removed them
        assert len(left) == 1
        report = reaper.release_stale_claims("q")
        assert [s.task.key for s in report.requeued] == [task.key]
        assert left[0] in report.orphan_locks
    else:
        assert worker.returncode == 0
    assert not list(sessions.glob("pull-*"))
    assert not [p.pid for p in agents if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert Task.objects.get().status == Status.QUEUED
