"""Herds and the Huey consumer: no thread held for a herd's life, and a dead consumer's
herds adopted by the next one. Real consumers, real worker processes, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from datetime import timedelta

import psutil
import pytest
from django.utils import timezone

from herds import processes
from herds.models import ExitClass, Herd, HerdStatus, HerdWorker, Profile
from tests.conftest import make_tasks, start_manage
from tests.test_herds_command import LAUNCH
from tests.test_herds_processes import agent_profile, launch, wait_until, worker_logs
from workqueue.models import EventKind, Status, Task, TaskEvent

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def running_consumer(env: dict[str, str], log_path):
    with open(log_path, "a") as log:
        proc = start_manage(["run_huey"], env, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except Exception:
                proc.kill()
                proc.wait()


@pytest.fixture
def end_workers():
    yield
    # Whatever a failing test left behind must not outlive it.
    for worker in HerdWorker.objects.all():
        processes.terminate_trees([(worker.pid, worker.process_started)], grace=1)


def fork_server_of(consumer) -> psutil.Process:
    def find():
        for child in psutil.Process(consumer.pid).children():
            with contextlib.suppress(psutil.Error):
                if "forkserver" in " ".join(child.cmdline()):
                    return child
        return None

    return wait_until(find, 30, what="the consumer's fork server")


def gone(worker: HerdWorker) -> bool:
    """Neither running nor a zombie: its parent waited on it."""
    try:
        return psutil.Process(worker.pid).create_time() != worker.process_started
    except psutil.NoSuchProcess:
        return True


# A real consumer whose launch waits 2 s between two workers, so a test can kill it mid-launch.
SLOW_LAUNCH_CONSUMER = (
    "import types; from herds import supervision; "
    "supervision.STAGGER_SECONDS = 2; "
    "supervision.random = types.SimpleNamespace(uniform=lambda low, high: high); "
    "from django.core.management import call_command; call_command('run_huey')"
)


def test_consumer_killed_mid_launch_is_adopted_at_start_up(huey_env, tmp_path, end_workers):
    agent_profile("steady", "--sleep", "0.5")
    make_tasks("midq", 12)
    with open(tmp_path / "first.log", "w") as log:
        args = ["shell", "-c", SLOW_LAUNCH_CONSUMER]
        first = start_manage(args, huey_env, stdout=log, stderr=log)
    try:
        herd_id = launch(huey_env, "--queue", "midq", "--profile", "steady", "--workers", "4")
        wait_until(
            lambda: HerdWorker.objects.filter(herd_id=herd_id, index=1).exclude(pid=None).exists(),
            60,
            interval=0.02,
            what="the second worker started",
        )
    finally:
        first.kill()  # two workers of four started: the consumer dies mid-launch
        first.wait()
    herd = Herd.objects.get(pk=herd_id)
    assert herd.status == HerdStatus.RUNNING and herd.launched_at is None
    started = list(herd.workers.exclude(pid=None))
    assert len(started) == 2

    with running_consumer(huey_env, tmp_path / "second.log") as second:
        restarted = time.monotonic()
        wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 60, what="the herd to end")
        adopted_in = time.monotonic() - restarted
        assert second.poll() is None

    herd.refresh_from_db()
    assert herd.status == HerdStatus.FINISHED, (herd.reason, worker_logs())
    assert adopted_in < 30  # the start-up pass and the start grace, not a 10-minute timeout
    assert Task.objects.filter(queue="midq", status=Status.DONE).count() == 12
    rows = {w["index"]: w for w in herd.summary["worker_processes"]}
    for worker in started:
        # The codes the workers reported themselves: the consumer that started them is gone.
        assert rows[worker.index]["exit_class"] == "finished", rows
        assert rows[worker.index]["exit_code"] == 0
    assert sum(rows[w.index]["done"] for w in started) == 12
    never = [row for row in rows.values() if row["pid"] is None]
    assert all("never started" in row["exit_detail"] for row in never)


def test_sigint_stops_a_consumer_in_seconds_while_its_herd_runs(huey_env, tmp_path, end_workers):
    agent_profile("sleepy", "--sleep", "60")
    make_tasks("intq", 4)
    with running_consumer(huey_env, tmp_path / "consumer.log") as consumer:
        herd_id = launch(huey_env, "--queue", "intq", "--profile", "sleepy", "--workers", "2")
        wait_until(
            lambda: Task.objects.filter(queue="intq", status=Status.CLAIMED).count() == 2,
            60,
            what="two claims",
        )
        asked = time.monotonic()
        consumer.send_signal(signal.SIGINT)
        code = consumer.wait(timeout=30)
        stopped_in = time.monotonic() - asked

    assert code == 0 and stopped_in < 10, (code, stopped_in)
    # The workers outlive it, for the next consumer to look after.
    herd = Herd.objects.get(pk=herd_id)
    assert herd.status == HerdStatus.RUNNING
    assert all(processes.leader(w.pid, w.process_started) for w in herd.workers.all())


def test_fork_server_waits_on_workers_and_their_codes_reach_the_rows(huey_env, tmp_path):
    agent_profile("steady", "--sleep", "1")
    make_tasks("zombieq", 6)
    with running_consumer(huey_env, tmp_path / "consumer.log") as consumer:
        herd_id = launch(huey_env, "--queue", "zombieq", "--profile", "steady", "--workers", "2")
        victim = wait_until(
            lambda: HerdWorker.objects.filter(herd_id=herd_id, index=0, state="running").first(),
            60,
            what="worker 0 running",
        )
        # Killed holding a claim: with its task back in the queue, a worker (index 2) is
        # started in its place, a child of the fork server like the others.
        wait_until(
            lambda: Task.objects.filter(status=Status.CLAIMED, holder_pid=victim.pid).exists(),
            30,
            what="a claim by worker 0",
        )
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 90, what="the herd to end")
        workers = list(HerdWorker.objects.filter(herd_id=herd_id))
        assert consumer.poll() is None
        assert all(gone(w) for w in workers), [psutil.Process(w.pid) for w in workers]

    codes = {w.index: (w.exit_class, w.exit_code) for w in workers}
    assert codes == {
        0: (ExitClass.CRASHED, -signal.SIGKILL),
        1: (ExitClass.FINISHED, 0),
        2: (ExitClass.FINISHED, 0),
    }


def test_ten_herds_on_two_consumer_threads_all_start_and_the_reaper_still_runs(
    huey_env, consumer_huey, tmp_path, end_workers
):
    reap_interval = 3
    env = {**huey_env, "HUEY_WORKERS": "2", "HYPERVISOR_REAP_INTERVAL": str(reap_interval)}
    profile = agent_profile("steady", "--sleep", "1")
    for n in range(10):
        make_tasks(f"ten{n}", 10)
    make_tasks("loneq", 1)
    with running_consumer(env, tmp_path / "consumer.log"):
        # A worker outside any herd: only the periodic reaper can give its claim back.
        with open(tmp_path / "lone.log", "w") as log:
            lone = start_manage(
                ["work", "--queue", "loneq", "--processor", "command", "--"]
                + [sys.executable, "-c", "import time; time.sleep(120)"],
                env,
                stdout=log,
                stderr=log,
            )
        held = wait_until(
            lambda: Task.objects.filter(queue="loneq", status=Status.CLAIMED).first(),
            60,
            what="the lone worker's claim",
        )
        lone_tree = wait_until(
            lambda: (tree := processes.tree(lone.pid, None)) and len(tree) >= 2 and tree,
            30,
            what="the lone worker's agent",
        )

        asked = time.monotonic()
        herds = [Herd.launch(f"ten{n}", profile, size=1) for n in range(10)]
        wait_until(
            lambda: (
                Herd.objects.filter(launched_at__isnull=False).count() == 10
                and not HerdWorker.objects.filter(pid=None).exists()
            ),
            30,
            interval=0.05,
            what="ten herds launched",
        )
        # Under a herd's run (ten tasks of 1 s): no launch waited for another herd to end,
        # with room for a loaded machine (5 s failed once at a load of 7 to 10).
        assert time.monotonic() - asked < 9
        assert Herd.objects.filter(pk__in=[h.pk for h in herds], status="running").count() == 10

        lone.kill()
        lone.wait()
        killed = time.monotonic()
        wait_until(
            lambda: Task.objects.get(pk=held.pk).status != Status.CLAIMED,
            reap_interval + 10,
            interval=0.1,
            what="the periodic reaper to put the claim back",
        )
        assert time.monotonic() - killed <= reap_interval + 5
        assert TaskEvent.objects.filter(
            task=held, kind=EventKind.REAPED, actor="reaper (huey)"
        ).exists()
        assert Herd.objects.filter(status="running").count() == 10  # still running meanwhile

        wait_until(lambda: all(h.ended for h in Herd.objects.all()), 180, what="every herd to end")
    processes.signal_tree(lone_tree, signal.SIGKILL)
    assert set(Herd.objects.values_list("status", flat=True)) == {HerdStatus.FINISHED}
    assert Task.objects.filter(queue__startswith="ten", status=Status.DONE).count() == 100


def unsent_herd(queue: str, profile: Profile, **fields) -> Herd:
    """A herd's row without its launch sent to Huey, as a process that died between the
    two (or a Huey storage down then) left it."""
    return Herd.objects.create(queue=queue, profile=profile, size=2, **fields)


def test_a_consumer_that_starts_launches_a_herd_whose_launch_was_never_sent(
    huey_env, consumer_huey, tmp_path, end_workers
):
    """Such a herd waited as pending for ever, its page saying to start a consumer that
    was running."""
    profile, _ = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("unsent", 6)
    herd = unsent_herd("unsent", profile)
    assert consumer_huey.pending() == []
    with running_consumer(huey_env, tmp_path / "consumer.log"):
        wait_until(lambda: Herd.objects.get(pk=herd.pk).ended, 60, what="the herd to end")
    herd.refresh_from_db()
    assert herd.status == HerdStatus.FINISHED, herd.reason
    assert Task.objects.filter(queue="unsent", status=Status.DONE).count() == 6
    claims = TaskEvent.objects.filter(task__queue="unsent", kind=EventKind.CLAIMED)
    assert claims.count() == 6


def test_a_minutes_pass_sends_again_the_launch_of_a_herd_pending_for_over_a_minute(
    huey_env, consumer_huey
):
    from herds import tasks

    profile, _ = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("late", 1)
    long_ago = timezone.now() - timedelta(seconds=tasks.LAUNCH_UNSENT + 5)
    waited = unsent_herd("late", profile, created_at=long_ago)
    unsent_herd("late", profile)  # just made: its launch may be on its way
    unsent_herd("late", profile, created_at=long_ago, status=HerdStatus.RUNNING)
    tasks.supervise_herds.call_local()
    launches = [t.args for t in consumer_huey.pending() if t.name == LAUNCH]
    assert launches == [(waited.pk,)]
