"""A lock root others write in: planted symlinks, foreign owner files, crafted long names.

Each planted symlink points at a "victim" folder shaped like a lock root's contents (an
owner.json of a dead worker of ours, a lock directory, other files), so code that follows
the link would find something it is willing to delete. Every code path that deletes goes
past each one; the victim must stay as it was, and the refusal must be raised or recorded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from tests.conftest import make_tasks, run_manage
from workqueue import actions, claims, locks, reaper
from workqueue.locks import Identity, LockError, OwnerFile
from workqueue.models import EventKind, Status, Task, TaskEvent
from workqueue.processing import Claim, Result

REFUSED = "is a symlink; refusing to follow it"
LOCKS_PAGE = "/admin/queue/task/locks/"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    dead = json.dumps({"host": settings.HYPERVISOR_HOST, "pid": dead_pid(), "started": 1.0})
    (folder / "t000000").mkdir(parents=True)
    (folder / "owner.json").write_text(dead)
    (folder / "t000000" / "owner.json").write_text(dead)
    (folder / "t000000" / "notes.txt").write_text("someone's work")
    (folder / "keep.txt").write_text("precious")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(parent, name), folder)] = "<dir>"
        for name in files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = Path(path).read_text()
    return found


def move_aside(path: Path) -> None:
    if path.exists():
        path.rename(path.with_name(path.name + "-moved"))


# Where a symlink is planted: a name below the lock root, and what it points at.
def plant_queue(root: Path, victim: Path) -> Path:
    move_aside(root / "q")
    (root / "q").symlink_to(victim)
    return root / "q"


def plant_lock(root: Path, victim: Path) -> Path:
    lock = root / "q" / "t000000"
    shutil.rmtree(lock, ignore_errors=True)
    lock.parent.mkdir(exist_ok=True)
    lock.symlink_to(victim)
    return lock


def plant_spares(root: Path, victim: Path) -> Path:
    move_aside(root / locks.SPARES)
    (root / locks.SPARES).symlink_to(victim)
    return root / locks.SPARES


def plant_owners(root: Path, victim: Path) -> Path:
    move_aside(root / locks.OWNERS)
    (root / locks.OWNERS).symlink_to(victim)
    return root / locks.OWNERS


def plant_owner_file(root: Path, victim: Path) -> Path:
    owner = root / "q" / "t000000" / "owner.json"
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.unlink(missing_ok=True)
    owner.symlink_to(victim / "owner.json")
    return owner


def plant_spare(root: Path, victim: Path) -> Path:
    (root / locks.SPARES).mkdir(exist_ok=True)
    (root / locks.SPARES / "x").symlink_to(victim / "t000000")
    return root / locks.SPARES / "x"


def plant_owner_leftover(root: Path, victim: Path) -> Path:
    (root / locks.OWNERS).mkdir(exist_ok=True)
    (root / locks.OWNERS / "x").symlink_to(victim / "owner.json")
    return root / locks.OWNERS / "x"


PLANTS = {
    "queue": plant_queue,
    "lock": plant_lock,
    "spares": plant_spares,
    "owners": plant_owners,
    "owner-file": plant_owner_file,
    "spare": plant_spare,
    "owner-leftover": plant_owner_leftover,
}


class Run:
    """One code path's state: tasks, a worker, and the planted symlink."""

    def __init__(self, root: Path, victim: Path, plant):
        make_tasks("q", 2)
        self.root, self.victim, self.plant = root, victim, plant
        self.me = Identity.current("me")
        self.owner_file = OwnerFile(self.me)

    def claim(self) -> Claim:
        [claim] = claims.claim_ready_tasks("q", self.me, self.owner_file, limit=1)
        return claim

    def planted(self) -> Path:
        return self.plant(self.root, self.victim)


# Each code path that deletes, and the plants it must come across (and refuse).
def claim_tasks(run: Run) -> None:
    run.planted()
    me = Identity.current("fresh")
    claims.claim_ready_tasks("q", me, OwnerFile(me), limit=2)


def finish(run: Run) -> None:
    claim = run.claim()
    run.planted()
    claims.finish_claims(run.me, [(claim, Result())], run.owner_file)


def release_claims(run: Run) -> None:
    claim = run.claim()
    run.planted()
    claims.release_claims(run.me, [claim], run.owner_file, "stopping")


def reap_stale(run: Run) -> None:
    run.claim()
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    run.planted()
    reaper.release_stale_claims("q")


