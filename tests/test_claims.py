"""Claims: exactly once across real worker processes, fencing, crashes and the reaper."""

import fcntl
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from hypervisor_site.writers import write_transaction, writer_clock, writer_lock_path
from tests.conftest import APPEND, make_tasks, run_manage, start_manage, work_appending
from workqueue import actions, claims, locks, reaper, transitions
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import Dependency, EventKind, Queue, Status, Task, TaskEvent
from workqueue.processing import Result


def wait_for(condition, timeout=60, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message}")


def lock_dirs(root: Path) -> list[Path]:
    return [p for q in root.iterdir() if not q.name.startswith(".") for p in q.iterdir()]


@pytest.mark.slow
def test_eight_workers_run_every_task_exactly_once(process_env, lock_root, tmp_path):
    make_tasks("q", 2000)
    log = tmp_path / "keys.log"
    command = ["--", sys.executable, "-S", APPEND, str(log), "{key}"]
    workers = [
        start_manage(
            ["work", "--queue", "q", "--processor", "command", "--json", *command], process_env
        )
        for _ in range(8)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0] * 8, [o[1][-500:] for o in outputs]
    seen = Counter(log.read_text().split())
    assert len(seen) == 2000
    assert max(seen.values()) == 1
    assert Task.objects.counts() == {"queued": 0, "claimed": 0, "done": 2000, "blocked": 0}
    assert lock_dirs(lock_root) == []
    summaries = [json.loads(o[0].strip().splitlines()[-1]) for o in outputs]
    assert sum(s["done"] for s in summaries) == 2000


FINISHING_AGENT = str(Path(__file__).parent / "scripts" / "finishing_agent.py")


def finishing_run(
    process_env, folder: Path, kinds: list[str], said: list[str] | None = None
) -> dict[str, Path]:
    """Import a task file per kind (`status: inbox`), work them all with a worker process
    whose command (tests/scripts/finishing_agent.py) finishes each as its kind says; what
    the worker said on stderr is added to `said`."""
    folder.mkdir()
    paths = {}
    for kind in kinds:
        paths[kind] = folder / f"{kind}.md"
        paths[kind].write_text(
            f"---\nid: {kind}-1\ntitle: {kind}  # a comment stays\nstatus: inbox\n---\nBody.\n"
        )
    report = Importer("q", roots=[folder]).run([folder])
    assert (report.imported, report.errors) == (len(kinds), [])
    argv = ["work", "--queue", "q", "--processor", "command", "--json", "--", sys.executable]
    result = run_manage([*argv, FINISHING_AGENT, "{path}", "{key}"], process_env, timeout=60)
    assert result.returncode == 0, result.stderr
    if said is not None:
        said.append(result.stderr)
    return paths


def test_a_worker_writes_done_and_blocked_into_the_task_files(process_env, tmp_path):
    """The file kept `status: inbox` after its task was done: a re-import into a new
    database, or anyone reading the folder, saw the work as open and did it again."""
    folder = tmp_path / "tasks"
    paths = finishing_run(process_env, folder, ["done", "blocked"])
    assert paths["done"].read_text() == (
        "---\nid: done-1\ntitle: done  # a comment stays\nstatus: done\n---\nBody.\n"
    )
    assert paths["blocked"].read_text() == (
        "---\nid: blocked-1\ntitle: blocked  # a comment stays\nstatus: blocked\n"
        "blocked_reason: needs a key\n---\nBody.\n"
    )
    blocked = Task.objects.get(key="blocked-1")
    assert blocked.reason == "needs a key\nasked ops on Monday"  # the row keeps it whole
    assert not list(folder.glob(".*.tmp"))
    # The rows know the files as written: an import finds nothing changed.
    again = Importer("q", roots=[folder]).run([folder])
    assert (again.unchanged, again.updated) == (2, 0)
    # A new database (here: the same one emptied) imports the work as it ended.
    Task.objects.all().delete()
    Queue.objects.all().delete()
    Importer("fresh", roots=[folder]).run([folder])
    statuses = dict(Task.objects.values_list("key", "status"))
    assert statuses == {"done-1": Status.DONE, "blocked-1": Status.BLOCKED}
    assert Task.objects.get(key="blocked-1").reason == "needs a key"


