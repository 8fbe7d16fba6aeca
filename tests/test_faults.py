"""Faults: a holder frozen past its lease, a lock root that is read-only or full, task files
changed under a claim, other hosts' claims, and a database that goes away."""

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from tests.conftest import (
    APPEND,
    freeze_outside_a_write,
    make_tasks,
    run_manage,
    start_manage,
    work_appending,
)
from tests.test_claims import lock_dirs, wait_for
from workqueue import claims, locks, reaper
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import EventKind, Status, Task, TaskBody
from workqueue.processing import Result
from workqueue.processors import NoopProcessor
from workqueue.worker import EXIT_LOCK_ROOT, Worker

AGENT = str(Path(__file__).parent.parent / "examples" / "agents" / "example_agent.py")


@pytest.mark.slow
def test_frozen_holder_that_wakes_after_losing_its_claim_is_refused(process_env, tmp_path):
    make_tasks("q", 1)
    frozen = start_manage(
        [
            "work",
            "--queue",
            "q",
            "--lease",
            "1",
            "--processor",
            "command",
            "--json",
            "--",
            sys.executable,
            AGENT,
            "--sleep",
            "3",
        ],
        process_env,
    )
    wait_for(lambda: Task.objects.filter(status=Status.CLAIMED).exists(), message="claim")
    freeze_outside_a_write(frozen.pid)
    try:
        wait_for(lambda: Task.objects.get().lease_expires_at < timezone.now(), message="expiry")
        reaped = run_manage(["reap_locks", "--json"], process_env)
        assert json.loads(reaped.stdout)["requeued"][0]["why"] == "lease expired"
        log = tmp_path / "keys.log"
        other = run_manage(
            work_appending(log),
            process_env,
        )
        assert other.returncode == 0, other.stderr
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    out, err = frozen.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1])["refused"] == 1, err
    task = Task.objects.get()
    assert (task.status, task.attempts, task.evidence) == (Status.DONE, 2, "")
    assert task.events.filter(kind=EventKind.LATE_FINISH_REFUSED).count() == 1


@contextmanager
def tiny_filesystem(path: Path, options: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs these as root)")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the lock root: {mounted.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_worker_on(settings, root: Path) -> Worker:
    settings.HYPERVISOR_LOCK_ROOT = root
    worker = Worker("q", NoopProcessor(), prefetch=5)
    worker.exit_code = worker.run()
    return worker


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("options", "prepare", "reason"),
    [
        ("size=64k,mode=0755,ro", None, "the lock root is read-only"),
        ("size=64k,nr_inodes=8", "fill", "the lock root is full"),
    ],
    ids=["read-only", "full"],
)
def test_lock_root_trouble_claims_nothing_and_says_why(
    settings, tmp_path, options, prepare, reason, caplog
):
    make_tasks("q", 20)
    with tiny_filesystem(tmp_path / "tiny-locks", options) as root:
        if prepare == "fill":
            for i in range(20):
                try:
                    (root / f"filler-{i}").mkdir()
                except OSError:
                    break
        worker = run_worker_on(settings, root)
    assert worker.exit_code == EXIT_LOCK_ROOT
    assert reason in worker.stop_reason
    assert reason in caplog.text
    assert Task.objects.counts() == {"queued": 20, "claimed": 0, "done": 0, "blocked": 0}
    assert set(Task.objects.values_list("attempts", flat=True)) == {0}
    failed = Task.objects.filter(events__kind=EventKind.LOCK_FAILED)
    assert failed.exists()


@pytest.mark.django_db
def test_file_edited_or_deleted_while_claimed_is_recorded_not_overwritten(write_task):
    edited = write_task("a.md", "---\nid: A\ntitle: First\n---\nbody\n")
    deleted = write_task("b.md", "---\nid: B\ntitle: Second\n---\nbody\n")
    Importer("q", [write_task.folder]).run([write_task.folder])
    me = Identity.current("w")
    mine = OwnerFile(me)
    batch = claims.claim_ready_tasks("q", me, mine, limit=2)
    edited.write_text("---\nid: A\ntitle: Edited meanwhile\n---\nbody\n")
    os.utime(edited, ns=(5, 5))
    deleted.unlink()
    report = Importer("q", [write_task.folder]).run([write_task.folder])
    assert (report.deferred, report.missing) == (1, 1)
    a, b = Task.objects.get(key="A"), Task.objects.get(key="B")
    assert a.title == "First" and a.change_pending and a.status == Status.CLAIMED
    assert b.source_missing and b.status == Status.CLAIMED
    claims.finish_claims(me, [(c, Result()) for c in batch], mine)
    a.refresh_from_db()
    assert (a.title, a.change_pending, a.status) == ("Edited meanwhile", False, Status.DONE)
    kinds = list(a.events.values_list("kind", flat=True))
    assert EventKind.CHANGE_DEFERRED in kinds and EventKind.UPDATED in kinds


