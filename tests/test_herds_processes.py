"""Herds end to end: a real Huey consumer launches real worker processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from herds import processes, supervision
from herds.models import ExitClass, Herd, HerdStatus, HerdWorker, Profile
from tests.conftest import ROOT, make_tasks, run_manage, start_manage
from workqueue.models import EventKind, Status, Task, TaskEvent

AGENT = str(ROOT / "examples" / "agents" / "example_agent.py")
pytestmark = pytest.mark.slow


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    value = predicate()
    assert value, f"timed out after {timeout} s waiting for {what}"
    return value


def agent_profile(name: str, *agent_args: str, **fields) -> Profile:
    values = {
        "processor": "command",
        "command": [sys.executable, AGENT, "{path}", *agent_args],
        "timeout_seconds": 120,
        "prefetch": 1,
        "quota_pattern": r"\b429\b|rate limit",
        **fields,
    }
    return Profile.objects.update_or_create(name=name, defaults=values)[0]


def launch(env, *args: str) -> int:
    result = run_manage(["herd", *args, "--json"], env, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    return json.loads(result.stdout.strip().splitlines()[-1])["herd"]


def worker_logs() -> str:
    """Every herd worker's log, for the message of a failed assertion."""
    parts = []
    for worker in HerdWorker.objects.all():
        path = Path(worker.log_path)
        text = path.read_text(errors="replace")[-3000:] if path.is_file() else "(no log)"
        parts.append(f"--- {worker.name} ({worker.exit_class} {worker.exit_code}):\n{text}")
    return "\n".join(parts)


def descendants(herd: Herd) -> list[psutil.Process]:
    found = []
    for worker in herd.workers.all():
        found += processes.tree(worker.pid, worker.process_started)
    return found


def test_herd_of_four_noop_workers_does_500_tasks_exactly_once(huey_env, consumer):
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop", "prefetch": 10})
    make_tasks("herdq", 500)

    result = run_manage(
        ["herd", "--queue", "herdq", "--profile", "noop", "--workers", "4", "--wait", "--json"],
        huey_env,
        timeout=180,
    )

    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    assert summary["queue"] == "herdq" and summary["profile"] == "noop"
    assert summary["size"] == 4
    assert summary["preflight"]["ready"] == 500
    assert summary["done"] == 500 and summary["blocked"] == 0
    assert summary["counts"] == {"success": 500}
    assert len({row["task_id"] for row in summary["workers"]}) == 500
    assert len(summary["worker_processes"]) == 4
    assert {w["exit_class"] for w in summary["worker_processes"]} == {"finished"}
    assert sum(w["done"] for w in summary["worker_processes"]) == 500
    assert summary["runtime_seconds"] > 0 and summary["items_per_second"] > 0
    assert Task.objects.filter(queue="herdq", status=Status.DONE).count() == 500
    claims = TaskEvent.objects.filter(kind=EventKind.CLAIMED, task__queue="herdq")
    assert claims.count() == 500
    assert claims.values("task_id").distinct().count() == 500
    herd = Herd.objects.get(pk=summary["herd"])
    assert herd.summary["done"] == 500
    for worker in herd.workers.all():
        assert Path(worker.log_path).is_file()
        assert worker.pid and worker.process_started


