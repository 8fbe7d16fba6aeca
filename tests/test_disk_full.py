"""A full disk (no blocks, or no inodes) under the task folder, the lock root, the data
dir and the database: nothing lost or half-written, no claim kept for good, and a message
that names what could not be written."""

import os
import pwd
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.utils.html import escape

from herds import supervision, zygote
from herds.models import ExitClass, Herd, Profile
from tests.conftest import make_tasks, run_manage, start_manage
from workqueue import editing, transitions
from workqueue.authoring import AuthoringError, create_task_file
from workqueue.importer import Importer
from workqueue.models import BulkAction, BulkStatus, EventKind, Status, Task
from workqueue.processors import CommandProcessor, NoopProcessor
from workqueue.triage import TriageProcessor
from workqueue.worker import EXIT_LOCK_ROOT, EXIT_OK, Worker

NO_SPACE = "No space left on device"


@pytest.fixture
def tiny_filesystem(tmp_path):
    """Mount a small tmpfs (`size`, `nr_inodes`) at a new folder; unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "256k", inodes: int = 64) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs these as root)")
        path = tmp_path / name
        path.mkdir()
        options = f"size={size},nr_inodes={inodes}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"mount refused: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Take every block left in `folder`'s filesystem."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def use_up_inodes(folder: Path) -> None:
    """Take every inode left in `folder`'s filesystem."""
    for i in range(1000):
        try:
            (folder / f"empty-{i}").touch()
        except OSError:
            return


@pytest.mark.django_db(transaction=True)
def test_agent_output_that_fills_the_data_dir_ends_its_log_not_the_worker(
    settings, tiny_filesystem
):
    settings.HYPERVISOR_DATA_DIR = tiny_filesystem("data")
    make_tasks("q", 2)
    # A megabyte of output into a 256 KiB filesystem, then its last word.
    loud = "for i in range(12000): print('x' * 80)\nprint('the end')"
    worker = Worker("q", CommandProcessor([sys.executable, "-c", loud]), batch=2)

    assert worker.run() == EXIT_OK
    tasks = list(Task.objects.order_by("key"))
    assert [t.status for t in tasks] == [Status.DONE, Status.DONE]
    for task in tasks:
        log = settings.HYPERVISOR_DATA_DIR / "logs" / "agents" / f"task-{task.pk}-1.log"
        cut = "; cut to its first 64 KiB"
        assert task.reason == f"the agent's log {log} stops short: {NO_SPACE}{cut}"
        assert task.output_tail.endswith("the end\n")
        assert log.read_bytes().startswith(b"x" * 80 + b"\n")
        assert log.stat().st_size <= 64 * 1024
    # The space the logs took is the disk's again: a database or task file beside them
    # can still take a finish.
    free = os.statvfs(settings.HYPERVISOR_DATA_DIR)
    assert free.f_bavail * free.f_frsize >= 64 * 1024


@pytest.mark.django_db(transaction=True)
def test_an_agent_the_data_dir_has_no_inode_left_for_runs_without_its_log(
    settings, tiny_filesystem
):
    settings.HYPERVISOR_DATA_DIR = data = tiny_filesystem("data")
    (data / "logs" / "agents").mkdir(parents=True)
    use_up_inodes(data)
    make_tasks("q", 1)
    worker = Worker("q", CommandProcessor([sys.executable, "-c", "print('the end')"]))

    assert worker.run() == EXIT_OK
    task = Task.objects.get()
    log = data / "logs" / "agents" / f"task-{task.pk}-1.log"
    assert (task.status, task.output_tail) == (Status.DONE, "the end\n")
    assert task.reason == f"cannot write the agent's log {log}: No space left on device"


