"""A herd starts a worker in place of one that crashed or timed out, while tasks are ready,
once per dead worker and within its restart budget: real worker processes, real claims."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from herds import processes, supervision
from herds.models import ExitClass, Herd, HerdStatus, HerdWorker, Profile
from tests.conftest import APPEND, make_tasks, start_manage
from tests.test_herds_processes import (
    agent_profile,
    kill_worker_holding_a_claim,
    launch,
    wait_until,
    worker_logs,
)
from tests.test_herds_supervision import running_noop_herd
from tests.test_herds_views import client_for
from workqueue.models import EventKind, Status, Task, TaskEvent

pytestmark = pytest.mark.django_db(transaction=True)

# An agent that SIGKILLs the worker that runs it: at once, or (with a folder) from the
# second task that worker gives it on, so that each worker finishes one task first.
KILL_MY_WORKER = """
import os, pathlib, signal, sys
if len(sys.argv) > 1:
    seen = pathlib.Path(sys.argv[1], str(os.getppid()))
    if not seen.exists():
        seen.touch()
        sys.exit(0)
os.kill(os.getppid(), signal.SIGKILL)
"""


def supervise_until_ended(herd: Herd, timeout: float = 60) -> Herd:
    """Passes as the consumer makes them, every half second, until the herd ends."""
    deadline = time.monotonic() + timeout
    while supervision.supervise(herd):
        assert time.monotonic() < deadline, "the herd did not end\n" + worker_logs()
        time.sleep(0.5)
    herd.refresh_from_db()
    return herd


@pytest.mark.slow
def test_a_sigkilled_worker_is_replaced_and_the_herd_does_every_task_once(
    huey_env, consumer, tmp_path
):
    log = tmp_path / "keys.log"
    Profile.objects.update_or_create(
        name="append-slowly",
        defaults={
            "processor": "command",
            "prefetch": 1,
            "command": [
                sys.executable,
                "-c",
                "import subprocess, sys, time; time.sleep(0.7); "
                "subprocess.run([sys.executable, '-S', *sys.argv[1:]], check=True)",
                APPEND,
                str(log),
                "{key}",
            ],
        },
    )
    make_tasks("replq", 16)
    herd_id = launch(huey_env, "--queue", "replq", "--profile", "append-slowly", "--workers", "2")
    victim, held = kill_worker_holding_a_claim(herd_id)

    replacement = wait_until(
        lambda: HerdWorker.objects.filter(herd_id=herd_id, replaces=victim).first(),
        30,
        what="a worker in worker 0's place",
    )
    # Started after the dead worker's claim was given back: the reap came first.
    reaped = TaskEvent.objects.get(task=held, kind=EventKind.REAPED)
    assert reaped.at <= replacement.started_at
    assert (replacement.index, replacement.name) == (2, f"herd{herd_id}-w2")
    wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 120, what="the herd to finish")

    herd = Herd.objects.get(pk=herd_id)
    assert herd.status == HerdStatus.FINISHED, worker_logs()
    assert Task.objects.filter(queue="replq", status=Status.DONE).count() == 16
    # Each task finished once; only the dead worker's task may have run twice (its agent
    # may have reached the file before the SIGKILL).
    runs = Counter(log.read_text().split())
    assert set(runs) == {f"t{i:06d}" for i in range(16)}
    assert {key for key, n in runs.items() if n > 1} <= {held.key}
    done = TaskEvent.objects.filter(kind=EventKind.DONE, task__queue="replq")
    assert done.count() == done.values("task").distinct().count() == 16
    rows = {w["index"]: w for w in herd.summary["worker_processes"]}
    assert rows[0]["exit_class"] == "crashed" and rows[0]["exit_code"] == -signal.SIGKILL
    assert rows[2]["replaces"] == f"herd{herd_id}-w0" and rows[2]["exit_class"] == "finished"
    assert rows[2]["done"] >= 1
    assert sorted(rows) == [0, 1, 2]
    assert (herd.summary["replacements"], herd.summary["replacements_stopped"]) == (1, "")
    assert (herd.replacements, herd.reason) == (1, "")
    said = f"herd{herd_id}-w2 started in place of herd{herd_id}-w0 (crashed; replacement 1 of 2)"
    assert said in (tmp_path / "consumer.log").read_text()
    page = client_for(User.objects.create_superuser("admin")).get(
        reverse("herds:detail", args=[herd_id])
    )
    text = page.content.decode()
    assert "1 worker replaced (a crashed or timed-out worker is started again" in text
    assert f"replaces herd{herd_id}-w0" in text


@pytest.mark.slow
def test_a_herd_whose_workers_keep_crashing_stops_at_its_restart_budget_and_fails(
    huey_env, consumer, tmp_path
):
    """Each worker finishes a task, then its agent kills it: two workers, two replacements
    (the budget is the herd's size), then none, and the herd fails saying why."""
    seen = tmp_path / "seen"
    seen.mkdir()
    agent_profile("killer", command=[sys.executable, "-c", KILL_MY_WORKER, str(seen)])
    make_tasks("loopq", 20)
    herd_id = launch(huey_env, "--queue", "loopq", "--profile", "killer", "--workers", "2")

    wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 90, what="the herd to end")

    herd = Herd.objects.get(pk=herd_id)
    workers = list(herd.workers.order_by("index"))
    assert len(workers) == 4, worker_logs()
    assert {w.exit_class for w in workers} == {ExitClass.CRASHED}
    # Which two of the dead are replaced follows the order they died in (a replacement may
    # die before the other first worker): two, each of another, in its place by index.
    replacements = [w for w in workers if w.replaces_id]
    assert len(replacements) == 2 and len({w.replaces_id for w in replacements}) == 2
    assert all(w.index == w.replaces.index + 2 for w in replacements)
    assert herd.status == HerdStatus.FAILED
    first = herd.workers.order_by("finished_at", "index").first()
    assert herd.reason == (
        "2 workers replaced; no more replacements: the restart budget of 2 is spent; "
        f"every worker crashed ({first.name}: killed by SIGKILL (signal 9))"
    )
    assert herd.summary["replacements"] == 2
    assert herd.summary["replacements_stopped"] == "the restart budget of 2 is spent"
    assert herd.summary["done"] == 4
    assert not Task.objects.filter(queue="loopq", status=Status.CLAIMED).exists()


