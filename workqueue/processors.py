"""What a worker does with a claimed task.

Built-ins run in the worker process; `command` runs an agent CLI or a script as an
argument list, never through a shell.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.utils.module_loading import import_string

from workqueue import agent_tree
from workqueue.models import Status


@dataclass(frozen=True)
class Claim:
    id: int
    queue: str
    key: str
    title: str
    path: str
    fence: int


@dataclass
class Result:
    """What a processor reports for one claim."""

    status: str = Status.DONE  # done, blocked, or queued to give the task back
    outcome: str = ""
    reason: str = ""
    evidence: str = ""
    next_step: str = ""
    commit: str = ""
    tokens: int = 0
    output_tail: str = ""
    data: dict = field(default_factory=dict)

    def row_values(self) -> dict:
        return {
            "status": self.status,
            "outcome": self.outcome or (self.status == Status.DONE and "success" or ""),
            "reason": self.reason,
            "evidence": self.evidence,
            "next_step": self.next_step,
            "commit": self.commit,
            "tokens": self.tokens,
            "output_tail": self.output_tail,
            "result": self.data,
        }


GIVE_BACK_EXIT = 75  # EX_TEMPFAIL: "not now, give the task to someone else"
TAIL_CHARS = 4000
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
AGENT_LINE = re.compile(r"^(COMPLETED|BLOCKED):\s*(\S.*)?$", re.MULTILINE)


class Processor:
    name = "processor"
    # Built-ins are fast: the worker finishes a whole prefetched batch in one write.
    finish_in_batches = True

    def process(self, claim: Claim, context: WorkContext) -> Result:
        raise NotImplementedError


class WorkContext:
    """What a processor may ask of the worker running it."""

    def __init__(
        self,
        worker_name: str,
        stopping: Callable[[], bool],
        dry_run: bool = False,
        agent_started: Callable[[Claim, int, float], None] | None = None,
    ):
        self.worker_name = worker_name
        self.stopping = stopping
        self.dry_run = dry_run
        # Records an agent's process group on its claim (the worker writes the row).
        self.agent_started = agent_started or (lambda claim, pgid, started: None)


class NoopProcessor(Processor):
    """Reads the task file and reports success: the baseline for throughput."""

    name = "noop"

    def process(self, claim: Claim, context: WorkContext) -> Result:
        if claim.path:
            try:
                with open(claim.path, "rb") as f:
                    f.read()
            except OSError as exc:
                return Result(status=Status.BLOCKED, reason=f"cannot read {claim.path}: {exc}")
        return Result(status=Status.DONE, outcome="success")


class CommandProcessor(Processor):
    """Runs an agent CLI or a script per task: its own process group tied to the claim,
    an allow-listed environment, output streamed with bounded memory and masked."""

    name = "command"
    finish_in_batches = False

    def __init__(
        self,
        argv: list[str],
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        secrets: list[str] | None = None,
        pass_env: list[str] | None = None,
    ):
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("a command is a non-empty list of strings")
        self.argv = argv
        self.timeout = timeout
        self.env = env or {}
        self.cwd = cwd
        self.secrets = [s for s in (secrets or []) if s]
        self.pass_env = list(pass_env or [])
        self.last_output = ""

    def arguments(self, claim: Claim, extra: dict | None = None) -> list[str]:
        values = {
            "python": sys.executable,
            "base_dir": str(settings.BASE_DIR),
            "path": claim.path,
            "key": claim.key,
            "queue": claim.queue,
            "title": claim.title,
            **(extra or {}),
        }

        # One pass, not str.format: a value (a title with braces, a key such as
        # "{path}") is put in as it is and never scanned for placeholders again.
        def fill(found: re.Match) -> str:
            name = found.group(1)
            return (values[name] or "") if name in values else found.group(0)

        return [PLACEHOLDER.sub(fill, arg) for arg in self.argv]

    def environment(self, claim: Claim, context: WorkContext) -> dict[str, str]:
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
        env = self.environment(claim, context)
        mask = agent_tree.Masker(
            [*self.secrets, *agent_tree.known_secrets(env, [*self.pass_env, *self.env])]
        )
        args = self.arguments(claim, extra)
        run = agent_tree.AgentRun(
            args,
            env,
            cwd or self.cwd,
            self.timeout,
            mask,
            context.stopping,
            log_path=agent_log_path(claim),
        )
        try:
            run.start()
        except OSError as exc:
            return Result(status=Status.BLOCKED, reason=f"cannot start {args[0]}: {exc.strerror}")
        try:
            context.agent_started(claim, run.pgid, run.started_at)
        finally:
            ended = run.wait()
        self.last_output = ended.stdout + ended.stderr
        result = self.interpret_exit(ended, claim, context)
        result.output_tail = (ended.stdout + ("\n" + ended.stderr if ended.stderr else ""))[
            -TAIL_CHARS:
        ]
        result.data.setdefault("seconds", ended.seconds)
        if ended.log_path:
            result.data.setdefault("log", ended.log_path)
        return result

    def interpret_exit(
        self, ended: agent_tree.AgentExit, claim: Claim, context: WorkContext
    ) -> Result:
        if ended.survivors:
            # Not requeued: another agent must not start while this one may still work.
            pids = ", ".join(map(str, ended.survivors))
            return Result(
                status=Status.BLOCKED,
                reason=f"the agent's processes could not be ended (pids {pids})",
            )
        if ended.stopped or (ended.code is not None and ended.code < 0 and context.stopping()):
            # Stopped with the herd (cancel or Ctrl-C, which may signal the agent before
            # the worker): the task is not at fault.
            return Result(status=Status.QUEUED, reason="worker stopped")
        if ended.timed_out:
            return Result(
                status=Status.BLOCKED,
                outcome="timed_out",
                reason=f"timed out after {self.timeout:g} s",
            )
        return interpret(ended.code, ended.stdout, ended.stderr, claim.key)


def agent_log_path(claim: Claim) -> Path:
    return Path(
        settings.HYPERVISOR_DATA_DIR, "logs", "agents", f"task-{claim.id}-{claim.fence}.log"
    )


def interpret(code: int, stdout: str, stderr: str, key: str) -> Result:
    """Turn an exit code and output into a result, reading the agent's last words."""
    if code == GIVE_BACK_EXIT:
        return Result(status=Status.QUEUED, reason="the command gave the task back (exit 75)")
    result = (
        Result(status=Status.DONE, outcome="success")
        if code == 0
        else Result(status=Status.BLOCKED, reason=_exit_reason(code, stderr))
    )
    _read_agent_lines(result, stdout)
    _read_json_line(result, stdout)
    return result


