"""Task state has one owner: the transitions, each guarded, each with its event and fence."""

from __future__ import annotations

import ast
import fcntl
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from hypervisor_site.writers import writer_lock_path
from tests.conftest import make_tasks, run_manage
from tests.test_lock_root_hostile import dead_pid
from workqueue import actions, claims, locks, reaper, transitions
from workqueue.locks import Identity, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent
from workqueue.processing import Result
from workqueue.processors import NoopProcessor
from workqueue.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def dead_identity(name: str) -> Identity:
    """A worker of this host that is provably gone."""
    return Identity(worker=name, host=Identity.current().host, pid=dead_pid(), started=1.0)


def events(task: Task) -> list[tuple[str, int | None]]:
    return list(task.events.order_by("at", "id").values_list("kind", "fence"))


# One owner ----------------------------------------------------------------------------

STATE_COLUMNS = {"status", "holder", "lease_expires_at", "fence", "agent_pgid"}


def test_only_the_transitions_write_a_tasks_state():
    """No module but transitions names a state column in an update() or a save()."""
    offenders = []
    for path in [*ROOT.glob("workqueue/**/*.py"), *ROOT.glob("herds/**/*.py")]:
        if "migrations" in path.parts or path.name == "transitions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr in ("update", "bulk_update", "update_or_create"):
                written = {k.arg for k in node.keywords} & STATE_COLUMNS
                if written and "Task" in ast.unparse(node.func.value):
                    offenders.append(f"{path.name}:{node.lineno} {sorted(written)}")
    assert offenders == []


@pytest.mark.django_db
def test_every_transition_records_its_event_with_the_fence(lock_root):
    make_tasks("q", 1)
    me = Identity.current("w")
    mine = OwnerFile(me)
    [claim] = claims.claim_ready_tasks("q", me, mine)
    claims.finish_claims(me, [(claim, Result(status=Status.BLOCKED, reason="no"))], mine)
    task = Task.objects.get()
    assert transitions.requeue([task], "nic")
    task.refresh_from_db()
    assert transitions.block([task], "nic", "waiting")
    task.refresh_from_db()
    assert transitions.mark_done([task], "nic")
    assert events(Task.objects.get()) == [
        (EventKind.CLAIMED, claim.fence),
        (EventKind.BLOCKED, claim.fence),
        (EventKind.REQUEUED, claim.fence),
        (EventKind.BLOCKED, claim.fence),
        (EventKind.DONE, claim.fence),
    ]


@pytest.mark.django_db
def test_a_transition_from_a_state_the_task_has_left_changes_nothing(lock_root):
    make_tasks("q", 1)
    seen = Task.objects.get()
    me = Identity.current("w")
    claims.claim_ready_tasks("q", me, OwnerFile(me))
    # A person acts on the board's stale copy: the task was claimed meanwhile.
    assert not transitions.block([seen], "nic", "stale page")
    assert not transitions.mark_done([seen], "nic")
    task = Task.objects.get()
    assert (task.status, task.holder) == (Status.CLAIMED, "w")
    assert [k for k, _ in events(task)] == [EventKind.CLAIMED]


@pytest.mark.django_db
def test_requeue_refuses_a_claimed_task_and_release_a_queued_one():
    (task,) = make_tasks("q", 1)
    assert not transitions.requeue([task], "nic")
    assert not transitions.release_by_person([task], "nic")
    assert not task.events.exists()


def test_the_admin_shows_state_read_only():
    from workqueue.admin import TaskAdmin

    assert {"status", "holder", "lease_expires_at", "fence", "attempts"} <= set(
        TaskAdmin.readonly_fields
    )


# Bug 1: the reaper never removes a lock a new worker took meanwhile ------------------


@pytest.mark.django_db
def test_reaping_keeps_the_lock_a_new_worker_took_after_the_row_was_released(lock_root):
    make_tasks("q", 1)
    dead = dead_identity("dead")
    claims.claim_ready_tasks("q", dead, OwnerFile(dead))
    [stale] = reaper.find_stale_claims("q")
    # The reaper commits the row ...
    assert transitions.release_by_reaper(stale.task, stale.why, "reaper", 3) == Status.QUEUED
    # ... a worker claims the task and puts its lock in place of the dead one's ...
    me = Identity.current("new")
    [claim] = claims.claim_ready_tasks("q", me, OwnerFile(me))
    assert locks.read_owner(locks.lock_dir("q", claim.key))["worker"] == "new"
    # ... then the reaper lets go of the claim it released.
    reaper.let_go(stale.task, "reaper")
    assert locks.read_owner(locks.lock_dir("q", claim.key))["worker"] == "new"


