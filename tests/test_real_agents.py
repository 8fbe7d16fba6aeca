"""The real agent CLIs, installed from npm (`make agents`), run by real workers of the
shipped profiles against local stand-ins of their vendors' APIs (tests/vendor_stubs).

What the stand-in answered is all the CLI knows: the tokens each answer reported, summed
the way the vendor sums them, must be what the worker recorded; the cost and session the
CLI printed must be what the task shows; a 429 must give the task back, not block it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from herds.models import Herd, HerdStatus
from tests.conftest import ROOT, run_manage, start_manage
from tests.test_agent_profiles import shipped_profile, task_files, work
from tests.test_herds_processes import wait_until, worker_logs
from tests.vendor_stubs.anthropic import AnthropicStub
from tests.vendor_stubs.gemini import GeminiStub
from tests.vendor_stubs.openai import OpenAIStub
from workqueue import agent_tree
from workqueue.models import Status, Task
from workqueue.processors import transcript_path

pytestmark = pytest.mark.slow
BIN = ROOT / "node_modules" / ".bin"
STUBS = {"claude": AnthropicStub, "gemini": GeminiStub, "codex": OpenAIStub}


@pytest.fixture(autouse=True)
def installed():
    missing = [name for name in STUBS if not (BIN / name).exists()]
    if not missing:
        return
    if shutil.which("npm") is None:
        pytest.skip("npm is not available, so the real agent CLIs are not installed")
    pytest.fail(f"{', '.join(missing)} not in node_modules/.bin: run `make agents`")


def stub_env(cli: str, stub, home: Path, gemini_settings: dict | None = None) -> dict[str, str]:
    """The profile's env for its agent: the stand-in's address and a scratch HOME."""
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home)}
    if cli == "claude":
        env.update(
            ANTHROPIC_BASE_URL=stub.url,
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            CLAUDE_CODE_MAX_RETRIES="0",
            IS_SANDBOX="1",  # these tests run as root in a container
        )
    elif cli == "gemini":
        (home / ".gemini").mkdir(exist_ok=True)
        settings = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
        settings.update(gemini_settings or {})
        (home / ".gemini" / "settings.json").write_text(json.dumps(settings))
        env.update(GOOGLE_GEMINI_BASE_URL=stub.url)
    else:
        codex_home = home / "codex"
        codex_home.mkdir(exist_ok=True)
        (codex_home / "config.toml").write_text(
            'model_provider = "local"\n[model_providers.local]\nname = "local"\n'
            f'base_url = "{stub.url}/v1"\nenv_key = "OPENAI_API_KEY"\nwire_api = "responses"\n'
            "request_max_retries = 0\nstream_max_retries = 0\nsupports_websockets = false\n"
        )
        env.update(CODEX_HOME=str(codex_home))
    return env


@pytest.fixture
def worker_env(process_env) -> dict[str, str]:
    return {
        **process_env,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "ANTHROPIC_API_KEY": "sk-ant-stand-in-key",
        "GEMINI_API_KEY": "gemini-stand-in-key",
        "OPENAI_API_KEY": "sk-openai-stand-in-key",
        "HYPERVISOR_AGENT_GRACE": "1",
    }


def vendor_total(cli: str, usage: list[dict]) -> int:
    """What the vendor counts as the run's tokens, from what the stand-in answered."""
    if cli == "claude":
        keys = [
            "input_tokens",
            "output",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ]
        return sum(u[k] for u in usage for k in keys)
    if cli == "gemini":
        return sum(u["totalTokenCount"] for u in usage)
    return sum(u["input_tokens"] + u["output_tokens"] for u in usage)


def printed_result(task: Task) -> dict:
    """The CLI's own last word, from the agent's log: what the adapter must agree with."""
    text = Path(task.result["log"]).read_text()
    if text.lstrip().startswith("{\n"):  # Gemini's json mode
        return json.loads(text[: text.rindex("}") + 1])
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("type") in ("result", "turn.completed")][-1] | {
        "session_id": next(
            e.get("session_id") or e.get("thread_id")
            for e in events
            if e.get("session_id") or e.get("thread_id")
        )
    }


