"""Supervision passes without a launch task: real processes, real claims, no consumer."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from herds import processes, supervision
from herds.models import ExitClass, Herd, HerdStatus, Profile, WorkerState
from tests.conftest import make_tasks, run_manage
from tests.test_herds_views import client_for
from workqueue.models import EventKind, Status, Task, TaskEvent

pytestmark = pytest.mark.django_db(transaction=True)


def running_noop_herd(queue: str, ready: int) -> Herd:
    """A herd of one no-op worker, launched and running, as a supervision pass finds it."""
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    now = timezone.now()
    return Herd.objects.create(
        queue=queue,
        profile=profile,
        size=1,
        status=HerdStatus.RUNNING,
        started_at=now,
        launched_at=now,
        preflight={"ready": ready},
    )


@pytest.fixture
def running_herd() -> Herd:
    return running_noop_herd("supq", ready=2)


def start_sleeper(seconds: str = "60") -> subprocess.Popen:
    """A stand-in worker with a child of its own, in its own session like a real one."""
    sleeper = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess; subprocess.run(['sleep', '{seconds}'])"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while len(processes.tree(sleeper.pid, None)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return sleeper


def exited_worker(herd: Herd):
    """A worker row of this host whose process has already exited."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = processes.create_time(gone.pid)
    gone.wait()
    return herd.workers.create(
        index=0,
        name="herd-w0",
        host=supervision.settings.HYPERVISOR_HOST,
        pid=gone.pid,
        process_started=started,
    )


def silent_worker(herd: Herd, process: subprocess.Popen):
    """A worker row of this host for a live process, its last heartbeat 30 s ago."""
    return herd.workers.create(
        index=0,
        name="herd-w0",
        host=supervision.settings.HYPERVISOR_HOST,
        pid=process.pid,
        process_started=processes.create_time(process.pid),
        heartbeat_at=timezone.now() - timedelta(seconds=30),
    )


def test_periodic_pass_reaps_a_dead_workers_claim_and_finishes_the_herd(
    running_herd, workers_by_popen
):
    make_tasks("supq", 2)
    worker = exited_worker(running_herd)
    task = Task.objects.get(key="t000000")
    Task.objects.filter(pk=task.pk).update(
        status=Status.CLAIMED,
        holder="herd-w0",
        holder_host=supervision.settings.HYPERVISOR_HOST,
        holder_pid=worker.pid,
        holder_started=worker.process_started,
        holder_herd=running_herd.pk,
        lease_expires_at=timezone.now() + timedelta(hours=1),
        fence=1,
    )

    assert supervision.supervise_running_herds() == 1

    worker.refresh_from_db()
    assert worker.state == WorkerState.EXITED and worker.exit_class == ExitClass.CRASHED
    assert TaskEvent.objects.filter(task=task, kind=EventKind.REAPED).count() == 1
    # Its claim went back before a worker was started in its place, which takes it.
    (replacement,) = workers_by_popen
    reaped = TaskEvent.objects.get(task=task, kind=EventKind.REAPED).at
    assert reaped <= running_herd.workers.get(replaces=worker).started_at
    replacement.process.wait(timeout=60)
    assert supervision.supervise_running_herds() == 1
    assert supervision.supervise_running_herds() == 0  # ended once; a second pass finds nothing
    assert Task.objects.filter(status=Status.DONE).count() == 2
    assert TaskEvent.objects.filter(task=task, kind=EventKind.DONE).count() == 1
    running_herd.refresh_from_db()
    assert running_herd.status == HerdStatus.FINISHED  # its replacement finished
    rows = running_herd.summary["worker_processes"]
    assert [(row["exit_class"], row["replaces"]) for row in rows] == [
        ("crashed", None),
        ("finished", "herd-w0"),
    ]