def task_folder(settings, folder: Path, queue: str = "inbox") -> list[Path]:
    """Two task files in `folder`, imported into `queue` with `folder` as its root."""
    files = []
    for key in ("ex-001", "ex-002"):
        path = folder / f"{key}.md"
        path.write_text(f"---\nid: {key}\ntitle: Task {key}\nstatus: todo\n---\n# {key}\n")
        files.append(path)
    settings.HYPERVISOR_IMPORT_ROOTS = [folder]
    assert not Importer(queue).run([folder]).errors
    return files


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.django_db
@pytest.mark.parametrize("full", ["blocks", "inodes"])
def test_a_new_task_in_a_full_folder_is_refused_naming_the_folder(settings, tiny_filesystem, full):
    folder = tiny_filesystem("tasks")
    task_folder(settings, folder)
    fill(folder) if full == "blocks" else use_up_inodes(folder)
    before = contents(folder)

    with pytest.raises(AuthoringError) as refused:
        create_task_file("inbox", "Fix the login bug", "Body\n")

    assert refused.value.errors == {
        "folder": f"cannot write a new task file into {folder}: No space left on device"
    }
    assert contents(folder) == before  # no temporary, no half-made file
    assert Task.objects.count() == 2


@pytest.mark.django_db
def test_a_board_edit_in_a_full_folder_says_the_disk_is_full_not_to_reload(
    settings, tiny_filesystem, client, django_user_model
):
    # It said "…; reload the task and try again", which cannot help.
    folder = tiny_filesystem("tasks")
    path = task_folder(settings, folder)[0]
    fill(folder)
    before, task = contents(folder), Task.objects.get(key="ex-001")
    user = django_user_model.objects.create_user("editor", password="pw")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_task", "change_task"])
    )
    client.force_login(user)
    values = {"title": "Renamed", "status": task.status, "priority": task.priority}
    values |= {"body": task.body, "base_sha256": task.source_sha256}

    response = client.post(f"/tasks/{task.pk}/edit/", values, HTTP_HX_REQUEST="true")

    assert response.status_code == 422
    page = response.content.decode()
    assert f"file: cannot write the file: {NO_SPACE}" in page
    assert "reload the task" not in page
    assert contents(folder) == before and "Renamed" not in path.read_text()
    assert Task.objects.get(pk=task.pk).title == "Task ex-001"


class FullDatabaseDisk:
    """The database in use failing as it fails on a full disk, raised as Django's backend
    raises it: SQLite, a real database file that outgrows a small filesystem; PostgreSQL,
    a table in a tablespace on a small filesystem that the server cannot extend."""

    def __init__(self, tiny_filesystem):
        self.vendor = connection.vendor
        if self.vendor == "postgresql":
            self._tablespace()
        else:
            self.folder = tiny_filesystem("database", size="64k")
        # What each says: SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100).
        self.words = NO_SPACE if self.vendor == "postgresql" else "database or disk is full"

    def _tablespace(self) -> None:
        db = connection.settings_dict
        if db["HOST"] not in ("", "localhost", "127.0.0.1", "::1"):
            pytest.skip("a tablespace on a small filesystem needs the server on this machine")
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs these as root)")
        server = pwd.getpwnam("postgres")
        # Not below the tests' own folders: the server's user must reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="hypervisor-full-"))
        options = f"size=64k,nr_inodes=64,uid={server.pw_uid},gid={server.pw_gid},mode=700"
        mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.folder)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            self.folder.rmdir()
            pytest.skip("mount refused")
        self.name = f"full_disk_{os.getpid()}"
        self.server = psycopg.connect(
            host=db["HOST"] or "127.0.0.1",
            port=db["PORT"] or 5432,
            user=db["USER"],
            password=db["PASSWORD"],
            dbname=connection.settings_dict["NAME"],
            autocommit=True,
        )
        self.server.execute(f"CREATE TABLESPACE {self.name} LOCATION '{self.folder}'")
        self.server.execute(f"CREATE TABLE {self.name} (n int) TABLESPACE {self.name}")

    def write_past_it(self) -> None:
        with connection.wrap_database_errors:
            if self.vendor == "postgresql":
                self.server.execute(
                    f"INSERT INTO {self.name} SELECT n FROM generate_series(1, 100000) n"  # noqa: S608
                )
                return
            database = sqlite3.connect(self.folder / "db.sqlite3")
            try:
                database.execute("CREATE TABLE t (x BLOB)")
                database.execute("INSERT INTO t VALUES (zeroblob(1000000))")
                database.commit()
            finally:
                database.close()

    def close(self) -> None:
        if self.vendor != "postgresql":
            return  # tiny_filesystem unmounts it
        self.server.execute(f"DROP TABLE IF EXISTS {self.name}")
        self.server.execute(f"DROP TABLESPACE IF EXISTS {self.name}")
        self.server.close()
        subprocess.run(["umount", "-l", str(self.folder)], check=False)
        self.folder.rmdir()


