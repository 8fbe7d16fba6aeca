"""The shipped claude, gemini and codex profiles, run by real worker processes against
fake CLIs placed first on PATH (tests/fake_agents), which print what the real ones print
with numbers of their own per task and write down what they printed (a ledger)."""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal
from pathlib import Path

import psutil
import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command

from herds.models import AdapterKind, Herd, HerdStatus, Profile
from tests.conftest import run_manage
from workqueue import claims
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent
from workqueue.processors import CommandProcessor
from workqueue.worker import Worker

FAKES = Path(__file__).parent / "fake_agents"
CLIS = ["claude", "gemini", "codex"]
PASS_ENV = {
    "claude": ["ANTHROPIC_API_KEY"],
    "gemini": ["GEMINI_API_KEY", "GOOGLE_API_KEY"],
    "codex": ["OPENAI_API_KEY", "CODEX_HOME"],
}
MODELS = {"claude": "sonnet", "gemini": "gemini-2.5-pro", "codex": "gpt-5-codex"}
# Hypervisor's own secrets, set in the worker's environment: no agent may see them.
SECRETS = {
    "SECRET_KEY": "hypervisor-secret-key-value-123",
    "HUEY_REDIS_URL": "redis://:redis-password-456@127.0.0.1:6379/9",
}


def shipped_profile(cli: str, ledger: Path, **fields) -> Profile:
    """The profile as the data migration ships it, plus the fake's ledger in its env."""
    values = {
        "processor": "command",
        "command": [],
        "adapter": cli,
        "model": MODELS[cli],
        "prompt_file": "prompts/worker.md",
        "timeout_seconds": 60,
        "pass_env": PASS_ENV[cli],
        "env": {"FAKE_AGENT_LEDGER": str(ledger)},
        **fields,
    }
    return Profile.objects.update_or_create(name=cli, defaults=values)[0]


@pytest.fixture
def agent_env(process_env) -> dict[str, str]:
    """A worker's environment with the fakes first on PATH and secrets the agents must
    not see (the database URL is one already)."""
    return {
        **process_env,
        **SECRETS,
        "PATH": f"{FAKES}{os.pathsep}{os.environ['PATH']}",
        "ANTHROPIC_API_KEY": "sk-ant-test-key-789",
        "HYPERVISOR_AGENT_GRACE": "1",
    }


@pytest.fixture
def ledger(tmp_path) -> Path:
    return tmp_path / "ledger.jsonl"


def read_ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def task_files(write_task, queue: str, scenarios: list[str]) -> list[Task]:
    Queue.objects.get_or_create(name=queue)
    tasks = []
    for i, scenario in enumerate(scenarios):
        key = f"{queue}-{i}"
        text = f"---\nid: {key}\ntitle: Task {i}\n" + (f"fake: {scenario}\n" if scenario else "")
        path = write_task(f"{queue}/{key}.md", text + "---\nDo the thing.\n")
        tasks.append(
            Task.objects.create(queue=queue, key=key, title=f"Task {i}", source_path=str(path))
        )
    return tasks


def work(env, queue: str, profile: str, *extra: str, timeout: float = 120):
    result = run_manage(
        ["work", "--queue", queue, "--profile", profile, "--json", *extra], env, timeout=timeout
    )
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert summaries, result.stderr + result.stdout
    return result, summaries[-1]


@pytest.mark.parametrize("cli", CLIS)
def test_shipped_profile_records_the_tokens_cost_and_session_each_agent_printed(
    cli, agent_env, ledger, write_task
):
    shipped_profile(cli, ledger)
    tasks = task_files(write_task, f"q{cli}", ["", "", ""])

    result, summary = work(agent_env, f"q{cli}", cli)

    assert result.returncode == 0, result.stderr
    printed = {r["key"]: r for r in read_ledger(ledger)}
    assert set(printed) == {t.key for t in tasks}
    for task in tasks:
        task.refresh_from_db()
        assert task.status == Status.DONE, task.reason
        assert task.tokens == printed[task.key]["tokens"] > 0
        assert task.result["session_id"] == printed[task.key]["session_id"]
        assert task.result["agent"] == cli and task.result["skipped_events"] >= 1
        if cli == "claude":
            assert task.cost_usd == Decimal(printed[task.key]["cost_usd"])
            assert task.result["resume"] == f"claude --resume {task.result['session_id']}"
        else:
            assert task.cost_usd is None
    assert summary["tokens"] == sum(r["tokens"] for r in printed.values())
    # The prompt went in as one argument after `--` (or as --prompt=…), never an option.
    args = next(iter(printed.values()))["args"]
    prompt = args[-1].removeprefix("--prompt=")
    assert "COMPLETED: " in prompt and "qclaude-0" in prompt if cli == "claude" else True