@pytest.mark.slow
def test_a_replacement_that_dies_at_its_start_ends_the_replacing(huey_env, tmp_path):
    """A crash loop: the worker dies of its start, and so does its replacement. The herd
    starts no third however large its budget, and says why."""
    agent_profile("killer", command=[sys.executable, "-c", KILL_MY_WORKER])
    make_tasks("startq", 5)
    env = {**huey_env, "HYPERVISOR_HERD_RESTARTS": "5"}
    with open(tmp_path / "consumer.log", "w") as out:
        consumer = start_manage(["run_huey"], env, stdout=out, stderr=out)
    try:
        herd_id = launch(env, "--queue", "startq", "--profile", "killer", "--workers", "1")
        wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 90, what="the herd to end")
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=30)

    herd = Herd.objects.get(pk=herd_id)
    assert sorted(herd.workers.values_list("index", flat=True)) == [0, 1], worker_logs()
    assert herd.status == HerdStatus.FAILED
    said = "1 worker replaced; no more replacements: "
    why = f"herd{herd_id}-w1, itself a replacement, died "
    assert herd.reason.startswith(said + why), herd.reason
    assert "s after it started with no task finished (a crash loop); every worker crashed (" in (
        herd.reason
    )
    assert herd.replacements == 1


# Without a consumer: passes in this process, whose replacements are real `manage.py work`
# processes started by Popen (tests.conftest.workers_by_popen).


@pytest.fixture
def running_herd() -> Herd:
    return running_noop_herd("replq", ready=3)


def dead_worker(herd: Herd, program: str = "pass", log=None, **fields) -> HerdWorker:
    """A worker row of `herd` whose process ran `program` and is gone."""
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        gone = subprocess.Popen([sys.executable, "-c", program], stdout=out)
        started = processes.create_time(gone.pid)
        gone.wait()
    finally:
        if log:
            out.close()
    fields = {"host": supervision.settings.HYPERVISOR_HOST, "index": 0, **fields}
    return herd.workers.create(
        name=f"herd{herd.pk}-w{fields['index']}",
        pid=gone.pid,
        process_started=started,
        log_path=str(log or ""),
        **fields,
    )


def test_a_pass_replaces_a_crashed_worker_whose_tasks_are_ready(running_herd, workers_by_popen):
    make_tasks("replq", 3)
    dead = dead_worker(running_herd, CRASH)

    herd = supervise_until_ended(running_herd)

    replacement = HerdWorker.objects.get(replaces=dead)
    assert (replacement.index, replacement.exit_class, replacement.done) == (
        1,
        ExitClass.FINISHED,
        3,
    )
    assert len(workers_by_popen) == 1
    assert herd.status == HerdStatus.FINISHED and herd.replacements == 1
    assert Task.objects.filter(status=Status.DONE).count() == 3