def test_the_summary_counts_the_tasks_its_workers_gave_back(running_herd):
    """done + blocked + given back adds up to what the herd claimed: a task given back
    (exit 75, a drain, a release, a dead worker's claim reaped) is counted, not lost."""
    from workqueue import transitions
    from workqueue.locks import Identity
    from workqueue.processing import Result

    make_tasks("supq", 6)
    worker = exited_worker(running_herd)
    me = Identity(
        "herd-w0",
        supervision.settings.HYPERVISOR_HOST,
        worker.pid,
        worker.process_started,
        running_herd.pk,
    )
    claims = transitions.claim("supq", me, 6, 3600)
    done, blocked, exit_75, busy, drained, left = claims
    transitions.finish(
        me,
        [
            (done, Result()),
            (blocked, Result(status=Status.BLOCKED, reason="no tests")),
            (exit_75, Result(status=Status.QUEUED, reason="agent asked to retry (exit 75)")),
        ],
    )
    transitions.give_back(me, [busy], EventKind.LOCK_BUSY, "lock directory held")
    transitions.release_by_worker(me, [drained], "herd draining", counted=False)
    # `left` is still claimed as the worker stops (with code 0, or another would be started
    # in its place to take the four given back): supervision reaps it back to the queue.
    type(worker).objects.filter(pk=worker.pk).update(exit_code=0)

    supervision.supervise_running_herds()

    running_herd.refresh_from_db()
    summary = running_herd.summary
    assert (summary["claimed"], summary["done"], summary["blocked"]) == (6, 1, 1)
    assert summary["given_back"] == 4
    assert summary["given_back_by"] == {"released": 2, "lock busy": 1, "reaped": 1}
    assert summary["done"] + summary["blocked"] + summary["given_back"] == summary["claimed"]
    assert Task.objects.get(pk=left.id).status == Status.QUEUED
    page = client_for(User.objects.create_superuser("admin")).get(
        reverse("herds:detail", args=[running_herd.pk])
    )
    text = page.content.decode()
    # The four given back are ready again as the herd ends: its one worker is gone.
    assert summary["left_ready"] == 4
    assert "1 done, 1 blocked, 4 given back (of 6 claims), 4 still ready in" in text
    assert "Given back to the queue: 1 lock busy, 1 reaped, 2 released" in text
    # Another herd's events on the same queue are not this herd's.
    other = Herd.objects.create(queue="supq", profile=running_herd.profile, size=1)
    other.started_at = running_herd.started_at
    assert other.build_summary()["claimed"] == 0


def test_a_cancel_that_must_kill_a_worker_gives_its_claim_back_uncounted(running_herd, settings):
    """A worker whose agent ignores SIGTERM outlives the cancel's grace and is killed: its
    task was not at fault. Counted, the third such cancel blocked it as abandoned."""
    from workqueue import transitions
    from workqueue.locks import Identity

    settings.HYPERVISOR_CANCEL_GRACE = 0.5
    make_tasks("supq", 1)
    deaf = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(15, 1); time.sleep(60)"],
        start_new_session=True,
    )
    try:
        time.sleep(0.3)  # its SIGTERM handler is set
        worker = silent_worker(running_herd, deaf)
        host = supervision.settings.HYPERVISOR_HOST
        me = Identity("herd-w0", host, deaf.pid, worker.process_started, running_herd.pk)
        (claim,) = transitions.claim("supq", me, 1, 3600)
        Task.objects.filter(pk=claim.id).update(attempts=3)  # its third cancel
        running_herd.request_cancel("cancelled by the test")

        assert supervision.supervise(running_herd) is False

        task = Task.objects.get(pk=claim.id)
        assert (task.status, task.attempts) == (Status.QUEUED, 2), task.reason
        worker.refresh_from_db()
        assert "killed after the grace period" in worker.exit_detail
    finally:
        processes.terminate_trees([(deaf.pid, None)], grace=1)


def test_silent_worker_is_ended_as_timed_out(running_herd, settings):
    settings.HYPERVISOR_LEASE_SECONDS = 1
    sleeper = start_sleeper()
    try:
        worker = silent_worker(running_herd, sleeper)
        tree = processes.tree(sleeper.pid, worker.process_started)
        assert len(tree) == 2

        assert supervision.supervise(running_herd) is False

        sleeper.wait(timeout=10)
        assert all(not p.is_running() or p.status() == "zombie" for p in tree)
        worker.refresh_from_db()
        assert worker.exit_class == ExitClass.TIMED_OUT
        assert "no heartbeat" in worker.exit_detail
    finally:
        processes.terminate_trees([(sleeper.pid, None)], grace=1)


def test_a_silent_worker_is_timed_out_when_another_pass_looks_during_its_grace(
    running_herd, settings, monkeypatch
):
    """The pass that ends a silent worker waits out the grace before it records the end; a
    pass on another consumer thread meanwhile found the pid gone and recorded "crashed:
    killed by signal 9", and the herd ended failed."""
    settings.HYPERVISOR_LEASE_SECONDS = 1
    sleeper = start_sleeper()
    worker = silent_worker(running_herd, sleeper)
    real_terminate = processes.terminate_trees

    def terminate_while_another_pass_looks(targets, grace):
        killed = real_terminate(targets, grace)
        sleeper.wait(timeout=10)
        supervision.check_worker(running_herd, type(worker).objects.get(pk=worker.pk), None)
        return killed

    monkeypatch.setattr(processes, "terminate_trees", terminate_while_another_pass_looks)
    try:
        supervision.supervise(running_herd)
    finally:
        monkeypatch.setattr(processes, "terminate_trees", real_terminate)
        real_terminate([(sleeper.pid, None)], grace=1)
    worker.refresh_from_db()
    running_herd.refresh_from_db()
    assert (worker.exit_class, worker.exit_detail[:15]) == (ExitClass.TIMED_OUT, "no heartbeat fo")
    assert running_herd.status == HerdStatus.FINISHED


