"""What a processor is given and what it reports: the claim, the result, the context.

Processors (built-in, command, an agent's adapter) import these without importing the
engine that claims and finishes tasks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from workqueue.models import Status, Task

# The most tokens one run may report, by an agent's CLI or its complete_task: far past any
# real run, and small enough that the sums of a queue and a herd stay inside their columns.
MAX_RUN_TOKENS = 10**12


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
    cost_usd: Decimal | None = None  # what the agent's CLI says the run cost, if it says
    output_tail: str = ""
    data: dict = field(default_factory=dict)

    def row_key(self) -> tuple:
        """Equal for results that write the same values into their rows (every field, the
        data as JSON): a batch's finishes with one key share one UPDATE."""
        return tuple(
            (json.dumps(value, sort_keys=True, default=str) if value else "{}")
            if isinstance(value, dict)
            else value
            for value in vars(self).values()
        )

    def storable(self) -> Result:
        """This result as its columns hold it: each NUL character (an agent's binary
        output, a JSON `\\u0000`) made U+FFFD, and an agent's outcome or commit clipped to
        its column. PostgreSQL refuses both, and a finish it refused would crash the worker
        and leave the task claimed."""
        for name, value in vars(self).items():
            if isinstance(value, str) and "\x00" in value:
                setattr(self, name, value.replace("\x00", "\ufffd"))
        for name in ("outcome", "commit"):
            setattr(self, name, getattr(self, name)[: Task._meta.get_field(name).max_length])
        if self.data:
            self.data = _without_nul(self.data)
        return self

    def row_values(self) -> dict:
        return {
            "status": self.status,
            "outcome": self.outcome or (self.status == Status.DONE and "success" or ""),
            "reason": self.reason,
            "evidence": self.evidence,
            "next_step": self.next_step,
            "commit": self.commit,
            "tokens": self.tokens,
            "cost_usd": self.cost_usd,
            "output_tail": self.output_tail,
            "result": self.data,
        }


def _without_nul(value):
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


class WorkContext:
    """What a processor may ask of the worker running it."""

    def __init__(
        self,
        worker_name: str,
        stopping: Callable[[], bool],
        dry_run: bool = False,
        agent_started: Callable[[Claim, int, float], None] | None = None,
        ending: Callable[[], bool] | None = None,
        why_ending: Callable[[], str] | None = None,
    ):
        self.worker_name = worker_name
        # The worker claims no more (a drain, a first Ctrl-C): the task at hand finishes,
        # and an agent killed meanwhile (a cancel signals its whole tree) is given back.
        self.stopping = stopping
        # The agent at work is to be ended now (a second Ctrl-C, its claim lost), and why
        # when it is not the worker's stop.
        self.ending = ending or stopping
        self.why_ending = why_ending or (lambda: "")
        self.dry_run = dry_run
        # Records an agent's process group on its claim (the worker writes the row).
        self.agent_started = agent_started or (lambda claim, pgid, started: None)


class Processor:
    name = "processor"
    # Built-ins are fast: the worker finishes a whole prefetched batch in one write.
    finish_in_batches = True
    # Works in the worker's own process, on the CPU alone (noop, triage): with more workers
    # than cores, such workers take turns on the cores (workqueue.cpu_slots).
    cpu_bound = False
    # Its batch ends in writes that wait on the disk, so its turn on a core is passed on
    # before the finish rather than after: another worker computes while this one waits.
    # Not a finish's status words, written in place (editing._write_finish_plans): that is
    # work on the CPU, and passing the turn on before it let more workers than cores run at
    # once, descheduling the write lock's holder (8 no-op workers on 2 cores held it twice
    # as long as 2 and ran 35% slower than 2).
    ends_on_disk = False
    # A finish writes the task's new state (done, blocked) into its file. Not triage's:
    # its decisions are what it writes, and a triaged task is not a finished one.
    writes_status = True
    # Under --dry-run it works out what it would do and does none of it. Others are
    # refused a dry run: a command or an agent would run for real and its tasks be
    # marked done while their files say otherwise.
    has_dry_run = False

    def process(self, claim: Claim, context: WorkContext) -> Result:
        raise NotImplementedError
