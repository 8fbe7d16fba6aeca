"""Start worker processes from a fork server that has Django loaded already.

A fresh `manage.py work` spends most of a second importing Django, Huey and the database
drivers before its first claim; forking a process that did it once starts a worker in
milliseconds. The fork server is a child of the Huey consumer and holds no database
connection; each worker opens its own, in its own session (process group).

The fork server lives as long as the consumer, not as long as a launch task: it is the
workers' parent, waits on each one as it exits (no zombies) and sends its exit status back
to the consumer, where any supervision pass reads it. If the consumer dies, the fork server
exits too and the workers, in their own sessions, go on; the next consumer judges them by
psutil and the exit code each worker reported itself.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker
import os
import sys
import threading
from pathlib import Path

from hypervisor_site.env import SERVER_SECRETS
from hypervisor_site.privacy import hide_environment

PRELOAD_FLAG = "HYPERVISOR_ZYGOTE_PRELOAD"
_context = multiprocessing.get_context("forkserver")
# Imported once by the fork server itself (this module, run as a preload, sets Django up).
_context.set_forkserver_preload(["herds.zygote"])


class WorkerProcess:
    """A started worker, with the poll/wait calls of a Popen."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid
        # Passes in several consumer threads may ask at once; the status is read from a
        # socket once, and a second reader racing the first would take the EOF for a 255.
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        with self._lock:
            self.process.join(timeout)
            return self.process.exitcode


def start(args: list[str], env: dict[str, str], log_path: Path) -> WorkerProcess:
    """Start `manage.py work ARGS` as a fork of the server, logging to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Made here, so that a data dir out of space or inodes is the launcher's error (the
    # herd's worker row says "could not start: ..."), not a fork that dies unheard.
    os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    warm_up()
    process = _context.Process(target=run_worker, args=(args, env, str(log_path)))
    process.start()
    # Workers outlive a restarted consumer (supervision picks them up again), so the
    # consumer must not join them at exit as multiprocessing does for its children.
    multiprocessing.process._children.discard(process)
    return WorkerProcess(process)


_warming = threading.Lock()


def warm_up() -> None:
    """Start the fork server (once) rather than at the first launch."""
    with _warming:
        os.environ[PRELOAD_FLAG] = "1"
        _start_resource_tracker()
        multiprocessing.forkserver.ensure_running()


def _start_resource_tracker() -> None:
    """multiprocessing starts its resource tracker with our whole environment, of which it
    uses nothing, and any process of our user (an agent) may read it in /proc/<pid>/environ:
    it is started without the server's secrets."""
    kept = {name: os.environ.pop(name) for name in SERVER_SECRETS if name in os.environ}
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        os.environ.update(kept)


def run_worker(args: list[str], env: dict[str, str], log_path: str) -> None:
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.environ.pop(PRELOAD_FLAG, None)
    _setup_django()
    from django.core.management import call_command
    from django.db import connections

    connections.close_all()
    call_command("work", *args)


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hypervisor_site.settings")
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()


if os.environ.get(PRELOAD_FLAG) == "1":
    # Imported as the fork server's preload: pay for the imports once, there. Started by
    # exec, the fork server is "dumpable" again, and so would be every worker it forks: the
    # agents' parents, whose environment holds SECRET_KEY and DATABASE_URL.
    hide_environment()
    _setup_django()
