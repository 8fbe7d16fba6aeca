"""PullSession, the MCP tools' logic, called in-process: every answer is one JSON object
with success and message, every bad input a clear refusal, every change through claims."""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tests.conftest import make_tasks
from workqueue import actions, locks, reaper
from workqueue.importer import Importer
from workqueue.locks import Identity
from workqueue.models import Dependency, EventKind, Queue, Status, Task, TaskEvent
from workqueue.pull import QUEUE_EMPTY, TOOLS, PullSession, blocked_parts, local_session
from workqueue.routing import TaskFilter

pytestmark = pytest.mark.django_db


def session(name: str, queue: str = "q", **kwargs) -> PullSession:
    """A local session with an identity of its own (same process, another name)."""
    me = Identity.current(f"mcp:{name}")
    return PullSession(queue, me, **kwargs)


def held_lock(task: Task) -> dict | None:
    return locks.read_owner(locks.lock_dir(task.queue, task.key))


def test_claim_next_task_claims_like_a_worker_row_fence_and_lock():
    make_tasks("q", 3)
    Task.objects.filter(key="t000002").update(priority=0)
    agent = local_session("q", "gemini-3")
    answer = agent.call("claim_next_task")
    assert answer["success"] is True
    task = answer["task"]
    assert task["id"] == "t000002"  # P0 first
    assert {"id", "title", "status", "path", "body", "frontmatter", "fence"} <= set(task)
    row = Task.objects.get(key="t000002")
    assert (row.status, row.holder, row.holder_pid, row.fence) == (
        Status.CLAIMED,
        "mcp:gemini-3",
        os.getpid(),
        task["fence"],
    )
    assert held_lock(row)["worker"] == "mcp:gemini-3"
    assert row.events.filter(kind=EventKind.CLAIMED, actor="mcp:gemini-3").count() == 1
    json.dumps(answer)  # one JSON object


def test_a_pull_workers_claim_carries_its_agent_in_its_own_write(monkeypatch):
    """The agent was noted on the claim in a second write: a pull worker killed between
    the two left a claim without its agent, which the reaper then could not end before the
    task went to another."""
    from workqueue import transitions

    make_tasks("q", 1)
    agent = session("pulling")
    agent.agent = (4242, 1700000000.5)
    monkeypatch.setattr(transitions, "record_agent", lambda *a, **k: False)  # never reached
    assert agent.call("claim_next_task")["success"] is True
    row = Task.objects.get()
    assert (row.status, row.agent_pgid, row.agent_started) == (
        Status.CLAIMED,
        4242,
        1700000000.5,
    )


def test_an_empty_queue_says_queue_empty_and_why():
    make_tasks("q", 2)
    first = Task.objects.get(key="t000001")
    Dependency.objects.create(task=first, key="t000000")
    Task.objects.filter(pk=first.pk).update(has_dependencies=True)
    agent = session("a")
    assert agent.call("claim_next_task")["task"]["id"] == "t000000"
    answer = agent.call("claim_next_task")
    assert answer["success"] is False
    assert answer["message"].startswith(f"{QUEUE_EMPTY}: no ready task in queue 'q'")
    assert "1 claimed, 1 waiting on dependencies" in answer["message"]


def test_a_mistyped_queue_is_named_not_taken_for_a_finished_one():
    """Over HTTP the queue is the URL's `?queue=`: a typo read as an empty queue, and the
    agent stopped as if its work were done."""
    make_tasks("inbox", 1)
    answer = session("a", queue="inbx").call("claim_next_task")
    assert answer["message"] == (
        f"{QUEUE_EMPTY}: no task is in a queue named 'inbx' (queues: inbox): check the queue "
        "this agent was given; stop here"
    )


def test_filters_and_project_narrow_the_claim():
    make_tasks("q", 2)
    Task.objects.filter(key="t000001").update(project="web", complexity="mechanical")
    agent = session("a", filters=None)
    answer = agent.call("claim_next_task", {"project": "web", "where": "complexity=mechanical"})
    assert answer["task"]["id"] == "t000001"
    empty = agent.call("claim_next_task", {"project": "web"})
    assert empty["message"] == (
        f"{QUEUE_EMPTY}: no ready task in queue 'q' matches project=web (1 others ready)"
    )


