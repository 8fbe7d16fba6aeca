"""A worker starts often and in herds: what it loads before its first claim stays small."""

import json
import subprocess
import sys

from django.conf import settings

from herds.models import Profile
from tests.conftest import MANAGE, ROOT
from workqueue.models import Queue

# Each of these was once loaded by every worker, for pages, logins, the admin, the MCP
# tools, the task editor or the Huey consumer, none of which a worker uses.
NOT_FOR_WORKERS = [
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
    "axes",
    "csp.apps",
    "django_htmx",
    "template_partials",
    "workqueue.admin",
    "workqueue.views",
    "workqueue.forms",
    "workqueue.rendering",
    "markdown_it",
    "nh3",
    "workqueue.pull",
    "workqueue.editing",
    "yaml",
    "mcp",
    "uvicorn",
    "workqueue.agents",
    "workqueue.agent_tree",
    "herds.views",
    "herds.forms",
    "huey",
    "redis",
]

# Runs manage.py as `python manage.py ARGS...` does, then reports what the process loaded
# (also when the command fails).
REPORT = """
import atexit, gc, json, runpy, sys
manage, report, *args = sys.argv[1:]

def write_report():
    with open(report, "w") as f:
        json.dump({"modules": sorted(sys.modules), "gc_enabled": gc.isenabled(),
                   "frozen": gc.get_freeze_count()}, f)

atexit.register(write_report)
sys.argv = [manage, *args]
runpy.run_path(manage, run_name="__main__")
"""


def run_command(process_env, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-c", REPORT, MANAGE, str(report), *args],
        env=process_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, json.loads(report.read_text())


def start_worker(process_env, tmp_path, queue: str = "nothing-queued") -> tuple[dict, dict]:
    done, report = run_command(process_env, tmp_path, "work", "--queue", queue, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), report


def test_worker_on_an_empty_queue_loads_none_of_the_web_or_agent_modules(process_env, tmp_path):
    summary, report = start_worker(process_env, tmp_path)
    assert summary["claimed"] == 0
    loaded = set(report["modules"])
    # What a worker does need is there: the run above was a real one.
    assert {"workqueue.worker", "workqueue.claims", "herds.receivers"} <= loaded
    assert [name for name in NOT_FOR_WORKERS if name in loaded] == []


def test_forked_workers_find_their_finish_path_loaded_by_the_parent(process_env, tmp_path):
    # Each of 8 forked no-op workers imported the file-writing finish on its first batch,
    # 0.1-0.2 s of CPU each on the cores its siblings worked on; the parent loads it once.
    Queue.objects.get_or_create(name="nothing-queued")
    done, report = run_command(
        process_env, tmp_path, "work", "--queue", "nothing-queued", "--workers", "2", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["claimed"] for line in done.stdout.splitlines()] == [0, 0]
    assert "workqueue.editing" in report["modules"]


def test_worker_collects_garbage_again_once_django_is_loaded(process_env, tmp_path):
    _, report = start_worker(process_env, tmp_path)
    # manage.py turns the collector off while Django loads; left off, a long-running worker
    # would keep every reference cycle it ever made.
    assert report["gc_enabled"] is True
    assert report["frozen"] > 10_000


def test_the_web_server_keeps_every_app():
    # This process is not `manage.py work`: the admin, logins and pages have their apps.
    assert not settings.HYPERVISOR_WORKER_PROCESS
    assert set(settings.WEB_ONLY_APPS).issubset(settings.INSTALLED_APPS)
    assert "axes.backends.AxesStandaloneBackend" in settings.AUTHENTICATION_BACKENDS


def test_no_command_but_mcp_loads_the_mcp_sdk_and_herd_starts_lean(process_env, tmp_path):
    # The SDK takes half a second to load, and Django's checks loaded it through the
    # URLconf for every command; a herd's launch is timed from its command.
    Profile.objects.get_or_create(name="noop", defaults={"processor": "noop"})
    Queue.objects.get_or_create(name="q")
    herd, report = run_command(
        process_env, tmp_path, "herd", "--queue", "q", "--profile", "noop", "--workers", "1"
    )
    assert herd.returncode == 0, herd.stderr
    assert "launched" in herd.stdout
    assert "mcp" not in report["modules"]
    # Like a worker, it loads without the pages' apps (Huey it needs, to enqueue the launch).
    pages = ["axes", "django_htmx", "template_partials", "workqueue.views", "herds.views"]
    assert [name for name in pages if name in report["modules"]] == []
    for args in [("reap_locks",), ("queue_stats",), ("import_tasks", "--queue", "q", ".")]:
        done, report = run_command(process_env, tmp_path, *args)
        # These run Django's checks, so the URLconf and the MCP endpoint's view are loaded.
        assert "pull_api.views" in report["modules"], (args, done.stderr)
        assert "mcp" not in report["modules"], args
