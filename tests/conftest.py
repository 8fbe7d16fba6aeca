"""Shared fixtures: real databases, real worker processes, a lock root per test."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.cache import cache
from django.core.signals import request_started
from django.db import connection, reset_queries

from herds import processes, zygote
from herds.models import HerdWorker
from herds.receivers import WORKER_ENV
from hypervisor_site.writers import writer_lock_path
from workqueue.models import Queue, Status, Task, TaskBody

ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(ROOT / "manage.py")


def pytest_configure(config):
    from django.conf import settings

    # Logins in tests need no deliberately slow hashing (the throttling tests log in dozens
    # of times); processes a test starts keep the real hashers.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # A run started as a background job (`make test &` from a script) inherits SIGINT
    # ignored, and so would every process a test starts: a command that keeps the
    # handler it found (`herd`) would then ignore the Ctrl-C a test sends it, as it
    # rightly does in such a job. The tests stand for a terminal's foreground.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def empty_cache():
    """The board keeps versions and facets in the cache, keyed by filter: one test's must
    not be another's (the local-memory cache outlives a test's database)."""
    cache.clear()


@pytest.fixture(autouse=True)
def whole_query_captures():
    """Every statement of a request inside a CaptureQueriesContext is captured.

    A request empties the query log as it starts (Django connects `reset_queries` to
    `request_started`), and a capture slices the log from its length at the capture's
    start: a capture after an earlier one missed that many of its request's first
    statements, and one around two requests kept only the second's. Tests keep the log.
    """
    request_started.disconnect(reset_queries)
    reset_queries()
    yield
    request_started.connect(reset_queries)


@pytest.fixture(autouse=True)
def lock_root(settings, tmp_path) -> Path:
    root = tmp_path / "locks"
    root.mkdir()
    settings.HYPERVISOR_LOCK_ROOT = root
    settings.HYPERVISOR_IMPORT_ROOTS = []
    return root


def database_url() -> str:
    """The URL of the test database, for processes the test starts."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


@pytest.fixture(autouse=True)
def no_fork_server_in_tests(monkeypatch):
    """A supervision pass run in the test process (not in a consumer) never forks a worker
    from a fork server of its own: that server would load the settings afresh and its
    workers would open the development database, not the test's. A test that wants a
    pass to start workers uses `workers_by_popen`."""

    def refuse(args, env, log_path):
        raise AssertionError(f"a worker would be forked in the test process: work {args}")

    monkeypatch.setattr(zygote, "start", refuse)