def test_complete_and_block_finish_through_the_fenced_finish():
    make_tasks("q", 2)
    agent = session("a")
    first = agent.call("claim_next_task")["task"]["id"]
    done = agent.call(
        "complete_task",
        {
            "id": first,
            "summary": "fixed",
            "evidence": "tests pass",
            "commit": "abc123",
            "tokens": 42,
        },
    )
    assert done == {
        "success": True,
        "message": f"completed {first}; claim_next_task for the next one",
    }
    row = Task.objects.get(key=first)
    assert (row.status, row.outcome, row.evidence, row.commit, row.tokens) == (
        Status.DONE,
        "success",
        "tests pass",
        "abc123",
        42,
    )
    assert row.result["summary"] == "fixed"
    assert held_lock(row) is None
    second = agent.call("claim_next_task")["task"]["id"]
    blocked = agent.call("block_task", {"id": second, "reason": "no access", "next": "ask ops"})
    assert blocked["success"] is True
    row = Task.objects.get(key=second)
    assert (row.status, row.reason, row.next_step) == (Status.BLOCKED, "no access", "ask ops")
    assert not agent.held


def test_release_task_gives_it_back_untouched_lock_and_all():
    make_tasks("q", 1)
    agent = session("a")
    agent.call("claim_next_task")
    answer = agent.call("release_task", {"id": "t000000"})
    assert answer["success"] is True
    row = Task.objects.get()
    assert (row.status, row.holder, held_lock(row)) == (Status.QUEUED, "", None)
    assert session("b").call("claim_next_task")["success"] is True


def test_a_released_task_goes_to_another_session_not_back_to_the_one_that_released_it():
    """It stays at the head of the claim order: the releasing agent was handed it again."""
    make_tasks("q", 2)
    agent = session("a")
    first = agent.call("claim_next_task")["task"]["id"]
    released = agent.call("release_task", {"id": first})
    assert released["message"].endswith("this session is not given it again")
    second = agent.call("claim_next_task")["task"]["id"]
    assert second != first
    agent.call("complete_task", {"id": second})
    assert agent.call("claim_next_task")["success"] is False
    assert session("b").call("claim_next_task")["task"]["id"] == first


def test_a_task_held_by_another_session_is_refused_with_who_holds_it():
    make_tasks("q", 1)
    first, second = session("polecat-1"), session("polecat-2")
    first.call("update_task", {"id": "t000000", "status": "in_progress", "assignee": "polecat"})
    for tool, args in [
        ("update_task", {"id": "t000000", "status": "in_progress", "assignee": "polecat"}),
        ("complete_task", {"id": "t000000"}),
        ("block_task", {"id": "t000000", "reason": "x"}),
        ("release_task", {"id": "t000000"}),
        ("update_task", {"id": "t000000", "status": "done"}),
    ]:
        answer = second.call(tool, args)
        assert answer["success"] is False, tool
        assert "held by mcp:polecat-1 (pid" in answer["message"], answer
    row = Task.objects.get()
    assert (row.status, row.holder) == (Status.CLAIMED, "mcp:polecat-1")


def test_same_name_in_another_process_is_another_session():
    make_tasks("q", 1)
    first = session("polecat")
    first.call("claim_next_task")
    # A second process that chose the same name: it holds nothing of the first's.
    twin = Identity("mcp:polecat", first.identity.host, 1, 1.0)
    answer = PullSession("q", twin).call("complete_task", {"id": "t000000"})
    assert answer["success"] is False
    assert "this session does not hold it" not in answer["message"]
    assert "held by mcp:polecat" in answer["message"]
    assert Task.objects.get().status == Status.CLAIMED


