"""Exactly once for the agent's whole process tree, not only for the worker.

Real worker processes run tests/scripts/hostile_agent.py, which records the pid of every
process it starts, so each test can look for what must be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.conf import settings
from django.db import OperationalError, connection

from tests.conftest import freeze_outside_a_write, make_tasks, run_manage, start_manage
from workqueue import agent_tree, locks, reaper, transitions
from workqueue.agents import AgentOptions, Transcript, adapter_class
from workqueue.models import EventKind, Status, Task
from workqueue.processing import Claim
from workqueue.processors import TAIL_CHARS, CommandProcessor
from workqueue.worker import Worker

AGENT = str(Path(__file__).parent / "scripts" / "hostile_agent.py")


def work_with_agent(record: Path, mode: str, *agent_args: str, options=()) -> list[str]:
    return [
        "work",
        "--queue",
        "q",
        *options,
        "--processor",
        "command",
        "--",
        sys.executable,
        AGENT,
        str(record),
        mode,
        *agent_args,
    ]


def recorded(record: Path, roles: set[str], timeout: float = 30) -> dict[str, int]:
    """Wait until the agent has recorded a process for each role; role -> pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        if record.exists():
            for line in record.read_text().splitlines():
                role, _, pid = line.partition(" ")
                if role in roles:
                    found[role] = int(pid)
        if set(found) == roles:
            return found
        time.sleep(0.05)
    raise AssertionError(f"the agent never recorded {roles}: {record.read_text()!r}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def cleanup():
    """Whatever a failing test left running must not outlive it."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def test_reaper_ends_a_killed_workers_agent_before_the_task_goes_back(
    process_env, tmp_path, cleanup
):
    make_tasks("q", 1)
    record = tmp_path / "record"
    worker = start_manage(work_with_agent(record, "escape"), process_env)
    pids = recorded(record, {"agent", "escaped"})
    cleanup.extend(pids.values())
    deadline = time.monotonic() + 10
    while Task.objects.get().agent_pgid is None and time.monotonic() < deadline:
        time.sleep(0.05)
    task = Task.objects.get()
    assert task.agent_pgid == pids["agent"]  # the agent leads a group of its own
    worker.kill()
    worker.wait()
    time.sleep(0.3)
    # The danger: the worker is gone, both of its agent's processes still work the task.
    assert alive(pids["agent"]) and alive(pids["escaped"])

    report = reaper.release_stale_claims()

    assert [s.task.key for s in report.requeued] == ["t000000"]
    assert wait_gone(pids.values(), timeout=1), "the task went back with its agent alive"
    task.refresh_from_db()
    assert task.status == Status.QUEUED and task.agent_pgid is None


def test_a_claim_whose_agent_cannot_be_ended_is_not_requeued(
    process_env, tmp_path, cleanup, monkeypatch, settings
):
    settings.HYPERVISOR_AGENT_GRACE = 0
    make_tasks("q", 1)
    record = tmp_path / "record"
    worker = start_manage(work_with_agent(record, "hang"), process_env)
    agent = recorded(record, {"agent"})["agent"]
    cleanup.append(agent)
    worker.kill()
    worker.wait()
    # A process that no signal ends (in the kernel, or beyond our permissions) cannot be
    # made on demand: here the signals to this one are lost on the way.
    real_send = psutil.Process.send_signal

    def lost(process, signum):
        if process.pid != agent:
            real_send(process, signum)

    monkeypatch.setattr(psutil.Process, "send_signal", lost)

    report = reaper.release_stale_claims()

    assert report.requeued == [] and [p for _, p in report.agents_alive] == [[agent]]
    assert Task.objects.get().status == Status.CLAIMED
    assert alive(agent)
    monkeypatch.undo()
    assert reaper.release_stale_claims().requeued[0].task.key == "t000000"
    assert not alive(agent)


def test_stopping_worker_ends_an_agent_child_that_escaped_with_setsid(
    process_env, tmp_path, cleanup
):
    make_tasks("q", 1)
    record = tmp_path / "record"
    worker = start_manage(work_with_agent(record, "escape"), process_env)
    pids = recorded(record, {"agent", "escaped"})
    cleanup.extend(pids.values())
    # Out of the agent's session and group, still its child.
    assert os.getsid(pids["escaped"]) == os.getpgid(pids["escaped"]) == pids["escaped"]
    assert psutil.Process(pids["escaped"]).ppid() == pids["agent"]
    # The first Ctrl-C (or SIGTERM) lets the task at hand finish: the agent works on.
    worker.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert alive(pids["agent"]) and worker.poll() is None
    worker.send_signal(signal.SIGTERM)  # the second ends it now
    _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert "SIGTERM again ends its agent now" in err
    assert not alive(pids["agent"]) and not alive(pids["escaped"])
    task = Task.objects.get()
    assert task.status == Status.QUEUED and task.reason == "worker stopped"
    assert task.attempts == 0  # the task was not at fault: a stop is no attempt


def test_a_first_ctrl_c_lets_the_agent_finish_its_task_and_claims_no_more(process_env, tmp_path):
    """README: SIGINT or SIGTERM stops a worker from claiming; it finishes the task at hand.
    The agent was ended at once, its work thrown away and the task run again later."""
    make_tasks("q", 2)
    started = tmp_path / "started"
    agent = (
        "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('x'); time.sleep(3); "
        "print('finished the work')"
    )
    worker = start_manage(
        ["work", "--queue", "q", "--processor", "command", "--", sys.executable, "-c", agent,
         str(started)],
        process_env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGINT)
    _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "finishing t00000" in err and "then stopping; SIGINT again ends its agent now" in err
    statuses = sorted(Task.objects.values_list("status", flat=True))
    assert statuses == [Status.DONE, Status.QUEUED]
    assert "finished the work" in Task.objects.get(status=Status.DONE).output_tail


@pytest.mark.parametrize(("mode", "role"), [("orphan", "escaped"), ("vanish", "vanished")])
def test_what_an_agent_that_exited_left_behind_is_ended(
    process_env, tmp_path, cleanup, mode, role
):
    """orphan: a setsid() child, its claim marker still on it. vanish: a grandchild in no
    group of the agent's, with no marker, its parent gone before any look at the tree; it
    outlived its task, and another agent could take the task meanwhile. The worker adopts
    orphans (PR_SET_CHILD_SUBREAPER) and ends it with the agent."""
    make_tasks("q", 1)
    record = tmp_path / "record"
    result = run_manage(work_with_agent(record, mode), process_env)
    assert result.returncode == 0, result.stderr
    left = recorded(record, {role})[role]
    cleanup.append(left)
    assert wait_gone([left], timeout=2), "what the agent left behind outlived its task"
    assert Task.objects.get().status == Status.DONE


def test_timeout_bounds_a_task_whose_agent_exited_but_left_a_child_on_its_pipes(
    process_env, tmp_path, cleanup
):
    make_tasks("q", 2)
    record = tmp_path / "record"
    started = time.monotonic()
    result = run_manage(
        work_with_agent(record, "background-exit", options=["--timeout", "3"]), process_env
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    backgrounds = [
        int(line.split()[1])
        for line in record.read_text().splitlines()
        if line.startswith("background")
    ]
    cleanup.extend(backgrounds)
    assert len(backgrounds) == 2
    assert not any(alive(p) for p in backgrounds)
    # Each task: the agent exits at once, then a grace period of reading; not 40 s each.
    assert elapsed < 2 * (3 + settings.HYPERVISOR_AGENT_GRACE) + 5, elapsed
    done = list(Task.objects.values_list("status", "outcome"))
    assert done == [(Status.DONE, "success")] * 2  # it exited 0: not "timed out"


def test_a_hung_agent_is_ended_within_its_timeout_plus_the_grace(process_env, tmp_path, cleanup):
    make_tasks("q", 1)
    record = tmp_path / "record"
    started = time.monotonic()
    result = run_manage(
        work_with_agent(record, "hang", options=["--timeout", "2"]), process_env, timeout=60
    )
    elapsed = time.monotonic() - started
    agent = recorded(record, {"agent"})["agent"]
    cleanup.append(agent)
    assert result.returncode == 0, result.stderr
    assert not alive(agent)  # it ignored SIGTERM: killed after the grace
    task = Task.objects.get()
    assert (task.status, task.outcome) == (Status.BLOCKED, "timed_out")
    assert elapsed < 2 + 2 * settings.HYPERVISOR_AGENT_GRACE + 5, elapsed


def test_worker_memory_does_not_follow_what_the_agent_prints(process_env, tmp_path):
    make_tasks("q", 1)
    record = tmp_path / "record"
    env = {**process_env, "HYPERVISOR_AGENT_LOG_BYTES": str(1024 * 1024)}
    worker = start_manage(work_with_agent(record, "flood", "400"), env)
    process = psutil.Process(worker.pid)
    # The baseline is the worker once its agent runs: Django and the worker's imports are
    # loaded by then, and what follows is only the output going through.
    while worker.poll() is None and not process.children():
        time.sleep(0.01)
    first = peak = process.memory_info().rss
    while worker.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    worker.communicate(timeout=120)
    assert worker.returncode == 0
    task = Task.objects.get()
    assert task.status == Status.DONE
    assert len(task.output_tail) <= TAIL_CHARS and task.output_tail.rstrip().endswith("x" * 100)
    # 400 MB went through; the worker's memory did not follow it.
    assert peak - first < 32 * 1024 * 1024, (first, peak)
    log = Path(task.result["log"])
    assert 1024 * 1024 <= log.stat().st_size < 1024 * 1024 + 200
    assert log.read_bytes().endswith(b" more bytes not kept]\n")


def test_an_agent_killed_mid_line_keeps_the_cut_line_in_its_output(process_env, tmp_path):
    make_tasks("q", 1)
    result = run_manage(work_with_agent(tmp_path / "record", "midline"), process_env)
    assert result.returncode == 0, result.stderr
    task = Task.objects.get()
    assert task.status == Status.BLOCKED and task.reason.startswith("killed by SIGKILL")
    assert "a line cut o" in task.output_tail


def test_agents_see_an_allow_listed_environment_and_no_secret_reaches_stored_output(
    process_env, tmp_path
):
    make_tasks("q", 1)
    record = tmp_path / "record"
    env = {
        **process_env,
        "SECRET_KEY": "django-secret-value-for-the-test",
        "HUEY_REDIS_URL": "redis://:redis-password-xyz@127.0.0.1:6379/0",
        "MY_SERVICE_TOKEN": "tok-not-for-agents-123",
        "AGENT_API_KEY": "sk-passed-to-the-agent-456",
        "LC_ALL": "C.UTF-8",
    }
    result = run_manage(
        work_with_agent(record, "env", options=["--pass-env", "AGENT_API_KEY"]), env
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(record.read_text().split("env ", 1)[1].splitlines()[0])
    allowed = agent_tree.ALLOWED_ENV | {"AGENT_API_KEY", "LC_ALL"}
    assert {n for n in seen if not n.startswith("HYPERVISOR_TASK_")} <= allowed, sorted(seen)
    assert seen["AGENT_API_KEY"] == "sk-passed-to-the-agent-456"
    assert seen["HYPERVISOR_TASK_KEY"] == "t000000"
    for name in ("SECRET_KEY", "DATABASE_URL", "HUEY_REDIS_URL", "MY_SERVICE_TOKEN"):
        assert name not in seen
    task = Task.objects.get()
    assert "AGENT_API_KEY=********" in task.output_tail
    assert "sk-passed-to-the-agent-456" not in task.output_tail
    log = Path(task.result["log"]).read_text()
    assert "AGENT_API_KEY=********" in log and "sk-passed" not in log


def test_known_secrets_cover_the_servers_own_and_passwords_inside_urls(monkeypatch, settings):
    settings.SECRET_KEY = "server-secret-key-abc"
    monkeypatch.setenv("DATABASE_URL", "postgres://app:db-pass-word@db:5432/hv")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-token-value")
    found = agent_tree.known_secrets({}, [])
    assert "server-secret-key-abc" in found and "db-pass-word" in found
    assert "ghp-token-value" in found
    masked = agent_tree.Masker(found).text(
        "url postgres://app:db-pass-word@db and ghp-token-value"
    )
    assert "db-pass-word" not in masked and "ghp-token-value" not in masked


def test_a_secret_a_cli_prints_json_escaped_is_masked_before_its_adapter_decodes_it():
    """A secret with a quote, a backslash or a non-ASCII letter is printed escaped by a
    JSON-printing CLI: the raw bytes did not hold it, and the adapter stored it decoded,
    in clear, as the task's final message."""
    secret = 'Pa"ss\\word-ü-4711'
    mask = agent_tree.Masker([secret])
    adapter = adapter_class("claude")(AgentOptions(), Transcript(None))
    result = {"type": "result", "subtype": "success", "result": f"It is {secret}. COMPLETED: t1"}
    for line in (json.dumps(result), json.dumps(result, ensure_ascii=False)):
        adapter.feed("stdout", mask(line.encode()).decode())
        assert secret not in adapter.final and "********" in adapter.final


def test_our_processes_keep_their_environment_from_agents_running_as_our_user(process_env):
    """An agent runs as its worker's user, and that user may read /proc/<pid>/environ of
    each of its processes: the worker's (the agent's parent), the consumer's, the web
    server's SECRET_KEY and DATABASE_URL. Ours are not "dumpable": root's to read only."""
    probe = "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    result = run_manage(["shell", "-c", probe], process_env)
    assert result.stdout.strip().splitlines()[-1] == "0", result.stderr
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("the same-user read needs root to take on another user (CI runs as root)")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    holder = "import ctypes, sys, time; ctypes.CDLL(None).prctl(4, int(sys.argv[1]), 0, 0, 0); "
    holder += "print('ready', flush=True); time.sleep(30)"
    for dumpable in (1, 0):
        process = subprocess.Popen(
            [*nobody, "/usr/bin/python3", "-c", holder, str(dumpable)],
            env={"PATH": "/usr/bin:/bin", "A_SECRET": "held-by-the-worker"},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout.readline() == "ready\n"
            read = subprocess.run(
                [*nobody, "cat", f"/proc/{process.pid}/environ"], capture_output=True
            )
        finally:
            process.kill()
            process.wait()
        assert (b"held-by-the-worker" in read.stdout) == bool(dumpable), read.stderr


HERD_PROCESSES = """
import ctypes, multiprocessing.resource_tracker as tracker, os
from herds import zygote

def probe(answers):
    answers.put(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE

if __name__ == "__main__":
    zygote.warm_up()  # as the consumer's start does
    answers = zygote._context.Queue()
    worker = zygote._context.Process(target=probe, args=(answers,))
    worker.start()
    print(answers.get())
    worker.join()
    with open(f"/proc/{tracker._resource_tracker._pid}/environ", "rb") as environ:
        print(b"probe-secret-key" in environ.read())
"""


def test_herd_workers_and_the_consumers_helpers_keep_the_secrets_from_agents(
    process_env, tmp_path
):
    """A herd's workers are forks of a fork server that multiprocessing starts by exec,
    with the consumer's whole environment: "dumpable" again, so every agent could read
    SECRET_KEY and DATABASE_URL in its own worker's /proc/<pid>/environ, and in that of
    the resource tracker beside it."""
    script = tmp_path / "herd_processes.py"
    script.write_text(HERD_PROCESSES)
    result = subprocess.run(
        [sys.executable, str(script)],
        env={
            **process_env,
            "SECRET_KEY": "probe-secret-key",
            "PYTHONPATH": str(settings.BASE_DIR),
        },
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == ["0", "False"], result.stderr


def test_placeholders_are_filled_once_and_values_never_scanned_again():
    processor = CommandProcessor(["agent", "{path}", "--key={key}", "{title}", "{unknown}"])
    claim = Claim(1, "q", "../outside", "{queue} {path}", "imp/{key}/secret.md", 1)
    assert processor.arguments(claim) == [
        "agent",
        "imp/{key}/secret.md",
        "--key=../outside",
        "{queue} {path}",
        "{unknown}",
    ]


def test_a_task_locked_by_an_outside_process_is_skipped_not_taken_for_an_empty_queue(
    process_env, tmp_path, cleanup, admin_client
):
    make_tasks("q", 50)
    urgent = Task.objects.create(queue="q", key="urgent", title="Most urgent", priority=0)
    outside = subprocess.Popen(["sleep", "60"])
    cleanup.append(outside.pid)
    directory = locks.lock_dir("q", "urgent")
    directory.mkdir(parents=True)
    (directory / "owner.json").write_text(
        json.dumps(
            {
                "host": settings.HYPERVISOR_HOST,
                "pid": outside.pid,
                "started": psutil.Process(outside.pid).create_time(),
                "worker": "someone's mkdir script",
            }
        )
    )
    result = run_manage(["work", "--queue", "q", "--prefetch", "1", "--json"], process_env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["done"] == 50
    urgent.refresh_from_db()
    assert urgent.status == Status.QUEUED and urgent.attempts == 0
    assert (directory / "owner.json").exists()  # the outside holder's lock is left alone
    shown = f"held by an outside process: host {settings.HYPERVISOR_HOST}, pid {outside.pid}"
    assert shown in admin_client.get("/").content.decode()
    assert shown in admin_client.get(f"/admin/queue/task/{urgent.pk}/change/").content.decode()
    outside.kill()
    outside.wait()


def test_another_installations_agent_with_the_same_task_and_fence_is_left_alone(
    settings, tmp_path, cleanup
):
    """Task ids and fences start at 1 in every database: a second installation on this host
    (or a second test run) has an agent marked for "task 1, fence 1" too."""
    settings.HYPERVISOR_LOCK_ROOT = tmp_path / "theirs"
    theirs = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, agent_tree.CLAIM_VARIABLE: agent_tree.claim_marker(1, 1)},
        start_new_session=True,
    )
    cleanup.append(theirs.pid)
    settings.HYPERVISOR_LOCK_ROOT = tmp_path / "ours"
    ours = agent_tree.AgentRef(agent_tree.claim_marker(1, 1), None, time.time() - 3600)
    found = agent_tree.find_agent_processes([ours])
    assert theirs.pid not in [p.pid for p in found[ours]]
    assert theirs.poll() is None


def test_an_agent_that_closes_its_pipes_before_exiting_is_not_killed(settings):
    """coreutils close stdout and stderr in their exit handlers: between that and the exit,
    a loaded machine leaves a window in which ending the group would kill a task that
    succeeded. The agent here closes its pipes, works one second more, and exits 0."""
    closes_early = "import os, time; os.close(1); os.close(2); time.sleep(1); raise SystemExit(0)"
    run = agent_tree.AgentRun(
        [sys.executable, "-c", closes_early], {}, None, 30, agent_tree.Masker([]), lambda: False
    )
    run.start()
    ended = run.wait()
    assert (ended.code, ended.timed_out, ended.survivors) == (0, False, [])
    assert ended.seconds >= 1


def test_an_agent_working_on_with_closed_pipes_still_meets_its_timeout():
    quiet = "import os, time; os.close(1); os.close(2); time.sleep(60)"
    run = agent_tree.AgentRun(
        [sys.executable, "-c", quiet], {}, None, 1.5, agent_tree.Masker([]), lambda: False
    )
    run.start()
    ended = run.wait()
    assert ended.timed_out and ended.survivors == []
    assert ended.seconds < 1.5 + 10


def test_a_worker_paused_past_its_lease_ends_its_agent_tree_as_it_resumes(
    process_env, tmp_path, cleanup
):
    """Another host's reaper cannot end an agent here: it takes back a claim whose lease
    ran out. A worker paused past its lease (a VM paused, SIGSTOP) resumed with its
    agent at work beside the agent of whoever claimed the task next: two agents on one
    task."""
    make_tasks("q", 1)
    record = tmp_path / "record"
    # Another host has a lock root of its own, which its agents' claim markers name: this
    # host's reaper cannot tell them from another machine's.
    there = {
        **process_env,
        "HYPERVISOR_HOST": "another-host",
        "HYPERVISOR_LOCK_ROOT": str(tmp_path / "another-hosts-locks"),
    }
    worker = start_manage(work_with_agent(record, "escape", options=["--lease", "3"]), there)
    cleanup.append(worker.pid)
    pids = recorded(record, {"agent", "escaped"})
    cleanup.extend(pids.values())
    freeze_outside_a_write(worker.pid)
    try:
        time.sleep(4)
        assert [s.why for s in reaper.release_stale_claims("q").requeued] == ["lease expired"]
        assert alive(pids["agent"]) and alive(pids["escaped"])  # not ours to end
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert wait_gone(pids.values(), timeout=3), "the lost claim's agent works on"
    task = Task.objects.get()
    deadline = time.monotonic() + 10
    while not task.events.filter(kind=EventKind.LATE_FINISH_REFUSED).exists():
        assert time.monotonic() < deadline, "the worker never reported its claim lost"
        time.sleep(0.1)
    refused = task.events.get(kind=EventKind.LATE_FINISH_REFUSED)
    assert refused.data["status"] == Status.QUEUED
    # Resumed, the worker claims the task again and starts another agent: stopped as a
    # person would (a second signal ends its agent now), it leaves none running. A SIGKILL
    # here left that agent, one this host's reaper may not end ("another-host").
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    started = [int(line.split()[1]) for line in record.read_text().splitlines()]
    cleanup.extend(started)
    assert wait_gone(started, timeout=5), "an agent outlived its worker's stop"


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_cannot_renew_its_lease_ends_its_agent_before_the_lease_runs_out(
    monkeypatch, tmp_path
):
    """The database out of a worker's reach (a network cut), the claim's lease runs out
    and any host may take the task back: its agent must not work on past that."""
    make_tasks("q", 1)

    def unreachable(*args):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(transitions, "heartbeat", unreachable)
    agent = [sys.executable, "-c", "import time; time.sleep(30)"]
    worker = Worker("q", CommandProcessor(agent), lease_seconds=3)
    started = time.monotonic()
    worker.run()
    assert time.monotonic() - started < 10
    task = Task.objects.get()
    assert (task.status, task.attempts) == (Status.QUEUED, 0)
    assert task.reason.startswith("agent ended: its lease was not renewed for 2 s")


NUL_OUTPUTS = {
    # Binary garbage, then its verdict with a NUL in it.
    "raw": (
        "import sys; sys.stdout.buffer.write(b'\\x00\\x01\\xff garbage\\n'); "
        "sys.stdout.buffer.write(b'COMPLETED: did it\\x00\\n')",
        Status.DONE,
    ),
    # A NUL written as JSON's escape: decoded, it is a NUL in the reason.
    "json": (
        'print(\'{"status": "blocked", "reason": "bad\\\\u0000byte", "next": "x"}\')',
        Status.BLOCKED,
    ),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", NUL_OUTPUTS)
def test_an_agent_printing_a_nul_character_has_its_task_finished(process_env, kind):
    """PostgreSQL refuses NUL in text and JSON: the finish failed, the worker died with a
    traceback and the task stayed claimed, to crash the next worker that took it."""
    program, status = NUL_OUTPUTS[kind]
    make_tasks("nul", 1)
    command = [sys.executable, "-c", program]
    done = run_manage(
        ["work", "--queue", "nul", "--processor", "command", "--", *command], process_env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    task = Task.objects.get(queue="nul")
    assert task.status == status
    if kind == "raw":
        assert "COMPLETED: did it\ufffd" in task.output_tail
    else:
        assert task.reason == "bad\ufffdbyte"
    assert "\x00" not in json.dumps(task.result)


@pytest.mark.django_db(transaction=True)
def test_an_outcome_and_commit_longer_than_their_columns_are_clipped(process_env):
    """PostgreSQL refused the finish (varchar(100)): the worker died, the task claimed."""
    said = {"status": "done", "outcome": "verified " + "x" * 300, "commit": "c" * 200}
    make_tasks("long", 1)
    command = [sys.executable, "-c", f"print({json.dumps(json.dumps(said))})"]
    done = run_manage(
        ["work", "--queue", "long", "--processor", "command", "--", *command], process_env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    task = Task.objects.get(queue="long")
    assert (task.status, task.outcome, task.commit) == (
        Status.DONE,
        ("verified " + "x" * 300)[:100],
        "c" * 100,
    )


@pytest.mark.django_db(transaction=True)
def test_a_worker_holds_one_database_connection_while_its_agent_runs(process_env):
    """The heartbeat thread kept a second connection for the worker's life: a herd of 50
    held 100, PostgreSQL's default limit. (SQLite: a file; the count is PostgreSQL's.)"""
    if connection.vendor != "postgresql":
        pytest.skip("counts PostgreSQL's connections; runs in the PostgreSQL pass")
    make_tasks("conn", 1)

    def others() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()[0]

    before = others()  # an earlier test's server thread may still hold one
    worker = start_manage(
        ["work", "--queue", "conn", "--lease", "3", "--processor", "command", "--",
         "sleep", "6"],
        process_env,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 5.5  # beats every second (a third of the lease)
        while time.monotonic() < deadline:
            seen.append(others() - before)
            time.sleep(0.05)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert Task.objects.get(queue="conn").status == Status.DONE
    # The main thread's, and for a moment a beat's.
    assert seen.count(2) < len(seen) / 4 and max(seen) <= 2, seen


FINISHING_AGENT = (
    "import pathlib, sys, time; pathlib.Path(sys.argv[1], sys.argv[2]).write_text('x'); "
    "time.sleep(4); print('finished the work')"
)


def start_two_workers_at_work(process_env, started: Path) -> subprocess.Popen:
    """`work --workers 2` in a process group of its own, as a terminal's foreground job,
    once both workers' agents are at work."""
    for name in started.iterdir():
        name.unlink()
    work = start_manage(
        ["work", "--queue", "q", "--workers", "2", "--processor", "command", "--",
         sys.executable, "-c", FINISHING_AGENT, str(started), "{key}"],
        process_env,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return work


def test_one_ctrl_c_to_forked_workers_counts_once_though_it_reaches_them_twice(
    process_env, tmp_path
):
    """A terminal's Ctrl-C reaches the whole foreground group: `work --workers 2` and its
    forked workers, which the parent forwards it to as well. One press lets each agent
    finish its task; a second ends them now."""
    make_tasks("q", 6)
    started = tmp_path / "started"
    started.mkdir()

    def finished_both(err: str) -> None:
        assert err.count("then stopping; SIGINT again ends its agent now") == 2, err
        done = Task.objects.filter(status=Status.DONE).exclude(pk__in=finished)
        assert len(done) == 2, err
        assert all("finished the work" in t.output_tail for t in done)
        finished.extend(t.pk for t in done)

    finished: list[int] = []
    work = start_two_workers_at_work(process_env, started)
    os.killpg(work.pid, signal.SIGINT)
    _out, err = work.communicate(timeout=60)
    assert work.returncode == 0, err
    finished_both(err)

    # The same press with the parent's share arriving late: no window of time decides.
    work = start_two_workers_at_work(process_env, started)
    for child in psutil.Process(work.pid).children():
        child.send_signal(signal.SIGINT)
    time.sleep(1.5)
    work.send_signal(signal.SIGINT)
    _out, err = work.communicate(timeout=60)
    assert work.returncode == 0, err
    finished_both(err)

    # Pressed twice, the agents end at once and their tasks go back.
    work = start_two_workers_at_work(process_env, started)
    os.killpg(work.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(work.pid, signal.SIGINT)
    _out, err = work.communicate(timeout=60)
    assert work.returncode == 0, err
    assert Task.objects.filter(status=Status.DONE).count() == 4, err
    assert Task.objects.filter(status=Status.QUEUED).count() == 2, err