@pytest.mark.parametrize("cli", list(STUBS))
def test_real_cli_tokens_cost_and_session_are_what_it_printed(
    cli, worker_env, tmp_path, write_task
):
    with STUBS[cli]() as stub:
        shipped_profile(cli, tmp_path / "ledger", env=stub_env(cli, stub, tmp_path / "home"))
        tasks = task_files(write_task, f"r{cli}", ["", ""])

        result, summary = work(worker_env, f"r{cli}", cli, timeout=240)

    assert result.returncode == 0, result.stderr
    assert stub.requests, "the CLI never called the stand-in"
    total = 0
    for task in tasks:
        task.refresh_from_db()
        assert task.status == Status.DONE, (task.reason, task.output_tail)
        printed = printed_result(task)
        assert task.result["session_id"] == printed["session_id"]
        if cli == "claude":
            assert task.cost_usd == Decimal(str(printed["total_cost_usd"])) > 0
            assert task.result["resume"] == f"claude --resume {printed['session_id']}"
        elif cli == "codex":
            assert task.result["resume"] == f"codex exec resume {printed['session_id']}"
            assert task.cost_usd is None
        # The worker's data folder is the test's process_env one, beside the agent's log.
        transcript = Path(task.result["log"]).parent / transcript_path(task.pk, task.fence).name
        entries = json.loads(transcript.read_text())["entries"]
        # the tool call, seen
        asked = [(r["path"], sorted((r["body"] or {}).keys())) for r in stub.requests]
        assert [e for e in entries if e["kind"] == "tool"], (entries, asked)
        total += task.tokens
    # Every token the stand-in reported, summed as the vendor sums them.
    assert total == vendor_total(cli, stub.usage) == summary["tokens"] > 0


def test_real_gemini_json_mode_is_read_whole(worker_env, tmp_path, write_task):
    with GeminiStub() as stub:
        env = stub_env("gemini", stub, tmp_path / "home")
        shipped_profile("gemini", tmp_path / "l", env=env, extra_args=["--output-format", "json"])
        (task,) = task_files(write_task, "rgj", [""])
        work(worker_env, "rgj", "gemini", timeout=240)
    task.refresh_from_db()
    assert task.status == Status.DONE, task.reason
    assert task.tokens == vendor_total("gemini", stub.usage) > 0
    assert task.result["final_message"].endswith(f"COMPLETED: {task.key}")


@pytest.mark.parametrize(
    "cli, words",
    [
        ("claude", "Request rejected (429)"),
        ("gemini", "exhausted your daily quota"),
        ("codex", "Quota exceeded"),
    ],
)
def test_real_cli_quota_gives_the_task_back_uncounted(
    cli, words, worker_env, tmp_path, write_task
):
    with STUBS[cli]() as stub:
        stub.mode = "quota"
        shipped_profile(cli, tmp_path / "ledger", env=stub_env(cli, stub, tmp_path / "home"))
        first, second = task_files(write_task, f"rq{cli}", ["", ""])
        result, summary = work(worker_env, f"rq{cli}", cli, timeout=240)
    assert result.returncode == 0, result.stderr
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == Status.QUEUED and first.attempts == 0, first.reason
    assert first.result["quota"] is True and words in first.reason
    # The worker stopped claiming: the second task was never tried.
    assert (second.status, second.attempts) == (Status.QUEUED, 0)
    assert summary["stop_reason"].startswith("quota or rate limit reached")


# Gemini retries a 5xx ten times over minutes: one attempt here, as a short timeout would.
ONE_ATTEMPT = {"general": {"maxAttempts": 1}}