@pytest.fixture
def full_database_disk(tiny_filesystem):
    disk = FullDatabaseDisk(tiny_filesystem)
    yield disk
    disk.close()


@pytest.mark.django_db
def test_a_full_database_disk_is_a_503_saying_so(
    django_user_model, monkeypatch, full_database_disk
):
    from workqueue import views

    user = django_user_model.objects.create_user("viewer", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client = Client(raise_request_exception=False)
    client.force_login(user)
    monkeypatch.setattr(
        views, "_board_context", lambda *a, **k: full_database_disk.write_past_it()
    )

    page = client.get("/")

    assert page.status_code == 503
    assert page.content.decode() == (
        "The database's disk is full: nothing was saved. Free space where the database "
        "lives, then try again."
    )


fork_a_worker = zygote.start  # before the tests' own fixture refuses forks


def notes_of(task: Task) -> list[str]:
    return list(
        task.events.filter(kind=EventKind.NOTE).order_by("id").values_list("message", flat=True)
    )


@pytest.mark.django_db(transaction=True)
def test_a_finish_the_full_folder_could_not_take_is_written_by_the_import_once_space_returns(
    settings, tiny_filesystem
):
    folder = tiny_filesystem("tasks")
    settings.HYPERVISOR_IMPORT_ROOTS = [folder]
    path = folder / "ex-001.md"
    path.write_text("---\nid: ex-001\ntitle: First\n---\n# First\n")  # no status key to overwrite
    assert not Importer("inbox").run([folder]).errors
    fill(folder)
    before = contents(folder)

    worker = Worker("inbox", NoopProcessor())
    assert worker.run() == EXIT_OK
    task = Task.objects.get()
    assert task.status == Status.DONE
    unwritten = (
        f"done, but not written into {path}: cannot write the file: No space left on device"
    )
    assert notes_of(task) == [unwritten]
    assert contents(folder) == before  # the file as it was, no temporary beside it

    # Still full: the import tries again, says nothing new, leaves nothing behind.
    assert not Importer("inbox").run([folder]).errors
    assert notes_of(task) == [unwritten]
    assert contents(folder) == before

    (folder / "filler").unlink()
    assert not Importer("inbox").run([folder]).errors
    assert path.read_text() == "---\nid: ex-001\ntitle: First\nstatus: done\n---\n# First\n"
    assert notes_of(task) == [unwritten, f"done, now written into {path}"]
    assert sorted(p.name for p in folder.iterdir()) == ["ex-001.md"]
    # Written once: the next import has nothing to write.
    assert not Importer("inbox").run([folder]).errors
    assert len(notes_of(task)) == 2


@pytest.mark.parametrize("buffered", [False, True], ids=["herd-worker", "terminal"])
def test_a_worker_whose_log_is_on_a_full_disk_finishes_its_tasks_and_exits_cleanly(
    process_env, tiny_filesystem, buffered
):
    make_tasks("q", 3)
    logs = tiny_filesystem("logs", size="64k")
    fill(logs)
    env = {k: v for k, v in process_env.items() if buffered is False or k != "PYTHONUNBUFFERED"}
    with open(logs / "worker.log", "ab") as log:
        worker = start_manage(["work", "--queue", "q"], env, stdout=log, stderr=log)
        assert worker.wait(timeout=120) == EXIT_OK  # a herd would have called it a crash
    assert Task.objects.counts()["done"] == 3


@pytest.mark.django_db(transaction=True)
def test_a_bulk_action_hueys_full_storage_cannot_take_fails_saying_so(
    django_user_model, write_task, tiny_filesystem, monkeypatch
):
    from huey.contrib.djhuey import HUEY
    from huey.storage import SqliteStorage

    for n in range(30):  # past what a request does itself: the action goes to Huey
        write_task(f"t{n:03d}.md", f"---\nid: t{n:03d}\ntitle: Task {n}\n---\nBody\n")
    assert not Importer("inbox", roots=[write_task.folder]).run([write_task.folder]).errors
    before = contents(write_task.folder)
    folder = tiny_filesystem("huey", size="512k")
    monkeypatch.setattr(HUEY, "storage", SqliteStorage(HUEY.name, filename=str(folder / "q.db")))
    monkeypatch.setattr(HUEY, "immediate", False)
    fill(folder)
    user = django_user_model.objects.create_user("alice", password="pw-12345")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_task", "change_task"])
    )
    client = Client(raise_request_exception=False)
    client.force_login(user)
    ids = ",".join(str(pk) for pk in Task.objects.values_list("pk", flat=True))

    page = client.post("/bulk/", {"action": "priority", "value": "1", "ids": ids})

    assert page.status_code == 200
    bulk = BulkAction.objects.get()
    assert bulk.status == BulkStatus.FAILED
    assert bulk.error.startswith("not started: Huey's queue could not take it (")
    assert f"Stopped: {escape(bulk.error)}" in page.content.decode()
    assert contents(write_task.folder) == before
    assert set(Task.objects.values_list("priority", flat=True)) == {2}


