"""README.md's MCP configs for Claude Code, Gemini CLI and Codex, written where each real
CLI reads them and run with README's unattended commands and the pull-worker prompt,
against stand-ins of their vendors' APIs (tests/vendor_stubs in "pull" mode: claim,
complete, claim again, until QUEUE EMPTY).

Two ways: `manage.py mcp` over stdio, started by the CLI itself from its config ("Adding
the server to an agent"), and /mcp/ on a live web server with an API token ("Over HTTP,
with tokens"). Everything is read from README.md; only the example's paths, database,
queue, address and token are replaced by the test's, so a README that stops working
fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pull_api.models import ApiToken
from tests import test_real_agents as real
from tests.conftest import MANAGE, ROOT
from tests.test_agent_profiles import task_files
from tests.test_mcp_http import person
from tests.test_real_pull_agents import API_KEYS, CLAIM_TOOL, assert_each_done_once, claim_tools
from workqueue import locks
from workqueue.models import EventKind, Status, TaskEvent
from workqueue.pull_agent import pull_prompt

pytestmark = pytest.mark.slow
STUBS, stub_env, installed = real.STUBS, real.stub_env, real.installed
EXAMPLE = {
    "/srv/hypervisor/.venv/bin/python": sys.executable,
    "/srv/hypervisor/manage.py": MANAGE,
    "/srv/hypervisor/prompts/": str(ROOT / "prompts") + "/",
}
EXAMPLE_URL = "https://hypervisor.example.com/mcp/?queue=inbox"


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(f"### {title}") :]
    return section[: section.index("\n### ", 1)]


def blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


STDIO = readme_section("Adding the server to an agent")
HTTP = readme_section("Over HTTP, with tokens")


def stdio_config(form: str) -> str:
    """`claude mcp add …` (given inline), or the config file of a CLI."""
    if form == "claude-add":
        return " ".join(re.search(r"`(claude mcp add hypervisor -- [^`]+)`", STDIO)[1].split())
    form = form.removesuffix("-project")
    (claude, gemini), (codex,) = blocks(STDIO, "json"), blocks(STDIO, "toml")
    return {"claude": claude, "gemini": gemini, "codex": codex}[form]


def http_config(form: str) -> str:
    (add,), (claude, gemini), (codex,) = (blocks(HTTP, lang) for lang in ("sh", "json", "toml"))
    return {"claude-add": add, "claude": claude, "gemini": gemini, "codex": codex}[form]


def run_commands(queue: str) -> dict[str, tuple[dict[str, str], list[str]]]:
    """README's unattended command for each CLI (the environment it sets, its argv),
    with its prompt line run as written."""
    (script,) = blocks(STDIO, "sh")
    for path, here in EXAMPLE.items():
        script = script.replace(path, here)
    prompt_line, *lines = script.replace("inbox", queue).splitlines()
    prompt = subprocess.run(
        ["bash", "-c", prompt_line + '\nprintf %s "$prompt"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert prompt == pull_prompt(queue).rstrip("\n")
    lines = [line.replace('"$prompt"', shlex.quote(prompt)) for line in lines]
    commands = [with_env(shlex.split(line, comments=True)) for line in lines]
    return {argv[0]: (env, argv) for env, argv in commands}


def with_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """A shell command's leading NAME=value words (its environment), and its argv."""
    n = next(i for i, word in enumerate(words) if not re.fullmatch(r"[A-Z_]+=.*", word))
    return dict(word.split("=", 1) for word in words[:n]), words[n:]


