"""`manage.py mcp` as real processes, driven by the SDK's own client over stdio."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anyio
import psutil
import pytest

from tests.conftest import MANAGE, ROOT, make_tasks, run_manage
from tests.mcp_client import call, in_thread, run, stdio_session
from workqueue import locks
from workqueue.locks import Identity
from workqueue.models import EventKind, Status, Task, TaskEvent
from workqueue.processors import Claim
from workqueue.pull import QUEUE_EMPTY, PullSession


async def drain(queue: str, env: dict, name: str) -> list[str]:
    """One agent's loop: claim, complete, until QUEUE EMPTY."""
    done = []
    async with stdio_session(queue, env, "--name", name) as client:
        while True:
            answer = await call(client, "claim_next_task")
            if not answer["success"]:
                assert answer["message"].startswith(QUEUE_EMPTY), answer
                return done
            key = answer["task"]["id"]
            finished = await call(client, "complete_task", id=key, summary=f"done by {name}")
            assert finished["success"], finished
            done.append(key)


@pytest.mark.slow
def test_four_sessions_drain_200_tasks_each_exactly_once(process_env):
    make_tasks("q", 200)
    results: dict[str, list[str]] = {}

    async def main():
        async def one(name):
            results[name] = await drain("q", process_env, name)

        async with anyio.create_task_group() as group:
            for i in range(4):
                group.start_soon(one, f"agent-{i}")

    run(main)
    keys = [key for done in results.values() for key in done]
    assert len(keys) == 200 and len(set(keys)) == 200
    assert all(results.values()), {n: len(d) for n, d in results.items()}  # all took part
    assert Task.objects.filter(status=Status.DONE, outcome="success").count() == 200
    for kind in (EventKind.CLAIMED, EventKind.DONE):
        per_task = TaskEvent.objects.filter(kind=kind).values_list("task_id", flat=True)
        assert sorted(per_task) == sorted(Task.objects.values_list("id", flat=True)), kind
    holders = dict(Task.objects.values_list("key", "holder"))
    for name, done in results.items():
        assert {holders[k] for k in done} == {f"mcp:{name}"}
    assert not locks.list_locks("q")


@pytest.mark.slow
def test_two_sessions_following_the_old_prompt_never_both_hold_a_task(process_env):
    """Both read the same list, both pick its top task and both claim it at once."""
    make_tasks("q", 12)
    rounds = []

    async def main():
        async with (
            stdio_session("q", process_env, "--name", "polecat-a") as a,
            stdio_session("q", process_env, "--name", "polecat-b") as b,
        ):
            while True:
                lists = [await call(c, "list_tasks", status="active", limit=5) for c in (a, b)]
                if not lists[0]["tasks"]:
                    return
                picks = [answer["tasks"][0]["id"] for answer in lists]
                assert picks[0] == picks[1]  # the same list, the same choice
                answers = [None, None]

                async def claim(index, client, key=picks[0], answers=answers):
                    answers[index] = await call(
                        client,
                        "update_task",
                        id=key,
                        status="in_progress",
                        assignee="polecat",
                    )

                async with anyio.create_task_group() as group:
                    group.start_soon(claim, 0, a)
                    group.start_soon(claim, 1, b)
                won = [i for i, answer in enumerate(answers) if answer["success"]]
                rounds.append((picks[0], won, answers))
                assert len(won) == 1, answers
                loser = answers[1 - won[0]]
                winner_name = ("polecat-a", "polecat-b")[won[0]]
                assert f"held by mcp:{winner_name} (pid" in loser["message"], loser
                done = await call((a, b)[won[0]], "complete_task", id=picks[0])
                assert done["success"], done

    run(main)
    assert len(rounds) == 12
    assert Task.objects.filter(status=Status.DONE).count() == 12
    assert TaskEvent.objects.filter(kind=EventKind.CLAIMED).count() == 12
    # The assignee the old prompt set lands in the file's row once the claim ends.
    assert set(Task.objects.values_list("assignee", flat=True)) == {"polecat"}


def claim_then(process_env: dict, name: str, to_the_server) -> None:
    """A session `name` of queue q claims a task, then `to_the_server(key)` ends its
    server (the client sees it gone)."""

    async def main():
        try:
            async with stdio_session("q", process_env, "--name", name) as client:
                answer = await call(client, "claim_next_task")
                assert answer["success"], answer
                await in_thread(to_the_server, answer["task"]["id"])
                await call(client, "get_index_stats")  # the pipe is gone now
        except Exception:  # noqa: S110 - the client sees its server gone
            pass

    run(main)


