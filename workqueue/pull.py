"""Agents that pull work: the MCP tools over the same claim engine the workers use.

A PullSession is one worker identity. Each tool is a method that takes plain values and
returns one JSON-able dict with `success` (bool) and `message` (one line a model can act
on); bad input of any kind is `success: false` with a reason, never an exception. The MCP
adapter (workqueue.mcp_server) only carries these dicts over stdio or HTTP.

Two kinds of session:
- local (`manage.py mcp`, a herd's pull worker): one process, its claims held in memory
  with a lock directory each, a heartbeat thread renewing their leases while the process
  lives; a session that dies is reaped by its pid like any dead worker.
- stateless (HTTP, one per API token): every request is a new object, so the claims it
  holds are the rows whose holder is its name; they live by lease, renewed by every call.

Task state changes only through claims.py (claim, finish, release): nothing here writes
status, holder, lease or fence.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)
from django.db.models import Count

from workqueue import claims, locks, signals, transitions
from workqueue.authoring import NEW_TASK_FIELDS, AuthoringError, create_task_file
from workqueue.dependencies import STUCK_LISTED, in_words, stuck, why_stuck
from workqueue.editing import Conflict, EditError, FileChanged, edit_task, validate
from workqueue.locks import Identity, LockError, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task
from workqueue.processing import MAX_RUN_TOKENS
from workqueue.processors import Claim, Result, blocked_if_half_merged
from workqueue.routing import FilterError, TaskFilter, field_is

log = logging.getLogger("workqueue.pull")

QUEUE_EMPTY = "QUEUE EMPTY"
LIST_LIMIT = 100
TEXT_LIMIT = 100_000  # characters of a summary, reason, evidence or next step
# Status words a session may give: this project's, then the old task_manager's.
STATUS_WORDS = {
    "queued": "queued",
    "ready": "ready",
    "claimed": "claimed",
    "done": "done",
    "blocked": "blocked",
    "active": "ready",  # the old "ready to claim"
    "in_progress": "claimed",
    "in-progress": "claimed",
    "cancelled": "cancelled",
    "canceled": "cancelled",
}
# The old blocked body: "## Blocked\n\n**Reason**: ...\n**Evidence**: ...\n**Next step**: ..."
# A part runs from its label's line to the next label; read line by line (one pattern
# over the whole body with a lookahead for the next label took minutes on blank lines).
BLOCKED_PART = re.compile(
    r"[ \t]*[-*]?[ \t]*\*\*(Reason|Evidence|Next(?: step)?)\*\*[ \t]*:(.*)", re.IGNORECASE
)
EDIT_FIELDS = ("assignee", "priority", "complexity", "tags", "title", "body")

# Which tools need which permission when a person's token stands behind the session.
READ_TOOLS = ("list_tasks", "get_task", "get_index_stats")
WRITE_TOOLS = (
    "claim_next_task",
    "update_task",
    "complete_task",
    "block_task",
    "release_task",
    "create_task",
)
TOOLS = (*WRITE_TOOLS[:1], *READ_TOOLS, *WRITE_TOOLS[1:])
HELD_LISTED = 5  # a token's other claims an answer names


class BadInput(ValueError):
    """A tool argument that cannot be used: the message names it."""


def answer(success: bool, message: str, **fields) -> dict:
    return {"success": success, "message": " ".join(message.split()), **fields}


def refused(message: str, **fields) -> dict:
    return answer(False, message, **fields)


@dataclass(frozen=True)
class _OnlyTask:
    """A claim filter for one task: `update_task(status="in_progress")` claims that task
    through the same statement as any claim, or nothing."""

    pk: int
    filters: TaskFilter | None = None  # the session's: no claim outside them by this way

    def apply(self, tasks):
        tasks = tasks.filter(pk=self.pk)
        return self.filters.apply(tasks) if self.filters else tasks


class PullSession:
    def __init__(
        self,
        queue: str,
        identity: Identity,
        filters: TaskFilter | None = None,
        lease_seconds: int | None = None,
        stateless: bool = False,
        max_attempts: int | None = None,
        permitted: Callable[[str], bool] | None = None,
        batch: int = 0,
    ):
        self.queue = queue
        self.identity = identity
        self.filters = filters or TaskFilter()
        self.lease_seconds = lease_seconds or settings.HYPERVISOR_LEASE_SECONDS
        self.stateless = stateless
        self.max_attempts = max_attempts
        self.permitted = permitted or (lambda tool: True)
        self.batch = batch  # tasks to finish before the session stops claiming; 0 = all
        self.owner_file = OwnerFile(identity)
        self.busy: dict[int, float] = {}
        self.renewed: list[Claim] = []  # over HTTP: the token's claims as this call began
        # Local sessions: the claims held now, by task id (what the heartbeat renews).
        self.held: dict[int, Claim] = {}
        self._held_lock = threading.Lock()
        # One call at a time, and the session's end after the call under way: a signal
        # ends a stdio session from another thread, maybe between a claim's commit and
        # its noting in `held`, which would leave that claim to the reaper.
        self._calling = threading.Lock()
        self.ended = False
        self.stop_requested = False
        self.stop_reason = ""
        self.claimed = self.done = self.blocked = self.released = 0
        # A pull worker's agent (process group, start time), written on each claim it
        # takes: the reaper ends it before the task goes to anyone else.
        self.agent: tuple[int, float] | None = None

    # What the herds' receivers ask of a worker (workqueue.signals) -------------------

    @property
    def current(self) -> Claim | None:
        with self._held_lock:
            return next(iter(self.held.values()), None)

    def stop(self, reason: str) -> None:
        if not self.stop_requested:
            self.stop_requested, self.stop_reason = True, reason

    # The entry point ----------------------------------------------------------------

    def call(self, tool: str, arguments: Any = None) -> dict:
        """Run one tool by name with the arguments a client sent: always a dict back."""
        if tool not in TOOLS:
            return refused(f"unknown tool {tool!r}; tools: {', '.join(TOOLS)}")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return refused(f"{tool}: arguments must be an object of names to values")
        method = getattr(self, tool)
        accepted = method.__code__.co_varnames[1 : method.__code__.co_argcount]
        unknown = sorted(set(arguments) - set(accepted))
        if unknown:
            return refused(
                f"{tool}: unknown argument {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(accepted) or 'no arguments'}"
            )
        if not self.permitted(tool):
            need = "queue.view_task" if tool in READ_TOOLS else "queue.change_task"
            return refused(f"{tool}: permission denied: your account needs {need}")
        with self._calling:
            if self.ended:
                return refused(f"{tool}: this session has ended")
            return self._run(tool, method, arguments)

    def _run(self, tool: str, method, arguments: dict) -> dict:
        try:
            if self.stateless:
                self._renew_leases()
            return method(**arguments)
        except BadInput as exc:
            return refused(f"{tool}: {exc}")
        except LockError as exc:
            return refused(f"{tool}: the lock root cannot take locks: {exc}")
        except (OperationalError, InterfaceError) as exc:
            if not connection.in_atomic_block:
                connection.close()  # the next call connects afresh (a database restart)
            return refused(f"{tool}: database unavailable ({_first_line(exc)}); try again")
        except DatabaseError as exc:
            log.exception("%s: %s failed", self.identity.worker, tool)
            return refused(f"{tool}: database error ({_first_line(exc)})")
        except Exception as exc:  # a model must get an answer, not a trace
            log.exception("%s: %s failed", self.identity.worker, tool)
            return refused(f"{tool}: internal error ({type(exc).__name__}: {_first_line(exc)})")

    # Tools ---------------------------------------------------------------------------

    def claim_next_task(self, project=None, where=None) -> dict:
        routing = self.filters
        extra = [f"project={_text(project, 'project', limit=200)}"] if project else []
        extra += _where(where)
        if extra:
            try:
                routing = routing.merged(TaskFilter.parse(extra))
            except FilterError as exc:
                raise BadInput(str(exc)) from None
        if self.stop_requested:
            return refused(f"{QUEUE_EMPTY}: this worker is stopping ({self.stop_reason})")
        taken = self._claim(routing or None, self.busy)
        if not taken:
            return refused(f"{QUEUE_EMPTY}: {self._why_empty(routing)}{self._also_held()}")
        task = self._task(taken[0].key)
        return answer(
            True,
            f"claimed {task.key}: work on it, then complete_task(id={task.key!r}) "
            f"or block_task(id={task.key!r}, reason=...){self._keep_alive(task.key)}"
            f"{self._also_held(task.key)}",
            task=self._task_dict(task, body=True),
        )

    def _keep_alive(self, key: str) -> str:
        """Over HTTP nothing watches the agent: its claim lives by its calls alone, so say
        how long that is (an agent silent past it finds the task gone to another)."""
        if not self.stateless:
            return ""
        lease = self.lease_seconds
        lasts = f"{lease // 60} minutes" if lease >= 120 else f"{lease} seconds"
        return (
            f"; the claim lasts {lasts} from your last call: "
            f"any call keeps it (get_task(id={key!r}) while a long step runs)"
        )

    def _also_held(self, new: str = "") -> str:
        """Over HTTP, an answer lost on the way (a dropped connection) leaves a claim the
        agent never heard of, kept alive by its token's every call: name what it holds."""
        if not self.stateless:
            return ""
        # What this call's renewal of leases found the token holding, before the new claim.
        keys = [c.key for c in self.renewed if c.key != new]
        if not keys:
            return ""
        named = ", ".join(keys[:HELD_LISTED]) + (" and more" if len(keys) > HELD_LISTED else "")
        return (
            f"; this token also holds {named}: finish it with complete_task or block_task, "
            "or give it back with release_task"
        )

    def list_tasks(
        self,
        project=None,
        status=None,
        type=None,
        priority=None,
        priority_max=None,
        assignee=None,
        limit=5,
    ) -> dict:
        tasks = Task.objects.filter(queue=self.queue)
        if self.filters:  # the session's share of the queue, as its claims are
            tasks = self.filters.apply(tasks)
        if status not in (None, ""):
            tasks = _with_status(tasks, _status_word(status))
        for name, value in (("project", project), ("type", type), ("assignee", assignee)):
            if value not in (None, ""):
                tasks = tasks.filter(field_is(name, _text(value, name, limit=200)))
        if priority not in (None, ""):
            tasks = tasks.filter(priority=_number(priority, "priority"))
        if priority_max not in (None, ""):
            tasks = tasks.filter(priority__lte=_number(priority_max, "priority_max"))
        limit = _number(limit, "limit", low=1, high=LIST_LIMIT)
        total = tasks.count()
        rows = list(
            tasks.claim_order().values(
                "key", "title", "status", "priority", "project", "assignee", "complexity"
            )[:limit]
        )
        for row in rows:
            row["id"] = row.pop("key")
        only = f" this session takes ({', '.join(self.filters.as_list())})" if self.filters else ""
        return answer(
            True,
            f"{len(rows)} of {total} tasks{only}" + (" (highest priority first)" if rows else ""),
            tasks=rows,
            count=len(rows),
            total=total,
        )

    def get_task(self, id=None) -> dict:
        task = self._task(_key(id))
        return answer(True, f"{task.key}: {task.status}", task=self._task_dict(task, body=True))

    def get_index_stats(self) -> dict:
        tasks = Task.objects.filter(queue=self.queue)
        stats = Task.objects.stats(self.queue)
        by_project: dict[str, dict[str, int]] = {}
        for project, status, n in tasks.values_list("project", "status").annotate(n=Count("id")):
            by_project.setdefault(project or "(none)", {s: 0 for s in Status.values})[status] = n
        ready = tasks.ready().count()
        counts = stats["counts"]
        return answer(
            True,
            f"{ready} ready, {counts['claimed']} claimed ({stats['stale']} stale), "
            f"{counts['done']} done, {counts['blocked']} blocked",
            queue=self.queue,
            counts=counts,
            ready=ready,
            claimed=counts["claimed"],
            stale=stats["stale"],
            claimed_by=stats["claimed_by"],
            waiting=stats["waiting"],
            cannot_become_ready=[
                {"id": s["key"], "why": s["why"]} for s in stats["stuck"][:STUCK_LISTED]
            ],
            projects=by_project,
        )

    def update_task(
        self,
        id=None,
        status=None,
        assignee=None,
        priority=None,
        complexity=None,
        tags=None,
        title=None,
        body=None,
    ) -> dict:
        task = self._task(_key(id))
        word = _status_word(status) if status not in (None, "") else None
        given = {"assignee": assignee, "priority": priority, "complexity": complexity}
        given.update(tags=tags, title=title, body=body)
        changes = {name: value for name, value in given.items() if value is not None}
        parts: dict[str, str] = {}
        if word == "blocked" and isinstance(body, str):
            parts = blocked_parts(body)
            if parts:
                changes.pop("body")  # the old prompt's report, not a new task body
        if word == "cancelled":
            raise BadInput(
                "status: a session cannot cancel a task; block_task it with the reason "
                "and a person closes it"
            )
        if word == "blocked" and not parts.get("reason"):
            raise BadInput(
                "status: blocked needs a reason: use block_task(id, reason) or a body "
                "with **Reason**: …, **Evidence**: …, **Next step**: …"
            )
        if word in ("done", "blocked", "queued", "ready") and self._mine(task) is None:
            return self._not_yours(task, f"set it {word}")
        held_by_another = task.status == Status.CLAIMED and not self._holds(task)
        if changes and word != "claimed" and held_by_another:
            # The task's text is its holder's instructions: not rewritten under it.
            return self._not_yours(task, "edit it")
        try:
            validate(changes, task)
        except EditError as exc:
            raise BadInput(str(exc)) from None
        said = []
        if word == "claimed":
            claimed = self._claim_this(task)
            if not claimed["success"]:
                return claimed
            said.append(claimed["message"])
        if changes:
            edited = self._edit(task, changes)
            if not edited["success"]:
                # Say what did happen: a claim taken just now stays this session's.
                return refused("; but ".join([*said, edited["message"]]))
            said.append(edited["message"])
        if word == "done":
            return self.complete_task(id=task.key)
        if word == "blocked":
            return self.block_task(
                id=task.key,
                reason=parts["reason"],
                next=parts.get("next_step"),
                evidence=parts.get("evidence"),
            )
        if word in ("queued", "ready"):
            return self.release_task(id=task.key)
        task = self._task(task.key)
        return answer(True, "; ".join(said) or "nothing to change", task=self._task_dict(task))

    def complete_task(
        self, id=None, summary=None, evidence=None, commit=None, tokens=None
    ) -> dict:
        task = self._task(_key(id))
        spent = 0 if tokens is None else _number(tokens, "tokens", low=0, high=MAX_RUN_TOKENS)
        result = Result(
            status=Status.DONE,
            outcome="success",
            evidence=_text(evidence, "evidence", TEXT_LIMIT),
            commit=_text(commit, "commit", 100),
            tokens=spent,
            output_tail=_text(summary, "summary", TEXT_LIMIT),
        )
        if summary:
            result.data["summary"] = result.output_tail
        return self._finish(task, result, "completed")

    def block_task(self, id=None, reason=None, next=None, evidence=None) -> dict:
        task = self._task(_key(id))
        why = _text(reason, "reason", TEXT_LIMIT)
        if not why.strip():
            raise BadInput("reason: say why the task is blocked")
        result = Result(
            status=Status.BLOCKED,
            reason=why.strip(),
            next_step=_text(next, "next", TEXT_LIMIT),
            evidence=_text(evidence, "evidence", TEXT_LIMIT),
        )
        return self._finish(task, result, "blocked")

    def release_task(self, id=None) -> dict:
        task = self._task(_key(id))
        claim = self._mine(task)
        if claim is None:
            return self._not_yours(task, "release it")
        message = f"given back by {self.identity.worker}"
        released = claims.release_claims(self.identity, [claim], self.owner_file, message)
        self._let_go(claim, task, released=claim.id in released)
        if claim.id not in released:
            return self._lost(claim)
        self.released += 1
        claims.pass_over(self.busy, claim.id)  # an HTTP session's lasts this request only
        again = "" if self.stateless else "; this session is not given it again"
        return answer(True, f"released {task.key}: back in the queue, untouched{again}")

    def create_task(
        self,
        title=None,
        body=None,
        project=None,
        priority=None,
        tags=None,
        parent=None,
        depends_on=None,
    ) -> dict:
        given = {"project": project, "priority": priority, "tags": tags}
        given.update(parent=parent, depends_on=depends_on)
        fields = {k: v for k, v in given.items() if v is not None and k in NEW_TASK_FIELDS}
        if not isinstance(title, str) or not title.strip():
            raise BadInput("title: a task needs a title")
        try:
            task = create_task_file(
                self.queue, title, body or "", fields, actor=self.identity.worker
            )
        except AuthoringError as exc:
            raise BadInput(str(exc)) from None
        waits = why_stuck(task) if task.depends_on else ""
        return answer(
            True,
            f"created {task.key} in {task.source_path}"
            + (f"; it cannot become ready as things stand: {waits}" if waits else ""),
            task=self._task_dict(task, body=True),
        )

    # Claims --------------------------------------------------------------------------

    def _claim(self, routing, busy: dict) -> list[Claim]:
        while taken := claims.claim_ready_tasks(
            self.queue,
            self.identity,
            self.owner_file,
            1,
            self.lease_seconds,
            routing,
            busy,
            self.max_attempts,
            self.agent,  # in the claim's own write: never a claim without its agent
        ):
            if not self._blocked_as_conflicted(taken[0]):
                break
        if taken:
            self.claimed += len(taken)
            if not self.stateless:
                with self._held_lock:
                    self.held.update((c.id, c) for c in taken)
        return taken

    def _blocked_as_conflicted(self, claim: Claim) -> bool:
        """Block a claimed task whose file git left half merged, as a worker's command
        does: an agent would work from both sides."""
        blocked = blocked_if_half_merged(claim.path)
        if blocked is None:
            return False
        report = claims.finish_claims(self.identity, [(claim, blocked)], self.owner_file)
        self.blocked += claim.id in report.finished
        return True

    def _claim_this(self, task: Task) -> dict:
        if self._holds(task):
            return answer(True, f"you already hold {task.key}")
        if self.stop_requested:
            return refused(
                f"{task.key}: not claimed: this worker is stopping ({self.stop_reason})"
            )
        if self._claim(_OnlyTask(task.pk, self.filters), {}):
            return answer(True, f"claimed {task.key}")
        # A claim racing ours may not have committed yet (PostgreSQL skipped its locked
        # row): wait for that row, then say who won.
        with transaction.atomic():
            task = Task.objects.select_for_update().get(pk=task.pk)
        return refused(f"{task.key}: not claimed: {self._why_not_claimable(task)}")

    def _mine(self, task: Task) -> Claim | None:
        """This session's claim of `task`: the one a finish or release presents, refused
        by its fence if the claim was lost meanwhile (see _holds)."""
        if not self.stateless:
            with self._held_lock:
                return self.held.get(task.pk)
        if task.status == Status.CLAIMED and task.holder == self.identity.worker:
            return Claim(task.pk, task.queue, task.key, task.title, task.source_path, task.fence)
        return None

    def _holds(self, task: Task) -> bool:
        """Whether this session holds `task` now: a local session's claim may have been
        taken back (a person's release, the reaper) and the task claimed by another."""
        claim = self._mine(task)
        return (
            claim is not None
            and task.status == Status.CLAIMED
            and (task.holder, task.fence) == (self.identity.worker, claim.fence)
        )

    def _finish(self, task: Task, result: Result, verb: str) -> dict:
        claim = self._mine(task)
        if claim is None and self._finished_by_me(task, result.status):
            # A finish sent again (its answer was lost): it went through the first time.
            return answer(True, f"{verb} {task.key} already; claim_next_task for the next one")
        if claim is None:
            return self._not_yours(task, "finish it")
        report = claims.finish_claims(self.identity, [(claim, result)], self.owner_file)
        kept = claim.id in report.finished
        self._let_go(claim, task, released=kept)
        if not kept:
            return self._lost(claim)
        if result.status == Status.DONE:
            self.done += 1
        else:
            self.blocked += 1
        if self.batch and self.done + self.blocked >= self.batch:
            self.stop(f"its batch of {self.batch} tasks is done")
        signals.tasks_finished.send(sender=self, finished=[(claim, result)], refused=[])
        return answer(True, f"{verb} {task.key}; claim_next_task for the next one")

    def _finished_by_me(self, task: Task, status: str) -> bool:
        kind = {Status.DONE: EventKind.DONE, Status.BLOCKED: EventKind.BLOCKED}.get(status)
        return (
            task.status == status
            and task.events.filter(
                kind=kind, actor=self.identity.worker, fence=task.fence
            ).exists()
        )

    def _let_go(self, claim: Claim, task: Task, released: bool) -> None:
        with self._held_lock:
            self.held.pop(claim.id, None)
        if self.stateless and released:
            # The lock was taken by another request's owner file: let it go by its owner.
            locks.release_held_by(
                task.queue, task.key, task.holder_host, task.holder_pid, task.holder_started
            )

    def _renew_leases(self) -> None:
        mine = Task.objects.held_by(self.identity.worker).filter(queue=self.queue)
        held = [
            Claim(i, self.queue, k, "", "", f)
            for i, k, f in mine.values_list("id", "key", "fence")
        ]
        self.renewed = held
        if held:
            transitions.heartbeat(self.identity, held, self.lease_seconds)

    def heartbeat(self) -> int:
        """Renew the leases of the claims this (local) session holds, by id and fence."""
        with self._held_lock:
            held = list(self.held.values())
        renewed = transitions.heartbeat(self.identity, held, self.lease_seconds) if held else 0
        signals.worker_heartbeat.send(sender=self)
        return renewed

    def release_all(self, message: str) -> int:
        """The session ends: whatever it still holds goes back to the queue, and it takes
        no more."""
        with self._calling:
            self.ended = True
            with self._held_lock:
                held = list(self.held.values())
                self.held.clear()
            if not held:
                return 0
            released = claims.release_claims(self.identity, held, self.owner_file, message)
            self.released += len(released)
            return len(released)

    # Explanations --------------------------------------------------------------------

    def _not_yours(self, task: Task, what: str) -> dict:
        if task.status == Status.CLAIMED:
            # Over HTTP the pid is the web server's: the token's name is the one its user knows.
            this = "over HTTP" if self.stateless else f"pid {self.identity.pid}"
            return refused(
                f"{task.key}: cannot {what}: it is held by {describe_holder(task)}, not by "
                f"this session ({self.identity.worker}, {this})"
            )
        return refused(
            f"{task.key}: cannot {what}: this session does not hold it (it is {task.status}); "
            "claim it first"
        )

    def _lost(self, claim: Claim) -> dict:
        task = Task.objects.filter(pk=claim.id).first()
        now = f"it is {task.status}" + (
            f", held by {describe_holder(task)}" if task and task.status == Status.CLAIMED else ""
        )
        return refused(
            f"{claim.key}: refused: this session's claim was lost (fence {claim.fence} no longer "
            f"matches; {now}); do not work on it further"
        )

    def _why_empty(self, routing: TaskFilter) -> str:
        missing = Queue.objects.missing(self.queue)
        if missing:  # a mistyped queue in the agent's settings is not a finished queue
            return f"{missing}: check the queue this agent was given; stop here"
        tasks = Task.objects.filter(queue=self.queue)
        ready = tasks.ready().count()
        if routing and ready:
            return (
                f"no ready task in queue {self.queue!r} matches {', '.join(routing.as_list())} "
                f"({ready} others ready)"
            )
        waiting = tasks.waiting().count()
        why = (
            f"no ready task in queue {self.queue!r} "
            f"({tasks.claimed().count()} claimed, {waiting} waiting on dependencies)"
        )
        cannot = stuck(self.queue) if waiting else []
        if cannot:
            named = in_words([(s.key, s.why) for s in cannot[:3]], len(cannot))
            why += f"; {len(cannot)} cannot become ready as things stand ({named})"
        return why + "; stop here"

    def _why_not_claimable(self, task: Task) -> str:
        if task.status == Status.CLAIMED:
            return f"held by {describe_holder(task)}"
        if task.status != Status.QUEUED:
            return f"it is {task.status}" + (f" ({task.reason})" if task.reason else "")
        waiting = task.dependencies.exclude(
            key__in=Task.objects.filter(queue=task.queue, status=Status.DONE).values("key")
        )
        if waiting.exists():
            keys = ", ".join(waiting.values_list("key", flat=True)[:10])
            return f"it waits on unfinished dependencies: {keys}"
        if task.outside_holder:
            return task.outside_holder
        if self.filters and not self.filters.apply(Task.objects.filter(pk=task.pk)).exists():
            return f"this session only takes {', '.join(self.filters.as_list())}"
        return "it was not claimable just now; try again"

    # Tasks ---------------------------------------------------------------------------

    def _task(self, key: str) -> Task:
        task = Task.objects.select_related("content").filter(queue=self.queue, key=key).first()
        if task is None:
            raise BadInput(f"id: no task {key!r} in queue {self.queue!r}")
        return task

    def _task_dict(self, task: Task, body: bool = False) -> dict:
        row = {
            "id": task.key,
            "title": task.title,
            "status": task.status,
            "priority": task.priority,
            "project": task.project,
            "assignee": task.assignee,
            "complexity": task.complexity,
            "type": task.type,
            "tags": task.tags,
            "depends_on": task.depends_on,
            "path": task.source_path,
            "queue": task.queue,
            "fence": task.fence,
            "attempts": task.attempts,
        }
        if task.status == Status.CLAIMED:
            row["holder"] = describe_holder(task)
            row["yours"] = self._holds(task)
            row["lease_expires_at"] = (
                task.lease_expires_at.isoformat() if task.lease_expires_at else None
            )
        if task.status in (Status.DONE, Status.BLOCKED):
            row.update(outcome=task.outcome, reason=task.reason, next_step=task.next_step)
        if body:
            row["frontmatter"] = task.frontmatter
            row["body"] = task.body
        return row

    def _edit(self, task: Task, changes: dict) -> dict:
        try:
            result = edit_task(task, changes, actor=self.identity.worker)
        except EditError as exc:
            return refused(f"{task.key}: {exc}")
        except FileChanged as exc:
            return refused(
                f"{task.key}: not edited: {exc.why} (a person re-imports or reloads it first)"
            )
        except Conflict as exc:
            return refused(f"{task.key}: not edited: {exc}")
        if not result.changed:
            return answer(True, "nothing to change")
        when = " (written to the file when the claim ends)" if result.deferred else ""
        return answer(True, f"edited {', '.join(result.changed)}{when}")