class PopenWorker:
    """A `manage.py work` started by Popen, with the poll/wait of zygote.WorkerProcess."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.pid = process, process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@pytest.fixture
def workers_by_popen(monkeypatch, settings, process_env) -> list[PopenWorker]:
    """Supervision passes in the test process start real workers on the test database:
    `manage.py work` processes in sessions of their own, as the fork server's are."""
    settings.HYPERVISOR_DATA_DIR = Path(process_env["HYPERVISOR_DATA_DIR"])
    started: list[PopenWorker] = []

    def start(args, env, log_path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            process = start_manage(
                ["work", *args],
                {**process_env, WORKER_ENV: env[WORKER_ENV]},
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        started.append(PopenWorker(process))
        return started[-1]

    monkeypatch.setattr(zygote, "start", start)
    yield started
    for worker in started:
        processes.terminate_trees([(worker.pid, None)], grace=1)
        worker.process.wait(timeout=10)


@pytest.fixture
def process_env(transactional_db, lock_root, tmp_path) -> dict[str, str]:
    """Environment for child processes: the same test database and lock root."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "HYPERVISOR_LOCK_ROOT": str(lock_root),
        "HYPERVISOR_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    return env


def start_manage(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, MANAGE, *args],
        env=env,
        cwd=ROOT,
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        text=True,
        **kwargs,
    )


def run_manage(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, MANAGE, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


APPEND = str(Path(__file__).parent / "scripts" / "append_key.py")


def work_appending(log: Path, queue: str = "q") -> list[str]:
    """`work` arguments for a command that appends each task's key to `log`."""
    return [
        "work",
        "--queue",
        queue,
        "--processor",
        "command",
        "--",
        sys.executable,
        "-S",
        APPEND,
        str(log),
        "{key}",
    ]


def make_tasks(queue: str, count: int, body: str = "", **fields) -> list[Task]:
    Queue.objects.get_or_create(name=queue)
    tasks = [
        Task(queue=queue, key=f"t{i:06d}", title=f"Task {i}", status=Status.QUEUED, **fields)
        for i in range(count)
    ]
    tasks = Task.objects.bulk_create(tasks, batch_size=1000)
    if body:
        TaskBody.objects.bulk_create(TaskBody(task=t, text=body) for t in tasks)
    return tasks


@pytest.fixture
def write_task(tmp_path):
    """Write a markdown task file under tmp_path/tasks and return its path."""
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)

    def write(name: str, text: str | bytes) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    write.folder = folder
    return write


@pytest.fixture
def huey_env(process_env) -> dict[str, str]:
    # A private Huey: its own SQLite file under the test's data dir, or its own Redis name.
    env = {**process_env, "HUEY_NAME": f"test-herds-{uuid.uuid4().hex[:12]}"}
    yield env
    if env.get("HUEY_REDIS_URL"):
        from huey import RedisHuey

        # The reaper schedules follow-ups that no consumer will run: leave no keys behind.
        RedisHuey(env["HUEY_NAME"], url=env["HUEY_REDIS_URL"]).flush()


@pytest.fixture
def consumer(huey_env, tmp_path):
    log_path = tmp_path / "consumer.log"
    with open(log_path, "w") as log:
        proc = start_manage(["run_huey"], huey_env, stdout=log, stderr=log)
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except Exception:
        proc.kill()
        proc.wait()
    # Whatever a failing test left behind must not outlive it.
    for worker in HerdWorker.objects.all():
        processes.terminate_trees([(worker.pid, worker.process_started)], grace=1)


CONSUMER_HUEY = (
    "import json; from huey.contrib.djhuey import HUEY; "
    "print(json.dumps({'name': HUEY.name, 'kwargs': HUEY.storage_kwargs}))"
)


@pytest.fixture
def consumer_huey(huey_env, monkeypatch):
    """This process (and a live server in it) enqueues into the Huey storage that the
    test's consumer reads, as the consumer itself reports it."""
    import json

    from huey.contrib.djhuey import HUEY

    result = run_manage(["shell", "-c", CONSUMER_HUEY], huey_env, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert not HUEY.immediate
    monkeypatch.setattr(HUEY, "name", theirs["name"])
    monkeypatch.setattr(HUEY, "storage", type(HUEY.storage)(theirs["name"], **theirs["kwargs"]))
    return HUEY


@pytest.fixture
def huey_down(monkeypatch, tmp_path):
    """Huey's real storage, out of reach: Redis on a port nothing listens on, or SQLite
    in a folder that is gone."""
    from huey.contrib.djhuey import HUEY
    from huey.storage import RedisStorage

    if isinstance(HUEY.storage, RedisStorage):
        down = RedisStorage(HUEY.name, url="redis://127.0.0.1:1/0")
    else:
        folder = tmp_path / "huey"
        folder.mkdir()
        down = type(HUEY.storage)(HUEY.name, filename=str(folder / "huey.sqlite3"))
        shutil.rmtree(folder)  # made its tables and closed: the next write opens it again
    monkeypatch.setattr(HUEY, "storage", down)


def freeze_outside_a_write(pid: int) -> None:
    """SIGSTOP a worker at a moment it is not inside a write: frozen mid-transaction (its
    heartbeat renews its lease twice a second) it would hold SQLite's writers' lock or a
    PostgreSQL row lock against the reaper, which is another fault than the one tested."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        if not _someone_writes():
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"process {pid} was inside a write at each of 100 tries")


def _someone_writes() -> bool:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')"
            )
            return cursor.fetchone()[0] > 0
    with open(writer_lock_path(connection.settings_dict["NAME"]), "a") as turn:
        try:
            fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(turn, fcntl.LOCK_UN)
        return False
