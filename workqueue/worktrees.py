"""One git worktree per claimed task, so agents never edit the same checkout at once."""

from __future__ import annotations

import fcntl
import hashlib
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.dispatch import receiver
from django.utils import timezone

from workqueue import signals
from workqueue.locks import lock_name
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent
from workqueue.processing import Claim, Processor, Result, WorkContext
from workqueue.processors import CommandProcessor


class WorktreeError(Exception):
    pass


def git(repo: str | Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise WorktreeError(f"git {' '.join(args[:2])} failed: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def branch_name(queue: str, key: str) -> str:
    """The task's own git branch, `hypervisor/<queue>/<key>`: two queues over one repository
    may both have a task `001`."""
    return f"hypervisor/{_ref_part(queue)}/{_ref_part(key)}"


def _ref_part(text: str) -> str:
    """`text` as one valid component of a git ref. Text that had to change gets a digest of
    itself, so "a b" and "a-b" (or two 300-character keys alike at the start) never share."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    part = re.sub(r"\.{2,}", ".", part).replace(".lock", "-lock").strip(".-")[:100]
    if part and part == text:
        return part
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{part}-{digest}" if part else digest


@contextmanager
def repository_lock(repo: Path):
    """git locks its worktree metadata; creating and removing worktrees waits in line."""
    common = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir"))
    with open(common / "hypervisor-worktrees.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@dataclass
class Worktree:
    path: Path
    branch: str
    start: str  # the branch's commit when the task got the worktree


def worktree_root(repo: Path) -> Path:
    digest = hashlib.sha256(str(repo).encode()).hexdigest()[:8]
    return Path(settings.HYPERVISOR_DATA_DIR) / "worktrees" / f"{repo.name}-{digest}"


def add(repo: Path, base: str, queue: str, key: str) -> Worktree:
    branch = branch_name(queue, key)
    path = worktree_root(repo) / lock_name(queue) / lock_name(key)
    with repository_lock(repo):
        if path.exists():
            git(repo, "worktree", "remove", "--force", str(path))
        git(repo, "worktree", "prune")
        exists = (
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(repo),
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    f"refs/heads/{branch}",
                ],
                capture_output=True,
            ).returncode
            == 0
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        if exists:  # a retry continues on the branch the earlier attempt left
            git(repo, "worktree", "add", str(path), branch)
        else:
            git(repo, "worktree", "add", "-b", branch, str(path), base)
    return Worktree(path, branch, git(path, "rev-parse", "HEAD"))


def remove(repo: Path, path: str | Path) -> None:
    with repository_lock(repo):
        if Path(path).exists():
            git(repo, "worktree", "remove", "--force", str(path))
        git(repo, "worktree", "prune")


@receiver(signals.claim_released)
def clean_task_worktree(sender, task: Task, actor: str, **kwargs) -> None:
    """Remove a released task's worktree (its branch stays) and say so on the task."""
    if not task.worktree:
        return
    try:
        remove(_repo_of(Path(task.worktree)), task.worktree)
        message = f"worktree {task.worktree} removed; branch {task.branch} kept"
    except (WorktreeError, OSError) as exc:
        message = f"worktree {task.worktree} could not be removed: {exc}"
    Task.objects.filter(pk=task.pk).update(worktree="")
    TaskEvent.objects.create(
        task=task,
        kind=EventKind.NOTE,
        actor=actor,
        message=message,
        data={"worktree": task.worktree, "branch": task.branch},
    )


def _repo_of(path: Path) -> Path:
    common = git(path, "rev-parse", "--path-format=absolute", "--git-common-dir")
    return Path(common).parent


class WorktreeProcessor(Processor):
    """Runs a command in the task's own worktree of a repository."""

    name = "worktree"
    finish_in_batches = False

    def __init__(
        self, inner: CommandProcessor, repo: str, base: str = "main", require_commit: bool = False
    ):
        self.inner = inner
        self.repo = Path(repo).resolve()
        self.base = base
        self.require_commit = require_commit

    def process(self, claim: Claim, context: WorkContext) -> Result:
        try:
            tree = add(self.repo, self.base, claim.queue, claim.key)
        except (WorktreeError, OSError) as exc:
            return Result(status=Status.BLOCKED, reason=f"cannot create a worktree: {exc}")
        # Recorded before the command runs: a crash or a cancel leaves a trace on the task.
        Task.objects.filter(pk=claim.id, fence=claim.fence).update(
            worktree=str(tree.path), branch=tree.branch, updated_at=timezone.now()
        )
        result = self.inner.process(
            claim, context, extra={"worktree": str(tree.path)}, cwd=str(tree.path)
        )
        result.data.update({"worktree": str(tree.path), "branch": tree.branch})
        try:
            head = git(tree.path, "rev-parse", "HEAD")
        except (WorktreeError, OSError) as exc:  # the agent removed or broke its worktree
            result.status, result.outcome = Status.BLOCKED, ""
            result.reason = f"the task's worktree {tree.path} is gone or broken: {exc}"
            return result
        committed = head != tree.start
        if committed:
            result.commit = result.commit or head
        if result.status == Status.DONE and self.require_commit and not committed:
            result = self._without_commit(claim, tree, result)
        if result.status == Status.BLOCKED:
            return result  # kept for a person to inspect; the task detail shows where
        try:
            remove(self.repo, tree.path)
        except (WorktreeError, OSError) as exc:
            result.data["worktree_left"] = f"not removed: {exc}"
            return result
        Task.objects.filter(pk=claim.id, fence=claim.fence).update(worktree="")
        return result

    def _without_commit(self, claim: Claim, tree: Worktree, result: Result) -> Result:
        """Back to the queue; blocked once the queue's attempt limit is used up."""
        attempts = Task.objects.filter(pk=claim.id).values_list("attempts", flat=True)[0]
        limit = Queue.objects.filter(name=claim.queue).values_list("max_attempts", flat=True)
        limit = limit[0] if limit else 3
        if attempts >= limit:
            return Result(
                status=Status.BLOCKED,
                output_tail=result.output_tail,
                reason=f"no new commit on {tree.branch} after {attempts} attempts",
                data=result.data,
            )
        return Result(
            status=Status.QUEUED,
            output_tail=result.output_tail,
            reason=f"no new commit on {tree.branch}: back to the queue",
            data=result.data,
        )
