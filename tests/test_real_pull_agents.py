"""The real agent CLIs as pull workers, with the commands README.md documents, against
local stand-ins of their vendors' APIs scripted to work the queue over our MCP tools:
claim, complete with a summary, claim again, until QUEUE EMPTY.

What the stand-in was offered and answered is all the CLI did: each task done once with
the stand-in's summary on it means the CLI found our server with the generated config,
called its tools without asking anyone, and passed the results back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herds.models import ExitClass, Profile
from tests import test_real_agents as real
from tests.conftest import ROOT, run_manage
from tests.test_agent_profiles import task_files, work
from tests.test_herds_processes import worker_logs
from tests.vendor_stubs import anthropic, gemini, openai
from tests.vendor_stubs.base import CLAIM, PULL_SUMMARY
from tests.vendor_stubs.openai import OpenAIStub
from workqueue.models import EventKind, Status, Task, TaskEvent

pytestmark = pytest.mark.slow
STUBS, stub_env = real.STUBS, real.stub_env
# The fixtures, used here too.
installed, worker_env, cli_consumer = real.installed, real.worker_env, real.cli_consumer


def readme_commands() -> dict[str, list[str]]:
    """The pull profiles' commands for the real CLIs, as README.md documents them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Herds of pulling agents") :]
    section = section[: section.index("\n### ", 1)]
    lines = [line for line in section.splitlines() if line.startswith('["')]
    return {json.loads(line)[0]: json.loads(line) for line in lines}


COMMANDS = readme_commands()
API_KEYS = {"claude": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY", "codex": "OPENAI_API_KEY"}
CODEX_MODEL = "gpt-5-codex"
SECRET_KEY = "pull-test-secret-key-never-for-agents"


# What each CLI calls our claim_next_task: Claude Code lists it by name only until its
# ToolSearch loads it; Codex offers it in a namespace `mcp__hypervisor`.
CLAIM_TOOL = {
    "claude": "mcp__hypervisor__claim_next_task",
    "gemini": "mcp_hypervisor_claim_next_task",
    "codex": "mcp__hypervisor__claim_next_task",
}
# The tool names each CLI offers its model, read from what it sent the stand-in.
OFFERED = {
    "claude": anthropic.tool_names,
    "gemini": lambda body: gemini.function_names(body.get("tools")),
    "codex": openai.function_names,
}


def pull_profile(cli: str, stub, home: Path, codex_model: str | None = CODEX_MODEL) -> str:
    """A pull profile with the README's command for `cli`, pointed at the stand-in."""
    env = stub_env(cli, stub, home)
    if cli == "codex" and codex_model:
        # The user's default model, in their config (the command names none): one that is
        # offered MCP tools as functions (newer ones reach them through code mode).
        config = Path(env["CODEX_HOME"], "config.toml")
        config.write_text(f'model = "{codex_model}"\n' + config.read_text())
    values = {
        "processor": "pull",
        "command": COMMANDS[cli],
        "timeout_seconds": 200,
        "pass_env": [API_KEYS[cli]],
        "env": env,
    }
    return Profile.objects.update_or_create(name=f"pull-{cli}", defaults=values)[0].name


def claim_tools(cli: str, stub) -> list[str]:
    bodies = [r["body"] for r in stub.requests if r["body"]]
    return sorted({n for body in bodies for n in OFFERED[cli](body) if n.endswith(CLAIM)})


def assert_each_done_once(tasks: list[Task]) -> None:
    for task in tasks:
        task.refresh_from_db()
        assert (task.status, task.attempts) == (Status.DONE, 1), (task.reason, task.result)
        assert task.result["summary"] == PULL_SUMMARY.format(key=task.key)
        kinds = list(TaskEvent.objects.filter(task=task).values_list("kind", flat=True))
        assert kinds.count(EventKind.CLAIMED) == 1 and kinds.count(EventKind.DONE) == 1, kinds
    assert not Task.objects.filter(status=Status.CLAIMED).exists()


@pytest.mark.parametrize("cli", list(STUBS))
def test_real_cli_pull_worker_drains_the_queue_each_task_once(
    cli, worker_env, tmp_path, write_task
):
    with STUBS[cli]() as stub:
        stub.mode = "pull"
        profile = pull_profile(cli, stub, tmp_path / "home")
        tasks = task_files(write_task, f"p{cli}", ["", "", ""])
        env = {**worker_env, "SECRET_KEY": SECRET_KEY}
        result, summary = work(env, f"p{cli}", profile, timeout=300)

    names = claim_tools(cli, stub)
    assert result.returncode == 0, (result.stderr[-3000:], result.stdout[-3000:], names)
    assert names == [CLAIM_TOOL[cli]]
    assert summary["done"] == 3 and summary["claimed"] == 3, summary
    assert_each_done_once(tasks)
    # The stand-in ended the run only on our server's QUEUE EMPTY.
    assert stub.ended_with == "QUEUE EMPTY"
    # Nothing of Hypervisor's own reached the vendor: the agent's env is allow-listed.
    sent = json.dumps(stub.requests)
    assert SECRET_KEY not in sent and worker_env["DATABASE_URL"] not in sent


@pytest.mark.parametrize("cli", list(STUBS))
def test_a_herd_of_two_real_cli_pull_workers_drains_the_queue_each_task_once(
    cli, cli_consumer, tmp_path, write_task
):
    with STUBS[cli]() as stub:
        stub.mode = "pull"
        profile = pull_profile(cli, stub, tmp_path / "home")
        tasks = task_files(write_task, f"h{cli}", ["", "", "", ""])
        result = run_manage(
            ["herd", "--queue", f"h{cli}", "--profile", profile, "--workers", "2"]
            + ["--wait", "--json"],
            cli_consumer,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr + result.stdout + worker_logs()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["status"], summary["done"], summary["blocked"]) == ("finished", 4, 0), (
        summary,
        worker_logs(),
    )
    workers = summary["worker_processes"]
    assert [w["exit_class"] for w in workers] == [ExitClass.FINISHED] * 2, worker_logs()
    assert_each_done_once(tasks)


def test_real_codex_pull_worker_with_its_default_model_in_code_mode(
    worker_env, tmp_path, write_task
):
    """Codex's own default model gets one tool, `exec`, that runs JavaScript calling the
    others (`await tools.<name>(…)`), ours among them though not described."""
    with OpenAIStub() as stub:
        stub.mode = "pull"
        profile = pull_profile("codex", stub, tmp_path / "home", codex_model=None)
        tasks = task_files(write_task, "pcode", ["", ""])
        result, summary = work(worker_env, "pcode", profile, timeout=300)
    assert result.returncode == 0, (result.stderr[-3000:], result.stdout[-3000:])
    assert summary["done"] == 2, (summary, stub.ended_with, result.stderr[-2000:])
    assert_each_done_once(tasks)
    assert stub.ended_with == "QUEUE EMPTY"
    # Through JavaScript, under the name ALL_TOOLS gave it.
    scripts = [
        i["input"] for i in stub.requests[-1]["body"]["input"] if i["type"] == "custom_tool_call"
    ]
    assert sum("tools.mcp__hypervisor__complete_task(" in code for code in scripts) == 2