@pytest.mark.slow
def test_a_killed_sessions_task_is_reaped_and_its_late_complete_refused(process_env):
    make_tasks("q", 2)

    killed = []

    def kill_the_holder(key: str) -> None:
        row = Task.objects.get(key=key)
        assert locks.read_owner(locks.lock_dir("q", row.key))["pid"] == row.holder_pid
        os.kill(row.holder_pid, signal.SIGKILL)
        killed.append(row.holder_pid)

    claim_then(process_env, "doomed", kill_the_holder)
    assert killed
    held = Task.objects.get(status=Status.CLAIMED)
    assert held.holder == "mcp:doomed"
    reaped = run_manage(["reap_locks", "--queue", "q", "--json"], process_env)
    assert reaped.returncode == 0, reaped.stderr
    report = json.loads(reaped.stdout)
    assert [r["key"] for r in report["requeued"]] == [held.key]
    assert f"holder pid {held.holder_pid} is gone" in report["requeued"][0]["why"]
    row = Task.objects.get(pk=held.pk)
    assert (row.status, row.holder) == (Status.QUEUED, "")
    assert locks.read_owner(locks.lock_dir("q", row.key)) is None

    # The dead session's identity, finishing with the claim it had: refused by the fence
    # once another session holds the task.
    async def reclaim_and_late_complete():
        async with stdio_session("q", process_env, "--name", "doomed") as client:
            again = await call(client, "claim_next_task")
            assert again["task"]["id"] == held.key and again["task"]["fence"] > held.fence
            stale = PullSession(
                "q",
                Identity(held.holder, held.holder_host, held.holder_pid, held.holder_started),
            )
            stale.held[held.pk] = Claim(
                held.pk, "q", held.key, held.title, held.source_path, held.fence
            )
            late = await in_thread(
                stale.call, "complete_task", {"id": held.key, "summary": "from the grave"}
            )
            assert late["success"] is False
            assert "claim was lost" in late["message"], late
            # The same name in a new process holds only what it claimed itself.
            other = await call(client, "complete_task", id="t000001")
            assert other["success"] is False and "does not hold it" in other["message"]
            assert (await call(client, "complete_task", id=held.key))["success"]

    run(reclaim_and_late_complete)
    row = Task.objects.get(pk=held.pk)
    assert (row.status, row.fence, row.result.get("summary")) == (
        Status.DONE,
        held.fence + 1,
        None,
    )
    assert row.events.filter(kind=EventKind.LATE_FINISH_REFUSED).count() == 1


@pytest.mark.slow
def test_bad_input_over_the_wire_is_success_false_never_a_trace(process_env):
    make_tasks("q", 1)

    async def main():
        async with stdio_session("q", process_env, "--name", "clumsy") as client:
            cases = [
                ("get_task", {"id": "nope"}, "no task 'nope'"),
                ("list_tasks", {"status": "wip"}, "not a status I know"),
                ("list_tasks", {"limit": "lots"}, "limit: a whole number expected"),
                ("claim_next_task", {"where": "colour=red"}, "unknown field 'colour'"),
                ("complete_task", {"id": "t000000"}, "does not hold it"),
                ("update_task", {"id": "t000000", "status": "paused"}, "not a status I know"),
                ("block_task", {"id": "t000000", "reason": 5}, "does not hold it"),
                ("create_task", {"title": ["x"]}, "title: a task needs a title"),
                ("missing_tool", {}, "unknown tool"),
            ]
            for tool, arguments, expected in cases:
                result = await client.call_tool(tool, arguments)
                answer = json.loads(result.content[0].text)
                assert answer["success"] is False, (tool, answer)
                assert expected in answer["message"], (tool, answer)
                assert "Traceback" not in result.content[0].text

    run(main)
    assert Task.objects.get().status == Status.QUEUED