@pytest.mark.parametrize("cli", CLIS)
def test_shipped_profiles_agents_see_none_of_hypervisors_secrets(
    cli, agent_env, ledger, write_task
):
    shipped_profile(cli, ledger)
    task_files(write_task, f"s{cli}", [""])
    work(agent_env, f"s{cli}", cli)
    (seen,) = read_ledger(ledger)
    assert not {"SECRET_KEY", "DATABASE_URL", "HUEY_REDIS_URL"} & set(seen["env"])
    values = "\n".join(seen["env_values"])
    for secret in [*SECRETS.values(), agent_env["DATABASE_URL"], "redis-password-456"]:
        assert secret not in values
    assert ("ANTHROPIC_API_KEY" in seen["env"]) == (cli == "claude")
    assert "FAKE_AGENT_LEDGER" in seen["env"]  # the profile's own env does reach it


def test_claude_verbose_json_array_output_is_read(agent_env, ledger, write_task):
    shipped_profile("claude", ledger, extra_args=["--output-format", "json", "--verbose"])
    (task,) = task_files(write_task, "arr", [""])
    work(agent_env, "arr", "claude")
    task.refresh_from_db()
    (printed,) = read_ledger(ledger)
    assert "--verbose" in printed["args"] and printed["args"].count("--output-format") == 1
    assert (task.status, task.tokens) == (Status.DONE, printed["tokens"])
    assert task.cost_usd == Decimal(printed["cost_usd"])


def test_gemini_pretty_json_and_its_stderr_quota_error(agent_env, ledger, write_task):
    shipped_profile("gemini", ledger, extra_args=["--output-format", "json"])
    done, limited = task_files(write_task, "gj", ["", "quota"])
    work(agent_env, "gj", "gemini")
    done.refresh_from_db()
    limited.refresh_from_db()
    printed = {r["key"]: r for r in read_ledger(ledger)}
    assert (done.status, done.tokens) == (Status.DONE, printed[done.key]["tokens"])
    assert limited.status == Status.QUEUED and limited.attempts == 0
    assert "exhausted your daily quota" in limited.reason and limited.result["quota"]


@pytest.mark.parametrize("cli", CLIS)
def test_a_stream_cut_mid_line_blocks_the_task_and_keeps_the_worker(
    cli, agent_env, ledger, write_task
):
    shipped_profile(cli, ledger)
    cut, after = task_files(write_task, f"t{cli}", ["truncate", ""])
    result, summary = work(agent_env, f"t{cli}", cli)
    assert result.returncode == 0 and summary["done"] == 1 and summary["blocked"] == 1
    cut.refresh_from_db()
    assert cut.status == Status.BLOCKED and "SIGKILL" in cut.reason
    assert cut.result["session_id"]
    after.refresh_from_db()
    assert after.status == Status.DONE