@pytest.mark.django_db
def test_a_herd_worker_the_full_data_dir_cannot_log_for_is_not_started_and_says_why(
    settings, tiny_filesystem, monkeypatch
):
    settings.HYPERVISOR_DATA_DIR = tiny_filesystem("data")
    profile = Profile.objects.get_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1)
    log = supervision.log_path(herd, 0)
    log.parent.mkdir(parents=True)
    use_up_inodes(settings.HYPERVISOR_DATA_DIR)
    monkeypatch.setattr(zygote, "start", fork_a_worker)  # the real one: it forks no test worker

    worker, child = supervision.start_worker(herd, 0)

    assert child is None
    worker.refresh_from_db()
    assert worker.exit_class == ExitClass.CRASHED
    assert worker.exit_detail == f"could not start: [Errno 28] {NO_SPACE}: '{log}'"


@pytest.mark.django_db(transaction=True)
def test_a_database_full_after_a_finish_commits_is_tried_again_not_refused(
    settings, write_task, full_database_disk, monkeypatch, lock_root, caplog
):
    path = write_task("a.md", "---\nid: A\ntitle: First\n---\nbody\n")
    assert not Importer("q", roots=[path.parent]).run([path.parent]).errors
    write_status = editing.write_finished_status
    tries = []

    def full_once(*args, **kwargs):
        # The finish is committed; the database's disk fills before the file is written.
        tries.append(args)
        if len(tries) == 1:
            full_database_disk.write_past_it()
        return write_status(*args, **kwargs)

    monkeypatch.setattr(editing, "write_finished_status", full_once)
    worker = Worker("q", NoopProcessor())

    assert worker.run() == EXIT_OK

    task = Task.objects.get()
    assert (task.status, worker.stats.done, worker.stats.refused) == (Status.DONE, 1, 0)
    assert len(tries) == 2 and full_database_disk.words in caplog.text
    assert not task.events.filter(kind=EventKind.LATE_FINISH_REFUSED).exists()
    assert path.read_text() == "---\nid: A\ntitle: First\nstatus: done\n---\nbody\n"
    assert not (lock_root / "q" / "A").exists()  # let go at once, not left for a reaper