@pytest.mark.django_db
def test_a_person_releasing_a_claim_keeps_a_lock_taken_since(lock_root):
    make_tasks("q", 1)
    dead = dead_identity("dead")
    claims.claim_ready_tasks("q", dead, OwnerFile(dead))
    seen = Task.objects.get()
    assert actions.release(seen, "nic")
    me = Identity.current("new")
    claims.claim_ready_tasks("q", me, OwnerFile(me))
    reaper.let_go(seen, "nic")  # a second, late clean-up of the same release
    assert locks.read_owner(locks.lock_dir("q", "t000000"))["worker"] == "new"


@pytest.mark.django_db
def test_reaping_removes_the_dead_holders_own_lock(lock_root):
    make_tasks("q", 1)
    dead = dead_identity("dead")
    claims.claim_ready_tasks("q", dead, OwnerFile(dead))
    report = reaper.release_stale_claims("q")
    assert [s.task.key for s in report.requeued] == ["t000000"]
    assert not locks.lock_dir("q", "t000000").exists()
    assert list(Path(lock_root, locks.SPARES).iterdir()) == []  # nothing left aside


# Bug 2: the heartbeat renews only the claims held now -------------------------------


@pytest.mark.django_db
def test_heartbeat_renews_only_the_claims_this_worker_holds_now(lock_root):
    make_tasks("q", 2)
    # A dead process had the same worker name (a herd worker's name is fixed).
    gone = dead_identity("herd1-w0")
    claims.claim_ready_tasks("q", gone, OwnerFile(gone), limit=1)
    Task.objects.filter(key="t000000").update(lease_expires_at=timezone.now())
    me = Identity.current("herd1-w0")
    [mine] = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=1)
    assert transitions.heartbeat(me, [mine], 300) == 1
    old, new = Task.objects.order_by("key")
    assert old.lease_expires_at <= timezone.now()
    assert new.lease_expires_at > timezone.now() + timedelta(seconds=200)


@pytest.mark.django_db
def test_heartbeat_does_not_renew_a_claim_lost_and_taken_again(lock_root):
    make_tasks("q", 1)
    me = Identity.current("w")
    [lost] = claims.claim_ready_tasks("q", me, OwnerFile(me))
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    reaper.release_stale_claims("q")
    claims.claim_ready_tasks("q", me, OwnerFile(me))  # the same worker claims it anew
    assert transitions.heartbeat(me, [lost], 300) == 0


# Bug 3: a finish whose acknowledgement was lost -------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_finish_retried_after_its_commit_went_through_counts_as_done(lock_root):
    make_tasks("q", 2)
    worker = Worker("q", NoopProcessor(), prefetch=2, name="w")
    real_finish = claims.finish_claims
    lost = []

    def finish_then_lose_the_answer(*args):
        report = real_finish(*args)
        if not lost:
            lost.append(report)
            raise OperationalError("server closed the connection unexpectedly")
        return report

    claims.finish_claims = finish_then_lose_the_answer
    try:
        assert worker.work_one_batch()
    finally:
        claims.finish_claims = real_finish
    assert lost[0].finished  # the first try committed
    assert (worker.stats.done, worker.stats.refused) == (2, 0)
    assert set(Task.objects.values_list("status", flat=True)) == {Status.DONE}
    assert not TaskEvent.objects.filter(kind=EventKind.LATE_FINISH_REFUSED).exists()
    assert TaskEvent.objects.filter(kind=EventKind.DONE).count() == 2
    assert not list(Path(lock_root, "q").iterdir())


@pytest.mark.django_db
def test_a_finish_repeated_by_a_worker_that_lost_its_claim_is_still_refused(lock_root):
    make_tasks("q", 1)
    me, other = Identity.current("me"), Identity.current("other")
    mine, theirs = OwnerFile(me), OwnerFile(other)
    [lost] = claims.claim_ready_tasks("q", me, mine)
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    reaper.release_stale_claims("q")
    claims.claim_ready_tasks("q", other, theirs)
    for _ in range(2):
        assert claims.finish_claims(me, [(lost, Result())], mine).refused == [lost.id]
    assert Task.objects.get().status == Status.CLAIMED


# Bug 4: every writer queues on the writers' lock ---------------------------------


def _board_action(client, task):
    client.post(f"/tasks/{task.pk}/action/", {"action": "block", "reason": "held"})