@pytest.mark.parametrize(
    "cli, status, words",
    [
        ("claude", 500, "API Error: 500"),
        ("claude", 503, "API Error: 503"),
        ("codex", 500, "high demand"),  # Codex's words for a 500
        ("codex", 502, "unexpected status 502 Bad Gateway"),
        ("gemini", 500, '"code":500'),
        ("gemini", 503, "An internal error has occurred"),  # only its exit (247) says 503
        ("gemini", 504, '"code":504'),
    ],
)
def test_real_cli_vendor_server_error_gives_the_task_back_uncounted(
    cli, status, words, worker_env, tmp_path, write_task
):
    """A vendor's 5xx blocked the task in a second, and the next one, and so through the
    queue for as long as the outage lasted: it is the vendor's, as a quota is."""
    with STUBS[cli]() as stub:
        stub.mode, stub.error_status = "server_error", status
        env = stub_env(cli, stub, tmp_path / "home", gemini_settings=ONE_ATTEMPT)
        shipped_profile(cli, tmp_path / "ledger", env=env)
        first, second = task_files(write_task, f"rs{cli}", ["", ""])
        result, summary = work(worker_env, f"rs{cli}", cli, timeout=240)
    assert result.returncode == 0, result.stderr
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.attempts) == (Status.QUEUED, 0), (first.reason, first.output_tail)
    assert first.reason.startswith("vendor server error: ") and words in first.reason
    assert first.result["quota"] is True and first.result["server_error"] is True
    # The worker stopped claiming: the second task was never tried.
    assert (second.status, second.attempts) == (Status.QUEUED, 0)
    assert summary["stop_reason"] == first.reason


@pytest.mark.parametrize(
    "cli, mode, words",
    [
        ("gemini", "rate_limit", "quota or rate limit reached: still retrying when the timeout "
         "ended it: Attempt"),
        ("gemini", "server_error", "vendor server error: still retrying when the timeout "
         "ended it: Attempt"),
        ("claude", "server_error", "vendor server error: still retrying when the timeout "
         "ended it: retry"),
    ],
)  # fmt: skip
def test_real_cli_still_retrying_the_vendor_at_the_timeout_gives_the_task_back(
    cli, mode, words, worker_env, tmp_path, write_task
):
    """Gemini CLI retries a plain 429 for minutes ("Attempt 2 failed with status 429.
    Retrying with backoff..."): the timeout ended it, and the task was blocked "timed out"
    while every other task would meet the same limit."""
    with STUBS[cli]() as stub:
        stub.mode = mode
        env = stub_env(cli, stub, tmp_path / "home")
        if cli == "claude":
            env["CLAUDE_CODE_MAX_RETRIES"] = "10"  # its own retries, as it ships
        shipped_profile(cli, tmp_path / "ledger", env=env)
        first, second = task_files(write_task, f"rr{cli}", ["", ""])
        # Its first retry comes 0.2 s after the CLI is up, which takes 1.5 s here and 7 s
        # with the two cores ten times over-committed; Gemini's next are 5, 17 and 35 s on.
        work(worker_env, f"rr{cli}", cli, "--timeout", "20", timeout=240)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.attempts) == (Status.QUEUED, 0), (first.reason, first.outcome)
    assert first.reason.startswith(words), first.reason
    assert (second.status, second.attempts) == (Status.QUEUED, 0)


def test_a_herd_stopped_by_a_vendor_server_error_resumes_after_the_backoff(
    cli_consumer, tmp_path, write_task
):
    with AnthropicStub() as stub:
        stub.mode = "server_error"
        shipped_profile(
            "claude", tmp_path / "ledger", env=stub_env("claude", stub, tmp_path / "h")
        )
        tasks = task_files(write_task, "rsh", ["", ""])
        out = run_manage(
            ["herd", "--queue", "rsh", "--profile", "claude", "--workers", "1"]
            + ["--resume-after-quota", "--json"],
            cli_consumer,
            timeout=60,
        )
        first = Herd.objects.get(pk=json.loads(out.stdout.strip().splitlines()[-1])["herd"])
        wait_until(lambda: Herd.objects.get(pk=first.pk).ended, 90, what="the first herd's end")
        first.refresh_from_db()
        assert first.status == HerdStatus.QUOTA, (first.reason, worker_logs())
        assert first.reason.startswith("vendor server error: API Error: 500"), first.reason
        assert first.finished_tasks() == 0  # none blocked
        stub.mode = "ok"  # the vendor is back
        resumed = Herd.objects.filter(resumed_from=first)
        wait_until(lambda: resumed.exists() and resumed.get().ended, 120, what="the resume")
    assert resumed.get().status == HerdStatus.FINISHED, resumed.get().reason
    for task in tasks:
        task.refresh_from_db()
        assert (task.status, task.attempts) == (Status.DONE, 1), task.reason