def test_cancel_ends_every_process_and_puts_tasks_back(huey_env, consumer, lock_root):
    agent_profile("sleepy", "--sleep", "60")
    make_tasks("cancelq", 10)
    herd_id = launch(huey_env, "--queue", "cancelq", "--profile", "sleepy", "--workers", "3")
    herd = Herd.objects.get(pk=herd_id)

    # Every worker holds a task and runs its agent child.
    wait_until(
        lambda: Task.objects.filter(queue="cancelq", status=Status.CLAIMED).count() == 3,
        60,
        what="three claims",
    )
    tree = wait_until(
        lambda: (found := descendants(herd)) and len(found) >= 6 and found,
        30,
        what="three workers with an agent each",
    )
    pids = [(p.pid, p.create_time()) for p in tree]

    herd.request_cancel("cancelled by the test")

    wait_until(
        lambda: Herd.objects.get(pk=herd_id).status == HerdStatus.CANCELLED,
        60,
        what="the herd to be cancelled",
    )
    survivors = [pid for pid, started in pids if processes.leader(pid, started) is not None]
    assert survivors == []
    assert Task.objects.filter(queue="cancelq", status=Status.CLAIMED).count() == 0
    assert Task.objects.filter(queue="cancelq", status=Status.QUEUED).count() == 10
    assert list((lock_root / "cancelq").iterdir()) == []
    herd.refresh_from_db()
    assert {w.exit_class for w in herd.workers.all()} == {ExitClass.CANCELLED}
    assert herd.summary["status"] == "cancelled"


def kill_worker_holding_a_claim(herd_id: int) -> tuple[HerdWorker, Task]:
    """SIGKILL the herd's worker 0 once it runs and holds a claim: it, and the task."""
    victim = wait_until(
        lambda: HerdWorker.objects.filter(herd_id=herd_id, index=0, state="running").first(),
        60,
        what="worker 0 running",
    )
    held = wait_until(
        lambda: Task.objects.filter(status=Status.CLAIMED, holder_pid=victim.pid).first(),
        30,
        what="a claim by worker 0",
    )
    os.kill(victim.pid, signal.SIGKILL)
    return victim, held


def test_killed_worker_is_noticed_and_its_claim_reaped(huey_env, consumer):
    agent_profile("steady", "--sleep", "1.5")
    make_tasks("killq", 6)
    herd_id = launch(huey_env, "--queue", "killq", "--profile", "steady", "--workers", "2")

    victim, held = kill_worker_holding_a_claim(herd_id)
    killed_at = time.monotonic()

    wait_until(
        lambda: Task.objects.get(pk=held.pk).holder_pid != victim.pid,
        supervision_period() + 3,
        interval=0.05,
        what="the dead worker's claim to be reaped",
    )
    noticed = time.monotonic() - killed_at
    assert noticed <= supervision_period() + 3
    assert TaskEvent.objects.filter(task=held, kind=EventKind.REAPED).exists()

    wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 90, what="the herd to finish")
    herd = Herd.objects.get(pk=herd_id)
    assert herd.status == HerdStatus.FINISHED
    rows = {w["index"]: w for w in herd.summary["worker_processes"]}
    assert rows[0]["exit_class"] == "crashed" and rows[0]["exit_code"] == -signal.SIGKILL
    assert rows[1]["exit_class"] == "finished"
    # Its task back in the queue, a worker was started in its place.
    assert rows[2]["exit_class"] == "finished" and rows[2]["replaces"] == rows[0]["name"]
    assert sorted(rows) == [0, 1, 2] and herd.summary["replacements"] == 1
    assert Task.objects.filter(queue="killq", status=Status.DONE).count() == 6


def supervision_period() -> float:
    from django.conf import settings

    return float(settings.HYPERVISOR_SUPERVISE_INTERVAL)