def _admin_action(client, task):
    client.post("/admin/queue/task/", {"action": "mark_done", "_selected_action": [task.pk]})


def _reaper(client, task):
    reaper.release_stale_claims("q")


def _import(client, task):
    from workqueue.importer import Importer

    Importer("q", []).run([])
    Task.objects.filter(pk=task.pk).update(title="renamed by a plain save")


def _herd_bookkeeping(client, task):
    from herds.models import Herd, Profile

    profile = Profile.objects.get_or_create(name="noop", defaults={"processor": "noop"})[0]
    Herd.objects.create(queue="q", profile=profile, size=1)


@pytest.mark.skipif("connection.vendor != 'sqlite'", reason="SQLite's writers' queue")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "write", [_board_action, _admin_action, _reaper, _import, _herd_bookkeeping]
)
def test_every_writer_waits_its_turn_at_the_writers_lock(admin_client, write, lock_root):
    make_tasks("q", 1)
    dead = dead_identity("dead")
    claims.claim_ready_tasks("q", dead, OwnerFile(dead))  # a stale claim for the reaper
    task = Task.objects.get()
    admin_client.get("/")  # the session is written before the lock is taken
    path = writer_lock_path(connection.settings_dict["NAME"])
    done = threading.Event()
    failed: list[BaseException] = []

    def run():
        try:
            write(admin_client, task)
        except BaseException as exc:  # reported below
            failed.append(exc)
        finally:
            connection.close()
            done.set()

    with open(path, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        thread = threading.Thread(target=run)
        thread.start()
        # It waits in the queue, not in SQLite's busy handler (which would give up or
        # slip in between others).
        assert not done.wait(1.0)
        fcntl.flock(other, fcntl.LOCK_UN)
    assert done.wait(30)
    thread.join()
    assert failed == []


# Bug 5: a quota result is given back in one write ----------------------------------


@pytest.mark.django_db
def test_a_quota_result_is_given_back_in_one_write_without_counting_the_attempt(lock_root):
    make_tasks("q", 1)
    me = Identity.current("w")
    mine = OwnerFile(me)
    [claim] = claims.claim_ready_tasks("q", me, mine)
    quota = Result(status=Status.QUEUED, reason="rate limited", data={"quota": "429"})
    claims.finish_claims(me, [(claim, quota)], mine)
    task = Task.objects.get()
    assert (task.status, task.attempts, task.holder) == (Status.QUEUED, 0, "")
    assert [k for k, _ in events(task)] == [EventKind.CLAIMED, EventKind.RELEASED]
    assert task.events.get(kind=EventKind.RELEASED).data["quota"] == "429"


# Bug 6: a profile's attempt limit, inside the reaper's write -------------------------


@pytest.mark.django_db
def test_the_claims_attempt_limit_blocks_in_the_reapers_own_write(lock_root):
    make_tasks("q", 1)
    Queue.objects.filter(name="q").update(max_attempts=5)
    dead = dead_identity("w")
    claims.claim_ready_tasks("q", dead, OwnerFile(dead), max_attempts=1)
    report = reaper.release_stale_claims("q")
    task = Task.objects.get()
    assert [s.task.key for s in report.blocked] == ["t000000"]
    assert (task.status, task.reason) == (
        Status.BLOCKED,
        "abandoned after 1 attempt (profile limit 1)",
    )
    # One write: the claim, then the reap that blocked it, nothing between.
    assert [k for k, _ in events(task)] == [EventKind.CLAIMED, EventKind.REAPED]


def test_a_profiles_attempt_limit_rides_on_its_workers_claims(process_env):
    from herds.models import Profile

    Profile.objects.create(name="careful", processor="noop", max_attempts=2)
    make_tasks("q", 1)
    result = run_manage(["work", "--queue", "q", "--profile", "careful"], process_env)
    assert result.returncode == 0, result.stderr
    assert Task.objects.get().max_attempts == 2


@pytest.mark.django_db
def test_no_claim_escapes_the_limit_between_reap_and_claim(lock_root):
    make_tasks("q", 1)
    dead = dead_identity("w")
    claims.claim_ready_tasks("q", dead, OwnerFile(dead), max_attempts=1)
    stale = reaper.find_stale_claims("q")
    me = Identity.current("eager")
    assert claims.claim_ready_tasks("q", me, OwnerFile(me)) == []  # still claimed
    reaper.release_stale_claims("q")
    assert claims.claim_ready_tasks("q", me, OwnerFile(me)) == []  # blocked, not queued
    assert stale and Task.objects.get().status == Status.BLOCKED