def test_a_command_whose_database_disk_is_full_says_so_and_harms_nothing(
    tiny_filesystem, tmp_path
):
    folder = tiny_filesystem("database", size="16m")
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{folder}/db.sqlite3",
        "HYPERVISOR_DATA_DIR": str(tmp_path / "data"),
        "HYPERVISOR_LOCK_ROOT": str(tmp_path / "locks"),
    }
    assert run_manage(["migrate", "-v0"], env).returncode == 0
    fill(folder)

    stats = run_manage(["queue_stats"], env)

    assert stats.returncode == 1
    assert stats.stderr.startswith("manage.py queue_stats: database: ")
    assert stats.stderr.endswith(" (its disk is full: free space there, then run this again)\n")
    (folder / "filler").unlink()
    assert run_manage(["queue_stats"], env).returncode == 0
    check = sqlite3.connect(folder / "db.sqlite3")
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_the_full_database_refuses_says_so_in_a_line_not_a_traceback(
    full_database_disk, monkeypatch, caplog
):
    monkeypatch.setattr(transitions, "heartbeat", lambda *args: full_database_disk.write_past_it())
    make_tasks("q", 1)
    worker = Worker("q", CommandProcessor([sys.executable, "-c", "import time; time.sleep(2)"]))
    worker.heartbeat_interval = 0.5

    assert worker.run() == EXIT_OK

    assert Task.objects.get().status == Status.DONE
    beats = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert beats and all(r.exc_info is None for r in beats)
    said = beats[0].getMessage()
    assert "heartbeat failed: database unavailable (" in said
    assert full_database_disk.words in said


@pytest.mark.django_db(transaction=True)
def test_a_lock_root_out_of_blocks_claims_nothing_and_leaves_nothing_half_made(
    settings, tiny_filesystem
):
    settings.HYPERVISOR_LOCK_ROOT = root = tiny_filesystem("tiny-locks", size="64k")
    fill(root)  # directories can still be made; an owner file's bytes cannot
    make_tasks("q", 5)
    worker = Worker("q", NoopProcessor(), prefetch=5)

    assert worker.run() == EXIT_LOCK_ROOT
    assert "the lock root is full" in worker.stop_reason
    assert Task.objects.counts() == {"queued": 5, "claimed": 0, "done": 0, "blocked": 0}
    assert set(Task.objects.values_list("attempts", flat=True)) == {0}
    assert not (root / "q").exists()
    assert not [p for p in root.rglob("*") if p.is_file() and p.name != "filler"]


@pytest.mark.django_db(transaction=True)
def test_triage_in_a_full_folder_blocks_its_tasks_naming_each_file_and_writes_nothing(
    settings, tiny_filesystem
):
    folder = tiny_filesystem("tasks")
    files = task_folder(settings, folder)
    fill(folder)
    before = contents(folder)

    assert Worker("inbox", TriageProcessor(), prefetch=2).run() == EXIT_OK

    assert contents(folder) == before
    reasons = dict(Task.objects.values_list("source_path", "reason"))
    assert reasons == {str(p): f"cannot write {p}: {NO_SPACE}" for p in files}
    assert set(Task.objects.values_list("status", flat=True)) == {Status.BLOCKED}


def test_a_pull_worker_says_its_agents_log_stopped_short_on_a_full_disk(
    process_env, tiny_filesystem
):
    """A push worker's task says why its agent's log is short; a pull worker's agent has
    no one task to say it on: its worker's own output says it."""
    data = Path(process_env["HYPERVISOR_DATA_DIR"])
    (data / "logs").mkdir(parents=True, exist_ok=True)
    logs = tiny_filesystem("agent-logs")
    (data / "logs" / "agents").symlink_to(logs)
    make_tasks("q", 1)
    loud = "for i in range(12000): print('x' * 80)\nprint('the end')"
    result = run_manage(
        ["work", "--queue", "q", "--processor", "pull", "--", sys.executable, "-c", loud],
        process_env,
    )
    assert result.returncode == 0, result.stderr
    assert "the end\n" in result.stdout  # the agent's last words, in its worker's output
    log = data / "logs" / "agents"
    assert f"the agent's log {log}/pull-" in result.stderr
    assert f"stops short: {NO_SPACE}; cut to its first 64 KiB" in result.stderr