def describe_holder(task: Task) -> str:
    if task.held_over_http:
        return f"{task.holder} (over HTTP, until its lease runs out)"
    where = f"pid {task.holder_pid} on {task.holder_host}" if task.holder_pid else "outside"
    return f"{task.holder} ({where})"


def blocked_parts(body: str) -> dict[str, str]:
    """reason, evidence and next_step from the old prompt's blocked body."""
    parts: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if label := BLOCKED_PART.match(line):
            field = {"reason": "reason", "evidence": "evidence"}.get(label[1].lower(), "next_step")
            parts.append((field, [label[2]]))
        elif parts:
            parts[-1][1].append(line)
    found = {}
    for field, lines in parts:
        found.setdefault(field, "\n".join(lines).strip())
    return {k: v for k, v in found.items() if v}


def _with_status(tasks, word: str):
    if word == "ready":
        return tasks.ready()
    if word == "cancelled":
        return tasks.filter(status=Status.DONE, outcome="cancelled")
    return tasks.filter(status=word)


def _status_word(value) -> str:
    if not isinstance(value, str) or value.strip().lower() not in STATUS_WORDS:
        raise BadInput(
            f"status: {str(value)[:40]!r} is not a status I know; use one of "
            f"{', '.join(STATUS_WORDS)}"
        )
    return STATUS_WORDS[value.strip().lower()]