def test_a_stale_identitys_late_complete_is_refused_by_the_fence():
    make_tasks("q", 1)
    stale = session("frozen", lease_seconds=1)
    claim = stale.call("claim_next_task")["task"]
    Task.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=5))
    report = reaper.release_stale_claims("q")
    assert [s.task.key for s in report.requeued] == ["t000000"]
    newer = session("fresh")
    assert newer.call("claim_next_task")["task"]["fence"] > claim["fence"]
    late = stale.call("complete_task", {"id": "t000000", "summary": "too late"})
    assert late["success"] is False
    assert "claim was lost (fence 1 no longer matches" in late["message"]
    assert "held by mcp:fresh" in late["message"]
    row = Task.objects.get()
    assert (row.status, row.holder) == (Status.CLAIMED, "mcp:fresh")
    assert row.events.filter(kind=EventKind.LATE_FINISH_REFUSED, actor="mcp:frozen").count() == 1
    assert held_lock(row)["worker"] == "mcp:fresh"


def test_a_session_whose_claim_was_taken_back_is_not_told_it_holds_the_task():
    """A person released the task on the board and another session claimed it: the first
    was still told `yours: true` and "you already hold", and could rewrite the new holder's
    instructions."""
    make_tasks("q", 1)
    first, second = session("first"), session("second")
    first.call("claim_next_task")
    actions.act(Task.objects.all(), "release", "alice")
    assert second.call("claim_next_task")["success"]
    assert first.call("get_task", {"id": "t000000"})["task"]["yours"] is False
    for args in ({"status": "in_progress"}, {"title": "Taken over"}):
        answer = first.call("update_task", {"id": "t000000", **args})
        assert answer["success"] is False, answer
        assert "held by mcp:second (pid" in answer["message"], answer
    row = Task.objects.get()
    assert (row.title, row.holder, row.change_pending) == ("Task 0", "mcp:second", False)
    late = first.call("complete_task", {"id": "t000000"})
    assert "claim was lost" in late["message"], late
    assert second.call("get_task", {"id": "t000000"})["task"]["yours"] is True


def test_old_blocked_body_fills_reason_evidence_and_next_step():
    make_tasks("q", 1, body="The original description.")
    agent = session("a")
    agent.call("update_task", {"id": "t000000", "status": "in_progress"})
    body = (
        "## Blocked\n\n**Reason**: the API key is missing\n"
        "**Evidence**: 401 from /v1/items\n**Next step**: ask ops for a key\n"
    )
    answer = agent.call("update_task", {"id": "t000000", "status": "blocked", "body": body})
    assert answer["success"] is True, answer
    row = Task.objects.get()
    assert (row.status, row.reason, row.evidence, row.next_step) == (
        Status.BLOCKED,
        "the API key is missing",
        "401 from /v1/items",
        "ask ops for a key",
    )
    assert row.body == "The original description."  # the report is not a new body


def test_blocked_parts_reads_the_old_forms():
    assert blocked_parts("**Reason**: a\n**Next**: c") == {"reason": "a", "next_step": "c"}
    assert blocked_parts("- **reason**: multi\nline\n- **Evidence**: e") == {
        "reason": "multi\nline",
        "evidence": "e",
    }
    assert blocked_parts("no form here") == {}


@pytest.mark.timeout(60)  # one pattern with a lookahead took 17 s for 4,000 blank lines
def test_blocked_parts_reads_a_body_of_blank_lines_in_linear_time():
    body = (
        "Notes" + "\n" * 20_000 + "so far\n**Reason**: late\n" + " \n" * 20_000 + "- **Next**: go"
    )
    assert blocked_parts(body) == {"reason": "late", "next_step": "go"}


