"""What a worker does with a claimed task.

Built-ins run in the worker process; `command` runs an agent CLI or a script as an
argument list, never through a shell.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.utils.module_loading import import_string

from workqueue.models import Status
from workqueue.processing import Claim, Processor, Result, WorkContext

# The agent adapters and the process tree load when a CommandProcessor is built or run, not
# here: a worker of a built-in processor (noop, triage) starts without them.
if TYPE_CHECKING:
    from workqueue import agent_tree, agents


def __getattr__(name: str):
    """The generic adapter's conventions, importable from here as before."""
    if name == "GIVE_BACK_EXIT":
        from workqueue.agents.base import GIVE_BACK_EXIT

        return GIVE_BACK_EXIT
    if name == "interpret":
        from workqueue.agents.generic import interpret

        return interpret
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger(__name__)

TAIL_CHARS = 4000
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class NoopProcessor(Processor):
    """Reads the task file and reports success: the baseline for throughput."""

    name = "noop"
    cpu_bound = True

    def process(self, claim: Claim, context: WorkContext) -> Result:
        if claim.path:
            from workqueue.taskfile import TaskFileError, read_regular_file  # loads YAML

            try:
                read_regular_file(claim.path, settings.HYPERVISOR_MAX_FILE_BYTES)
            except (OSError, TaskFileError) as exc:
                return Result(status=Status.BLOCKED, reason=f"cannot read {claim.path}: {exc}")
        return Result(status=Status.DONE, outcome="success")