def test_a_herd_whose_workers_all_crashed_says_why(running_herd, tmp_path):
    """It ended failed with no reason: the cause was a traceback's last line in a log."""
    worker = exited_worker(running_herd)
    log = tmp_path / "worker-0.log"
    log.write_text(
        "Traceback (most recent call last):\n  ...\ndjango.core.management.base."
        "CommandError: --worktree-repo /srv/x: not a git checkout\n\n"
    )
    type(worker).objects.filter(pk=worker.pk).update(log_path=str(log))
    supervision.supervise(running_herd)
    running_herd.refresh_from_db()
    assert running_herd.status == HerdStatus.FAILED
    assert running_herd.reason == (
        "every worker crashed (herd-w0: died without reporting an exit code: "
        "django.core.management.base.CommandError: --worktree-repo /srv/x: not a git checkout)"
    )


def test_a_worker_killed_by_a_signal_is_not_said_to_have_died_of_its_last_log_line(
    running_herd, tmp_path
):
    """Its last line is whatever it was doing (a task it finished), not why it ended."""
    worker = exited_worker(running_herd)
    log = tmp_path / "worker-0.log"
    log.write_text("2026-12-07 10:00:35,531 INFO workqueue.worker: v-074 done ok\n")
    type(worker).objects.filter(pk=worker.pk).update(log_path=str(log), exit_code=-9)
    supervision.supervise(running_herd)
    worker.refresh_from_db()
    assert (worker.exit_class, worker.exit_detail) == (
        ExitClass.CRASHED,
        "killed by SIGKILL (signal 9)",
    )


def test_live_worker_gets_cpu_memory_and_children_sampled(running_herd):
    sleeper = start_sleeper()
    try:
        worker = running_herd.workers.create(
            index=0,
            name="herd-w0",
            host=supervision.settings.HYPERVISOR_HOST,
            pid=sleeper.pid,
            process_started=processes.create_time(sleeper.pid),
            heartbeat_at=timezone.now(),
        )
        assert supervision.supervise(running_herd) is True
        assert supervision.supervise(running_herd) is True
        worker.refresh_from_db()
        assert worker.state == WorkerState.STARTING
        assert worker.rss_bytes > 0 and worker.children == 1
        assert worker.cpu_percent is not None
    finally:
        processes.terminate_trees([(sleeper.pid, None)], grace=1)
        sleeper.wait(timeout=10)


@pytest.mark.parametrize(
    "limits, reason",
    [
        ({"wall_clock_limit": 1}, "wall-clock limit of 1 s reached"),
        ({"token_budget": 50}, "token budget of 50 reached"),
        ({"cost_budget_usd": Decimal("0.25")}, "cost budget of $0.2500 reached"),
    ],
)
def test_limits_drain_the_herd_and_tell_its_workers(running_herd, limits, reason):
    Herd.objects.filter(pk=running_herd.pk).update(
        started_at=timezone.now() - timedelta(seconds=5), **limits
    )
    sleeper = start_sleeper()
    try:
        worker = running_herd.workers.create(
            index=0,
            name="herd-w0",
            host=supervision.settings.HYPERVISOR_HOST,
            pid=sleeper.pid,
            process_started=processes.create_time(sleeper.pid),
            heartbeat_at=timezone.now(),
            tokens=80,
            cost_usd=Decimal("0.3"),
        )
        supervision.supervise(running_herd)
        running_herd.refresh_from_db()
        worker.refresh_from_db()
        assert running_herd.draining and running_herd.reason == reason
        assert worker.drain_reason == reason
    finally:
        processes.terminate_trees([(sleeper.pid, None)], grace=1)
        sleeper.wait(timeout=10)


def crashed_worker(herd, log, program: str, **fields):
    """A worker row of `herd` whose process ran `program` (its output into `log`, added
    to what is there) and is gone."""
    with log.open("a") as out:
        crashed = subprocess.Popen([sys.executable, "-c", program], stdout=out)
    started = processes.create_time(crashed.pid)
    crashed.wait()
    return herd.workers.create(
        index=0,
        name="herd-w0",
        host=supervision.settings.HYPERVISOR_HOST,
        pid=crashed.pid,
        process_started=started,
        log_path=str(log),
        **fields,
    )