def _exit_reason(code: int, stderr: str) -> str:
    tail = stderr.strip()[-500:]
    if code < 0:
        try:
            what = signal.Signals(-code).name
        except ValueError:
            what = f"signal {-code}"
        return f"killed by {what}" + (f": {tail}" if tail else "")
    return tail or f"exited with code {code}"


def _read_agent_lines(result: Result, stdout: str) -> None:
    found = list(AGENT_LINE.finditer(stdout))
    if not found:
        return
    last = found[-1]
    after = stdout[last.end() :]
    reason = re.search(r"^Reason:\s*(.+)$", after, re.MULTILINE)
    following = re.search(r"^Next:\s*(.+)$", after, re.MULTILINE)
    if last.group(1) == "BLOCKED":
        result.status = Status.BLOCKED
        result.reason = reason.group(1).strip() if reason else "the agent reported BLOCKED"
    else:
        result.status = Status.DONE
        result.outcome = result.outcome or "success"
        result.reason = ""
    if following:
        result.next_step = following.group(1).strip()


def _read_json_line(result: Result, stdout: str) -> None:
    lines = stdout.strip().splitlines()
    if not lines:
        return
    try:
        data = json.loads(lines[-1])
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    status = data.get("status")
    if status in (Status.DONE, "success", "completed"):
        result.status = Status.DONE
        result.reason = ""
    elif status == Status.BLOCKED:
        result.status = Status.BLOCKED
    for name, attr in (
        ("outcome", "outcome"),
        ("reason", "reason"),
        ("evidence", "evidence"),
        ("next", "next_step"),
        ("commit", "commit"),
    ):
        if data.get(name) is not None:
            setattr(result, attr, str(data[name]))
    with contextlib.suppress(TypeError, ValueError):
        result.tokens = max(0, int(data.get("tokens") or 0))
    if result.status == Status.DONE and not result.outcome:
        result.outcome = "success"


BUILT_IN = {
    "noop": "workqueue.processors.NoopProcessor",
    "triage": "workqueue.triage.TriageProcessor",
}


def load_processor(name: str, command: list[str] | None = None, **options) -> Processor:
    """A processor by name: a built-in, `command` (with its argument list) or a dotted path."""
    if name == "command":
        return CommandProcessor(command or [], **options)
    target = BUILT_IN.get(name, name)
    if "." not in target:
        raise ValueError(f"unknown processor {name!r}: use noop, triage, command or a dotted path")
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