def reap_orphans(run: Run) -> None:
    run.planted()
    reaper.release_stale_claims()
    reaper.release_orphan_locks("q")
    for path, _ in locks.leftover_records():
        locks.remove_leftover(path)


def remove_planted(run: Run) -> None:
    planted = run.planted()
    for remove in (locks.remove, locks.remove_leftover):
        with pytest.raises(LockError, match=REFUSED):
            remove(planted)
    raise LockError(f"{planted} {REFUSED}")  # both refused: say so to the caller


def mark_done(run: Run) -> None:
    claim = run.claim()
    run.planted()
    actions.mark_done(Task.objects.get(pk=claim.id), "nic")


def board_release(run: Run) -> None:
    claim = run.claim()
    run.planted()
    actions.release(Task.objects.get(pk=claim.id), "nic")


def admin_locks_page(run: Run, client) -> None:
    run.planted()
    assert client.get(LOCKS_PAGE).status_code == 200
    assert client.post(LOCKS_PAGE).status_code == 302


ALL = set(PLANTS)
PATHS = {
    claim_tasks: {"queue", "lock", "spares", "owners", "owner-file"},
    finish: {"lock"},  # the worker's cached folder fds never meet the other plants
    release_claims: {"lock"},  # the same cached fds as finish
    # Releasing someone else's claim reads its owner file, and moves the lock aside into
    # the spares before removing it.
    reap_stale: ALL,
    reap_orphans: ALL,
    remove_planted: ALL,
    mark_done: {"queue", "lock", "spares", "owner-file"},
    board_release: {"queue", "lock", "spares", "owner-file"},
    admin_locks_page: ALL,
}


@pytest.mark.django_db
@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__)
def test_no_code_path_deletes_through_a_symlink_in_the_lock_root(
    lock_root, victim, plant, path, caplog, admin_client
):
    before = snapshot(victim)
    run = Run(lock_root, victim, PLANTS[plant])
    caplog.set_level(logging.WARNING, logger="workqueue.locks")
    raised = ""
    try:
        path(run, admin_client) if path is admin_locks_page else path(run)
    except LockError as exc:
        raised = str(exc)
    assert snapshot(victim) == before
    recorded = [raised, *caplog.messages]
    for event in TaskEvent.objects.filter(kind__in=[EventKind.LOCK_BUSY, EventKind.LOCK_FAILED]):
        recorded += [event.message, json.dumps(event.data)]
    refusals = [text for text in recorded if REFUSED in text]
    if plant in PATHS[path]:
        assert refusals, recorded
        assert any(str(lock_root) in text for text in refusals)
    else:
        assert refusals == [] and raised == ""


@pytest.mark.django_db
def test_claim_skips_a_symlinked_lock_and_records_why(lock_root, victim, caplog):
    make_tasks("q", 2)
    plant_lock(lock_root, victim)
    me = Identity.current("me")
    batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=2)
    assert [c.key for c in batch] == ["t000001"]
    event = TaskEvent.objects.get(task__key="t000000", kind=EventKind.LOCK_BUSY)
    assert event.data["owner"]["refused"] == f"{lock_root}/q/t000000 {REFUSED}"
    assert Task.objects.get(key="t000000").status == Status.QUEUED
    # The worker's output says why, not "held by an outside process: host ?, pid ?".
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"t000000 passed over: not a lock directory: {lock_root}/q/t000000 {REFUSED}"]


@pytest.mark.django_db
def test_a_symlinked_queue_folder_stops_the_claim_with_a_clear_error(lock_root, victim):
    make_tasks("q", 1)
    plant_queue(lock_root, victim)
    me = Identity.current("me")
    with pytest.raises(LockError, match=f"{lock_root}/q {REFUSED}"):
        claims.claim_ready_tasks("q", me, OwnerFile(me))
    task = Task.objects.get()
    assert task.status == Status.QUEUED
    assert task.events.get(kind=EventKind.LOCK_FAILED).message == f"{lock_root}/q {REFUSED}"


@pytest.mark.django_db
def test_try_release_reports_the_refusal_and_goes_on(lock_root, victim):
    before = snapshot(victim)
    plant_lock(lock_root, victim)
    assert locks.try_release("q", "t000000") == f"{lock_root}/q/t000000 {REFUSED}"
    assert locks.try_release("q", "t000001") is None
    assert snapshot(victim) == before