def test_list_tasks_speaks_both_vocabularies():
    make_tasks("q", 5)
    Task.objects.filter(key="t000004").update(status=Status.DONE, outcome="cancelled")
    Task.objects.filter(key="t000003").update(status=Status.DONE, outcome="success")
    waiting = Task.objects.get(key="t000002")
    Dependency.objects.create(task=waiting, key="t000001")
    Task.objects.filter(pk=waiting.pk).update(has_dependencies=True, priority=0)
    session("a").call("update_task", {"id": "t000001", "status": "in_progress"})

    def ids(**args) -> list[str]:
        answer = session("reader").call("list_tasks", args)
        assert answer["success"] is True, answer
        return [t["id"] for t in answer["tasks"]]

    assert ids(status="active") == ["t000000"]  # ready: not the one waiting on t000001
    assert ids(status="queued") == ["t000002", "t000000"]
    assert ids(status="in_progress") == ids(status="claimed") == ["t000001"]
    assert ids(status="done") == ["t000003", "t000004"]
    assert ids(status="cancelled") == ["t000004"]
    assert ids(priority_max=0) == ["t000002"]
    answer = session("reader").call("list_tasks", {"limit": 2})
    assert (answer["count"], answer["total"]) == (2, 5)
    assert set(answer["tasks"][0]) == {
        "id", "title", "status", "priority", "project", "assignee", "complexity",
    }  # fmt: skip


def test_index_stats_count_by_status_project_and_staleness():
    make_tasks("q", 3, project="web")
    Task.objects.filter(key="t000002").update(project="api")
    agent = session("a", lease_seconds=1)
    agent.call("claim_next_task")
    Task.objects.filter(status=Status.CLAIMED).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    answer = session("b").call("get_index_stats")
    assert (answer["ready"], answer["claimed"], answer["stale"]) == (2, 1, 1)
    assert answer["projects"]["web"] == {"queued": 1, "claimed": 1, "done": 0, "blocked": 0}
    assert answer["projects"]["api"]["queued"] == 1


@pytest.fixture
def inbox(settings, write_task):
    write_task("a.md", "---\nid: ex-001\ntitle: A\nstatus: inbox\npriority: 2\n---\n# A\n")
    settings.HYPERVISOR_IMPORT_ROOTS = [write_task.folder]
    assert not Importer("inbox").run([write_task.folder]).errors
    return write_task.folder


def test_field_changes_are_written_back_into_the_file(inbox):
    answer = session("a", queue="inbox").call(
        "update_task", {"id": "ex-001", "priority": 0, "tags": ["bug"], "complexity": "small"}
    )
    assert answer["success"] is True, answer
    assert answer["message"] == "edited priority, complexity, tags"
    text = (inbox / "a.md").read_text()
    assert "priority: 0\n" in text and "tags: [bug]\n" in text and "complexity: small\n" in text
    row = Task.objects.get(key="ex-001")
    assert (row.priority, row.tags, row.complexity) == (0, ["bug"], "small")


def test_an_agents_finish_over_mcp_is_written_into_the_task_files(inbox):
    """complete_task and update_task(status=done|blocked) left the file saying `inbox`."""
    (inbox / "b.md").write_text("---\nid: ex-002\ntitle: B\nstatus: inbox\n---\n# B\n")
    (inbox / "c.md").write_text("---\nid: ex-003\ntitle: C\nstatus: todo\n---\n# C\n")
    assert not Importer("inbox").run([inbox]).errors
    agent = session("a", queue="inbox")
    for _ in range(3):
        assert agent.call("claim_next_task")["success"] is True
    # An edit and the finish in one call: the edit waits for the claim, then both land.
    done = agent.call("update_task", {"id": "ex-001", "status": "done", "priority": 0})
    assert done["success"] is True, done
    assert agent.call("complete_task", {"id": "ex-002"})["success"] is True
    blocked = agent.call("update_task", {"id": "ex-003", "status": "blocked", "body": (
        "**Reason**: no key\n**Evidence**: 403\n**Next step**: ask ops"
    )})  # fmt: skip
    assert blocked["success"] is True, blocked
    assert (inbox / "a.md").read_text() == (
        "---\nid: ex-001\ntitle: A\nstatus: done\npriority: 0\n---\n# A\n"
    )
    assert "status: done\n" in (inbox / "b.md").read_text()
    assert (inbox / "c.md").read_text() == (
        "---\nid: ex-003\ntitle: C\nstatus: blocked\nblocked_reason: no key\n---\n# C\n"
    )
    again = Importer("inbox").run([inbox])
    assert (again.unchanged, again.updated, again.errors) == (3, 0, [])


