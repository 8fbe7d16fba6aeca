"""What a person does to a task, from the board or the admin.

Each action ends the agent of a claimed task first (two agents must never work on one
task, and a person's release is a release like the reaper's), then makes its transition,
then lets go of the claim's lock directory while it is still the old holder's.
"""

from __future__ import annotations

from workqueue import agent_tree, reaper, transitions
from workqueue.models import Status, Task


class AgentStillRunning(Exception):
    """A claim's agent could not be ended, so its task cannot go to anyone else."""


def _end_agent(task: Task) -> None:
    if task.status == Status.CLAIMED:
        alive = agent_tree.end_agents_of([task]).get(task.pk)
        if alive:
            raise AgentStillRunning(
                f"{task.key}: its agent's processes {', '.join(map(str, alive))} "
                "could not be ended; the task stays claimed"
            )


def _after(task: Task, changed: bool, actor: str) -> bool:
    if changed and task.status == Status.CLAIMED:
        reaper.let_go(task, actor)
    return changed


def release(task: Task, actor: str, message: str = "") -> bool:
    """A claim let go: back to queued. Raises AgentStillRunning."""
    _end_agent(task)
    return _after(task, transitions.release_by_person(task, actor, message), actor)


def requeue(task: Task, actor: str, message: str = "") -> bool:
    """A done or blocked task back to queued."""
    return transitions.requeue(task, actor, message)


def back_to_queue(task: Task, actor: str, message: str = "") -> bool:
    """Whatever the task's state: a claim released, a done or blocked task requeued."""
    if task.status == Status.CLAIMED:
        return release(task, actor, message)
    return requeue(task, actor, message)


def mark_done(task: Task, actor: str, reason: str = "") -> bool:
    """Closed by a person. Raises AgentStillRunning."""
    _end_agent(task)
    return _after(task, transitions.mark_done(task, actor, reason), actor)


def block(task: Task, actor: str, reason: str) -> bool:
    """Blocked by a person, with the reason. Raises AgentStillRunning."""
    _end_agent(task)
    return _after(task, transitions.block(task, actor, reason), actor)