@pytest.mark.django_db
def test_removal_walks_by_fds_and_unlinks_links_inside_a_lock(lock_root, victim):
    before = snapshot(victim)
    lock = locks.lock_dir("q", "t000000")
    (lock / "deep" / "er").mkdir(parents=True)
    (lock / "deep" / "er" / "link").symlink_to(victim)
    (lock / "link").symlink_to(victim / "keep.txt")
    (lock / "owner.json").symlink_to(victim / "owner.json")
    locks.release("q", "t000000")
    assert not os.path.lexists(lock)
    assert snapshot(victim) == before


@pytest.mark.django_db
def test_a_lock_root_that_is_itself_a_symlink_is_followed_once(settings, tmp_path):
    real = tmp_path / "real-locks"
    real.mkdir()
    (tmp_path / "link-locks").symlink_to(real)
    settings.HYPERVISOR_LOCK_ROOT = tmp_path / "link-locks"
    make_tasks("q", 2)
    me = Identity.current("me")
    mine = OwnerFile(me)
    batch = claims.claim_ready_tasks("q", me, mine, limit=2)
    assert sorted(p.name for p in (real / "q").iterdir()) == ["t000000", "t000001"]
    claims.finish_claims(me, [(c, Result()) for c in batch], mine)
    mine.discard()
    assert list((real / "q").iterdir()) == []


# Long names (issue 12, item 12).


def test_a_crafted_200_character_key_does_not_share_a_long_keys_lock():
    long_key = "a" * 300
    digest = locks.hashlib.sha256(long_key.encode()).hexdigest()[:16]
    crafted = "a" * 183 + "~" + digest  # what the long key's lock name used to be
    assert len(crafted) == 200
    assert locks.lock_name(crafted) == crafted  # short safe keys keep their own name
    assert locks.lock_name(long_key) != crafted
    assert len(locks.lock_name(long_key)) <= locks.MAX_NAME
    assert locks.key_from_lock_name(locks.lock_name(long_key)) == "a" * 182 + "…"


def test_long_encoded_names_are_not_cut_inside_an_escape():
    for key in ("é" * 150, "/" * 150, "x/" * 120):
        name = locks.lock_name(key)
        assert len(name) <= locks.MAX_NAME and "/" not in name
        assert key.startswith(locks.key_from_lock_name(name)[:-1])


@pytest.mark.django_db
def test_a_crafted_key_and_a_long_key_are_claimed_side_by_side(lock_root):
    long_key = "a" * 300
    digest = locks.hashlib.sha256(long_key.encode()).hexdigest()[:16]
    make_tasks("q", 2)
    Task.objects.filter(key="t000000").update(key=long_key, priority=2)
    Task.objects.filter(key="t000001").update(key="a" * 183 + "~" + digest, priority=1)
    me = Identity.current("me")
    batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=2)
    assert len(batch) == 2
    assert len(list((lock_root / "q").iterdir())) == 2


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_no_name_maps_onto_the_lock_root_or_its_parent(name):
    if name == "":
        with pytest.raises(ValueError):
            locks.lock_name(name)
    else:
        assert locks.lock_name(name) not in ("", ".", "..")
        assert locks.lock_name(name).startswith("%2E")


def test_short_safe_keys_keep_their_names():
    for key in ("t000001", "Task_1.2-x~y", "z" * 200):
        assert locks.lock_name(key) == key
        assert locks.key_from_lock_name(key) == key


# Foreign owner files (issue 12, item 3): judged by pid and age, never trusted for ever.


def foreign_lock(key: str, owner, age: float = 0) -> Path:
    lock = locks.lock_dir("q", key)
    lock.mkdir(parents=True)
    if owner is not None:
        (lock / "owner.json").write_text(owner if isinstance(owner, str) else json.dumps(owner))
    if age:
        then = time.time() - age
        os.utime(lock, (then, then))
    return lock


FOREIGN_OWNERS = {
    "live-pid-no-start": lambda: {"host": settings.HYPERVISOR_HOST, "pid": os.getpid()},
    "no-pid": lambda: {"tool": "mkdir-lock"},
    "bad-pid": lambda: {"host": settings.HYPERVISOR_HOST, "pid": "not a pid"},
    # A digit int() cannot read (str.isdigit() takes it): the reaper raised ValueError.
    "superscript-pid": lambda: {"host": settings.HYPERVISOR_HOST, "pid": "\u00b2"},
    # An outside tool's `mkdir` alone, or its own words: taken over after a minute, as
    # if a worker of ours had died making it.
    "no-owner-file": lambda: None,
    "a-note": lambda: "held by nic's script\n",
    "a-list": lambda: "[]",
}