def test_worker_that_died_of_a_rate_limit_drains_the_herd(running_herd, tmp_path):
    Profile.objects.filter(pk=running_herd.profile_id).update(quota_pattern=r"\b429\b")
    running_herd.refresh_from_db()
    program = "import sys; print('HTTP 429 Too Many Requests'); sys.exit(1)"
    worker = crashed_worker(running_herd, tmp_path / "worker-0.log", program, exit_code=1)

    supervision.supervise(running_herd)

    worker.refresh_from_db()
    running_herd.refresh_from_db()
    assert worker.exit_class == ExitClass.QUOTA and "429" in worker.exit_detail
    assert running_herd.draining and "quota or rate limit reached (429)" in running_herd.reason


def test_a_long_quota_match_in_a_crashed_workers_log_still_ends_the_herd(running_herd, tmp_path):
    """The match went whole into the workers' drain reason (500 characters): PostgreSQL
    refused it in every pass, and the herd stayed running for ever."""
    Profile.objects.filter(pk=running_herd.profile_id).update(quota_pattern=r"rate limit.*")
    running_herd.refresh_from_db()
    log = tmp_path / "worker-0.log"
    log.write_text("t1 blocked: upstream said: rate limit " + "x" * 700 + "\n")
    worker = crashed_worker(running_herd, log, "import os; os.kill(os.getpid(), 9)")
    assert supervision.supervise(running_herd) is False
    running_herd.refresh_from_db()
    worker.refresh_from_db()
    assert running_herd.ended and worker.exit_class == ExitClass.QUOTA
    clipped = "rate limit " + "x" * 189
    assert running_herd.reason == f"quota or rate limit reached ({clipped}) in herd-w0"


def test_exit_code_reported_after_the_pass_loaded_the_row_is_used(running_herd):
    # A consumer restarted mid-herd is not the workers' parent: it only has the code each
    # worker writes as it stops, which may land between loading the row and sampling the pid.
    worker = exited_worker(running_herd)
    loaded = running_herd.workers.get(pk=worker.pk)
    running_herd.workers.filter(pk=worker.pk).update(exit_code=0)

    supervision.check_worker(running_herd, loaded, None)

    worker.refresh_from_db()
    assert (worker.exit_class, worker.exit_code) == (ExitClass.FINISHED, 0)


def test_another_hosts_worker_is_judged_by_its_heartbeat_not_its_pid(running_herd, settings):
    settings.HYPERVISOR_LEASE_SECONDS = 5
    make_tasks("supq", 1)
    # A pid that means nothing here: the worker lives on another host.
    worker = running_herd.workers.create(
        index=0,
        name="herd-w0",
        host="another-host",
        pid=2**22 + 11,
        process_started=1.0,
        heartbeat_at=timezone.now(),
    )
    Task.objects.update(
        status=Status.CLAIMED,
        holder="herd-w0",
        holder_host="another-host",
        holder_pid=2**22 + 11,
        holder_started=1.0,
        fence=1,
        lease_expires_at=timezone.now() + timedelta(seconds=5),
    )

    assert supervision.supervise(running_herd) is True
    worker.refresh_from_db()
    assert worker.state != WorkerState.EXITED
    assert Task.objects.get().status == Status.CLAIMED

    Worker = type(worker)
    Worker.objects.filter(pk=worker.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=9))
    assert supervision.supervise(running_herd) is False
    worker.refresh_from_db()
    assert worker.exit_class == ExitClass.TIMED_OUT
    assert "no heartbeat from host another-host" in worker.exit_detail
    # Its claim is left to the lease: no reap by pid from this host.
    assert Task.objects.get().status == Status.CLAIMED


def lost_launch_herd(herd: Herd, launcher_pid: int | None, launcher_started: float | None):
    """A herd whose launch got as far as one started worker and one row without a process."""
    Herd.objects.filter(pk=herd.pk).update(
        launched_at=None,
        launch_host=supervision.settings.HYPERVISOR_HOST,
        launch_pid=launcher_pid,
        launch_started=launcher_started,
    )
    finished = exited_worker(herd)
    type(finished).objects.filter(pk=finished.pk).update(exit_code=0)
    unstarted = herd.workers.create(
        index=1,
        name="herd-w1",
        host=supervision.settings.HYPERVISOR_HOST,
        started_at=timezone.now() - timedelta(seconds=supervision.START_GRACE_SECONDS + 1),
    )
    return finished, unstarted


