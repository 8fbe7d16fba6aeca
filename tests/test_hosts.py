"""Two hosts sharing one database and one Huey queue (Redis in the PostgreSQL pass)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.utils import timezone

from herds import processes, supervision
from herds.models import Herd, HerdWorker, Profile
from tests.conftest import ROOT, make_tasks, run_manage, start_manage
from tests.test_herds_processes import launch, wait_until, worker_logs
from workqueue import clock, transitions
from workqueue.locks import Identity
from workqueue.models import EventKind, Status, Task, TaskEvent

AGENT = str(ROOT / "examples" / "agents" / "example_agent.py")
pytestmark = pytest.mark.slow


def test_a_dead_hosts_claims_wait_for_their_lease_then_the_other_host_works_them(
    huey_env, tmp_path
):
    host_a = {**huey_env, "HYPERVISOR_HOST": "host-a", "HYPERVISOR_LEASE_SECONDS": "4"}
    host_b = {**huey_env, "HYPERVISOR_HOST": "host-b", "HYPERVISOR_LEASE_SECONDS": "4"}
    Profile.objects.update_or_create(
        name="slow",
        defaults={
            "processor": "command",
            "prefetch": 1,
            "timeout_seconds": 120,
            "command": [sys.executable, AGENT, "{path}", "--sleep", "60"],
        },
    )
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("hosts", 4)
    with open(tmp_path / "a.log", "w") as out:
        consumer_a = start_manage(["run_huey"], host_a, stdout=out, stderr=out)
    consumer_b = None
    try:
        herd_a = launch(host_a, "--queue", "hosts", "--profile", "slow", "--workers", "2")
        wait_until(
            lambda: Task.objects.filter(status=Status.CLAIMED).count() == 2,
            60,
            what="two claims on host A",
        )
        with open(tmp_path / "b.log", "w") as out:
            consumer_b = start_manage(["run_huey"], host_b, stdout=out, stderr=out)
        # Host A dies entirely: its consumer and every worker with its agent.
        consumer_a.kill()
        consumer_a.wait()
        for worker in HerdWorker.objects.filter(herd_id=herd_a):
            os.killpg(worker.pid, signal.SIGKILL)  # each worker leads its own session
        assert {t.holder_host for t in Task.objects.filter(status=Status.CLAIMED)} == {"host-a"}

        # Host B cannot judge host A's pids: nothing is released while the leases run.
        early = json.loads(run_manage(["reap_locks", "--json"], host_b).stdout)
        if Task.objects.filter(status=Status.CLAIMED, lease_expires_at__gt=timezone.now()):
            assert early["requeued"] == []
        wait_until(
            lambda: not Task.objects.filter(lease_expires_at__gt=timezone.now()).exists(),
            30,
            what="host A's leases to run out",
        )
        late = json.loads(run_manage(["reap_locks", "--json"], host_b).stdout)
        # Host B's consumer reaps on its own interval too: whichever of it and the command
        # came first put each claim back, once, as expired.
        reaped = TaskEvent.objects.filter(kind=EventKind.REAPED)
        assert len(early["requeued"] + late["requeued"]) <= 2
        assert reaped.count() == 2, list(reaped.values("actor", "message"))
        assert all(e.message.startswith("lease expired;") for e in reaped)
        assert {e.data["host"] for e in reaped} == {"host-a"}

        # Host B's consumer launches the next herd; its workers take the tasks.
        herd_b = launch(host_b, "--queue", "hosts", "--profile", "noop", "--workers", "2")
        wait_until(lambda: Herd.objects.get(pk=herd_b).ended, 60, what="host B's herd")
        assert Task.objects.filter(queue="hosts").counts()["done"] == 4, worker_logs()
        assert set(Task.objects.values_list("holder_host", flat=True)) == {"host-b"}
        assert set(HerdWorker.objects.filter(herd_id=herd_b).values_list("host", flat=True)) == {
            "host-b"
        }
        assert TaskEvent.objects.filter(kind=EventKind.REAPED).count() == 2
    finally:
        for proc in (consumer_a, consumer_b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        for worker in HerdWorker.objects.all():
            if worker.pid and worker.pid != os.getpid():
                processes.terminate_trees([(worker.pid, worker.process_started)], grace=1)


@pytest.mark.django_db(transaction=True)
def test_a_cancel_taken_by_another_hosts_consumer_leaves_this_hosts_workers_to_it(settings):
    """Every consumer runs every herd's passes. Host B's signalled host A's worker pids on
    host B (other processes there, in sessions of their own like B's workers) and recorded
    A's workers cancelled, ending the herd: A's consumer never looked again, A's agents ran
    on."""
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    now = timezone.now()
    herd = Herd.objects.create(
        queue="q", profile=profile, size=1, status="running",
        started_at=now, launched_at=now, preflight={"ready": 1},
    )  # fmt: skip
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        wait_until(lambda: processes.create_time(bystander.pid), 10)
        # Host A's worker has the pid of one of host B's processes (pids are per host).
        worker = herd.workers.create(
            index=0, name="herd-w0", host="host-a", pid=bystander.pid,
            process_started=processes.create_time(bystander.pid) - 60, heartbeat_at=now,
            state="running",
        )  # fmt: skip
        herd.request_cancel("cancelled by someone")
        settings.HYPERVISOR_HOST = "host-b"
        assert supervision.supervise(herd) is True
        time.sleep(0.5)
        assert bystander.poll() is None
        worker.refresh_from_db()
        assert worker.state == "running"
        # Host A's consumer ends its own worker in its pass, and the herd with it.
        settings.HYPERVISOR_HOST = "host-a"
        assert supervision.supervise(herd) is False
        herd.refresh_from_db()
        worker.refresh_from_db()
        ended = (herd.status, worker.state, worker.exit_class)
        assert ended == ("cancelled", "exited", "cancelled")
    finally:
        bystander.kill()
        bystander.wait()


SKEWED = str(ROOT / "tests" / "scripts" / "skewed_clock.py")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="hosts share a PostgreSQL database; SQLite is one host's, its clock the database's",
)


def skewed(seconds: float, args: list[str]) -> list[str]:
    """A manage.py command line run as a host whose clock is off by `seconds`."""
    return [sys.executable, SKEWED, str(seconds), *args]


def holding_one_task(queue: str, env: dict[str, str], seconds: float = 0) -> subprocess.Popen:
    """A `work` of `env`'s host, its clock off by `seconds`, in a session of its own,
    once it has claimed the one task of `queue` and started its agent (a sleeper)."""
    make_tasks(queue, 1)
    args = ["work", "--queue", queue, "--processor", "command", "--", *SLEEPER]
    worker = subprocess.Popen(
        skewed(seconds, args), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_until(
        lambda: Task.objects.filter(status=Status.CLAIMED, agent_pgid__isnull=False).exists(),
        30,
        what="a claim and its agent",
    )
    return worker


def reap_as(seconds: float, env: dict[str, str]) -> dict:
    result = subprocess.run(
        skewed(seconds, ["reap_locks", "--json"]),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@postgres_only
@pytest.mark.parametrize(
    "worker_clock, reaper_clock",
    [(0, 600), (-600, 0)],
    ids=["reaper-ten-minutes-ahead", "worker-ten-minutes-behind"],
)
def test_a_live_claim_is_not_reaped_by_a_host_whose_clock_disagrees(
    process_env, worker_clock, reaper_clock
):
    """Judged by each host's own clock, a host ten minutes ahead took every other host's
    live claim as expired and gave it to another worker while its agent ran on; a worker
    ten minutes behind wrote leases every other host took as long expired."""
    worker_env = {**process_env, "HYPERVISOR_HOST": "host-b", "HYPERVISOR_LEASE_SECONDS": "6"}
    worker = holding_one_task("skew", worker_env, worker_clock)
    try:
        fence = Task.objects.get().fence
        time.sleep(7)  # past the claim's own lease: what stands now is a heartbeat's renewal
        report = reap_as(reaper_clock, {**process_env, "HYPERVISOR_HOST": "host-a"})
        assert report["requeued"] == [], report
        task = Task.objects.get()
        assert (task.status, task.holder_host, task.fence) == (Status.CLAIMED, "host-b", fence)
        assert not TaskEvent.objects.filter(kind=EventKind.REAPED).exists()
        assert worker.poll() is None
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        pgid = Task.objects.get().agent_pgid
        if pgid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


@postgres_only
def test_a_dead_hosts_claim_is_reaped_at_its_lease_by_a_host_whose_clock_runs_behind(
    process_env,
):
    worker_env = {**process_env, "HYPERVISOR_HOST": "host-b", "HYPERVISOR_LEASE_SECONDS": "3"}
    worker = holding_one_task("skew", worker_env)
    os.killpg(worker.pid, signal.SIGKILL)  # host B is gone, its agent with it
    os.killpg(Task.objects.get().agent_pgid, signal.SIGKILL)
    worker.wait()
    time.sleep(4)
    report = reap_as(-600, {**process_env, "HYPERVISOR_HOST": "host-a"})
    assert [row["why"] for row in report["requeued"]] == ["lease expired"], report
    assert Task.objects.get().status == Status.QUEUED


@postgres_only
@pytest.mark.django_db
def test_a_live_worker_of_another_host_is_not_timed_out_by_a_clock_ahead(monkeypatch):
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1, status="running")
    # As the worker's heartbeat writes it, on host B.
    worker = herd.workers.create(
        index=0, name="herd-w0", host="host-b", pid=4242, state="running",
        heartbeat_at=clock.now(),
    )  # fmt: skip
    true_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: true_now() + timedelta(minutes=10))
    supervision.check_remote_worker(worker)
    worker.refresh_from_db()
    assert (worker.state, worker.exit_class) == ("running", "")


@postgres_only
@pytest.mark.django_db
def test_the_board_shows_a_live_claim_by_the_databases_clock_on_a_web_host_ahead(
    client, django_user_model, monkeypatch
):
    """A board served by a host ten minutes ahead marked every live claim "stale claim",
    its lease long over: a person would release claims whose agents are at work."""
    user = django_user_model.objects.create_user("viewer", password="pw-viewer-123")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(user)
    make_tasks("q", 1)
    transitions.claim("q", Identity.current("w1"), 1, lease_seconds=300)
    true_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: true_now() + timedelta(minutes=10))
    monkeypatch.setattr(clock, "_offset", None)  # as a web process just started

    task = Task.objects.get()
    assert not task.is_stale()
    assert timedelta(minutes=4) < task.lease_left <= timedelta(minutes=5)
    page = client.get("/", {"queue": "q"}).content.decode()
    assert "held by w1" in page
    assert "stale claim" not in page


@postgres_only
def test_a_worker_started_by_a_host_behind_is_not_timed_out_before_its_first_beat(process_env):
    """Until its first heartbeat a worker's silence runs from its start: written by the
    launching host's clock, ten minutes behind, it read as ten minutes of silence."""
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1, status="running")
    # Host B's consumer makes the worker's row as it starts the worker.
    create = (
        "from herds.models import HerdWorker; HerdWorker.objects.create("
        f"herd_id={herd.pk}, index=0, name='herd-w0', host='host-b', pid=4242)"
    )
    result = subprocess.run(
        skewed(-600, ["shell", "-c", create]),
        env={**process_env, "HYPERVISOR_HOST": "host-b"}, cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    worker = herd.workers.get()
    supervision.check_remote_worker(worker)
    worker.refresh_from_db()
    assert (worker.state, worker.exit_class) == ("starting", "")


@postgres_only
@pytest.mark.django_db
def test_a_herds_wall_clock_limit_runs_from_its_start_on_any_hosts_clock(monkeypatch):
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1, wall_clock_limit=3600)
    assert herd.start()
    true_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: true_now() + timedelta(hours=2))
    monkeypatch.setattr(clock, "_offset", None)  # as a process on that host
    assert not herd.deadline_passed()
    assert herd.runtime_seconds() < 60