def _key(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise BadInput("id: give the task's id (its key, as list_tasks shows it)")
    if len(value) > 500:
        raise BadInput("id: longer than any task key (500 characters)")
    if "\x00" in value:  # PostgreSQL refuses it in a query: a database error otherwise
        raise BadInput("id: contains a NUL character")
    return value.strip()


def _text(value, name: str, limit: int) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadInput(f"{name}: text expected, got {type(value).__name__}")
    if "\x00" in value:
        raise BadInput(f"{name}: contains a NUL character")
    if len(value) > limit:
        raise BadInput(f"{name}: {len(value):,} characters, over {limit:,}")
    return value


def _number(value, name: str, low: int = -(2**31), high: int = 2**31 - 1) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInput(f"{name}: a whole number expected, got {str(value)[:40]!r}")
    if not low <= value <= high:
        raise BadInput(f"{name}: {value} is out of range ({low}..{high})")
    return value


def _where(value) -> list[str]:
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        return [part for part in re.split(r"\s*[,;]\s*", value.strip()) if part]
    if isinstance(value, dict):
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value.values()):
            raise BadInput("where: each field's value is one text or number")
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadInput("where: FIELD=VALUE text, a list of them, or an object of fields to values")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def local_session(
    queue: str,
    name: str = "",
    filters: TaskFilter | None = None,
    lease_seconds: int | None = None,
    herd: int | None = None,
    max_attempts: int | None = None,
    batch: int = 0,
) -> PullSession:
    """A session of this process (its pid and start time), reaped like any worker's.
    Its holder name is `mcp:NAME`, or `mcp:HOST:PID` without a name."""
    identity = Identity.current(f"mcp:{name}" if name else None, herd)
    if not name:
        identity = Identity(
            f"mcp:{identity.worker}", identity.host, identity.pid, identity.started, herd
        )
    session = PullSession(
        queue, identity, filters or None, lease_seconds, False, max_attempts, batch=batch
    )
    signals.worker_started.send(sender=session)
    return session


class Heartbeat:
    """Renews the leases of the claims a local session holds while its process lives."""

    def __init__(self, session: PullSession):
        self.session = session
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        interval = max(0.5, min(self.session.lease_seconds / 3, 10))
        try:
            while not self.stopping.wait(interval):
                try:
                    self.session.heartbeat()
                except Exception:  # a lost beat is retried; the lease covers the gap
                    log.exception("heartbeat failed")
                    close_old_connections()
        finally:
            connection.close()