def test_create_task_writes_a_file_into_the_queue_folder_and_imports_it(inbox):
    answer = session("a", queue="inbox").call(
        "create_task",
        {"title": "Split: part one", "body": "Do the first half.", "parent": "ex-001",
         "depends_on": ["ex-001"], "priority": 1},
    )  # fmt: skip
    assert answer["success"] is True, answer
    assert answer["task"]["id"] == "ex-002"
    path = inbox / "split-part-one.md"
    assert path.exists() and "parent: ex-001" in path.read_text()
    row = Task.objects.get(key="ex-002")
    assert (row.status, row.depends_on, row.source_path) == (
        Status.QUEUED,
        ["ex-001"],
        str(path),
    )
    assert row.events.filter(kind=EventKind.CREATED, actor="mcp:a").exists()


BAD_INPUT = [
    ("nope", {}, "unknown tool 'nope'"),
    ("get_task", ["t000000"], "arguments must be an object"),
    ("get_task", {"id": "missing"}, "no task 'missing' in queue 'q'"),
    ("get_task", {}, "id: give the task's id"),
    ("get_task", {"id": {"x": 1}}, "id: give the task's id"),
    ("get_task", {"key": "t000000"}, "unknown argument 'key'; it takes id"),
    ("claim_next_task", {"where": "colour=red"}, "unknown field 'colour'"),
    ("claim_next_task", {"where": "priority>=high"}, "priority is a whole number"),
    ("claim_next_task", {"where": 7}, "where: FIELD=VALUE text"),
    ("list_tasks", {"status": "wip"}, "status: 'wip' is not a status I know"),
    ("list_tasks", {"status": 3}, "status: '3' is not a status I know"),
    ("list_tasks", {"limit": 0}, "limit: 0 is out of range (1..100)"),
    ("list_tasks", {"limit": "many"}, "limit: a whole number expected"),
    ("list_tasks", {"priority": True}, "priority: a whole number expected"),
    ("update_task", {"id": "t000000", "status": "paused"}, "'paused' is not a status I know"),
    ("update_task", {"id": "t000000", "status": "cancelled"}, "cannot cancel a task"),
    ("update_task", {"id": "t000000", "status": "blocked"}, "blocked needs a reason"),
    (
        "update_task",
        {"id": "t000000", "priority": "someday"},
        "'someday' is not a number",
    ),
    ("update_task", {"id": "t000000", "title": ""}, "title: a task needs a title"),
    ("update_task", {"id": "t000000", "title": "a\nb"}, "title: one line only"),
    ("update_task", {"id": "t000000", "tags": "a|b"}, "tags"),
    ("update_task", {"id": "t000000", "status": "done"}, "this session does not hold it"),
    ("complete_task", {"id": "t000000"}, "this session does not hold it (it is queued)"),
    ("complete_task", {"id": "t000000", "tokens": -1}, "tokens: -1 is out of range"),
    # As an agent CLI's count is capped: two runs of 2**62 overflowed the queue's SUM.
    (
        "complete_task",
        {"id": "t000000", "tokens": 2**62},
        "tokens: 4611686018427387904 is out of range (0..1000000000000)",
    ),
    ("complete_task", {"id": "t000000", "commit": "x" * 101}, "commit: 101 characters"),
    ("complete_task", {"id": "t000000", "summary": "a\x00b"}, "summary: contains a NUL"),
    ("block_task", {"id": "t000000"}, "reason: say why"),
    ("block_task", {"id": "t000000", "reason": ["x"]}, "reason: text expected"),
    ("release_task", {"id": "t000000"}, "this session does not hold it"),
    ("get_task", {"id": "t0\x00"}, "id: contains a NUL character"),
    ("create_task", {}, "title: a task needs a title"),
    ("create_task", {"title": "x"}, "queue: 'q' has no folder yet"),
    ("get_index_stats", {"queue": "other"}, "unknown argument 'queue'; it takes no arguments"),
]