def test_quota_message_drains_the_herd_without_respawn(huey_env, consumer):
    agent_profile("limited", "--quota")
    make_tasks("quotaq", 10)

    result = run_manage(
        [
            "herd",
            "--queue",
            "quotaq",
            "--profile",
            "limited",
            "--workers",
            "2",
            "--wait",
            "--json",
        ],
        huey_env,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    herd = Herd.objects.get(pk=summary["herd"])
    assert herd.status == HerdStatus.QUOTA and herd.draining
    assert "quota or rate limit" in herd.reason
    # No worker is started in its place, and none after the drain: the second may never
    # start when the first meets the quota before the launch reaches it (a busy machine).
    assert sorted(herd.workers.values_list("index", flat=True)) in ([0], [0, 1])
    assert ExitClass.QUOTA in {w.exit_class for w in herd.workers.all()}
    # The rate limit is not the tasks' fault: none is blocked, all are back in the queue.
    assert Task.objects.filter(queue="quotaq", status=Status.QUEUED).count() == 10
    # The profile's quota pattern is read by the generic adapter before the finish: the
    # task was given back in that one write, its attempt not counted.
    assert not Task.objects.filter(queue="quotaq", attempts__gt=0).exists()
    assert TaskEvent.objects.filter(kind=EventKind.CLAIMED, task__queue="quotaq").count() <= 4


def test_herd_with_nothing_ready_finishes_at_once_and_says_so(transactional_db):
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    make_tasks("emptyq", 3)
    Task.objects.filter(queue="emptyq").update(status=Status.DONE, outcome="success")
    herd = Herd.objects.create(queue="emptyq", profile=profile, size=4)

    supervision.launch(herd.pk)

    herd.refresh_from_db()
    assert herd.status == HerdStatus.FINISHED
    assert herd.preflight["ready"] == 0 and herd.preflight["skipped_complete"] == 3
    assert "nothing ready" in herd.reason and "3 skipped (already complete)" in herd.reason
    assert herd.summary["workers"] == [] and herd.workers.count() == 0


def test_token_budget_drains_the_herd(huey_env, consumer):
    agent_profile("metered", "--sleep", "0.2")
    make_tasks("budgetq", 30)

    result = run_manage(
        ["herd", "--queue", "budgetq", "--profile", "metered", "--workers", "1"]
        + ["--token-budget", "250", "--wait", "--json"],
        huey_env,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    assert "token budget of 250 reached" in summary["reason"]
    assert 3 <= summary["done"] < 30
    assert summary["total_tokens"] == 100 * summary["done"]
    assert (
        Task.objects.filter(queue="budgetq", status=Status.QUEUED).count() == 30 - summary["done"]
    )


def test_new_consumer_adopts_a_herd_whose_consumer_died(huey_env, tmp_path):
    agent_profile("steady", "--sleep", "1")
    make_tasks("adoptq", 12)
    with open(tmp_path / "first.log", "w") as log:
        first = start_manage(["run_huey"], huey_env, stdout=log, stderr=log)
    second = None
    try:
        herd_id = launch(huey_env, "--queue", "adoptq", "--profile", "steady", "--workers", "2")
        wait_until(
            lambda: HerdWorker.objects.filter(herd_id=herd_id, state="running").count() == 2,
            60,
            what="two running workers",
        )
        first.kill()  # the consumer dies; its workers, in their own sessions, go on
        first.wait()
        workers = list(HerdWorker.objects.filter(herd_id=herd_id))
        assert all(processes.leader(w.pid, w.process_started) for w in workers)

        with open(tmp_path / "second.log", "w") as log:
            second = start_manage(["run_huey"], huey_env, stdout=log, stderr=log)

        wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 90, what="the herd to finish")
        herd = Herd.objects.get(pk=herd_id)
        assert herd.status == HerdStatus.FINISHED, worker_logs()
        assert {w["exit_class"] for w in herd.summary["worker_processes"]} == {"finished"}
        assert Task.objects.filter(queue="adoptq", status=Status.DONE).count() == 12
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=15)
        for worker in HerdWorker.objects.all():
            processes.terminate_trees([(worker.pid, worker.process_started)], grace=1)


def test_herd_with_filters_takes_only_matching_tasks(huey_env, consumer):
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop", "prefetch": 2})
    make_tasks("routeq", 10)
    Task.objects.filter(queue="routeq", key__lt="t000004").update(complexity="mechanical")

    result = run_manage(
        ["herd", "--queue", "routeq", "--profile", "noop", "--workers", "2"]
        + ["--where", "complexity=mechanical", "--wait", "--json"],
        huey_env,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["preflight"]["ready"] == 4 and summary["preflight"]["filtered_out"] == 6
    assert summary["done"] == 4
    assert {row["task_id"] for row in summary["workers"]} == {f"t00000{i}" for i in range(4)}
    assert Task.objects.filter(queue="routeq", status=Status.QUEUED).count() == 6