class CommandProcessor(Processor):
    """Runs an agent CLI or a script per task: its own process group tied to the claim,
    an allow-listed environment, output streamed with bounded memory and masked, and
    read as it streams by the adapter of its CLI (`generic` for any other command)."""

    name = "command"
    finish_in_batches = False

    def __init__(
        self,
        argv: list[str] | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        secrets: list[str] | None = None,
        pass_env: list[str] | None = None,
        adapter: str = "generic",
        options: agents.AgentOptions | None = None,
        prompt_file: str = "",
    ):
        from workqueue import agents

        self.adapter_class = agents.adapter_class(adapter)
        self.generic = adapter == "generic"
        if self.generic and (not argv or not all(isinstance(a, str) for a in argv)):
            raise ValueError("a command is a non-empty list of strings")
        self.argv = list(argv or [])
        self.prompt = "" if self.generic else read_prompt(prompt_file or DEFAULT_PROMPT)
        self.options = options or agents.AgentOptions()
        self.timeout = timeout
        self.env = env or {}
        self.cwd = cwd
        self.secrets = [s for s in (secrets or []) if s]
        self.pass_env = list(pass_env or [])
        self.last_output = ""

    def arguments(
        self, claim: Claim, extra: dict | None = None, adapter: agents.Adapter | None = None
    ) -> list[str]:
        values = {
            **install_values(),
            "path": claim.path,
            "key": claim.key,
            "queue": claim.queue,
            "title": claim.title,
            **(extra or {}),
        }
        if not self.generic:
            # The adapter builds the command line; task values reach it inside the prompt.
            adapter = adapter or self.adapter_class(self.options)
            return adapter.command(fill_placeholders(self.prompt, values))
        return [fill_placeholders(arg, values) for arg in self.argv]

    def missing_program(self) -> str:
        """Why no task of this processor could start: its program is not on the PATH its
        agents get ('' when it is, or when where it is depends on the task or the folder)."""
        from workqueue import agent_tree

        program = self.argv[0] if self.generic else self.adapter_class.program
        program = fill_placeholders(program, install_values())
        if "{" in program or ("/" in program and not program.startswith("/")):
            return ""
        if program_path(program, agent_tree.agent_environment({}, self.env, self.pass_env)):
            return ""
        return not_on_path(program)

    def environment(self, claim: Claim, context: WorkContext) -> dict[str, str]:
        from workqueue import agent_tree

        return agent_tree.agent_environment(
            {
                "HYPERVISOR_TASK_KEY": claim.key,
                "HYPERVISOR_TASK_PATH": claim.path,
                "HYPERVISOR_TASK_QUEUE": claim.queue,
                "HYPERVISOR_TASK_TITLE": claim.title,
                "HYPERVISOR_TASK_FENCE": str(claim.fence),
                "HYPERVISOR_TASK_WORKER": context.worker_name,
                agent_tree.CLAIM_VARIABLE: agent_tree.claim_marker(claim.id, claim.fence),
            },
            self.env,
            self.pass_env,
        )

    def process(
        self, claim: Claim, context: WorkContext, extra: dict | None = None, cwd: str | None = None
    ) -> Result:
        from workqueue import agent_tree, agents

        if blocked := blocked_if_half_merged(claim.path):
            return blocked
        env = self.environment(claim, context)
        mask = agent_tree.Masker(
            [*self.secrets, *agent_tree.known_secrets(env, [*self.pass_env, *self.env])]
        )
        adapter = self.adapter_class(
            self.options, agents.Transcript(transcript_path(claim.id, claim.fence))
        )
        args = self.arguments(claim, extra, adapter)
        run = agent_tree.AgentRun(
            args,
            env,
            cwd or self.cwd,
            self.timeout,
            mask,
            context.ending,
            log_path=agent_log_path(claim),
            on_line=adapter.feed,
        )
        try:
            run.start()
        except OSError as exc:
            return Result(status=Status.BLOCKED, reason=adapter.missing_reason(exc, args[0]))
        try:
            context.agent_started(claim, run.pgid, run.started_at)
        finally:
            ended = run.wait()
        self.last_output = ended.stdout + ended.stderr
        result = self.interpret_exit(ended, claim, context, adapter)
        adapter.transcript.close()
        result.output_tail = (ended.stdout + ("\n" + ended.stderr if ended.stderr else ""))[
            -TAIL_CHARS:
        ]
        result.data.setdefault("seconds", ended.seconds)
        if ended.log_path:
            result.data.setdefault("log", ended.log_path)
        if ended.log_error:
            # The run stands (its tail is kept); the drawer says why its log is short.
            result.reason = "\n".join(filter(None, [result.reason, ended.log_error]))
            log.warning("%s: %s", claim.key, ended.log_error)
        return result

    def interpret_exit(
        self,
        ended: agent_tree.AgentExit,
        claim: Claim,
        context: WorkContext,
        adapter: agents.Adapter | None = None,
    ) -> Result:
        adapter = adapter or self.adapter_class(self.options)
        if ended.survivors:
            # Not requeued: another agent must not start while this one may still work.
            pids = ", ".join(map(str, ended.survivors))
            result = Result(
                status=Status.BLOCKED,
                reason=f"the agent's processes could not be ended (pids {pids})",
            )
        elif ended.stopped or (context.stopping() and _ended_by_the_stop(ended, adapter)):
            # Ended with the worker (a second Ctrl-C) or with the herd (a cancel signals
            # every process of the tree at once): the task is not at fault.
            why = context.why_ending()
            reason = f"agent ended: {why}" if why else "worker stopped"
            result = Result(status=Status.QUEUED, reason=reason, data={"stopped": True})
        elif ended.timed_out:
            adapter.timed_out()
            if adapter.quota or adapter.server_error:  # retrying the vendor's answer
                return adapter.quota_result()
            result = Result(
                status=Status.BLOCKED,
                outcome="timed_out",
                reason=f"timed out after {self.timeout:g} s",
            )
        else:
            return adapter.result(ended.code, ended.stdout, ended.stderr, claim.key)
        adapter.fill(result)
        return result


DEFAULT_PROMPT = "prompts/worker.md"
PROMPT_LIMIT = 64 * 1024


def blocked_if_half_merged(path: str) -> Result | None:
    """A blocked result for a task whose file git left in a merge conflict, or None: an
    agent would work from both sides of it, and its file cannot say the end."""
    from workqueue import taskfile

    line = merge_conflict_line(path)
    if not line:
        return None
    reason = f"its file has an {taskfile.conflict_reason(line)}: resolve it, then requeue"
    return Result(status=Status.BLOCKED, reason=reason)


def merge_conflict_line(path: str) -> int:
    """Where git left a merge conflict in a task's file (taskfile.merge_conflict), or 0."""
    from workqueue import taskfile  # YAML with it: not for a worker that runs no command

    if not path:
        return 0
    try:
        raw, _ = taskfile.read_regular_file(path, settings.HYPERVISOR_MAX_FILE_BYTES)
    except (OSError, taskfile.TaskFileError):
        return 0  # the agent meets what cannot be read, as it always has
    return taskfile.merge_conflict(raw.decode("utf-8", "replace"))