@pytest.mark.parametrize("finished_before", [1, 3])
def test_a_replacement_finishes_what_is_left_of_its_places_batch(
    running_herd, workers_by_popen, finished_before
):
    """A herd of batches of 3: the worker started in a dead one's place finishes what is
    left of that one's batch, not a batch more (the plan is what the herd does); a worker
    that died with its batch done is not replaced."""
    Herd.objects.filter(pk=running_herd.pk).update(batch=3)
    running_herd.refresh_from_db()
    make_tasks("replq", 6)
    dead = dead_worker(running_herd, CRASH, done=finished_before)

    herd = supervise_until_ended(running_herd)

    replacement = HerdWorker.objects.filter(replaces=dead).first()
    if finished_before == 3:
        assert replacement is None and herd.replacements == 0 and not workers_by_popen
        return
    assert (replacement.exit_class, replacement.done) == (ExitClass.FINISHED, 2), worker_logs()
    assert Task.objects.filter(status=Status.DONE).count() == 2


CONDITIONS = {
    "draining": lambda herd, settings: herd.drain("drained by the test"),
    "cancel requested": lambda herd, settings: herd.request_cancel("cancelled by the test"),
    "launch not over": lambda herd, settings: Herd.objects.filter(pk=herd.pk).update(
        launched_at=None,
        launch_host=supervision.settings.HYPERVISOR_HOST,
        launch_pid=os.getpid(),
        launch_started=processes.create_time(os.getpid()),
    ),
    "nothing ready": lambda herd, settings: Task.objects.update(status=Status.DONE),
    "restarts set to 0": lambda herd, settings: setattr(settings, "HYPERVISOR_HERD_RESTARTS", 0),
}
# How the worker ended, where it is not a crash on this host.
ENDS = {
    "quota": ("import sys; print('HTTP 429 Too Many Requests'); sys.exit(1)", {}),
    "a clean exit": ("pass", {"exit_code": 0}),
    "another host": ("pass", {"host": "another-host"}),
}
CRASH = "import os; os.kill(os.getpid(), 9)"


@pytest.mark.parametrize("condition", [*CONDITIONS, *ENDS])
def test_no_replacement_while_draining_cancelled_launching_on_quota_or_nothing_ready(
    running_herd, tmp_path, settings, condition
):
    """Ready tasks and a dead worker, but one thing that forbids its replacement: the pass
    records the end as before and starts nothing (had it started a worker, the test
    process's guard, tests.conftest.no_fork_server_in_tests, would have failed it)."""
    Profile.objects.filter(pk=running_herd.profile_id).update(quota_pattern=r"\b429\b")
    running_herd.refresh_from_db()
    make_tasks("replq", 3)
    program, fields = ENDS.get(condition, (CRASH, {}))
    if condition == "another host":
        settings.HYPERVISOR_LEASE_SECONDS = 1
        fields["heartbeat_at"] = timezone.now() - timedelta(seconds=5)
    dead = dead_worker(running_herd, program, log=tmp_path / "worker-0.log", **fields)
    if condition in CONDITIONS:
        CONDITIONS[condition](running_herd, settings)

    supervision.supervise(running_herd)

    dead.refresh_from_db()
    assert dead.state == "exited"
    assert running_herd.workers.count() == 1
    running_herd.refresh_from_db()
    assert running_herd.replacements == 0
    assert running_herd.replacements_stopped == ""
    if condition == "restarts set to 0":  # replacing is off: the herd ends as it did before
        assert running_herd.status == HerdStatus.FAILED
        assert running_herd.reason.startswith("every worker crashed (herd")


def test_overlapping_passes_start_one_replacement(
    running_herd, workers_by_popen, monkeypatch, settings
):
    """Two passes (two consumer threads, or a cancel's) look at the same dead worker: the
    second runs whole while the first gives the claims back; one replacement starts,
    though the budget would allow more."""
    settings.HYPERVISOR_HERD_RESTARTS = 5
    make_tasks("replq", 3)
    dead = dead_worker(running_herd, CRASH)
    loaded = HerdWorker.objects.get(pk=dead.pk)
    real_reap = supervision.reap_worker
    overlapped = []

    def reap_while_another_pass_looks(herd, worker):
        real_reap(herd, worker)
        if not overlapped:
            overlapped.append(worker)
            supervision.check_worker(Herd.objects.get(pk=herd.pk), loaded, None)

    monkeypatch.setattr(supervision, "reap_worker", reap_while_another_pass_looks)
    supervision.check_worker(running_herd, dead, None)
    monkeypatch.setattr(supervision, "reap_worker", real_reap)

    assert overlapped and len(workers_by_popen) == 1
    assert list(HerdWorker.objects.exclude(pk=dead.pk).values_list("index", "replaces")) == [
        (1, dead.pk)
    ]
    herd = supervise_until_ended(running_herd)
    assert herd.status == HerdStatus.FINISHED and herd.replacements == 1
    assert herd.replacements_stopped == ""
    assert Task.objects.filter(status=Status.DONE).count() == 3