def cli_env(cli: str, stub, home: Path) -> dict[str, str]:
    """The CLI's environment: none of Hypervisor's settings, the stand-in's address and
    key, a scratch HOME."""
    own = ("DATABASE_URL", "HYPERVISOR_", "SECRET_KEY", "HUEY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env["PATH"] = f"{real.BIN}{os.pathsep}{env['PATH']}"
    env[API_KEYS[cli]] = "stand-in-key"
    env.update(stub_env(cli, stub, home))
    if cli == "codex":
        # A model offered MCP tools as functions, as in test_real_pull_agents.
        config = Path(env["CODEX_HOME"], "config.toml")
        config.write_text('model = "gpt-5-codex"\n' + config.read_text())
    return env


def install(form: str, config: str, env: dict[str, str], project: Path) -> None:
    """Put `config` where the CLI reads it: Claude Code's project `.mcp.json` or what
    `claude mcp add` (run in the project) writes, Gemini's user settings, Codex's."""
    if form == "claude-add":
        argv = shlex.split(config.replace("\\\n", " "))
        added = subprocess.run(argv, env=env, cwd=project, capture_output=True, text=True)
        assert added.returncode == 0, added.stderr + added.stdout
    elif form == "claude":
        (project / ".mcp.json").write_text(config)
    elif form == "gemini-project":
        (project / ".gemini").mkdir()
        (project / ".gemini" / "settings.json").write_text(config)
    elif form == "gemini":
        path = Path(env["HOME"], ".gemini", "settings.json")
        path.write_text(json.dumps(json.loads(path.read_text()) | json.loads(config)))
    else:
        path = Path(env["CODEX_HOME"], "config.toml")
        path.write_text(path.read_text() + config)


def run_cli(form: str, config: str, queue: str, tmp_path, write_task, extra_env=None):
    """Install `config`, run the CLI as README says: its stand-in, result and tasks."""
    cli = form.split("-")[0]
    project = tmp_path / "project"
    project.mkdir()
    with STUBS[cli]() as stub:
        stub.mode = "pull"
        env = cli_env(cli, stub, tmp_path / "home") | (extra_env or {})
        install(form, config, env, project)
        tasks = task_files(write_task, queue, ["", ""])
        command_env, argv = run_commands(queue)[cli]
        result = subprocess.run(
            argv,
            env=env | command_env,
            cwd=project,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
    return stub, result, tasks


def drain(form: str, config: str, queue: str, tmp_path, write_task, extra_env=None):
    """The CLI run with `config` did every task once; the tasks."""
    cli = form.split("-")[0]
    stub, result, tasks = run_cli(form, config, queue, tmp_path, write_task, extra_env)
    names = claim_tools(cli, stub)
    assert result.returncode == 0, (result.stderr[-3000:], result.stdout[-3000:], names)
    assert names == [CLAIM_TOOL[cli]], (result.stderr[-3000:], names)
    assert stub.ended_with == "QUEUE EMPTY", (stub.ended_with, result.stderr[-3000:])
    assert_each_done_once(tasks)
    return tasks


def claimed_by(tasks) -> set[str]:
    events = TaskEvent.objects.filter(task__in=tasks, kind=EventKind.CLAIMED)
    return set(events.values_list("actor", flat=True))


def local_config(form: str, queue: str, process_env) -> str:
    """README's stdio config for `form` with the test's paths, database and queue."""
    config = stdio_config(form)
    for path, here in EXAMPLE.items():
        config = config.replace(path, here)
    return (
        config.replace("postgres://hypervisor@db/hypervisor", process_env["DATABASE_URL"])
        .replace("/srv/hypervisor/var", process_env["HYPERVISOR_DATA_DIR"])
        .replace("inbox", queue)
    )


@pytest.mark.parametrize("form", ["claude", "claude-add", "gemini", "gemini-project", "codex"])
def test_readme_stdio_config_drains_the_queue_with_the_real_cli(
    form, process_env, settings, tmp_path, write_task
):
    queue = f"s{form}".replace("-", "")
    config = local_config(form, queue, process_env)
    name = re.search(r'--name"?,? "?([\w-]+)', config)[1]
    # README: Claude Code's config gives no env, its own environment has the settings;
    # Gemini's and Codex's never reach the server, so theirs are left without.
    own = {k: process_env[k] for k in ("DATABASE_URL", "HYPERVISOR_DATA_DIR")}
    tasks = drain(form, config, queue, tmp_path, write_task, own if "claude" in form else None)
    assert claimed_by(tasks) == {f"mcp:{name}"}
    # The server's locks, under the data folder's default lock root, all released.
    settings.HYPERVISOR_LOCK_ROOT = Path(process_env["HYPERVISOR_DATA_DIR"]) / "locks"
    assert not locks.list_locks(queue)


@pytest.mark.parametrize("cli", ["gemini", "codex"])
def test_gemini_and_codex_never_pass_their_database_url_to_the_server(
    cli, process_env, tmp_path, write_task
):
    """README: with them every setting goes in the config's `env`. Here DATABASE_URL is
    in the CLI's environment alone: the server opens the data folder's default SQLite,
    never migrated, and the test database's tasks are not touched."""
    queue = f"n{cli}"
    config = local_config(cli, queue, process_env)
    url = process_env["DATABASE_URL"]
    if cli == "gemini":
        data = json.loads(config)
        del data["mcpServers"]["hypervisor"]["env"]["DATABASE_URL"]
        config = json.dumps(data)
    else:
        config = config.replace(f'DATABASE_URL = "{url}", ', "")
    assert url not in config
    stub, _, tasks = run_cli(cli, config, queue, tmp_path, write_task, {"DATABASE_URL": url})
    for task in tasks:
        task.refresh_from_db()
        assert (task.status, task.attempts) == (Status.QUEUED, 0)
    assert not TaskEvent.objects.filter(task__in=tasks).exists()
    # The server refused that database and never came up: no tools were offered.
    assert claim_tools(cli, stub) == []


@pytest.mark.parametrize("required", [True, False], ids=["as-the-readme", "not-required"])
def test_codex_waits_for_a_stdio_server_slow_to_start_only_when_it_is_required(
    required, process_env, tmp_path, write_task
):
    """Codex leaves out of its model's tools, without a word, a server not marked
    `required` that has not answered within a second of its start, as `manage.py mcp`
    may not on a busy machine (it failed CI so). README's config marks it required."""
    slow = tmp_path / "slow_start.py"
    slow.write_text(
        "import os, sys, time\ntime.sleep(3)\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    queue = "sslow" if required else "sfast"
    config = local_config("codex", queue, process_env).replace('args = ["', f'args = ["{slow}", "')
    if required:
        drain("codex", config, queue, tmp_path, write_task)
        return
    config = config.replace("\nrequired = true", "\n")
    stub, _, tasks = run_cli("codex", config, queue, tmp_path, write_task)
    assert claim_tools("codex", stub) == []
    assert not TaskEvent.objects.filter(task__in=tasks, kind=EventKind.CLAIMED).exists()


@pytest.mark.parametrize("form", ["claude", "claude-add", "gemini", "codex"])
def test_readme_http_config_drains_the_queue_with_the_real_cli(
    form, live_server, process_env, tmp_path, write_task
):
    queue = f"h{form}".replace("-", "")
    _, secret = ApiToken.issue(person("alice", "view_task", "change_task"), form)
    url = f"{live_server.url}/mcp/?queue={queue}"
    config = http_config(form).replace(EXAMPLE_URL, url).replace("hv_…", secret)
    # Codex reads the token from the variable its config names.
    token_env = {"HYPERVISOR_TOKEN": secret} if form == "codex" else None
    tasks = drain(form, config, queue, tmp_path, write_task, token_env)
    assert claimed_by(tasks) == {f"mcp:alice/{form}"}
    assert not locks.list_locks(queue)
