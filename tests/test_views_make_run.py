"""`make run` is `manage.py start`: first-start setup, then web server and Huey together."""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from django.conf import global_settings
from django.contrib.auth import get_user_model
from django.test import override_settings

from tests.conftest import run_manage, start_manage
from workqueue.models import Queue, Task

pytestmark = pytest.mark.slow  # each starts the web server and a Huey consumer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_setup_creates_one_admin_and_imports_examples_once(process_env):
    first = run_manage(["start", "--setup-only"], process_env)
    assert first.returncode == 0, first.stderr
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["admin"]
    # Shown once, here: no later start can show it (it was made and never shown).
    password = re.search(r"log in as admin with password (\S+)", first.stdout).group(1)
    with override_settings(PASSWORD_HASHERS=global_settings.PASSWORD_HASHERS):
        assert get_user_model().objects.get().check_password(password)  # the real hashers'
    imported = Task.objects.filter(queue="examples").count()
    assert imported >= 5
    # A copy in the data folder: the repository's files are never the ones written.
    copy = (Path(process_env["HYPERVISOR_DATA_DIR"]) / "examples" / "inbox").resolve()
    paths = [Path(p) for p in Task.objects.values_list("source_path", flat=True)]
    assert all(path.is_relative_to(copy) for path in paths), paths
    assert Queue.objects.get(name="examples").folder == str(copy)
    Task.objects.filter(queue="examples").delete()
    again = run_manage(["start", "--setup-only"], process_env)
    assert again.returncode == 0, again.stderr
    assert get_user_model().objects.count() == 1
    assert "password" not in again.stdout
    # Deleted examples stay deleted: the import happens on the first start only.
    assert Task.objects.filter(queue="examples").count() == 0


def test_examples_outside_the_import_roots_are_not_imported_on_a_first_start(
    process_env, tmp_path
):
    """HYPERVISOR_IMPORT_ROOTS set empty ("none") or elsewhere: the board could not write
    the examples' files, and the person chose their own folders."""
    (tmp_path / "elsewhere").mkdir()
    for roots in ("", str(tmp_path / "elsewhere")):
        setup = run_manage(
            ["start", "--setup-only"], {**process_env, "HYPERVISOR_IMPORT_ROOTS": roots}
        )
        assert setup.returncode == 0, setup.stderr
        assert not Task.objects.exists()


def test_start_serves_and_ctrl_c_stops_web_server_and_huey(process_env):
    port = free_port()
    start = start_manage(["start", "--addr", f"127.0.0.1:{port}"], process_env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/") as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the web server never answered"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/css/board.css") as r:
            assert r.status == 200
        children = psutil.Process(start.pid).children()
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("run_huey" in c for c in commands), commands
        assert any("runserver" in c for c in commands), commands
        start.send_signal(signal.SIGINT)
        out, err = start.communicate(timeout=30)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert start.returncode == 0, err
    assert "Hypervisor is running at http://127.0.0.1:" in out
    assert "log in as admin with password" in out
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_start_stops_the_other_process_when_one_dies(process_env):
    port = free_port()
    start = start_manage(["start", "--addr", f"127.0.0.1:{port}"], process_env)
    try:
        deadline = time.monotonic() + 60
        children = []
        while len(children) < 2:
            assert time.monotonic() < deadline, "start never launched its two processes"
            children = psutil.Process(start.pid).children()
            time.sleep(0.1)
        huey = next(c for c in children if "run_huey" in " ".join(c.cmdline()))
        huey.kill()
        out, err = start.communicate(timeout=30)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert start.returncode != 0
    assert "the huey process exited" in err
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_start_on_a_taken_port_fails_before_it_makes_a_password(process_env):
    # It said "running" (another program answered) and showed a password once, for a
    # database no server of ours ran on.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = run_manage(["start", "--addr", f"127.0.0.1:{port}"], process_env)
    assert start.returncode != 0
    assert f"cannot serve on 127.0.0.1:{port}" in start.stderr
    assert f"--addr 127.0.0.1:{port + 1}" in start.stderr
    assert "password" not in start.stdout and "running" not in start.stdout
    assert not get_user_model().objects.exists()