def test_an_agents_edit_of_its_task_file_is_kept_and_the_status_added(process_env, tmp_path):
    paths = finishing_run(process_env, tmp_path / "tasks", ["edits", "completed"])
    assert paths["edits"].read_text() == (
        "---\nid: edits-1\ntitle: edits  # a comment stays\nstatus: done\n"
        "notes: the agent was here\n---\nBody.\n\nThe agent's line.\n"
    )
    edited = Task.objects.get(key="edits-1")
    assert edited.status == Status.DONE
    assert edited.frontmatter["notes"] == "the agent was here"
    assert "The agent's line." in edited.body
    # Its own word for done is left as it wrote it.
    assert "status: completed\n" in paths["completed"].read_text()
    assert Task.objects.get(key="completed-1").status == Status.DONE
    again = Importer("q", roots=[tmp_path / "tasks"]).run([tmp_path / "tasks"])
    assert (again.unchanged, again.updated) == (2, 0)


def test_a_block_over_a_close_section_the_agent_wrote_stays_blocked(process_env, tmp_path):
    """An agent wrote a `## Close Reason` section, then its run was blocked: the file said
    `status: blocked` and the section, and the section won, so the next read of the file
    (an edit, a re-import into a new database) closed the unfinished task as done."""
    folder = tmp_path / "tasks"
    paths = finishing_run(process_env, folder, ["closeblock"])
    text = paths["closeblock"].read_text()
    assert "status: blocked\nblocked_reason: the tests need a key\n" in text
    assert "## Close Reason" in text
    assert Task.objects.get(key="closeblock-1").status == Status.BLOCKED
    Task.objects.all().delete()
    Queue.objects.all().delete()
    Importer("fresh", roots=[folder]).run([folder])
    task = Task.objects.get(key="closeblock-1")
    assert (task.status, task.reason) == (Status.BLOCKED, "the tests need a key")


def test_a_finish_whose_file_is_gone_or_a_symlink_stands_and_says_why(process_env, tmp_path):
    said = []
    paths = finishing_run(process_env, tmp_path / "tasks", ["removed", "symlink"], said)
    assert not paths["removed"].exists()
    assert paths["symlink"].is_symlink()
    assert "status: inbox" in (tmp_path / "elsewhere.md").read_text()  # not followed
    for key, why in (("removed-1", "missing on disk"), ("symlink-1", "not a regular file")):
        task = Task.objects.get(key=key)
        assert task.status == Status.DONE
        note = task.events.get(kind=EventKind.NOTE)
        assert "done, but not written into" in note.message and why in note.message
        # Said where the run is watched too, not only on the task's timeline.
        warned = f"WARNING workqueue.editing: done, but not written into {paths[key[:-2]]}: "
        assert warned in said[0]
        assert why in said[0]


def test_prefetched_batches_are_exclusive(process_env, lock_root):
    make_tasks("q", 1000)
    workers = [
        start_manage(["work", "--queue", "q", "--prefetch", "50", "--json"], process_env)
        for _ in range(4)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, [o[1][-2000:] for o in outputs]
    summaries = [json.loads(o[0].strip().splitlines()[-1]) for o in outputs]
    assert sum(s["claimed"] for s in summaries) == 1000
    assert Task.objects.filter(status=Status.DONE, attempts=1).count() == 1000
    claimed_events = Counter(
        Task.objects.filter(events__kind=EventKind.CLAIMED).values_list("id", flat=True)
    )
    assert set(claimed_events.values()) == {1}
    assert lock_dirs(lock_root) == []


@pytest.mark.django_db
def test_claim_takes_the_row_and_the_lock_directory(lock_root):
    make_tasks("q", 3)
    Task.objects.filter(key="t000002").update(priority=0)
    me = Identity.current("w1")
    batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=2)
    assert [c.key for c in batch] == ["t000002", "t000000"]
    task = Task.objects.get(key="t000002")
    assert (task.status, task.holder, task.holder_pid, task.attempts) == (
        Status.CLAIMED,
        "w1",
        os.getpid(),
        1,
    )
    owner = locks.read_owner(locks.lock_dir("q", "t000002"))
    assert owner["pid"] == os.getpid() and owner["worker"] == "w1"
    assert owner["started"] == pytest.approx(me.started)


