"""The adapters read each CLI's output as it streams, from the vendors' own formats.

The samples in tests/fixtures/agent_formats are shaped after the CLIs' sources and docs;
each test feeds them line by line, as AgentRun does, and checks what the worker records.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import make_tasks
from workqueue import transitions
from workqueue.agents import AgentOptions, Transcript, adapter_class
from workqueue.agents.base import (
    FINAL_LIMIT,
    MAX_RUN_COST_USD,
    MAX_RUN_TOKENS,
    read_agent_lines,
    reset_time,
)
from workqueue.locks import Identity
from workqueue.models import Status, Task
from workqueue.processing import Result

SAMPLES = Path(__file__).parent / "fixtures" / "agent_formats"


def run(
    name: str,
    stdout: str = "",
    stderr: str = "",
    code: int = 0,
    options: AgentOptions | None = None,
    transcript: Path | None = None,
):
    adapter = adapter_class(name)(options or AgentOptions(), Transcript(transcript))
    for line in stdout.splitlines():
        adapter.feed("stdout", line)
    for line in stderr.splitlines():
        adapter.feed("stderr", line)
    result = adapter.result(code, stdout[-4000:], stderr[-4000:], "t1")
    adapter.transcript.close()
    return adapter, result


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def test_claude_stream_json_reports_tokens_cost_session_and_final_message(tmp_path):
    path = tmp_path / "transcript.json"
    adapter, result = run("claude", sample("claude_stream.jsonl"), transcript=path)
    assert result.status == Status.DONE
    assert result.tokens == 18 + 2577 + 169817 + 14760
    assert result.cost_usd == Decimal("0.2416735")
    data = result.data
    assert data["tokens"] == {
        "input": 18,
        "output": 2577,
        "cache_read": 169817,
        "cache_write": 14760,
        "total": 187172,
    }
    assert data["session_id"] == "22795ca6-8222-4620-91dd-3001deaf3378"
    assert data["resume"] == "claude --resume 22795ca6-8222-4620-91dd-3001deaf3378"
    assert (data["turns"], data["model"], data["duration_ms"]) == (15, "claude-opus-4-6", 74096)
    assert data["final_message"] == "Done. Added the null check in src/util.ts."
    entries = json.loads(path.read_text())["entries"]
    tools = [e for e in entries if e["kind"] == "tool"]
    assert tools == [
        {"kind": "tool", "name": "Read", "text": "file_path=/home/dev/repo/src/util.ts",
         "at": tools[0]["at"]}
    ]  # fmt: skip


def test_claude_json_mode_is_one_result_line():
    _adapter, result = run("claude", sample("claude_json.txt"))
    assert (result.status, result.tokens, result.cost_usd) == (
        Status.DONE,
        187172,
        Decimal("0.2416735"),
    )


def test_claude_verbose_json_array_is_read_as_events():
    events = [json.loads(line) for line in sample("claude_stream.jsonl").splitlines()]
    one_line = json.dumps(events)
    _adapter, result = run("claude", one_line)
    assert (result.status, result.tokens) == (Status.DONE, 187172)
    pretty = json.dumps(events, indent=2)
    _adapter, result = run("claude", pretty)
    assert (result.status, result.tokens, result.data["session_id"]) == (
        Status.DONE,
        187172,
        "22795ca6-8222-4620-91dd-3001deaf3378",
    )


def test_claude_429_is_a_quota_give_back_not_a_block():
    _adapter, result = run("claude", sample("claude_api_error.txt"), code=1)
    assert result.status == Status.QUEUED
    assert result.data["quota"] is True and result.data["attempt_counted"] is False
    assert "Rate limit reached" in result.reason


def test_claude_rejected_rate_limit_event_carries_the_reset_time():
    event = {
        "type": "rate_limit_event",
        "rate_limit_info": {"status": "rejected", "resetsAt": 1785651000, "rateLimitType": "x"},
    }
    _adapter, result = run("claude", json.dumps(event), code=1)
    assert result.status == Status.QUEUED
    assert datetime.fromisoformat(result.data["resets_at"]).timestamp() == 1785651000


def test_claude_allowed_rate_limit_event_is_not_quota():
    _adapter, result = run("claude", sample("claude_stream.jsonl"))
    assert result.status == Status.DONE and "quota" not in result.data


def test_claude_max_turns_blocks_with_a_plain_reason_and_keeps_the_usage():
    _adapter, result = run("claude", sample("claude_max_turns.txt"), code=1)
    assert result.status == Status.BLOCKED
    assert result.reason == "reached the maximum number of turns (10)"
    assert result.tokens == 40 + 9000 + 210000 + 3100
    assert result.cost_usd == Decimal("0.41")


def test_claude_blocked_line_in_the_final_message_blocks_with_reason_and_next():
    final = "I could not finish.\n\nBLOCKED: t1\nReason: the API key is missing\nNext: ask ops"
    event = {"type": "result", "subtype": "success", "is_error": False, "result": final}
    _adapter, result = run("claude", json.dumps(event))
    assert (result.status, result.reason, result.next_step) == (
        Status.BLOCKED,
        "the API key is missing",
        "ask ops",
    )


def test_claude_refusing_root_says_what_to_do():
    stderr = "--dangerously-skip-permissions cannot be used with root/sudo privileges"
    _adapter, result = run("claude", "", stderr, code=1)
    assert result.status == Status.BLOCKED and "IS_SANDBOX=1" in result.reason


def test_claude_command_line_puts_the_prompt_after_double_dash():
    options = AgentOptions(model="sonnet", max_turns=7, max_budget_usd=Decimal("1.5"))
    args = adapter_class("claude")(options).command("--output=/etc/x do it")
    assert args[:2] == ["claude", "-p"] and args[-2:] == ["--", "--output=/etc/x do it"]
    for flag, value in (("--model", "sonnet"), ("--max-turns", "7"), ("--max-budget-usd", "1.5")):
        assert args[args.index(flag) + 1] == value
    assert args[args.index("--output-format") + 1] == "stream-json" and "--verbose" in args
    own = adapter_class("claude")(AgentOptions(extra_args=["--output-format", "json"]))
    assert own.command("p").count("--output-format") == 1 and "--verbose" not in own.command("p")


def test_gemini_pretty_json_on_stdout_is_read_whole():
    adapter, result = run("gemini", sample("gemini_json_stdout.txt"))
    assert result.status == Status.DONE
    assert result.tokens == 12988
    assert result.data["tokens"]["input"] == 12150 and result.data["tokens"]["cache_read"] == 3030
    assert result.data["session_id"] == "1f6c1d0e-7a7b-4a55-9d8e-2c1f3b1e9a10"
    assert result.data["final_message"].startswith("Done. I added")
    assert result.cost_usd is None and adapter.model == "gemini-2.5-pro"


def test_gemini_error_object_on_stderr_is_quota():
    _adapter, result = run("gemini", "", sample("gemini_json_error_STDERR.txt"), code=1)
    assert result.status == Status.QUEUED
    assert "exhausted your daily quota" in result.reason


def test_gemini_error_object_after_warnings_and_a_stack_trace():
    stderr = (
        "Warning: 256-color support not detected.\nYOLO mode is enabled.\n"
        "TerminalQuotaError: You have exhausted your daily quota on this model.\n"
        "    at main (file:///x/gemini.js:17627:5) {\n  cause: {\n    code: 429\n  }\n}\n"
        + sample("gemini_json_error_STDERR.txt")
    )
    _adapter, result = run("gemini", "", stderr, code=1)
    assert result.status == Status.QUEUED
    assert result.data["session_id"] == "1f6c1d0e-7a7b-4a55-9d8e-2c1f3b1e9a10"


def test_gemini_stream_json_reports_tool_calls_and_tokens(tmp_path):
    path = tmp_path / "t.json"
    _adapter, result = run("gemini", sample("gemini_stream.jsonl"), transcript=path)
    assert (result.status, result.tokens) == (Status.DONE, 12988)
    assert result.data["final_message"] == "Done. I added the missing null check."
    kinds = [(e["kind"], e.get("name")) for e in json.loads(path.read_text())["entries"]]
    assert ("tool", "read_file") in kinds and ("assistant", None) in kinds


def test_gemini_stream_error_result_is_quota():
    _adapter, result = run("gemini", sample("gemini_stream_error.jsonl"), code=1)
    assert result.status == Status.QUEUED and "daily quota" in result.reason


@pytest.mark.parametrize(
    "code, words",
    [(41, "authentication failed"), (55, "untrusted folder"), (53, "turn limit")],
)
def test_gemini_exit_codes_block_with_plain_reasons(code, words):
    _adapter, result = run("gemini", "", "some error", code=code)
    assert result.status == Status.BLOCKED and words in result.reason


def test_gemini_exit_173_is_quota():
    _adapter, result = run("gemini", "", "", code=173)
    assert result.status == Status.QUEUED and result.data["quota"]


def test_gemini_json_error_object_of_a_503_is_the_vendors_server_not_quota():
    # What Gemini CLI 0.61 prints on stderr in json mode, its retries spent on a 503.
    stderr = (
        "Attempt 1 failed: An internal error has occurred. Max attempts reached\n"
        "Error when talking to Gemini API RetryableQuotaError: An internal error has occurred\n"
        "    at classifyGoogleError (file:///x/chunk.js:307333:14) {\n  status: 503\n}\n"
        '{\n  "session_id": "s1",\n  "error": {\n    "type": "Error",\n'
        '    "message": "An internal error has occurred.",\n    "code": 503\n  }\n}\n'
    )
    _adapter, result = run("gemini", "", stderr, code=247)
    assert result.status == Status.QUEUED and result.data["server_error"] is True
    assert result.reason == "vendor server error: An internal error has occurred."


def test_a_gemini_retry_answered_before_the_timeout_is_not_why_it_timed_out():
    adapter = adapter_class("gemini")(AgentOptions(), Transcript(None))
    adapter.feed("stderr", "Attempt 1 failed with status 429. Retrying with backoff...")
    adapter.feed("stdout", json.dumps({"type": "message", "role": "assistant", "content": "Hi"}))
    adapter.timed_out()
    assert not adapter.quota and not adapter.server_error
    adapter.feed("stderr", "Attempt 1 failed with status 503. Retrying with backoff...")
    adapter.timed_out()
    assert adapter.server_error.startswith("still retrying when the timeout ended it: Attempt")


def test_a_gemini_retry_read_before_the_sessions_start_is_still_retrying():
    """The retry line (stderr) and the session's first events (stdout) are printed 50 ms
    apart, and a busy worker reads both pipes at once, in either order: the echo of the
    prompt answered no retry (CI saw the run blocked "timed out" once)."""
    adapter = adapter_class("gemini")(AgentOptions(), Transcript(None))
    adapter.feed("stderr", "Attempt 1 failed with status 500. Retrying with backoff...")
    adapter.feed("stdout", json.dumps({"type": "init", "session_id": "s", "model": "auto"}))
    adapter.feed("stdout", json.dumps({"type": "message", "role": "user", "content": "Do it"}))
    adapter.timed_out()
    assert adapter.server_error.startswith("still retrying when the timeout ended it: Attempt")


def test_codex_jsonl_reports_tokens_as_input_plus_output_and_the_thread():
    _adapter, result = run("codex", sample("codex_exec.jsonl"))
    assert result.status == Status.DONE
    assert result.tokens == 24763 + 122
    assert result.data["tokens"]["cache_read"] == 24448
    assert result.data["session_id"] == "0199a213-81c0-7800-8aa1-bbab2a035a53"
    assert result.data["resume"] == "codex exec resume 0199a213-81c0-7800-8aa1-bbab2a035a53"
    assert result.data["final_message"] == "Added a null check in src/util.ts."
    assert result.cost_usd is None


def test_codex_turn_failed_usage_limit_is_quota_with_the_reset_time():
    _adapter, result = run("codex", sample("codex_exec_failed.jsonl"), code=1)
    assert result.status == Status.QUEUED
    resets = datetime.fromisoformat(result.data["resets_at"])
    assert (resets.hour, resets.minute) == (15, 28)
    assert timedelta(0) < resets - datetime.now().astimezone() <= timedelta(days=1)


def test_codex_turn_failed_for_another_reason_blocks():
    lines = [
        {"type": "thread.started", "thread_id": "th"},
        {"type": "turn.failed", "error": {"message": "model not found"}},
    ]
    _adapter, result = run("codex", "\n".join(map(json.dumps, lines)), code=1)
    assert (result.status, result.reason) == (Status.BLOCKED, "model not found")


def test_codex_retry_errors_followed_by_success_are_not_fatal():
    lines = sample("codex_exec.jsonl").splitlines()
    lines.insert(2, json.dumps({"type": "error", "message": "Reconnecting... 1/5"}))
    _adapter, result = run("codex", "\n".join(lines))
    assert result.status == Status.DONE


@pytest.mark.parametrize("name", ["claude", "gemini", "codex"])
def test_unknown_events_and_noise_are_skipped(name):
    stream = {
        "claude": "claude_stream.jsonl",
        "gemini": "gemini_stream.jsonl",
        "codex": "codex_exec.jsonl",
    }[name]
    lines = sample(stream).splitlines()
    lines.insert(1, json.dumps({"type": "from_the_future", "payload": {"x": [1, 2]}}))
    lines.insert(2, "Loaded cached credentials.")
    lines.insert(3, '{"type": "assistant", "message": "not an object"}')
    lines.insert(4, "[1, 2, 3]")
    adapter, result = run(name, "\n".join(lines))
    assert result.status == Status.DONE and result.tokens > 0
    assert adapter.skipped >= 1


@pytest.mark.parametrize(
    "name, stream",
    [
        ("claude", "claude_stream.jsonl"),
        ("gemini", "gemini_stream.jsonl"),
        ("codex", "codex_exec.jsonl"),
    ],
)
def test_a_stream_cut_mid_line_is_blocked_with_what_was_read(name, stream):
    text = sample(stream)
    cut = text[: text.rindex("\n", 0, len(text) - 2) + 40]  # the last line half written
    adapter, result = run(name, cut, "", code=-9)
    assert result.status == Status.BLOCKED and "SIGKILL" in result.reason
    assert result.data["session_id"]


def test_claude_usage_so_far_when_the_result_never_came():
    text = sample("claude_stream.jsonl").splitlines()[:5]
    _adapter, result = run("claude", "\n".join(text), code=-9)
    assert result.tokens == (3 + 1200 + 14000 + 60) + (15 + 13560 + 155817 + 2517)


def test_generic_quota_pattern_gives_the_task_back_before_the_finish():
    options = AgentOptions(quota_pattern=r"\b429\b|rate limit")
    _adapter, result = run("generic", "", "Error: 429 too many", code=1, options=options)
    assert result.status == Status.QUEUED and result.data["quota"] is True
    _adapter, result = run("generic", "", "Error: disk full", code=1, options=options)
    assert result.status == Status.BLOCKED


@pytest.mark.parametrize(
    "text, delta",
    [
        ("Please retry in 30s.", timedelta(seconds=30)),
        ("quota resets in 2 hours", timedelta(hours=2)),
    ],
)
def test_reset_time_in_words(text, delta):
    now = datetime(2026, 8, 22, 10, 0).astimezone()
    assert reset_time(text, now) == now + delta


@pytest.mark.parametrize("adapter", ["gemini", "codex", "claude"])
@pytest.mark.parametrize(
    "text",
    [
        "Quota exceeded for this model. Please try again in 3000000 days.",
        "rate limit reached; retry after 99999999999 d",
        "quota exceeded: try again in 32 days",
    ],
)
def test_a_quota_wait_past_any_real_limit_is_a_quota_with_no_reset_time(adapter, text):
    """timedelta overflowed on "3000000 days" and the worker died mid-finish, its task
    claimed until the reaper (an attempt counted), the next worker dying the same way."""
    assert reset_time(text) is None
    run = adapter_class(adapter)()
    result = run.result(1, "", text, "k1")
    assert result.status == Status.QUEUED
    assert result.data["quota"] is True and result.data["resets_at"] is None


def test_reset_clock_time_already_past_is_tomorrow():
    now = datetime(2026, 8, 22, 16, 0).astimezone()
    assert reset_time("Try again at 3:28 PM.", now) == now.replace(hour=15, minute=28) + timedelta(
        days=1
    )


@pytest.mark.django_db
def test_absurd_tokens_and_cost_are_capped_and_the_finish_is_recorded():
    """A broken or hostile CLI's numbers: infinity was an OverflowError in the adapter, and
    1e30 dollars failed the finish on its column (PostgreSQL), leaving the task to the
    reaper and the agent to run again."""
    stream = (
        sample("claude_stream.jsonl")
        .replace('"total_cost_usd":0.2416735', '"total_cost_usd":1e30')
        .replace('"inputTokens":18', '"inputTokens":1e999')
        .replace('"outputTokens":2577', '"outputTokens":100000000000000000000000')
    )
    _, claude = run("claude", stream)
    assert claude.cost_usd == MAX_RUN_COST_USD
    assert claude.tokens == 2 * MAX_RUN_TOKENS + 169817 + 14760
    _, generic = run("generic", '{"status": "done", "tokens": 1e999}\n')
    assert (generic.status, generic.tokens) == (Status.DONE, MAX_RUN_TOKENS)
    make_tasks("q", 2)
    me = Identity.current("me")
    claims = transitions.claim("q", me, 2, 300)
    report = transitions.finish(me, list(zip(claims, [claude, generic], strict=True)))
    assert sorted(report.finished) == sorted(c.id for c in claims)
    rows = Task.objects.order_by("id").values_list("status", "tokens", "cost_usd")
    assert [(s, t, c) for s, t, c in rows] == [
        (Status.DONE, 2 * MAX_RUN_TOKENS + 169817 + 14760, MAX_RUN_COST_USD),
        (Status.DONE, MAX_RUN_TOKENS, None),
    ]


@pytest.mark.timeout(60)  # the old search took about 90 s over these 1.2 MB
def test_the_last_words_are_found_in_linear_time_after_lines_of_punctuation():
    """`^\\W*` at each line start ran on over every line below it: quadratic in lines of
    dots, rules or box drawing, which agents print."""
    result = Result(status=Status.DONE)
    text = "." * 99 + "\n"
    words = "I could not go on.\n** BLOCKED: t1\n- Reason: no key\n"
    read_agent_lines(result, text * 12_000 + words + text * 100)
    assert (result.status, result.reason) == (Status.BLOCKED, "no key")


def test_a_final_message_streamed_in_pieces_keeps_only_its_end():
    pieces = [{"type": "message", "role": "assistant", "content": "x" * 1000, "delta": True}]
    last = {"type": "message", "role": "assistant", "content": "\nBLOCKED: t1", "delta": True}
    stream = "".join(json.dumps(p) + "\n" for p in pieces * 5_000 + [last])
    adapter, result = run("gemini", stream + json.dumps({"type": "result", "status": "success"}))
    assert len(adapter.final) == FINAL_LIMIT  # not the 5 MB the agent printed
    assert adapter.final.endswith("x\nBLOCKED: t1")
    assert result.status == Status.BLOCKED


# A helper's audit of the adapters (stop 35): each fails on the code before it.


@pytest.mark.parametrize("name", ["gemini", "codex"])
def test_a_cli_that_exits_0_with_no_result_is_blocked_not_done(name):
    """A wrapper, a crash that exits 0, Gemini CLI heeding a SIGTERM: closed as done with
    nothing done (Claude's adapter already blocked it)."""
    _adapter, result = run(name, "", "", code=0)
    assert (result.status, result.reason) == (Status.BLOCKED, f"{name} ended without a result")
    _adapter, done = run(
        name, sample({"gemini": "gemini_stream.jsonl"}.get(name, "codex_exec.jsonl"))
    )
    assert done.status == Status.DONE


def test_claude_on_overage_that_finished_is_done_not_given_back():
    """Claude Code on overage says `rejected` with `isUsingOverage` and goes on; a run that
    met any limit on the way and ended in success is done, not done twice."""
    overage = {
        "type": "rate_limit_event",
        "rate_limit_info": {
            "status": "rejected", "overageStatus": "allowed", "isUsingOverage": True,
            "resetsAt": 1785651000, "rateLimitType": "five_hour",
        },
    }  # fmt: skip
    stream = sample("claude_stream.jsonl").splitlines()
    adapter, result = run("claude", "\n".join([stream[0], json.dumps(overage), *stream[1:]]))
    assert result.status == Status.DONE and not adapter.quota
    rejected = {**overage, "rate_limit_info": {"status": "rejected", "resetsAt": 1785651000}}
    _adapter, result = run("claude", "\n".join([stream[0], json.dumps(rejected), *stream[1:]]))
    assert result.status == Status.DONE  # its result is a success: the limit came and went


def test_a_completed_line_naming_another_task_finishes_nothing():
    final = {"type": "result", "subtype": "success", "result": "All good.\nCOMPLETED: t2"}
    _adapter, result = run("claude", json.dumps(final))
    assert (result.status, result.reason) == (
        Status.BLOCKED,
        "the agent reported another task done (t2), not t1",
    )
    for words in ("COMPLETED: t1", "COMPLETED: `t1`.", "COMPLETED: fixed the login bug"):
        _adapter, result = run("claude", json.dumps({**final, "result": words}))
        assert result.status == Status.DONE, words


def test_an_agents_own_blocked_verdict_about_a_429_is_not_its_quota():
    options = AgentOptions(quota_pattern=r"\b429\b|rate limit|quota exceeded")
    said = '{"status": "blocked", "reason": "the vendor API answers 429 to bulk calls"}'
    _adapter, result = run("generic", said, "", code=0, options=options)
    assert (result.status, result.reason) == (
        Status.BLOCKED,
        "the vendor API answers 429 to bulk calls",
    )
    lines = "BLOCKED: t1\nReason: their rate limit is the question\n"
    _adapter, result = run("generic", lines, "", code=0, options=options)
    assert result.status == Status.BLOCKED and "quota" not in result.data


def test_claude_counts_many_api_calls_in_linear_time_and_memory():
    """Every assistant message summed every message's usage again: 8,000 took 2.2 s."""
    adapter = adapter_class("claude")(AgentOptions(), Transcript(None))
    usage = {"input_tokens": 1, "output_tokens": 2}
    for i in range(40_000):
        message = {"id": f"m{i // 2}", "usage": usage, "content": [{"type": "text", "text": "x"}]}
        adapter.feed("stdout", json.dumps({"type": "assistant", "message": message}))
    assert (adapter.usage.total, adapter.turns) == (20_000 * 3, 20_000)
    assert not hasattr(adapter, "per_message")