@pytest.mark.django_db
@pytest.mark.parametrize("owner", FOREIGN_OWNERS)
def test_a_foreign_lock_is_held_until_the_age_limit_then_abandoned(settings, lock_root, owner):
    settings.HYPERVISOR_FOREIGN_LOCK_MAX_AGE = 600
    young = foreign_lock("young", FOREIGN_OWNERS[owner](), age=300)
    old = foreign_lock("old", FOREIGN_OWNERS[owner](), age=700)
    assert reaper.release_orphan_locks("q") == [old]
    assert young.exists() and not old.exists()


@pytest.mark.django_db
def test_a_worker_takes_over_a_foreign_lock_past_the_age_limit(settings, lock_root):
    settings.HYPERVISOR_FOREIGN_LOCK_MAX_AGE = 600
    make_tasks("q", 2)
    live = {"host": settings.HYPERVISOR_HOST, "pid": os.getpid()}
    foreign_lock("t000000", live, age=700)
    held = foreign_lock("t000001", live, age=10)
    me = Identity.current("me")
    batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=2)
    assert [c.key for c in batch] == ["t000000"]
    assert locks.read_owner(locks.lock_dir("q", "t000000"))["worker"] == "me"
    busy = TaskEvent.objects.get(task__key="t000001", kind=EventKind.LOCK_BUSY)
    assert busy.data["owner"]["since"] == pytest.approx(held.stat().st_mtime)


@pytest.mark.django_db
def test_a_worker_leaves_a_lock_an_outside_tool_made_with_mkdir_alone(settings, lock_root):
    # It was taken over after 60 s, the outside tool and our agent both at work.
    make_tasks("q", 1)
    foreign_lock("t000000", None, age=90)
    me = Identity.current("me")
    assert claims.claim_ready_tasks("q", me, OwnerFile(me), limit=1) == []
    assert locks.read_owner(locks.lock_dir("q", "t000000")) is None
    assert Task.objects.get().status == Status.QUEUED


@pytest.mark.django_db
def test_a_foreign_owner_of_this_host_whose_pid_is_gone_is_dead_at_once(lock_root):
    lock = foreign_lock("gone", {"host": settings.HYPERVISOR_HOST, "pid": dead_pid()})
    assert reaper.release_orphan_locks("q") == [lock]


@pytest.mark.django_db
def test_our_own_live_owner_is_never_abandoned_for_its_age(settings, lock_root):
    settings.HYPERVISOR_FOREIGN_LOCK_MAX_AGE = 1
    ours = Identity.current("me").owner_record()
    lock = foreign_lock("ours", ours, age=3600)
    assert reaper.release_orphan_locks("q") == []
    assert lock.exists()


def test_describe_holder_names_host_pid_and_since():
    when = 1_700_000_000.0
    assert locks.describe_holder({"host": "box", "pid": 42, "time": when}) == (
        "held by an outside process: host box, pid 42, since 2023-11-14 22:13:20 UTC"
    )
    assert locks.describe_holder({"tool": "x"}, since=when) == (
        "held by an outside process: host ?, pid ?, since 2023-11-14 22:13:20 UTC"
    )
    assert locks.describe_holder(None) == "held by an outside process: host ?, pid ?, since ?"


@pytest.mark.django_db
def test_a_fifo_as_owner_file_does_not_hang_the_reaper(lock_root):
    lock = locks.lock_dir("q", "fifo")
    lock.mkdir(parents=True)
    os.mkfifo(lock / "owner.json")
    started = time.monotonic()
    [info] = locks.list_locks("q")
    assert info.owner is None and time.monotonic() - started < 5