@pytest.mark.django_db
def test_a_task_whose_file_is_gone_is_not_claimed_until_it_is_back(lock_root, tmp_path, capsys):
    """A queued task whose file was deleted or moved away was claimed and worked: its agent
    was sent to a path that was not there and its finish written into nothing."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for key in ("gone", "here"):
        (folder / f"{key}.md").write_text(f"---\nid: {key}\npriority: P0\n---\nBody.\n")
    Importer("q", roots=[folder]).run([folder])
    text = (folder / "gone.md").read_bytes()
    (folder / "gone.md").unlink()
    Importer("q", roots=[folder]).run([folder])
    assert Task.objects.get(key="gone").source_missing
    me = Identity.current("w1")
    assert [c.key for c in claims.claim_ready_tasks("q", me, OwnerFile(me), limit=5)] == ["here"]
    assert Task.objects.get(key="gone").status == Status.QUEUED
    assert Task.objects.filter(queue="q").ready().count() == 0
    with pytest.raises(SystemExit):
        call_command("work", "--queue", "q", "--processor", "noop")
    assert (
        "1 queued task waits for a file missing on disk: put it back and import again, "
        "or close the task"
    ) in capsys.readouterr().err
    (folder / "gone.md").write_bytes(text)  # back: it is work again
    Importer("q", roots=[folder]).run([folder])
    assert [c.key for c in claims.claim_ready_tasks("q", me, OwnerFile(me), limit=5)] == ["gone"]


@pytest.mark.django_db
def test_fence_grows_on_every_claim():
    make_tasks("q", 1)
    me = Identity.current("w1")
    mine = OwnerFile(me)
    first = claims.claim_ready_tasks("q", me, mine)[0]
    claims.finish_claims(me, [(first, Result(status=Status.QUEUED))], mine)
    second = claims.claim_ready_tasks("q", me, mine)[0]
    assert second.fence > first.fence


@pytest.mark.django_db
def test_a_pass_over_list_longer_than_a_statement_takes_parameters_still_claims(lock_root):
    """A worker never claims again the tasks it gave back in its run, and the list grows
    with each. Sent as a parameter a task, a list of 250,001 made every later claim fail
    on this SQLite ("too many SQL variables"; 32,767 on older builds), and every claim
    on PostgreSQL quoted the whole list into its statement."""
    make_tasks("q", 3)
    first, second, third = Task.objects.order_by("id").values_list("id", flat=True)
    passed_over = {first: math.inf, third: math.inf}
    # Ids no task has: the list of a long run, whose tasks were since deleted or done.
    passed_over.update((third + n, math.inf) for n in range(1, 300_000))
    me = Identity.current("w1")
    parameters = []

    def counted(run, sql, params, many, context):
        parameters.append(len(params or ()))
        return run(sql, params, many, context)

    with connection.execute_wrapper(counted):
        batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=3, busy=passed_over)
    assert [c.id for c in batch] == [second]
    assert max(parameters) < 100


@pytest.mark.django_db
@pytest.mark.parametrize("way", ["finish", "release"])
def test_a_task_given_back_can_be_claimed_at_once_by_another_worker(lock_root, monkeypatch, way):
    """Its row went back to the queue before its lock directory was let go: a worker that
    claimed it in between found the lock held, passed the task over for 30 s, and could end
    its run with the task left queued (1 of 40 tasks, in one of three runs of two workers
    over a command that gives each task back once)."""
    make_tasks("q", 1)
    first, second = Identity.current("w1"), Identity.current("w2")
    mine, theirs = OwnerFile(first), OwnerFile(second)
    claim = claims.claim_ready_tasks("q", first, mine)[0]
    taken, passed_over = [], {}
    name = "finish" if way == "finish" else "release_by_worker"
    give_back = getattr(transitions, name)

    def then_another_claims(*args):
        changed = give_back(*args)  # committed: the row is queued
        taken.extend(claims.claim_ready_tasks("q", second, theirs, busy=passed_over))
        return changed

    monkeypatch.setattr(transitions, name, then_another_claims)
    if way == "finish":
        claims.finish_claims(first, [(claim, Result(status=Status.QUEUED))], mine)
    else:
        claims.release_claims(first, [claim], mine, "given back")
    assert [c.id for c in taken] == [claim.id] and passed_over == {}
    assert not TaskEvent.objects.filter(kind=EventKind.LOCK_BUSY).exists()
    owner = locks.read_owner(locks.lock_dir("q", claim.key))
    assert owner["worker"] == "w2"


@pytest.mark.django_db
def test_dependencies_hold_a_task_back_until_done():
    first, second = make_tasks("q", 2)
    Task.objects.filter(pk=first.pk).update(priority=5)
    Task.objects.filter(pk=second.pk).update(has_dependencies=True)
    Dependency.objects.create(task=second, key=first.key)
    assert list(Task.objects.ready().values_list("key", flat=True)) == [first.key]
    assert list(Task.objects.waiting().values_list("key", flat=True)) == [second.key]
    Task.objects.filter(pk=first.pk).update(status=Status.DONE)
    assert list(Task.objects.ready().values_list("key", flat=True)) == [second.key]


@pytest.mark.django_db
def test_lock_held_by_a_live_outside_holder_sends_the_task_back(lock_root, caplog):
    make_tasks("q", 2)
    outside = locks.lock_dir("q", "t000000")
    outside.mkdir(parents=True)
    (outside / "owner.json").write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "worker": "script"})
    )
    me = Identity.current("w1")
    batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=2)
    assert [c.key for c in batch] == ["t000001"]
    held_elsewhere = Task.objects.get(key="t000000")
    assert (held_elsewhere.status, held_elsewhere.attempts) == (Status.QUEUED, 0)
    assert held_elsewhere.events.filter(kind=EventKind.LOCK_BUSY).exists()
    assert outside.exists()
    # Said where the run is watched (a run that did nothing said nothing of it), once.
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1, said
    assert said[0].startswith("t000000 passed over: held by an outside process: host elsewhere")


@pytest.mark.django_db
def test_finished_locks_are_released_only_while_ours(lock_root):
    make_tasks("q", 2)
    me, other = Identity.current("me"), Identity.current("other")
    mine = OwnerFile(me)
    first, second = claims.claim_ready_tasks("q", me, mine, limit=2)
    # A person requeues the first task and another worker takes its lock before this
    # worker releases it: that lock is the other worker's and must stay.
    locks.release("q", first.key)
    assert locks.acquire("q", first.key, OwnerFile(other)) is None
    mine.release_own([locks.lock_path("q", c.key) for c in (first, second)])
    assert locks.read_owner(locks.lock_dir("q", first.key))["worker"] == "other"
    assert not locks.lock_dir("q", second.key).exists()


@pytest.mark.django_db
def test_late_finish_after_losing_the_claim_is_refused(lock_root):
    make_tasks("q", 1)
    zombie, other = Identity.current("zombie"), Identity.current("other")
    lost = claims.claim_ready_tasks("q", zombie, OwnerFile(zombie))[0]
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    report = reaper.release_stale_claims("q")
    assert [s.why for s in report.requeued] == ["lease expired"]
    theirs, mine = OwnerFile(other), OwnerFile(zombie)
    winner = claims.claim_ready_tasks("q", other, theirs)[0]
    claims.finish_claims(other, [(winner, Result(outcome="by other"))], theirs)
    late = [(lost, Result(status=Status.BLOCKED, reason="late"))]
    refused = claims.finish_claims(zombie, late, mine)
    task = Task.objects.get()
    assert refused.refused == [task.pk]
    assert (task.status, task.outcome, task.reason) == (Status.DONE, "by other", "")
    assert task.events.filter(kind=EventKind.LATE_FINISH_REFUSED, actor="zombie").exists()


@pytest.mark.django_db
def test_a_requeue_by_a_person_counts_the_attempts_afresh(lock_root):
    # Done on its first attempt, requeued, then abandoned once: with a limit of 2 it was
    # blocked as "abandoned 2 times" although a worker had died on it once.
    make_tasks("q", 1)
    Queue.objects.filter(name="q").update(max_attempts=2)
    me = Identity.current("w0")
    mine = OwnerFile(me)
    [claim] = claims.claim_ready_tasks("q", me, mine)
    claims.finish_claims(me, [(claim, Result())], mine)
    assert actions.requeue(Task.objects.get(), "nic")
    assert Task.objects.get().attempts == 0
    dead = Identity.current("w1")
    assert claims.claim_ready_tasks("q", dead, OwnerFile(dead))
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert len(reaper.release_stale_claims("q").requeued) == 1
    task = Task.objects.get()
    assert (task.status, task.attempts) == (Status.QUEUED, 1)


@pytest.mark.django_db
def test_reap_locks_dry_run_says_what_it_would_do_and_does_nothing(lock_root):
    make_tasks("q", 1)
    me = Identity.current("w0")
    claims.claim_ready_tasks("q", me, OwnerFile(me))
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    out = io.StringIO()
    call_command("reap_locks", "--dry-run", stdout=out)
    # It ended "1 requeued, 0 blocked, 0 orphan locks", which reads as done.
    assert out.getvalue().splitlines() == [
        "would release q/t000000 to queued: lease expired",
        "dry run, nothing changed: 1 to requeue, 0 to block, 0 orphan lock(s) to remove",
    ]
    assert Task.objects.get().status == Status.CLAIMED


@pytest.mark.django_db
def test_reaper_blocks_a_task_abandoned_too_often(lock_root):
    make_tasks("q", 1)
    Queue.objects.filter(name="q").update(max_attempts=2)
    for attempt in range(2):
        me = Identity.current(f"w{attempt}")
        claims.claim_ready_tasks("q", me, OwnerFile(me))
        Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        reaper.release_stale_claims("q")
    task = Task.objects.get()
    assert (task.status, task.reason) == (
        Status.BLOCKED,
        "abandoned after 2 attempts (queue limit 2)",
    )
    assert lock_dirs(lock_root) == []


@pytest.mark.django_db
def test_a_task_the_reaper_blocks_says_so_in_its_file(lock_root, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    path = folder / "a.md"
    path.write_text("---\nid: a\ntitle: A  # kept\nstatus: inbox\n---\nBody.\n")
    Importer("q", roots=[folder]).run([folder])
    Queue.objects.filter(name="q").update(max_attempts=1)
    me = Identity.current("w0")
    claims.claim_ready_tasks("q", me, OwnerFile(me))
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert [s.task.key for s in reaper.release_stale_claims("q").blocked] == ["a"]
    assert path.read_text() == (
        "---\nid: a\ntitle: A  # kept\nstatus: blocked\n"
        "blocked_reason: abandoned after 1 attempt (queue limit 1)\n---\nBody.\n"
    )
    assert Importer("q", roots=[folder]).run([folder]).unchanged == 1


@pytest.mark.django_db
def test_reaper_removes_orphan_locks_of_dead_owners_only(lock_root):
    dead = locks.lock_dir("q", "gone")
    live = locks.lock_dir("q", "alive")
    for path, pid in ((dead, 2**22 + 7), (live, os.getpid())):
        path.mkdir(parents=True)
        (path / "owner.json").write_text(
            json.dumps({"host": locks.Identity.current().host, "pid": pid, "started": None})
        )
    report = reaper.release_stale_claims("q")
    assert report.orphan_locks == [dead]
    assert not dead.exists() and live.exists()


@pytest.mark.django_db
def test_reaper_removes_spares_and_owner_files_of_dead_workers_only(lock_root):
    host = locks.Identity.current().host
    for pid, name in ((2**22 + 7, "dead"), (os.getpid(), "live")):
        spare = lock_root / locks.SPARES / name
        spare.mkdir(parents=True)
        record = json.dumps({"host": host, "pid": pid, "started": None})
        (spare / "owner.json").write_text(record)
        (lock_root / ".owners").mkdir(exist_ok=True)
        (lock_root / ".owners" / name).write_text(record)
    report = reaper.release_stale_claims()
    assert sorted(p.relative_to(lock_root).as_posix() for p in report.orphan_locks) == [
        ".owners/dead",
        ".spares/dead",
    ]
    assert sorted(p.name for p in (lock_root / locks.SPARES).iterdir()) == ["live"]
    assert sorted(p.name for p in (lock_root / ".owners").iterdir()) == ["live"]


@pytest.mark.django_db
@pytest.mark.parametrize("renames", [True, False], ids=["rename", "mkdir"])
def test_locks_appear_with_their_owner_and_finished_ones_leave_no_trace(lock_root, renames):
    make_tasks("q", 6)
    me = Identity.current("me")
    mine = OwnerFile(me)
    mine.renames = renames and mine.renames
    for _ in range(3):  # the second and third batches reuse the first one's directories
        batch = claims.claim_ready_tasks("q", me, mine, limit=2)
        for claim in batch:
            owner = locks.read_owner(locks.lock_dir("q", claim.key))
            assert (owner["worker"], owner["pid"]) == ("me", os.getpid())
        claims.finish_claims(me, [(c, Result()) for c in batch], mine)
        assert lock_dirs(lock_root) == []
    assert Task.objects.filter(status=Status.DONE).count() == 6
    mine.discard()
    assert sorted(p.name for p in lock_root.iterdir()) == sorted(
        [".owners", "q"] + ([locks.SPARES] if renames else [])
    )
    assert [p for d in lock_root.iterdir() for p in d.iterdir() if d.name != "q"] == []


@pytest.mark.django_db
def test_the_owner_file_carries_the_time_of_the_latest_batch(lock_root):
    make_tasks("q", 2)
    me = Identity.current("me")
    mine = OwnerFile(me)
    [first] = claims.claim_ready_tasks("q", me, mine, limit=1)
    owner = locks.read_owner(locks.lock_dir("q", first.key))
    assert {k: owner[k] for k in ("host", "pid", "worker")} == {
        "host": me.host,
        "pid": os.getpid(),
        "worker": "me",
    }
    time.sleep(0.01)
    [second] = claims.claim_ready_tasks("q", me, mine, limit=1)
    # One owner file for the worker, linked into each of its locks, stamped per batch.
    later = locks.read_owner(locks.lock_dir("q", second.key))
    assert later["time"] > owner["time"]
    assert locks.read_owner(locks.lock_dir("q", first.key)) == later


@pytest.mark.django_db
def test_a_spare_removed_under_the_worker_is_replaced(lock_root):
    make_tasks("q", 2)
    me = Identity.current("me")
    mine = OwnerFile(me)
    if not mine.renames:
        pytest.skip("this platform has no rename-without-replace: locks are made with mkdir")
    first = claims.claim_ready_tasks("q", me, mine, limit=1)
    claims.finish_claims(me, [(c, Result()) for c in first], mine)
    [spare] = mine.spares
    locks.remove(spare)
    [second] = claims.claim_ready_tasks("q", me, mine, limit=1)
    assert locks.read_owner(locks.lock_dir("q", second.key))["worker"] == "me"


@pytest.mark.slow
def test_killed_worker_is_reaped_and_its_task_completes_once_more(
    process_env, tmp_path, lock_root
):
    make_tasks("q", 1)
    log = tmp_path / "keys.log"
    agent = Path(__file__).parent.parent / "examples" / "agents" / "example_agent.py"
    slow = start_manage(
        [
            "work",
            "--queue",
            "q",
            "--processor",
            "command",
            "--",
            sys.executable,
            str(agent),
            "--sleep",
            "60",
        ],
        process_env,
    )
    wait_for(lambda: Task.objects.filter(status=Status.CLAIMED).exists(), message="claim")
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait(timeout=10)
    task = Task.objects.get()
    assert task.holder_pid == slow.pid and task.is_stale()

    reaped = run_manage(["reap_locks", "--json"], process_env)
    assert json.loads(reaped.stdout)["requeued"][0]["why"] == f"holder pid {slow.pid} is gone"
    assert lock_dirs(lock_root) == []

    done = run_manage(
        work_appending(log),
        process_env,
    )
    assert done.returncode == 0, done.stderr
    task.refresh_from_db()
    assert (task.status, task.attempts) == (Status.DONE, 2)
    assert log.read_text().split() == [task.key]


@pytest.mark.django_db
def test_command_result_conventions(lock_root, tmp_path):
    from workqueue.processors import interpret as with_word

    def interpret(*args):
        return with_word(*args)[0]

    blocked = interpret(0, "thinking\nBLOCKED: t1\nReason: needs a key\nNext: ask ops\n", "", "t1")
    assert (blocked.status, blocked.outcome, blocked.reason, blocked.next_step) == (
        Status.BLOCKED,
        "",  # a clean exit's "success" was kept on a blocked task
        "needs a key",
        "ask ops",
    )
    said_blocked = interpret(0, '{"status": "blocked", "reason": "no key"}', "", "t1")
    assert (said_blocked.status, said_blocked.outcome) == (Status.BLOCKED, "")
    done = interpret(
        0, 'x\n{"status": "done", "outcome": "ok", "tokens": 12, "commit": "ab"}', "", "t1"
    )
    assert (done.status, done.outcome, done.tokens, done.commit) == (Status.DONE, "ok", 12, "ab")
    failed = interpret(2, "", "Traceback\nboom", "t1")
    assert (failed.status, failed.reason) == (Status.BLOCKED, "Traceback\nboom")
    assert interpret(75, "", "", "t1").status == Status.QUEUED


def test_a_task_a_command_gives_back_is_not_claimed_again_by_the_same_worker(
    process_env, lock_root
):
    """Exit 75 put the task back at the head of the claim order, and the worker that gave it
    back claimed it again at once, for ever (40,000 attempts in four minutes by hand)."""
    make_tasks("q", 3)
    script = "import sys; sys.exit(75 if sys.argv[1] == 't000001' else 0)"
    argv = ["work", "--queue", "q", "--processor", "command", "--json", "--"]
    result = run_manage([*argv, sys.executable, "-c", script, "{key}"], process_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["released"] == 1
    given_back = Task.objects.get(key="t000001")
    assert (given_back.status, given_back.attempts) == (Status.QUEUED, 1)
    assert given_back.events.filter(kind=EventKind.CLAIMED).count() == 1
    assert Task.objects.filter(status=Status.DONE).count() == 2


def test_forked_workers_share_the_queue_exactly_once(process_env, lock_root):
    make_tasks("q", 600)
    result = run_manage(
        ["work", "--queue", "q", "--workers", "4", "--prefetch", "20", "--json"], process_env
    )
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len({s["worker"] for s in summaries}) == 4
    assert sum(s["done"] for s in summaries) == 600
    # Each worker wrote (claims and finishes) and says for how long it held the writer.
    assert all(s["writer_hold_seconds"] > 0 for s in summaries)
    assert Task.objects.filter(status=Status.DONE, attempts=1).count() == 600
    assert lock_dirs(lock_root) == []


def test_a_forked_worker_that_dies_is_reported_and_the_others_finish(process_env, lock_root):
    make_tasks("q", 40)
    result = run_manage(
        [
            *("work", "--queue", "q", "--workers", "2", "--json"),
            *("--processor", "tests.scripts.dying_processor.die_on_first"),
        ],
        process_env,
    )
    assert result.returncode == 9, result.stderr
    summaries = [json.loads(line) for line in result.stdout.strip().splitlines()]
    dead = [s for s in summaries if s["stop_reason"] == "died without a summary"]
    assert [s["exit_code"] for s in dead] == [9]
    assert sum(s["done"] for s in summaries) == 39
    # The dead worker's claim waits for the reaper; nothing else is left claimed.
    assert list(Task.objects.filter(status=Status.CLAIMED).values_list("key", flat=True)) == [
        "t000000"
    ]


@pytest.mark.django_db(transaction=True)
def test_the_writer_clock_counts_waiting_for_and_holding_the_write_lock():
    waited_before, held_before = writer_clock.reading()
    if connection.vendor == "sqlite":
        # Another writer has the lock for 0.3 s (flock is per open file, so this conflicts).
        other = open(writer_lock_path(connection.settings_dict["NAME"]), "a")  # noqa: SIM115
        fcntl.flock(other, fcntl.LOCK_EX)
        threading.Timer(0.3, other.close).start()
    with write_transaction():
        time.sleep(0.1)
    waited = writer_clock.waited - waited_before
    held = writer_clock.held - held_before
    assert held >= 0.1
    if connection.vendor == "sqlite":
        assert 0.25 <= waited < 5
    else:
        assert waited == 0  # PostgreSQL writers lock rows, not the database


@pytest.mark.django_db
def test_a_batch_of_different_results_writes_each_its_own(lock_root):
    # Results alike share one UPDATE; any field that differs, the data too, parts them.
    make_tasks("q", 5)
    me = Identity.current("w")
    owner = OwnerFile(me)
    taken = claims.claim_ready_tasks("q", me, owner, limit=5)
    results = [
        Result(outcome="same"),
        Result(outcome="same"),
        Result(outcome="other", tokens=7),
        Result(status=Status.BLOCKED, reason="stuck", data={"why": 1}),
        Result(status=Status.BLOCKED, reason="stuck", data={"why": 2}),
    ]
    report = claims.finish_claims(me, list(zip(taken, results, strict=True)), owner)
    assert sorted(report.finished) == sorted(c.id for c in taken)
    rows = {
        t.pk: (t.status, t.outcome, t.tokens, t.reason, t.result)
        for t in Task.objects.filter(pk__in=[c.id for c in taken])
    }
    assert [rows[c.id] for c in taken] == [
        (Status.DONE, "same", 0, "", {}),
        (Status.DONE, "same", 0, "", {}),
        (Status.DONE, "other", 7, "", {}),
        (Status.BLOCKED, "", 0, "stuck", {"why": 1}),
        (Status.BLOCKED, "", 0, "stuck", {"why": 2}),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("option", "value"),
    [("--lease", 10**20), ("--max-attempts", 10**20), ("--prefetch", 10**20)],
)
def test_options_past_a_database_integer_are_refused_before_any_claim(option, value):
    """Each was a traceback mid-claim: a lease no date holds, a LIMIT or a column value
    past SQLite's 64 bits (PostgreSQL's integer columns stop at 32)."""
    from django.core.management import CommandError, call_command

    make_tasks("q", 1)
    with pytest.raises(CommandError, match=f"^{option}: at most 2,147,483,647$"):
        call_command("work", "--queue", "q", option, str(value))
    assert Task.objects.get().status == Status.QUEUED


@pytest.mark.django_db
@pytest.mark.parametrize("timeout", ["-5", "0", "nan"])
def test_a_timeout_that_is_no_time_is_refused_before_any_claim(timeout):
    """`--timeout -5` claimed every ready task and blocked each "timed out after -5 s"."""
    from django.core.management import CommandError, call_command

    make_tasks("q", 2)
    with pytest.raises(
        CommandError, match=f"^--timeout {timeout}: give a number of seconds above 0$"
    ):
        call_command("work", "--queue", "q", "--processor", "command", "--timeout", timeout,
                     "--", sys.executable, "-c", "pass")  # fmt: skip
    assert set(Task.objects.values_list("status", flat=True)) == {Status.QUEUED}


@pytest.mark.django_db
def test_reap_locks_names_a_queue_that_does_not_exist():
    from django.core.management import CommandError

    make_tasks("q", 1)
    with pytest.raises(CommandError, match="no task is in a queue named 'qq'"):
        call_command("reap_locks", "--queue", "qq")
    with pytest.raises(CommandError, match="--queue"):
        call_command("reap_locks", "--queue", "bad/name")


@pytest.mark.django_db
@pytest.mark.parametrize("workers", [257, 5000, 10**20])
def test_a_typo_in_workers_does_not_fork_thousands_of_processes(workers):
    """`work --workers 5000` forked 5,000 processes (and as many database connections)."""
    from django.core.management import CommandError, call_command

    make_tasks("q", 1)
    with pytest.raises(
        CommandError,
        match=f"^--workers {workers}: one command forks at most 256 workers; start more",
    ):
        call_command("work", "--queue", "q", "--workers", str(workers))
    assert Task.objects.get().status == Status.QUEUED


@pytest.mark.django_db
@pytest.mark.parametrize(
    "processor",
    [
        ["--processor", "command", "--", sys.executable, "-c", "pass"],
        ["--processor", "pull", "--", sys.executable, "-c", "pass"],
        ["--processor", "noop"],
    ],
)
def test_dry_run_is_refused_for_a_processor_that_has_none(processor, tmp_path):
    """`work --dry-run --processor command` ran the command and marked its tasks done,
    while their files stayed as they were: only triage reports what it would do."""
    from django.core.management import CommandError, call_command

    make_tasks("q", 2)
    with pytest.raises(CommandError, match=r"^--dry-run: the .* processor has no dry run"):
        call_command("work", "--queue", "q", "--dry-run", *processor)
    assert set(Task.objects.values_list("status", flat=True)) == {Status.QUEUED}


@pytest.mark.django_db
def test_queue_stats_names_a_queue_that_does_not_exist():
    """It reported zeros for a typo, where reap_locks and herd refuse the name."""
    from django.core.management import CommandError

    make_tasks("q", 1)
    with pytest.raises(CommandError, match=r"^no task is in a queue named 'nosuch' \(queues: q\)"):
        call_command("queue_stats", "--queue", "nosuch")
    with pytest.raises(CommandError, match="--queue"):
        call_command("queue_stats", "--queue", "bad/name")
    out = io.StringIO()
    call_command("queue_stats", "--queue", "q", stdout=out)
    assert "  queued: 1" in out.getvalue()


def test_queue_stats_into_a_pipe_its_reader_closed_ends_without_a_traceback(process_env):
    """`queue_stats | head -1`: the reader leaves after one line."""
    make_tasks("q", 1)
    reader, writer = os.pipe()
    os.close(reader)  # gone before the command writes a byte
    try:
        stats = start_manage(["queue_stats", "--queue", "q"], process_env, stdout=writer)
    finally:
        os.close(writer)
    _out, err = stats.communicate(timeout=60)
    assert err == ""
    assert stats.returncode == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--prefetch", "-1", "--prefetch -1: give 1 or more"),
        ("--timeout", "0", "--timeout 0: give a number of seconds above 0"),
        ("--workers", "0", "--workers 0: give 1 or more"),
        ("--lease", "-10", "--lease -10: give 1 or more"),
        ("--max-attempts", "-1", "--max-attempts -1: give 1 or more"),
        ("--batch", "-3", "--batch -3: give 0 (every task) or more"),
    ],
)
def test_a_number_that_makes_no_sense_is_named_with_its_flag(option, value, said):
    """Each was told with one message listing every rule, naming none that was broken."""
    from django.core.management import CommandError

    make_tasks("q", 1)
    with pytest.raises(CommandError) as refused:
        call_command("work", "--queue", "q", option, value)
    assert str(refused.value) == said
    assert Task.objects.get().status == Status.QUEUED


@pytest.mark.django_db
def test_an_unknown_processor_is_told_every_one_there_is():
    from django.core.management import CommandError

    make_tasks("q", 1)
    with pytest.raises(CommandError) as refused:
        call_command("work", "--queue", "q", "--processor", "nosuch")
    assert str(refused.value) == (
        "unknown processor 'nosuch': use noop, triage, command, pull or a dotted path"
    )
