"""Settings come from the environment; bad or missing values stop start-up with a clear error."""

import os
import secrets
import socket
import subprocess
import sys

import pytest

from tests.conftest import MANAGE, ROOT


def manage_check(extra_env: dict, *args: str) -> subprocess.CompletedProcess:
    # The browser tests' conftest sets DJANGO_ALLOW_ASYNC_UNSAFE for Playwright's loop;
    # a deployment never has it.
    unset = ("SECRET_KEY", "DJANGO_DEBUG", "DJANGO_ALLOW_ASYNC_UNSAFE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, MANAGE, "check", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_documented_production_settings_pass_check_deploy():
    env = {
        "HYPERVISOR_PRODUCTION": "1",
        "SECRET_KEY": secrets.token_urlsafe(60),
        "ALLOWED_HOSTS": "hypervisor.example.com",
    }
    result = manage_check(env, "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_production_without_secret_key_refuses_to_start():
    result = manage_check({"HYPERVISOR_PRODUCTION": "1"})
    assert result.returncode != 0
    assert "SECRET_KEY must be set when HYPERVISOR_PRODUCTION is on" in result.stderr


def test_unset_import_roots_are_the_examples_so_new_tasks_work_after_make_run(tmp_path):
    # `make run` imports examples/inbox on a first start; "New task" writes only inside the
    # configured roots, so with none set it refused the one queue a new user has.
    # They are a copy in the data folder: workers and the board write into task files.
    env = {k: v for k, v in os.environ.items() if k != "HYPERVISOR_IMPORT_ROOTS"}
    env["HYPERVISOR_DATA_DIR"] = str(tmp_path)
    show = "from django.conf import settings; print(settings.HYPERVISOR_IMPORT_ROOTS)"
    args = [sys.executable, MANAGE, "shell", "--no-imports", "-c", show]
    unset = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert unset.stdout.strip() == repr([(tmp_path / "examples").resolve()]), unset.stderr
    env["HYPERVISOR_IMPORT_ROOTS"] = ""
    empty = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert empty.stdout.strip() == "[]", empty.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("HYPERVISOR_LEASE_SECONDS", "abc", "HYPERVISOR_LEASE_SECONDS must be a whole number"),
        ("HYPERVISOR_MAX_FILE_BYTES", "0", "HYPERVISOR_MAX_FILE_BYTES must be at least 1"),
        # A lease no date can hold: each claim raised OverflowError.
        ("HYPERVISOR_LEASE_SECONDS", "9" * 20, "HYPERVISOR_LEASE_SECONDS must be at most"),
        ("DJANGO_DEBUG", "maybe", "DJANGO_DEBUG must be true or false"),
        ("HYPERVISOR_IMPORT_ROOTS", "/nonexistent/folder", "HYPERVISOR_IMPORT_ROOTS:"),
        ("DATABASE_URL", "nosuchdb://x", "DATABASE_URL is not a valid database URL"),
        ("HYPERVISOR_METRICS_TOKEN", "short", "HYPERVISOR_METRICS_TOKEN must be at least 32"),
        # A folder no one may make there: a traceback of pathlib's, not the variable's name.
        ("HYPERVISOR_DATA_DIR", "/proc/hypervisor", "HYPERVISOR_DATA_DIR: cannot make /proc/"),
    ],
)
def test_bad_environment_value_names_the_variable(name, value, message):
    result = manage_check({name: value})
    assert result.returncode != 0
    assert message in result.stderr


def test_a_bad_setting_or_a_database_out_of_reach_is_one_line_not_a_traceback(tmp_path):
    # An operator's mistake in the environment printed forty lines of Django's internals
    # before the sentence that names it, on every command.
    bad = manage_check({"HYPERVISOR_LEASE_SECONDS": "abc"})
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "manage.py check: settings: HYPERVISOR_LEASE_SECONDS must be a whole number, not 'abc'"
    ]
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/no-such-folder/db.sqlite3"
    args = [sys.executable, MANAGE, "queue_stats", "--queue", "inbox"]
    unreachable = subprocess.run(
        args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines() == [
        "manage.py queue_stats: database: unable to open database file"
    ]
    # --traceback still shows where.
    traced = subprocess.run(
        [*args, "--traceback"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "Traceback" in traced.stderr


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_consumer_that_cannot_reach_its_queue_or_the_database_says_so_and_stops(tmp_path):
    # It ran on: its threads took launches off the shared queue only to fail them without
    # a database, or logged a traceback each four times a second without Redis.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env["HUEY_REDIS_URL"] = f"redis://127.0.0.1:{closed_port()}/0"
    env["DATABASE_URL"] = (
        f"sqlite:///{tmp_path}/db.sqlite3"  # a database it reaches, in both passes
    )
    args = [sys.executable, MANAGE, "run_huey"]
    no_redis = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert no_redis.returncode == 1
    [line] = no_redis.stderr.strip().splitlines()
    assert line.startswith("CommandError: cannot reach Huey's queue: Error 111 connecting to")
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/no-such-folder/db.sqlite3"
    no_db = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert no_db.returncode == 1
    assert no_db.stderr.strip().splitlines() == [
        "manage.py run_huey: database: unable to open database file"
    ]
    # And once running, a thread whose read of Redis failed waits longer each time: a
    # handful of reads in the first minute, then one each 10 s, not four a second (what
    # the log says of them: tests/test_consumer_outage.py).
    show = (
        "from django.conf import settings; c = settings.HUEY['consumer']; "
        "print(c['initial_delay'], c['backoff'], c['max_delay'])"
    )
    shown = subprocess.run(
        [sys.executable, MANAGE, "shell", "--no-imports", "-c", show],
        env={**env, "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    delay, backoff, longest = map(float, shown.stdout.split())
    failures = waited = 0
    while waited < 60:  # huey's Worker.sleep after each failed read
        failures, waited = failures + 1, waited + min(delay, longest)
        delay *= backoff
    assert longest == 10
    assert failures <= 15


def test_a_new_sqlite_database_is_made_in_wal_mode_with_16_kib_pages(tmp_path):
    # Runs in both passes: the embedded default is SQLite whatever the suite runs on.
    database = tmp_path / "fresh.sqlite3"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}"}
    script = (
        "import django; django.setup(); from django.db import connection; "
        "c = connection.cursor(); c.execute('PRAGMA page_size'); a = c.fetchone()[0]; "
        "c.execute('PRAGMA journal_mode'); print(a, c.fetchone()[0])"
    )
    env["DJANGO_SETTINGS_MODULE"] = "hypervisor_site.settings"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.stdout.split() == ["16384", "wal"], result.stderr


def test_a_metrics_token_read_from_a_file_loses_its_final_newline():
    """A mounted secret keeps its file's newline; the scraper's token never has one, and
    every scrape was 401 "wrong metrics token"."""
    env = {**os.environ, "HYPERVISOR_METRICS_TOKEN": "m" * 40 + "\n"}
    show = "from django.conf import settings; print(repr(settings.HYPERVISOR_METRICS_TOKEN))"
    args = [sys.executable, MANAGE, "shell", "--no-imports", "-c", show]
    shown = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == repr("m" * 40), shown.stderr