@pytest.mark.parametrize("extra_args", [[], ["--output-format", "json", "--verbose"]])
def test_real_claude_final_message_over_a_megabyte_is_read(
    extra_args, worker_env, tmp_path, write_task
):
    """Its result line carries the whole final message (json mode with --verbose, every
    message too): cut into pieces at 1 MiB, the task was blocked "ended without a result"
    and its tokens and cost lost."""
    with AnthropicStub() as stub:
        stub.mode = "long"
        env = stub_env("claude", stub, tmp_path / "home")
        shipped_profile("claude", tmp_path / "ledger", env=env, extra_args=extra_args)
        (task,) = task_files(write_task, "rcl", [""])
        work(worker_env, "rcl", "claude", timeout=240)
    task.refresh_from_db()
    assert task.status == Status.DONE, task.reason
    assert task.tokens == vendor_total("claude", stub.usage) > 0
    assert task.cost_usd > 0 and task.outcome == "success"


def test_real_claude_max_turns_blocks_with_a_plain_reason(worker_env, tmp_path, write_task):
    with AnthropicStub() as stub:
        env = stub_env("claude", stub, tmp_path / "home")
        shipped_profile("claude", tmp_path / "ledger", env=env, max_turns=1)
        (task,) = task_files(write_task, "rmt", [""])
        work(worker_env, "rmt", "claude", timeout=240)
    task.refresh_from_db()
    assert task.status == Status.BLOCKED
    assert task.reason.startswith("reached the maximum number of turns"), task.reason
    assert task.tokens == vendor_total("claude", stub.usage) > 0


def test_real_gemini_turn_limit_blocks_with_a_plain_reason(worker_env, tmp_path, write_task):
    # Gemini has no max-turns option: its settings.json has model.maxSessionTurns.
    with GeminiStub() as stub:
        turns = {"model": {"maxSessionTurns": 1}}
        env = stub_env("gemini", stub, tmp_path / "home", gemini_settings=turns)
        shipped_profile("gemini", tmp_path / "ledger", env=env)
        (task,) = task_files(write_task, "rgt", [""])
        work(worker_env, "rgt", "gemini", timeout=240)
    task.refresh_from_db()
    assert task.status == Status.BLOCKED
    assert task.reason.startswith("reached the session's turn limit (exit 53)"), (
        task.reason,
        task.output_tail,
        task.result,
    )
    assert task.tokens == vendor_total("gemini", stub.usage) > 0


@pytest.mark.parametrize("extra_args", [[], ["--output-format", "json"]])
def test_real_gemini_stopped_by_its_loop_detection_is_blocked(
    extra_args, worker_env, tmp_path, write_task
):
    """Gemini CLI stops a run that repeats itself and still reports success: the task,
    never finished, was closed as done."""
    with GeminiStub() as stub:
        stub.mode = "loop"
        env = stub_env("gemini", stub, tmp_path / "home")
        shipped_profile("gemini", tmp_path / "ledger", env=env, extra_args=extra_args)
        (task,) = task_files(write_task, "rgl", [""])
        work(worker_env, "rgl", "gemini", timeout=240)
    task.refresh_from_db()
    assert task.status == Status.BLOCKED, (task.outcome, task.output_tail)
    assert task.reason == "the CLI stopped the agent: Loop detected, stopping execution"