def test_an_outside_script_locking_a_path_key_by_lock_path_keeps_workers_off_it(process_env):
    """The README named the lock `LOCK_ROOT/<queue>/<key>/`; a key that is a path is
    percent-encoded there, so a script that made `projects/web/t.md/` kept no worker off
    the task. `lock_path` gives the name; the README says how it is made."""
    (held,) = make_tasks("q", 1)
    Task.objects.filter(pk=held.pk).update(key="projects/web/t.md")
    shown = run_manage(["lock_path", "q", "projects/web/t.md", "plain-key"], process_env)
    assert shown.returncode == 0, shown.stderr
    path, plain = shown.stdout.split()
    root = process_env["HYPERVISOR_LOCK_ROOT"]
    assert (path, plain) == (f"{root}/q/projects%2Fweb%2Ft.md", f"{root}/q/plain-key")
    os.makedirs(path)
    outside = {"host": settings.HYPERVISOR_HOST, "pid": os.getpid()}
    Path(path, "owner.json").write_text(json.dumps(outside))
    worked = run_manage(["work", "--queue", "q", "--processor", "noop"], process_env)
    assert worked.returncode == 0, worked.stderr
    assert Task.objects.get().status == Status.QUEUED
    assert Path(path, "owner.json").exists()


@pytest.mark.django_db
def test_a_dead_pull_workers_session_folder_goes_never_through_a_link(settings, tmp_path):
    # A SIGKILLed pull worker leaves its config files; the reaper removes them once its
    # owner is dead, and follows no link planted where such a folder goes.
    settings.HYPERVISOR_DATA_DIR = tmp_path / "data"
    sessions = tmp_path / "data" / "run"
    sessions.mkdir(parents=True)
    dead = {"host": settings.HYPERVISOR_HOST, "pid": dead_pid(), "started": 1.0}
    live = Identity.current("me").owner_record()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "owner.json").write_text(json.dumps(dead))
    (outside / "keep.txt").write_text("mine")
    for name, owner in {"pull-dead": dead, "pull-live": live, "other-dead": dead}.items():
        (sessions / name).mkdir()
        (sessions / name / "owner.json").write_text(json.dumps(owner))
        (sessions / name / "claude_mcp.json").write_text("{}")
    (sessions / "pull-dead" / "escape").symlink_to(outside)
    (sessions / "pull-link").symlink_to(outside)
    assert reaper.release_orphan_locks(dry_run=True) == [sessions / "pull-dead"]
    assert (sessions / "pull-dead").exists()
    assert reaper.release_orphan_locks() == [sessions / "pull-dead"]
    assert sorted(p.name for p in sessions.iterdir()) == ["other-dead", "pull-link", "pull-live"]
    assert (outside / "keep.txt").read_text() == "mine"


# A symlink the reaper meets at every pass (issue: logged every minute, for ever).


def reaper_pass() -> None:
    """What the consumer runs every minute (herds.tasks.reap_stale_claims_now)."""
    reaper.release_stale_claims(actor="reaper (huey)")


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.django_db
@pytest.mark.parametrize("plant", PLANTS)
def test_the_reaper_logs_a_symlink_in_the_lock_root_once_not_at_every_pass(
    lock_root, victim, plant, caplog
):
    before = snapshot(victim)
    planted = PLANTS[plant](lock_root, victim)
    caplog.set_level(logging.WARNING, logger="workqueue.locks")
    reaper_pass()
    reaper_pass()
    assert refusals(caplog) == [f"{planted} {REFUSED}"]
    # Still refused at the second pass, quietly: nothing followed, nothing deleted through.
    assert planted.is_symlink() and snapshot(victim) == before


@pytest.mark.django_db
def test_a_symlink_planted_again_is_logged_again_and_a_person_who_asks_hears_of_it(
    lock_root, victim, caplog, admin_client
):
    before = snapshot(victim)
    planted = plant_lock(lock_root, victim)
    said = f"{planted} {REFUSED}"
    caplog.set_level(logging.WARNING, logger="workqueue.locks")
    reaper_pass()
    reaper_pass()
    assert refusals(caplog) == [said]
    planted.unlink()
    reaper_pass()
    time.sleep(0.05)  # a link made anew, not the same one seen again
    planted.symlink_to(victim)
    reaper_pass()
    reaper_pass()
    assert refusals(caplog) == [said, said]
    # A person running reap_locks, or looking at the admin's locks page, is told each time.
    caplog.clear()
    for _ in range(2):
        assert run_in_process_reap_locks() == "0 requeued, 0 blocked, 0 orphan locks"
    assert refusals(caplog) == [said, said]
    caplog.clear()
    assert admin_client.get(LOCKS_PAGE).status_code == 200
    assert said in refusals(caplog)
    assert planted.is_symlink() and snapshot(victim) == before


def run_in_process_reap_locks() -> str:
    """`reap_locks` in this process, which has logged the link already."""
    out = StringIO()
    call_command("reap_locks", stdout=out)
    return out.getvalue().strip()