@pytest.mark.parametrize(("tool", "arguments", "message"), BAD_INPUT)
def test_bad_input_is_a_clear_refusal_and_changes_nothing(tool, arguments, message):
    make_tasks("q", 1)
    before = list(Task.objects.values())
    answer = session("a").call(tool, arguments)
    assert answer["success"] is False
    assert message in answer["message"], answer["message"]
    assert "\n" not in answer["message"] and "Traceback" not in answer["message"]
    assert list(Task.objects.values()) == before


def test_every_tool_is_covered_by_a_bad_input_case():
    assert {tool for tool, _, _ in BAD_INPUT} >= set(TOOLS)


def test_a_database_error_is_an_answer_not_a_trace(monkeypatch):
    make_tasks("q", 1)
    from django.db import OperationalError

    def broken(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly\nmore")

    monkeypatch.setattr("workqueue.claims.claim_ready_tasks", broken)
    answer = session("a").call("claim_next_task")
    assert answer == {
        "success": False,
        "message": "claim_next_task: database unavailable (server closed the connection "
        "unexpectedly); try again",
    }


def test_a_stopping_session_claims_nothing_more():
    make_tasks("q", 2)
    agent = session("a")
    agent.stop("herd draining: budget reached")
    answer = agent.call("claim_next_task")
    assert (
        answer["message"]
        == f"{QUEUE_EMPTY}: this worker is stopping (herd draining: budget reached)"
    )
    assert Task.objects.filter(status=Status.CLAIMED).count() == 0


def test_release_all_gives_back_what_a_closing_session_holds():
    make_tasks("q", 2)
    agent = session("a")
    agent.call("claim_next_task")
    agent.call("claim_next_task")
    assert agent.release_all("MCP session ended") == 2
    assert Task.objects.filter(status=Status.QUEUED).count() == 2
    assert not list(locks.list_locks("q"))


@pytest.mark.django_db(transaction=True)
def test_a_session_ended_during_a_claim_gives_that_claim_back_and_takes_no_more(monkeypatch):
    """A signal ends a stdio session in a thread of its own while the session's thread
    may be claiming: a claim committed but not yet noted as the session's was not given
    back, and the task waited for the reaper."""
    from workqueue import claims

    make_tasks("q", 2)
    agent = session("ending")
    committed, go_on = threading.Event(), threading.Event()
    claim_ready_tasks = claims.claim_ready_tasks

    def claim_then_pause(*args, **kwargs):
        taken = claim_ready_tasks(*args, **kwargs)
        committed.set()
        go_on.wait(30)
        return taken

    monkeypatch.setattr(claims, "claim_ready_tasks", claim_then_pause)
    claimed, released = [], []

    def in_a_thread(function):
        def run():
            try:
                function()
            finally:
                connection.close()

        return threading.Thread(target=run)

    calling = in_a_thread(lambda: claimed.append(agent.call("claim_next_task")))
    calling.start()
    assert committed.wait(30)
    ending = in_a_thread(lambda: released.append(agent.release_all("MCP session ended")))
    ending.start()
    ending.join(0.5)
    assert ending.is_alive()  # it waits for the claim under way
    go_on.set()
    calling.join(30)
    ending.join(30)
    assert claimed[0]["success"] is True
    assert released == [1]
    assert Task.objects.filter(status=Status.CLAIMED).count() == 0
    assert not list(locks.list_locks("q"))
    assert agent.call("claim_next_task") == {
        "success": False,
        "message": "claim_next_task: this session has ended",
    }
    assert Task.objects.filter(status=Status.CLAIMED).count() == 0


def test_the_board_shows_the_sessions_name_and_pid(client):
    from django.contrib.auth.models import Permission, User

    make_tasks("q", 1)
    local_session("q", "gemini-3").call("claim_next_task")
    viewer = User.objects.create_user("viewer")
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(viewer)
    page = client.get("/?queue=q").content.decode()
    assert f"held by mcp:gemini-3 on {Task.objects.get().holder_host} pid {os.getpid()}" in page


def test_a_session_with_a_batch_stops_claiming_once_it_is_done():
    make_tasks("q", 3)
    agent = session("a", batch=2)
    for _ in range(2):
        key = agent.call("claim_next_task")["task"]["id"]
        assert agent.call("complete_task", {"id": key})["success"]
    answer = agent.call("claim_next_task")
    assert answer["message"] == (
        f"{QUEUE_EMPTY}: this worker is stopping (its batch of 2 tasks is done)"
    )
    assert Task.objects.filter(status=Status.QUEUED).count() == 1


def test_a_session_cannot_rewrite_a_task_another_session_holds():
    """Its title and body are the holder's instructions: README, bad input includes "a task
    held by someone else"."""
    make_tasks("q", 2)
    holder, other = session("holder"), session("other")
    key = holder.call("claim_next_task")["task"]["id"]
    answer = other.call("update_task", {"id": key, "title": "Taken over", "body": "Do else"})
    assert answer["success"] is False
    assert answer["message"].startswith(f"{key}: cannot edit it: it is held by mcp:holder")
    task = Task.objects.get(key=key)
    assert (task.title, task.body) == ("Task 0", "")
    # Its holder may; so may anyone, a task nobody holds.
    assert holder.call("update_task", {"id": key, "title": "Renamed by its holder"})["success"]
    assert other.call("update_task", {"id": "t000001", "priority": 0})["success"]
    assert Task.objects.get(key=key).title == "Renamed by its holder"


def test_an_http_agent_is_told_of_a_claim_whose_answer_it_never_got():
    """Every call of a token renews its claims' leases, so a claim whose answer was lost (a
    dropped connection) would stay held, unnamed, while the agent works on."""
    make_tasks("q", 2)
    agent = session("laptop", stateless=True, lease_seconds=60)
    lost = agent.call("claim_next_task")["task"]["id"]  # the answer never reached it
    second = agent.call("claim_next_task")
    assert second["success"]
    assert second["message"].endswith(
        f"; this token also holds {lost}: finish it with complete_task or block_task, or give "
        "it back with release_task"
    )
    assert agent.call("complete_task", {"id": second["task"]["id"]})["success"]
    empty = agent.call("claim_next_task")
    assert empty["message"].startswith("QUEUE EMPTY")
    assert f"this token also holds {lost}" in empty["message"]
    assert agent.call("release_task", {"id": lost})["success"]
    # A local session hears every answer it is given: nothing to add.
    local = session("local")
    local.call("claim_next_task")
    assert "also holds" not in local.call("claim_next_task")["message"]


def test_a_where_value_of_the_wrong_type_and_a_new_task_that_cannot_become_ready_are_said(
    settings, tmp_path
):
    make_tasks("q", 1)
    agent = session("a")
    answer = agent.call("claim_next_task", {"where": {"project": ["a"]}})
    assert answer == {
        "success": False,
        "message": "claim_next_task: where: each field's value is one text or number",
    }
    settings.HYPERVISOR_IMPORT_ROOTS = [tmp_path]
    Queue.objects.filter(name="q").update(folder=str(tmp_path))
    created = agent.call("create_task", {"title": "Later", "depends_on": ["no-such-task"]})
    assert created["success"]
    assert created["message"].endswith(
        "; it cannot become ready as things stand: depends on 'no-such-task': no task of "
        "queue 'q' has that id"
    )
    assert "cannot become ready" not in agent.call("create_task", {"title": "Now"})["message"]


def test_a_sessions_filters_bind_the_old_prompts_claim_and_its_list():
    """`update_task(status="in_progress")` claimed through a one-task filter alone: a
    session for project=web took an ops task, and `list_tasks` steered it there."""
    make_tasks("q", 3)
    Task.objects.filter(key__in=["t000000", "t000002"]).update(project="web")
    Task.objects.filter(key="t000001").update(project="ops")
    web = PullSession("q", Identity.current("mcp:web"), filters=TaskFilter.parse(["project=web"]))
    listed = web.call("list_tasks", {"status": "active", "limit": 10})
    assert [t["id"] for t in listed["tasks"]] == ["t000000", "t000002"]
    assert listed["message"].startswith("2 of 2 tasks this session takes (project=web)")
    answer = web.call("update_task", {"id": "t000001", "status": "in_progress"})
    assert answer == {
        "success": False,
        "message": "t000001: not claimed: this session only takes project=web",
    }
    assert Task.objects.get(key="t000001").status == Status.QUEUED
    assert web.call("update_task", {"id": "t000002", "status": "in_progress"})["success"]
    # Over HTTP a session keeps nothing between requests: the URL's filters still bind.
    http = PullSession(
        "q",
        Identity("mcp:alice/web", "http:host", 1, 1.0),
        TaskFilter.parse(["project=web"]),
        1800,
        stateless=True,
    )
    assert not http.call("update_task", {"id": "t000001", "status": "in_progress"})["success"]
    assert Task.objects.get(key="t000001").status == Status.QUEUED


@pytest.mark.parametrize("stateless", [False, True], ids=["local", "http"])
def test_a_finish_sent_again_says_it_went_through(stateless):
    """Its answer lost, a client sends complete_task again: it was told "claim it first"
    of a task it had just finished."""
    make_tasks("q", 2)
    agent = PullSession("q", Identity.current("mcp:alice/laptop"), None, 1800, stateless=stateless)
    assert agent.call("claim_next_task")["task"]["id"] == "t000000"
    assert agent.call("complete_task", {"id": "t000000", "summary": "done"})["success"]
    again = agent.call("complete_task", {"id": "t000000", "summary": "done"})
    assert again == {
        "success": True,
        "message": "completed t000000 already; claim_next_task for the next one",
    }
    assert TaskEvent.objects.filter(kind=EventKind.DONE).count() == 1
    # Blocking what it completed, or another session's retry, is still refused.
    assert not agent.call("block_task", {"id": "t000000", "reason": "r"})["success"]
    other = PullSession("q", Identity.current("mcp:bob/laptop"), None, 1800, stateless=stateless)
    assert not other.call("complete_task", {"id": "t000000"})["success"]


def test_a_task_whose_file_git_left_half_merged_is_blocked_not_given_to_the_agent(inbox):
    # An agent pulling work was sent to a file holding both sides of a merge; a worker's
    # command has been spared it since the conflict check (processors.merge_conflict_line).
    (inbox / "b.md").write_text(
        "---\nid: ex-002\ntitle: B\nstatus: inbox\npriority: 0\n---\n# B\n"
    )
    assert not Importer("inbox").run([inbox]).errors
    conflicted = (
        "---\nid: ex-002\ntitle: B\nstatus: inbox\npriority: 0\n---\n# B\n\n"
        "<<<<<<< HEAD\nDo it this way.\n=======\nDo it that way.\n>>>>>>> other\n"
    )
    (inbox / "b.md").write_text(conflicted)
    agent = session("a", queue="inbox")

    answer = agent.call("claim_next_task")

    assert answer["success"] is True and answer["task"]["id"] == "ex-001", answer
    row = Task.objects.get(key="ex-002")
    assert (row.status, row.reason) == (
        Status.BLOCKED,
        "its file has an unresolved merge conflict (git's '<<<<<<<' at line 9): "
        "resolve it, then requeue",
    )
    assert held_lock(row) is None
    assert (inbox / "b.md").read_text() == conflicted  # nothing written into it
    row.status = Status.QUEUED
    row.save(update_fields=["status"])
    again = agent.call("update_task", {"id": "ex-002", "status": "claimed"})
    assert again["success"] is False and "merge conflict" in again["message"], again
    assert Task.objects.get(key="ex-002").status == Status.BLOCKED