def test_launch_of_a_dead_consumer_is_given_up_at_once_and_the_herd_finishes(running_herd):
    consumer = subprocess.Popen([sys.executable, "-c", "pass"])
    started = processes.create_time(consumer.pid)
    consumer.wait()
    finished, unstarted = lost_launch_herd(running_herd, consumer.pid, started)

    assert supervision.supervise(running_herd) is False

    running_herd.refresh_from_db()
    assert running_herd.status == HerdStatus.FINISHED and running_herd.launched_at
    finished.refresh_from_db()
    unstarted.refresh_from_db()
    assert (finished.exit_class, finished.exit_code) == (ExitClass.FINISHED, 0)
    assert unstarted.exit_class == ExitClass.CRASHED and "never started" in unstarted.exit_detail


def test_launch_of_a_live_consumer_is_waited_for(running_herd):
    me = os.getpid()
    finished, unstarted = lost_launch_herd(running_herd, me, processes.create_time(me))

    assert supervision.supervise(running_herd) is True

    unstarted.refresh_from_db()
    assert unstarted.state == WorkerState.STARTING
    assert Herd.objects.get(pk=running_herd.pk).status == HerdStatus.RUNNING


def test_launch_that_started_no_worker_fails_the_herd_and_says_why(running_herd):
    Herd.objects.filter(pk=running_herd.pk).update(
        launched_at=None, launch_host=supervision.settings.HYPERVISOR_HOST, launch_pid=2**22 + 7
    )

    assert supervision.supervise(running_herd) is False

    running_herd.refresh_from_db()
    assert running_herd.status == HerdStatus.FAILED
    assert "stopped before any worker started" in running_herd.reason


@pytest.mark.parametrize("started_at_second", [0.5, 30, 55.5])
def test_passes_never_pause_between_two_periodic_ticks(monkeypatch, started_at_second):
    """Huey ticks 60 s after its last tick, counted from the consumer's start and not on the
    minute: the passes each tick schedules must reach the next tick, whatever the second
    the consumer started at, and two consumers ticking together schedule each pass once."""
    import types

    from huey import MemoryHuey
    from huey.utils import utcnow

    from herds import tasks

    huey = MemoryHuey("cover-test", utc=True)
    monkeypatch.setattr(tasks, "HUEY", huey)

    @huey.task()
    def a_pass():
        pass

    interval = 2
    first_tick = 1_800_000_000 + started_at_second  # a round minute plus the start second
    scheduled = []
    for tick in range(3):
        now = first_tick + 60 * tick
        monkeypatch.setattr(tasks, "time", types.SimpleNamespace(time=lambda now=now: now))
        for _consumer in range(2):
            before = utcnow()
            seen = {t.id for t in huey.pending()}
            tasks.keep_covered(a_pass, "test-passes", interval)
            for task in huey.pending():
                if task.id not in seen:
                    scheduled.append(now + (task.eta - before).total_seconds())

    times = sorted(scheduled)
    assert len(times) == len({round(t) for t in times}), "a pass was scheduled twice"
    last_tick = first_tick + 120
    assert times[0] - first_tick <= interval + 0.5
    assert times[-1] >= last_tick + 60 - interval  # the third tick reaches the fourth
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert max(gaps) <= interval + 0.5, max(gaps)


def test_a_directory_given_as_the_command_is_called_a_directory(tmp_path, process_env):
    """`--command /some/dir` (or a profile's) was refused as "not on the workers' PATH",
    which sent people looking at their PATH: it is a directory, not a program."""
    folder = tmp_path / "agents"
    folder.mkdir()
    said = f"{folder} is a directory, not a program"
    make_tasks("dirq", 1)

    worker = run_manage(
        ["work", "--queue", "dirq", "--processor", "command", "--", str(folder)], process_env
    )
    assert worker.returncode == 1
    assert f"{said}: no task was claimed" in worker.stderr

    profile = Profile.objects.create(name="dir", processor="command", command=[str(folder)])
    herd = Herd.objects.create(queue="dirq", profile=profile, size=1)
    supervision.launch(herd.pk)
    herd.refresh_from_db()
    assert (herd.status, herd.reason) == (HerdStatus.FAILED, f"launch failed: {said}")
    assert Task.objects.get(queue="dirq").status == Status.QUEUED
    # Nor is a path that is not there, or a file without its x bit, "not on the PATH".
    plain = folder / "run.sh"
    plain.write_text("#!/bin/sh\n")
    for program, why in ((plain, "is not executable"), (folder / "gone", "does not exist")):
        argv = ["work", "--queue", "dirq", "--processor", "command", "--", str(program)]
        worker = run_manage(argv, process_env)
        assert worker.returncode == 1
        assert f"{program} {why}: no task was claimed" in worker.stderr