@pytest.mark.slow
def test_other_hosts_claims_wait_for_their_lease_not_for_a_pid(process_env, tmp_path):
    make_tasks("q", 3)
    host_a = {**process_env, "HYPERVISOR_HOST": "host-a"}
    host_b = {**process_env, "HYPERVISOR_HOST": "host-b"}
    group_a = [
        start_manage(
            [
                "work",
                "--queue",
                "q",
                "--lease",
                "20",  # long enough that a loaded machine still asks well before it ends
                "--processor",
                "command",
                "--",
                sys.executable,
                AGENT,
                "--sleep",
                "60",
            ],
            host_a,
        )
        for _ in range(3)
    ]
    wait_for(lambda: Task.objects.filter(status=Status.CLAIMED).count() == 3, message="claims")
    for proc in group_a:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Host B cannot judge host A's pids: nothing is released while the leases run.
    early = run_manage(["reap_locks", "--json"], host_b)
    assert json.loads(early.stdout)["requeued"] == []
    assert Task.objects.filter(status=Status.CLAIMED, holder_host="host-a").count() == 3
    wait_for(
        lambda: not Task.objects.filter(lease_expires_at__gt=timezone.now()).exists(),
        message="lease expiry",
    )
    log = tmp_path / "keys.log"
    taken = run_manage(["reap_locks", "--json"], host_b)
    assert {r["why"] for r in json.loads(taken.stdout)["requeued"]} == {"lease expired"}
    done = run_manage(
        work_appending(log),
        host_b,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(log.read_text().split()) == ["t000000", "t000001", "t000002"]
    assert set(Task.objects.values_list("holder_host", flat=True)) == {"host-b"}


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").startswith("postgres") is False,
    reason="restarts the PostgreSQL server; runs in the PostgreSQL pass",
)
def test_workers_ride_out_a_postgresql_restart(process_env, tmp_path, lock_root):
    assert connection.vendor == "postgresql"
    make_tasks("q", 400)
    log = tmp_path / "keys.log"
    workers = [
        start_manage(
            [
                "work",
                "--queue",
                "q",
                "--processor",
                "command",
                "--json",
                "--",
                sys.executable,
                "-S",
                APPEND,
                str(log),
                "{key}",
            ],
            process_env,
        )
        for _ in range(4)
    ]
    wait_for(lambda: log.exists() and len(log.read_text().split()) > 40, message="progress")
    cluster = subprocess.run(["ls", "/etc/postgresql"], capture_output=True, text=True)
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster.stdout.strip(), "main", "restart"],
        check=True,
        timeout=120,
    )
    connection.close()
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, [o[1][-1000:] for o in outputs]
    keys = log.read_text().split()
    assert len(keys) == len(set(keys)) == 400
    assert Task.objects.counts()["done"] == 400
    assert lock_dirs(lock_root) == []
    assert any("database unavailable" in o[1] for o in outputs)


def test_command_arguments_never_reach_a_shell(process_env, tmp_path):
    """Hostile titles, keys and bodies are plain arguments to the command, nothing more."""
    marker = tmp_path / "pwned"
    hostile = [
        f"$(touch {marker})",
        "; rm -rf ~",
        f"`touch {marker}`",
        "line\nbreak",
        "--help",
        f"a && touch {marker}",
    ]
    for i, text in enumerate(hostile):
        task = Task.objects.create(queue="q", key=f"k{i}-{text}", title=text)
        TaskBody.objects.create(task=task, text=text)
    argv_log = tmp_path / "argv.jsonl"
    script = "import json,sys; open(sys.argv[1],'a').write(json.dumps(sys.argv[2:])+'\\n')"
    result = run_manage(
        [
            "work",
            "--queue",
            "q",
            "--processor",
            "command",
            "--",
            sys.executable,
            "-c",
            script,
            str(argv_log),
            "{key}",
            "{title}",
        ],
        process_env,
    )
    assert result.returncode == 0, result.stderr
    seen = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert sorted(seen) == sorted([[f"k{i}-{t}", t] for i, t in enumerate(hostile)])
    assert not marker.exists()
    assert Task.objects.counts()["done"] == len(hostile)


def test_secret_values_from_the_environment_are_masked_in_stored_output(process_env):
    Task.objects.create(queue="q", key="s1", title="secret")
    env = {
        **process_env,
        "AGENT_API_KEY": "sk-very-secret-123",
        "HYPERVISOR_MASK_ENV": "AGENT_API_KEY",
    }
    script = "import os; print('using key', os.environ['AGENT_API_KEY'])"
    result = run_manage(
        ["work", "--queue", "q", "--processor", "command", "--", sys.executable, "-c", script], env
    )
    assert result.returncode == 0, result.stderr
    task = Task.objects.get()
    assert "sk-very-secret-123" not in task.output_tail
    assert "using key ********" in task.output_tail


def test_lease_expired_claim_of_our_own_live_process_is_released(db):
    make_tasks("q", 1)
    me = Identity.current("w")
    claims.claim_ready_tasks("q", me, OwnerFile(me))
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=5))
    assert [s.why for s in reaper.find_stale_claims("q")] == ["lease expired"]
    assert locks.lock_dir("q", "t000000").exists()


def test_the_board_shows_a_task_file_changed_or_gone_under_a_claim(client, django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("watcher", password="pw-watcher-123")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(user)
    changed, gone = make_tasks("q", 2)
    Task.objects.filter(pk=changed.pk).update(status=Status.CLAIMED, change_pending=True)
    Task.objects.filter(pk=gone.pk).update(status=Status.CLAIMED, source_missing=True)
    page = client.get("/").content.decode()
    assert page.count("file changed while claimed") == 1
    assert page.count("file missing") == 1


def test_lock_root_trouble_is_told_on_the_herds_worker_row(settings, tmp_path, monkeypatch, db):
    from herds.models import Herd, HerdStatus, Profile
    from herds.receivers import WORKER_ENV

    make_tasks("q", 3)
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="q", profile=profile, size=1, status=HerdStatus.RUNNING)
    row = herd.workers.create(index=0, name="herd-w0", host=settings.HYPERVISOR_HOST)
    monkeypatch.setenv(WORKER_ENV, str(row.pk))
    with tiny_filesystem(tmp_path / "ro-locks", "size=64k,mode=0755,ro") as root:
        settings.HYPERVISOR_LOCK_ROOT = root
        worker = Worker("q", NoopProcessor(), herd=herd.pk)
        assert worker.run() == EXIT_LOCK_ROOT
    row.refresh_from_db()
    assert "the lock root is read-only" in row.exit_detail
    assert Task.objects.counts()["queued"] == 3