@pytest.mark.parametrize("cli", CLIS)
def test_a_hung_agent_ends_within_timeout_and_grace_with_nothing_left(
    cli, agent_env, ledger, write_task
):
    shipped_profile(cli, ledger)
    (task,) = task_files(write_task, f"h{cli}", ["hang"])
    started = time.monotonic()
    result, _ = work(agent_env, f"h{cli}", cli, "--timeout", "2")
    took = time.monotonic() - started
    task.refresh_from_db()
    assert (task.status, task.outcome) == (Status.BLOCKED, "timed_out"), task.reason
    # 2 s of timeout, 1 s of grace (twice: SIGTERM, then SIGKILL), the worker's start-up.
    assert took < 2 + 2 * 1 + 10
    (record,) = [r for r in read_ledger(ledger) if "children" in r]
    survivors = []
    for process in psutil.process_iter(["pid", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead, waiting for init to collect it
        try:
            if os.getpgid(process.pid) == record["pgid"] or process.pid in record["children"]:
                survivors.append((process.pid, process.info["status"], process.cmdline()))
        except (psutil.Error, OSError):
            continue
    assert survivors == []


def test_max_turns_auth_and_untrusted_folder_block_with_plain_reasons(
    agent_env, ledger, write_task
):
    shipped_profile("claude", ledger, max_turns=3)
    (turns,) = task_files(write_task, "mt", ["max_turns"])
    work(agent_env, "mt", "claude")
    turns.refresh_from_db()
    assert turns.status == Status.BLOCKED and "maximum number of turns" in turns.reason
    args = read_ledger(ledger)[0]["args"]
    assert args[args.index("--max-turns") + 1] == "3"

    shipped_profile("gemini", ledger)
    auth, untrusted = task_files(write_task, "ga", ["auth", "untrusted"])
    work(agent_env, "ga", "gemini")
    auth.refresh_from_db()
    untrusted.refresh_from_db()
    assert auth.status == Status.BLOCKED and "authentication failed" in auth.reason
    assert untrusted.status == Status.BLOCKED and "untrusted folder" in untrusted.reason


def test_a_missing_cli_stops_the_worker_before_it_claims(process_env, ledger, write_task):
    """It blocked every task of the queue in turn, for the same reason: a typo in a command
    (`claud`) put a whole inbox in the blocked column."""
    shipped_profile("codex", ledger)
    tasks = task_files(write_task, "nocli", ["", ""])
    env = {**process_env, "PATH": "/usr/bin:/bin"}
    result = run_manage(["work", "--queue", "nocli", "--profile", "codex"], env)
    assert result.returncode == 1
    assert "codex is not on the workers' PATH: no task was claimed" in result.stderr
    result = run_manage(["work", "--queue", "nocli", "--processor", "command", "--", "claud"], env)
    assert "claud is not on the workers' PATH: no task was claimed" in result.stderr
    assert {t.status for t in Task.objects.filter(pk__in=[t.pk for t in tasks])} == {"queued"}
    assert not TaskEvent.objects.filter(kind=EventKind.CLAIMED).exists()
    # A program gone after the worker started still blocks its task, with a plain reason.
    processor = CommandProcessor(adapter="codex", env={"PATH": "/nonexistent"})
    worker = Worker("nocli", processor)
    [claim] = claims.claim_ready_tasks("nocli", worker.identity, worker.owner_file, 1)
    outcome = processor.process(claim, worker.context)
    worker.finish([(claim, outcome)])
    assert outcome.status == Status.BLOCKED
    assert outcome.reason == "codex is not installed here (not found on the worker's PATH)"


def test_a_command_whose_place_depends_on_the_task_is_not_judged_before_it_runs():
    for argv in (["{path}"], ["./run.sh"], ["bin/agent"], ["{python}", "x.py"], ["true"]):
        assert CommandProcessor(argv).missing_program() == "", argv
    assert CommandProcessor(["/no/such/agent"]).missing_program() == (
        "/no/such/agent does not exist"
    )


def test_blocked_line_in_the_final_message_gives_reason_and_next(agent_env, ledger, write_task):
    shipped_profile("claude", ledger)
    (task,) = task_files(write_task, "bl", ["blocked"])
    work(agent_env, "bl", "claude")
    task.refresh_from_db()
    assert (task.status, task.reason, task.next_step) == (
        Status.BLOCKED,
        "needs a decision",
        "ask the owner",
    )
    assert task.tokens > 0 and task.cost_usd > 0  # spent all the same


def test_queue_stats_totals_tokens_and_cost_per_queue(agent_env, ledger, write_task, capsys):
    shipped_profile("claude", ledger)
    task_files(write_task, "st", ["", ""])
    work(agent_env, "st", "claude")
    printed = read_ledger(ledger)
    result = run_manage(["queue_stats", "--queue", "st", "--json"], agent_env)
    stats = json.loads(result.stdout)
    assert stats["usage"]["st"]["tokens"] == sum(r["tokens"] for r in printed)
    assert Decimal(str(stats["usage"]["st"]["cost_usd"])) == sum(
        Decimal(r["cost_usd"]) for r in printed
    )
    assert stats["total_tokens"] == stats["usage"]["st"]["tokens"]


# Herds: the quota ends the herd, and the summary adds up what the agents printed.


def launch_and_wait(env, queue: str, profile: str, *extra: str) -> dict:
    result = run_manage(
        ["herd", "--queue", queue, "--profile", profile, "--wait", "--json", *extra],
        env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def agent_huey_env(huey_env) -> dict[str, str]:
    return {
        **huey_env,
        **SECRETS,
        "PATH": f"{FAKES}{os.pathsep}{os.environ['PATH']}",
        "HYPERVISOR_AGENT_GRACE": "1",
    }


@pytest.fixture
def agent_consumer(agent_huey_env, tmp_path):
    from tests.conftest import start_manage

    log_path = tmp_path / "consumer.log"
    with open(log_path, "w") as log:
        proc = start_manage(["run_huey"], agent_huey_env, stdout=log, stderr=log)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except Exception:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("cli", CLIS)
def test_herd_summary_totals_equal_what_the_agents_printed(
    cli, agent_huey_env, agent_consumer, ledger, write_task
):
    shipped_profile(cli, ledger)
    task_files(write_task, f"hs{cli}", ["", "", "", "", ""])

    summary = launch_and_wait(agent_huey_env, f"hs{cli}", cli, "--workers", "2")

    printed = {r["key"]: r for r in read_ledger(ledger)}
    assert summary["status"] == "finished" and summary["done"] == 5
    assert summary["total_tokens"] == sum(r["tokens"] for r in printed.values())
    rows = {r["task_id"]: r for r in summary["workers"]}
    for key, record in printed.items():
        assert rows[key]["tokens"] == record["tokens"]
        assert rows[key]["session_id"] == record["session_id"]
    if cli == "claude":
        expected = sum(Decimal(r["cost_usd"]) for r in printed.values())
        assert Decimal(str(summary["total_cost_usd"])) == expected
        assert sum(Decimal(str(w["cost_usd"])) for w in summary["worker_processes"]) == expected
    assert sum(w["tokens"] for w in summary["worker_processes"]) == summary["total_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("cli", CLIS)
def test_quota_from_each_cli_leaves_the_task_queued_and_ends_the_herd_quota(
    cli, agent_huey_env, agent_consumer, ledger, write_task
):
    shipped_profile(cli, ledger)
    tasks = task_files(write_task, f"qq{cli}", ["quota"] * 4)

    summary = launch_and_wait(agent_huey_env, f"qq{cli}", cli, "--workers", "2")

    herd = Herd.objects.get(pk=summary["herd"])
    assert herd.status == HerdStatus.QUOTA == summary["status"]
    assert "quota or rate limit reached" in herd.reason
    for task in tasks:
        task.refresh_from_db()
        assert task.status == Status.QUEUED and task.attempts == 0
    given_back = TaskEvent.objects.filter(task__queue=f"qq{cli}", kind=EventKind.RELEASED)
    assert given_back.exists() and all(e.data.get("quota") for e in given_back)
    # The herd stopped claiming: no more claims than workers.
    assert TaskEvent.objects.filter(task__queue=f"qq{cli}", kind=EventKind.CLAIMED).count() <= 2
    if cli == "claude":  # its rate_limit_event said when: about an hour from now
        left = (herd.quota_resets_at - herd.finished_at).total_seconds()
        assert 3000 < left < 3700
    elif cli == "codex":  # "Try again at 3:28 PM.", the workers' local time
        resets = herd.quota_resets_at.astimezone()
        assert (resets.hour, resets.minute) == (15, 28)
    else:  # Gemini's message gives no time: none is made up
        assert herd.quota_resets_at is None


@pytest.mark.slow
def test_resume_after_quota_launches_the_same_herd_after_the_backoff(
    agent_huey_env, tmp_path, ledger, write_task
):
    from tests.conftest import start_manage

    env = {**agent_huey_env, "HYPERVISOR_QUOTA_BACKOFF": "2"}
    shipped_profile("gemini", ledger)  # Gemini's quota message gives no reset time
    (task,) = task_files(write_task, "rq", ["quota"])
    with open(tmp_path / "consumer.log", "w") as log:
        consumer = start_manage(["run_huey"], env, stdout=log, stderr=log)
    try:
        summary = launch_and_wait(env, "rq", "gemini", "--workers", "1", "--resume-after-quota")
        first = Herd.objects.get(pk=summary["herd"])
        assert first.status == HerdStatus.QUOTA
        # The limit lifts: the task file now lets the fake agent finish.
        Path(task.source_path).write_text("---\nid: rq-0\ntitle: Task 0\n---\nDo it.\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            second = Herd.objects.filter(resumed_from=first).first()
            if second is not None and second.ended:
                break
            time.sleep(0.2)
        first.refresh_from_db()
        assert first.resume_at is not None
        assert second is not None and second.status == HerdStatus.FINISHED, second
        assert (second.queue, second.size, second.profile_id) == ("rq", 1, first.profile_id)
        task.refresh_from_db()
        assert task.status == Status.DONE
    finally:
        consumer.terminate()
        consumer.wait(timeout=15)


@pytest.mark.django_db
def test_a_herd_whose_cli_is_missing_does_not_start_and_says_why(monkeypatch, ledger):
    from herds import supervision

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    profile = shipped_profile("claude", ledger)
    Task.objects.create(queue="miss", key="m1")
    herd = Herd.objects.create(queue="miss", profile=profile, size=2)
    supervision.launch(herd.pk)
    herd.refresh_from_db()
    assert herd.status == HerdStatus.FAILED
    assert herd.reason == "launch failed: claude is not on the workers' PATH"
    assert not herd.workers.exists()


@pytest.mark.django_db
def test_a_herd_of_any_command_not_on_the_path_does_not_start(monkeypatch):
    from herds import supervision

    typo = Profile.objects.create(name="typo", processor="command", command=["claud", "{path}"])
    Task.objects.create(queue="miss", key="m1")
    herd = Herd.objects.create(queue="miss", profile=typo, size=2)
    supervision.launch(herd.pk)
    herd.refresh_from_db()
    assert (herd.status, herd.reason) == (
        HerdStatus.FAILED,
        "launch failed: claud is not on the workers' PATH",
    )
    assert not herd.workers.exists()
    assert Task.objects.get(key="m1").status == Status.QUEUED
    # Found, a command is not asked for its --version (it could do anything).
    assert Profile(name="ok", processor="command", command=["true"]).agent_check() is None


@pytest.mark.django_db
def test_preflight_records_the_cli_version(monkeypatch, ledger):
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    profile = shipped_profile("gemini", ledger)
    herd = Herd(queue="v", profile=profile, size=1)
    agent = herd.compute_preflight()["agent"]
    assert agent == {
        "program": "gemini",
        "path": str(FAKES / "gemini"),
        "version": "gemini fake 1.0",
    }


@pytest.mark.django_db
def test_fresh_database_has_the_three_agent_profiles():
    profiles = {p.name: p for p in Profile.objects.all()}
    assert {"noop", "example-agent", "claude", "gemini", "codex"} <= set(profiles)
    for name in CLIS:
        profile = profiles[name]
        assert profile.adapter == AdapterKind(name) and profile.command == []
        assert profile.pass_env == PASS_ENV[name] and profile.model == MODELS[name]
        assert profile.prompt_file == "prompts/worker.md" and profile.timeout_seconds
        profile.full_clean()  # what the migration made passes the model's own checks
        processor = profile.build_processor()
        assert "COMPLETED: {key}" in processor.prompt and "BLOCKED: {key}" in processor.prompt


@pytest.mark.django_db
def test_a_profile_can_point_at_its_own_prompt_file(tmp_path, ledger):
    prompt = tmp_path / "mine.md"
    prompt.write_text("Only {key}, titled {title}.")
    profile = shipped_profile("codex", ledger, prompt_file=str(prompt))
    processor = profile.build_processor()
    from workqueue.claims import Claim

    claim = Claim(1, "q", "k-1", "--rm -rf {path}", "/tmp/x.md", 1)
    args = processor.arguments(claim)
    # The title is inside the one prompt argument, after `--`, and filled in one pass.
    assert args[-2:] == ["--", "Only k-1, titled --rm -rf {path}."]
    bad = Profile(name="bad", processor="command", adapter="claude", prompt_file="nope.md")
    with pytest.raises(Exception, match="prompt file .*nope.md"):
        bad.save()


@pytest.mark.django_db
@pytest.mark.parametrize("cli", ["gemini", "codex"])
def test_limits_a_cli_does_not_have_are_refused(cli):
    profile = Profile(
        name=f"{cli}-limited",
        processor="command",
        adapter=cli,
        max_turns=5,
        max_budget_usd=Decimal("1"),
    )
    with pytest.raises(Exception) as caught:
        profile.save()
    assert {"max_turns", "max_budget_usd"} <= set(caught.value.message_dict)
    assert ("maxSessionTurns" in str(caught.value)) == (cli == "gemini")


def test_command_line_options_never_leak_the_profile(capsys):
    # `work --profile` refuses a second source of truth.
    with pytest.raises(Exception, match="--profile brings its own processor"):
        call_command("work", "--queue", "q", "--profile", "claude", "--processor", "noop")


def test_hypervisors_own_secrets_cannot_be_passed_to_an_agent(process_env):
    """A profile editor (staff, not a superuser) could pass SECRET_KEY or DATABASE_URL to
    every agent of the profile, though the README says they never reach one."""
    profile = Profile(name="leaky", processor="command", command=["true"])
    profile.pass_env = ["GITHUB_TOKEN", "DATABASE_URL", "SECRET_KEY"]
    with pytest.raises(ValidationError) as refused:
        profile.full_clean()
    assert refused.value.message_dict["pass_env"] == [
        "DATABASE_URL, SECRET_KEY: Hypervisor's own secrets never reach an agent"
    ]
    result = run_manage(
        ["work", "--queue", "q", "--processor", "command", "--pass-env", "HUEY_REDIS_URL",
         "--", "true"],
        process_env,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--pass-env HUEY_REDIS_URL: Hypervisor's own secrets never reach an agent" in (
        result.stderr
    )