def test_an_agent_left_under_this_hosts_old_name_is_ended_before_its_task_goes_again(
    process_env,
):
    """HYPERVISOR_HOST changed while a claim was held (the README says not to): the
    reaper under the new name took the claim back at its lease but left its agent at work
    beside the next one."""
    old_name = {**process_env, "HYPERVISOR_HOST": "old-name", "HYPERVISOR_LEASE_SECONDS": "3"}
    worker = holding_one_task("renamed", old_name)
    agent = Task.objects.get().agent_pgid
    try:
        worker.kill()  # the worker alone: its agent leads a group of its own, and runs on
        worker.wait()
        assert processes.leader(agent, None) is not None
        time.sleep(4)  # past the lease
        new_name = {**process_env, "HYPERVISOR_HOST": "new-name"}
        report = json.loads(run_manage(["reap_locks", "--json"], new_name).stdout)
        assert [row["why"] for row in report["requeued"]] == ["lease expired"], report
        wait_until(lambda: processes.leader(agent, None) is None, 10, what="the agent's end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent, signal.SIGKILL)


@postgres_only
def test_hosts_twenty_minutes_apart_work_one_queue_each_task_once(process_env, tmp_path):
    """Two hosts, one ten minutes ahead and one ten minutes behind the database, work one
    queue while both reap again and again: no claim is taken back, no agent runs twice."""
    make_tasks("apart", 8)
    runs = tmp_path / "runs"
    agent = (
        "import os, sys, time; start = time.time(); time.sleep(3); "
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
        "os.write(fd, f'{sys.argv[2]} {start} {time.time()}\\n'.encode())"
    )
    hosts = {"ahead": 600, "behind": -600}
    envs = {
        name: {**process_env, "HYPERVISOR_HOST": name, "HYPERVISOR_LEASE_SECONDS": "4",
               "HYPERVISOR_LOCK_ROOT": str(tmp_path / f"locks-{name}")}
        for name in hosts
    }  # fmt: skip
    workers = [
        subprocess.Popen(
            skewed(seconds, ["work", "--queue", "apart", "--workers", "2", "--processor",
                             "command", "--", sys.executable, "-c", agent, str(runs), "{key}"]),
            env=envs[name], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        for name, seconds in hosts.items()
    ]  # fmt: skip
    try:
        while any(w.poll() is None for w in workers):
            for name, seconds in hosts.items():
                reap_as(seconds, envs[name])
        assert [w.returncode for w in workers] == [0, 0], [w.stderr.read() for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert Task.objects.filter(queue="apart").counts()["done"] == 8
    assert not TaskEvent.objects.filter(kind=EventKind.REAPED).exists()
    keys = sorted(line.split()[0] for line in runs.read_text().splitlines())
    assert keys == [f"t{i:06d}" for i in range(8)]
    assert {t.holder_host for t in Task.objects.all()} == set(hosts)  # both worked it


@postgres_only
@pytest.mark.django_db
def test_a_web_host_ahead_does_not_say_no_consumer_looked_at_a_supervised_herd(monkeypatch):
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1)
    assert herd.start()
    herd.record_pass()  # a supervision pass of the consumer's
    true_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: true_now() + timedelta(minutes=10))
    monkeypatch.setattr(clock, "_offset", None)
    assert Herd.objects.get(pk=herd.pk).unsupervised_minutes == 0