def program_path(program: str, agent_env: dict[str, str]) -> str | None:
    """Where `program` is on the PATH of `agent_env` (agent_tree.agent_environment's)."""
    return shutil.which(program, path=agent_env.get("PATH", ""))


def not_on_path(program: str) -> str:
    """Why `program`, which no PATH lookup found, cannot start."""
    if "/" in program:
        # A path is not looked up on the PATH: "not on the PATH" sent people to theirs.
        path = Path(program)
        if path.is_dir():
            return f"{program} is a directory, not a program"
        return f"{program} is not executable" if path.exists() else f"{program} does not exist"
    return f"{program} is not on the workers' PATH"


def read_prompt(name: str) -> str:
    """A profile's prompt template, relative to the project unless absolute."""
    path = Path(settings.BASE_DIR, name)
    try:
        with open(path, "rb") as f:
            data = f.read(PROMPT_LIMIT + 1)
    except OSError as exc:
        raise ValueError(f"prompt file {path}: {exc.strerror or exc}") from None
    if len(data) > PROMPT_LIMIT:
        raise ValueError(f"prompt file {path}: larger than {PROMPT_LIMIT} bytes")
    text = data.decode("utf-8", "replace").strip()
    if not text:
        raise ValueError(f"prompt file {path}: empty")
    return text


def install_values() -> dict[str, str]:
    """The placeholders that are the same for every task: this interpreter and install."""
    return {"python": sys.executable, "base_dir": str(settings.BASE_DIR)}


def fill_placeholders(text: str, values: dict) -> str:
    """One pass, not str.format: a value (a title with braces, a key such as "{path}")
    is put in as it is and never scanned for placeholders again."""

    def fill(found: re.Match) -> str:
        name = found.group(1)
        return (values[name] or "") if name in values else found.group(0)

    return PLACEHOLDER.sub(fill, text)


def agent_log_path(claim: Claim) -> Path:
    return Path(
        settings.HYPERVISOR_DATA_DIR, "logs", "agents", f"task-{claim.id}-{claim.fence}.log"
    )


def transcript_path(task_id: int, fence: int) -> Path:
    """The live transcript of one claim's agent: named by numbers only."""
    return Path(
        settings.HYPERVISOR_DATA_DIR,
        "logs",
        "agents",
        f"task-{int(task_id)}-{int(fence)}.transcript.json",
    )


BUILT_IN = {
    "noop": "workqueue.processors.NoopProcessor",
    "triage": "workqueue.triage.TriageProcessor",
}


def is_cpu_bound(name: str) -> bool:
    """Whether the built-in processor of this name works on the CPU alone."""
    return name in BUILT_IN and import_string(BUILT_IN[name]).cpu_bound


def load_processor(name: str, command: list[str] | None = None, **options) -> Processor:
    """A processor by name: a built-in, `command` (with its argument list) or a dotted path."""
    if name == "command":
        return CommandProcessor(command or [], **options)
    target = BUILT_IN.get(name, name)
    if "." not in target:
        raise ValueError(
            f"unknown processor {name!r}: use noop, triage, command, pull or a dotted path"
        )
    try:
        found = import_string(target)
    except ImportError as exc:
        raise ValueError(f"cannot import processor {name!r}: {exc}") from None
    if isinstance(found, type):
        return found(**options) if options else found()
    if callable(found):
        return _FunctionProcessor(found)
    raise ValueError(f"processor {name!r} is neither a class nor a function")


class _FunctionProcessor(Processor):
    def __init__(self, function):
        self.function = function
        self.name = getattr(function, "__name__", "function")

    def process(self, claim: Claim, context: WorkContext) -> Result:
        return self.function(claim, context)


# Exits that say "ended by SIGTERM or SIGINT", as node and shells give them.
SIGNAL_EXITS = {128 + signal.SIGTERM, 128 + signal.SIGINT}


def _ended_by_the_stop(ended, adapter) -> bool:
    """An agent that ended while its worker stops, without its own last word: killed, or
    heeding the same signal by itself (Claude Code exits 143, Gemini CLI 0 with no
    result). One that finished its task while a drain waited for it has its result."""
    if ended.code is not None and (ended.code < 0 or ended.code in SIGNAL_EXITS):
        return True
    adapter.finish_stream()
    return not adapter.concluded
