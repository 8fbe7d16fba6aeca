"""What a person does to tasks, from the board, a bulk action or the admin.

An action ends the agents of the claimed tasks first (two agents must never work on one
task, and a person's release is a release like the reaper's), in one look at the process
table however many tasks; then makes its transition for all of them in one write; then
lets go of each released claim's lock directory while it is still the old holder's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from workqueue import agent_tree, reaper, transitions
from workqueue.models import Status, Task

ACTIONS = ("release", "requeue", "back_to_queue", "done", "block")


class AgentStillRunning(Exception):
    """A claim's agent could not be ended, so its task cannot go to anyone else."""


@dataclass
class Outcome:
    changed: list[int] = field(default_factory=list)
    # Task id -> why it was left as it was: its agent could not be ended.
    refused: dict[int, str] = field(default_factory=dict)


def act(
    tasks: Iterable[Task], action: str, actor: str, reason: str = "", message: str = ""
) -> Outcome:
    """One action over tasks as the caller saw them. Tasks that moved meanwhile, or that
    the action does not start from, are left alone (not in `changed`)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    tasks = list(tasks)
    outcome = Outcome()
    claimed = [t for t in tasks if t.status == Status.CLAIMED]
    if claimed and action != "requeue":
        for pk, pids in agent_tree.end_agents_of(claimed).items():
            key = next(t.key for t in claimed if t.pk == pk)
            outcome.refused[pk] = (
                f"{key}: its agent's processes {', '.join(map(str, pids))} "
                "could not be ended; the task stays claimed"
            )
    ready = [t for t in tasks if t.pk not in outcome.refused]
    if action in ("release", "back_to_queue"):
        outcome.changed += transitions.release_by_person(ready, actor, message)
    if action in ("requeue", "back_to_queue"):
        outcome.changed += transitions.requeue(ready, actor, message)
    if action == "done":
        outcome.changed += transitions.mark_done(ready, actor, reason)
    if action == "block":
        outcome.changed += transitions.block(ready, actor, reason)
    changed = set(outcome.changed)
    for task in claimed:
        if task.pk in changed:
            reaper.let_go(task, actor)
    return outcome


def _one(task: Task, action: str, actor: str, reason: str = "", message: str = "") -> bool:
    outcome = act([task], action, actor, reason, message)
    if task.pk in outcome.refused:
        raise AgentStillRunning(outcome.refused[task.pk])
    return task.pk in outcome.changed


def release(task: Task, actor: str, message: str = "") -> bool:
    """A claim let go: back to queued. Raises AgentStillRunning."""
    return _one(task, "release", actor, message=message)


def requeue(task: Task, actor: str, message: str = "") -> bool:
    """A done or blocked task back to queued."""
    return _one(task, "requeue", actor, message=message)


def back_to_queue(task: Task, actor: str, message: str = "") -> bool:
    """Whatever the task's state: a claim released, a done or blocked task requeued."""
    return _one(task, "back_to_queue", actor, message=message)


def mark_done(task: Task, actor: str, reason: str = "") -> bool:
    """Closed by a person. Raises AgentStillRunning."""
    return _one(task, "done", actor, reason=reason)


def block(task: Task, actor: str, reason: str) -> bool:
    """Blocked by a person, with the reason. Raises AgentStillRunning."""
    return _one(task, "block", actor, reason=reason)