@pytest.mark.slow
def test_a_session_that_ends_gives_back_what_it_holds(process_env):
    make_tasks("q", 1)

    async def main():
        async with stdio_session("q", process_env, "--name", "brief") as client:
            assert (await call(client, "claim_next_task"))["success"]

    run(main)
    row = Task.objects.get()
    assert (row.status, row.holder) == (Status.QUEUED, "")
    assert row.events.filter(kind=EventKind.RELEASED, message="MCP session ended").exists()
    assert not locks.list_locks("q")


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals",
    [[signal.SIGINT, signal.SIGTERM], [signal.SIGTERM], [signal.SIGHUP]],
    ids=["sigint-then-sigterm", "sigterm", "sighup"],
)
def test_a_session_its_client_ends_with_a_signal_gives_back_what_it_holds(process_env, signals):
    """Claude Code ends its servers with SIGINT and SIGTERM 0.1 s apart, stdin still open:
    the server died holding its claim (held by a dead pid until a reaper on this host took
    it back, an attempt counted), or hung on its reader thread."""
    make_tasks("q", 2)

    def signal_the_holder(key: str) -> None:
        pid = Task.objects.get(key=key).holder_pid
        for number in signals:
            os.kill(pid, number)
            time.sleep(0.1)
        psutil.Process(pid).wait(timeout=30)

    claim_then(process_env, "ended", signal_the_holder)
    assert Task.objects.filter(status=Status.QUEUED, holder="").count() == 2
    ended = TaskEvent.objects.filter(kind=EventKind.RELEASED, message="MCP session ended")
    assert ended.count() == 1
    assert not locks.list_locks("q")


@pytest.mark.slow
def test_a_server_whose_client_is_killed_mid_answer_ends_quietly(process_env, tmp_path):
    """A client killed with SIGKILL leaves answers unwritten: the server gave back what
    it held, then ended in a BrokenPipeError traceback through the SDK's task group."""
    make_tasks("q", 2)
    with open(tmp_path / "stderr", "w+") as stderr:
        server = subprocess.Popen(
            [sys.executable, MANAGE, "mcp", "--queue", "q", "--name", "killed"],
            env=process_env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )

        def send(number: int, method: str, **params) -> None:
            message = {"jsonrpc": "2.0", "method": method, "params": params}
            if number:
                message["id"] = number
            server.stdin.write(json.dumps(message).encode() + b"\n")
            server.stdin.flush()

        hello = {"name": "test", "version": "1"}
        send(1, "initialize", protocolVersion="2025-06-18", capabilities={}, clientInfo=hello)
        server.stdout.readline()
        send(0, "notifications/initialized")
        for number in (2, 3):
            send(number, "tools/call", name="claim_next_task", arguments={})
            assert json.loads(server.stdout.readline())["id"] == number
        # The client dies: what it asked last is answered into a pipe no one reads.
        server.stdout.close()
        for number in range(10, 60):
            send(number, "tools/call", name="get_index_stats", arguments={})
        server.stdin.close()
        server.wait(timeout=30)
        stderr.seek(0)
        said = stderr.read()
    assert said.strip() == "mcp:killed: gave back 2 task(s)", said
    assert Task.objects.filter(status=Status.QUEUED, holder="").count() == 2


@pytest.mark.slow
def test_bad_command_line_is_a_usage_error(process_env):
    result = run_manage(["mcp", "--queue", "../x"], process_env)
    assert result.returncode != 0 and "queue name" in result.stderr
    result = run_manage(["mcp", "--queue", "q", "--where", "colour=red"], process_env)
    assert result.returncode != 0 and "unknown field 'colour'" in result.stderr
    result = run_manage(["mcp", "--queue", "q", "--name", "x" * 101], process_env)
    assert result.returncode != 0 and "--name: at most 100" in result.stderr


def test_a_server_given_no_database_settings_says_so_in_one_line(process_env, tmp_path):
    """Gemini CLI and Codex pass no DATABASE_URL to their servers: the default SQLite,
    never migrated, ended the server in a traceback the agent's MCP log hid."""
    env = {k: v for k, v in process_env.items() if k != "DATABASE_URL"}
    result = run_manage(["mcp", "--queue", "inbox"], {**env, "HYPERVISOR_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"CommandError: cannot read the sqlite database {tmp_path}/hypervisor.sqlite3 (no such "
        "table: queue_queue): give DATABASE_URL and HYPERVISOR_DATA_DIR in the agent's MCP "
        "config (its env)"
    )


def test_a_session_on_a_queue_no_task_is_in_warns_naming_the_queues(process_env):
    """A typo in the agent's MCP config served "no task" for ever, saying nothing."""
    make_tasks("inbox", 1)
    args = [sys.executable, MANAGE, "mcp", "--queue"]
    ended = [
        subprocess.run(
            [*args, queue],
            env=process_env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        for queue in ("inbx", "inbox")
    ]
    assert [e.returncode for e in ended] == [0, 0], ended[0].stderr
    assert "warning: no task is in a queue named 'inbx' (queues: inbox)" in ended[0].stderr
    assert "warning" not in ended[1].stderr and ended[0].stdout == ended[1].stdout == ""