@pytest.mark.parametrize("cli", list(STUBS))
def test_real_cli_waiting_on_a_silent_api_ends_at_the_timeout(
    cli, worker_env, tmp_path, write_task
):
    with STUBS[cli]() as stub:
        stub.mode = "hang"
        shipped_profile(cli, tmp_path / "ledger", env=stub_env(cli, stub, tmp_path / "home"))
        (task,) = task_files(write_task, f"rh{cli}", [""])
        # The agent's processes carry the claim's marker (this installation's, then the
        # task's id and fence): watched while the CLI hangs, and none may be left after.
        ours = agent_tree.claim_marker(task.pk, 0).rsplit(".", 1)[0] + "."
        seen, stop = set(), threading.Event()

        def watch() -> None:
            while not stop.wait(0.2):
                seen.update(m for _, m in carrying(ours))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            work(worker_env, f"rh{cli}", cli, "--timeout", "8", timeout=240)
        finally:
            stop.set()
            watcher.join()
        took = time.monotonic() - started
    task.refresh_from_db()
    assert (task.status, task.outcome) == (Status.BLOCKED, "timed_out"), task.reason
    assert took < 8 + 2 * 1 + 15
    assert seen == {agent_tree.claim_marker(task.pk, task.fence)}
    assert carrying(ours) == []


def carrying(prefix: str) -> list[tuple[int, str]]:
    """The live processes whose claim marker starts with `prefix`: pid and marker."""
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            marker = process.environ().get(agent_tree.CLAIM_VARIABLE, "")
            if process.info["status"] != psutil.STATUS_ZOMBIE and marker.startswith(prefix):
                found.append((process.pid, marker))
        except psutil.Error:
            continue
    return found


@pytest.fixture
def cli_consumer(huey_env, tmp_path):
    """A real consumer whose herds' workers find the real CLIs."""
    env = {
        **huey_env,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HYPERVISOR_AGENT_GRACE": "1",
        "HYPERVISOR_QUOTA_BACKOFF": "2",  # a herd ended on quota resumes in seconds
        # What the shipped profiles pass on to their CLIs.
        "ANTHROPIC_API_KEY": "sk-ant-stand-in-key",
        "GEMINI_API_KEY": "gemini-stand-in-key",
        "OPENAI_API_KEY": "sk-openai-stand-in-key",
    }
    with open(tmp_path / "consumer.log", "w") as log:
        proc = start_manage(["run_huey"], env, stdout=log, stderr=log)
    yield env
    proc.terminate()
    proc.wait(timeout=15)


@pytest.mark.slow
@pytest.mark.parametrize("cli", list(STUBS))
def test_cancelling_a_herd_of_real_clis_puts_every_task_back(
    cli, cli_consumer, tmp_path, write_task
):
    """A cancel signals every process of each worker's tree at once, and the CLIs heed
    it before their worker does: Gemini CLI exited 0 with no result (its tasks closed as
    done, nothing done), Claude Code 143 (blocked, "exited with code 143")."""
    with STUBS[cli]() as stub:
        stub.mode = "hang"
        shipped_profile(cli, tmp_path / "ledger", env=stub_env(cli, stub, tmp_path / "home"))
        tasks = task_files(write_task, f"cx{cli}", ["", ""])
        out = run_manage(
            ["herd", "--queue", f"cx{cli}", "--profile", cli, "--workers", "2", "--json"],
            cli_consumer,
            timeout=60,
        )
        herd = Herd.objects.get(pk=json.loads(out.stdout.strip().splitlines()[-1])["herd"])
        claimed = Task.objects.filter(queue=f"cx{cli}", status=Status.CLAIMED)
        wait_until(lambda: len(stub.requests) >= 2 and claimed.count() == 2, 90, what="asks")
        herd.request_cancel("cancelled by the test")
        wait_until(lambda: Herd.objects.get(pk=herd.pk).ended, 90, what="the herd's end")
    herd.refresh_from_db()
    assert herd.status == HerdStatus.CANCELLED, (herd.reason, worker_logs())
    for task in tasks:
        task.refresh_from_db()
        assert (task.status, task.attempts) == (Status.QUEUED, 0), (task.reason, task.result)
