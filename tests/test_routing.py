"""Routing (filters inside the claim query) and isolation (a git worktree per task)."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import APPEND, make_tasks, run_manage, start_manage
from workqueue import claims, reaper
from workqueue.locks import Identity, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task
from workqueue.routing import FilterError, TaskFilter

AGENT = str(Path(__file__).parent.parent / "examples" / "agents" / "git_agent.py")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("colour=red", "unknown field 'colour'"),
        ("project", "is not FIELD=VALUE"),
        ("project>=a", "only priority takes >= or <="),
        ("priority>=high", "priority is a whole number"),
        ("tag=", "a tag is a non-empty word"),
        # One &where= or --where holding two (the tool's `where` splits them itself).
        ("project=web,type=task", "give each condition on its own"),
        ("project=web; priority<=2", "give each condition on its own"),
    ],
)
def test_bad_filters_are_refused_with_the_reason(expression, message):
    with pytest.raises(FilterError, match=message):
        TaskFilter.parse([expression])


def test_more_filters_than_any_routing_needs_are_refused():
    """600 conditions were an error page at the herd's pre-flight on SQLite (its
    expression tree too deep), and a crashed launch from the command line."""
    assert len(TaskFilter.parse([f"project!=p{n}" for n in range(50)]).conditions) == 50
    with pytest.raises(FilterError, match="^at most 50 filters, not 600$"):
        TaskFilter.parse([f"project=p{n}" for n in range(600)])


@pytest.mark.django_db
def test_a_tag_matches_in_its_own_case_on_every_database():
    # SQLite's LIKE ignores ASCII case, PostgreSQL's does not: the same filter must pick
    # the same tasks on both (the dropdown lists `Bug` and `bug` as two tags).
    make_tasks("q", 4)
    for key, tags in {"t000000": "|bug|", "t000001": "|Bug|", "t000002": "|BUG|ui|"}.items():
        Task.objects.filter(key=key).update(tag_index=tags)
    tasks = Task.objects.order_by("key")
    assert [t.key for t in TaskFilter.parse(["tag=bug"]).apply(tasks)] == ["t000000"]
    assert [t.key for t in TaskFilter.parse(["tag=Bug"]).apply(tasks)] == ["t000001"]
    assert [t.key for t in TaskFilter.parse(["tag!=bug"]).apply(tasks)] == [
        "t000001",
        "t000002",
        "t000003",
    ]


@pytest.mark.django_db
def test_filters_apply_inside_the_claim_query():
    make_tasks("q", 6)
    Task.objects.filter(key__in=["t000001", "t000003"]).update(
        complexity="mechanical", project="web", tag_index="|bug|"
    )
    Task.objects.filter(key="t000003").update(priority=4)
    me = Identity.current("w")
    only = TaskFilter.parse(["complexity=mechanical", "project=web", "tag=bug", "priority<=3"])
    batch = claims.claim_ready_tasks("q", me, OwnerFile(me), limit=10, filters=only)
    assert [c.key for c in batch] == ["t000001"]
    assert Task.objects.filter(status=Status.CLAIMED).count() == 1
    others = TaskFilter.parse(["complexity!=mechanical"])
    assert TaskFilter.parse(["priority>=4"]).apply(Task.objects.all()).count() == 1
    assert others.apply(Task.objects.all()).count() == 4


def test_work_command_reports_a_bad_filter(process_env):
    result = run_manage(["work", "--queue", "q", "--where", "colour=red"], process_env)
    assert result.returncode == 1
    assert "unknown field 'colour'" in result.stderr


@pytest.mark.slow
def test_two_groups_with_overlapping_filters_take_each_task_once(process_env, tmp_path):
    tasks = make_tasks("q", 600)
    for i, task in enumerate(tasks):
        task.project = "web" if i % 2 else "ops"
        task.complexity = "mechanical" if i % 3 else "multi-step"
    Task.objects.bulk_update(tasks, ["project", "complexity"])
    log = tmp_path / "keys.log"
    command = [
        "--processor",
        "command",
        "--prefetch",
        "5",
        "--json",
        "--",
        sys.executable,
        "-S",
        APPEND,
        str(log),
        "{key}",
    ]
    groups = {
        "web": ["--where", "project=web"],
        "mechanical": ["--where", "complexity=mechanical"],
    }
    workers = [
        (name, start_manage(["work", "--queue", "q", *where, *command], process_env))
        for name, where in groups.items()
        for _ in range(3)
    ]
    for _, w in workers:
        w.communicate(timeout=600)
        assert w.returncode == 0
    seen = Counter(log.read_text().split())
    assert max(seen.values()) == 1
    expected = {t.key for t in tasks if t.project == "web" or t.complexity == "mechanical"}
    assert set(seen) == expected
    left = Task.objects.filter(status=Status.QUEUED)
    assert set(left.values_list("project", "complexity").distinct()) == {("ops", "multi-step")}


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (path / "README.md").write_text("# Project\n")
    git("add", "README.md")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "init")
    return path


def branches(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(repo), "branch", "--format=%(refname:short)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(out.split())


def worktree_list(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]


def work_in_worktrees(repo, env, *agent_args, extra=()):
    return start_manage(
        [
            "work",
            "--queue",
            "q",
            "--processor",
            "command",
            "--worktree-repo",
            str(repo),
            "--require-commit",
            *extra,
            "--json",
            "--",
            sys.executable,
            AGENT,
            "{key}",
            *agent_args,
        ],
        env,
    )


@pytest.mark.slow
def test_two_agents_commit_the_same_file_name_in_their_own_worktrees(process_env, repo):
    make_tasks("q", 2)
    procs = [work_in_worktrees(repo, process_env, extra=["--batch", "1"]) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert branches(repo) == ["hypervisor/q/t000000", "hypervisor/q/t000001", "main"]
    assert worktree_list(repo) == [str(repo)]
    for task in Task.objects.all():
        assert task.status == Status.DONE and task.worktree == ""
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{task.commit}:RESULT.md"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert task.key in shown
        assert task.result["branch"] == f"hypervisor/q/{task.key}"


@pytest.mark.slow
def test_an_agent_that_commits_nothing_puts_its_task_back(process_env, repo):
    make_tasks("q", 1)
    proc = work_in_worktrees(repo, process_env, "--no-commit", extra=["--batch", "1"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    task = Task.objects.get()
    assert (task.status, task.attempts) == (Status.QUEUED, 1)
    assert task.reason == "no new commit on hypervisor/q/t000000: back to the queue"
    assert worktree_list(repo) == [str(repo)]
    assert task.events.filter(kind=EventKind.RELEASED).exists()
    assert json.loads(out.strip().splitlines()[-1])["released"] == 1


@pytest.mark.slow
def test_no_commit_blocks_the_task_once_its_attempts_are_used_up(process_env, repo):
    make_tasks("q", 1)
    Queue.objects.filter(name="q").update(max_attempts=2)
    for _ in range(2):
        proc = work_in_worktrees(repo, process_env, "--no-commit", extra=["--batch", "1"])
        proc.communicate(timeout=120)
    task = Task.objects.get()
    assert (task.status, task.attempts) == (Status.BLOCKED, 2)
    assert task.reason == "no new commit on hypervisor/q/t000000 after 2 attempts"


@pytest.mark.slow
def test_a_blocked_task_keeps_its_worktree(process_env, repo):
    make_tasks("q", 1)
    proc = work_in_worktrees(repo, process_env, "--block")
    proc.communicate(timeout=120)
    task = Task.objects.get()
    assert task.status == Status.BLOCKED
    assert task.worktree and Path(task.worktree, "RESULT.md").exists()
    assert task.worktree in worktree_list(repo)


@pytest.mark.django_db
def test_reaper_removes_the_worktree_of_a_task_it_releases(repo, settings, tmp_path):
    from workqueue import worktrees

    settings.HYPERVISOR_DATA_DIR = tmp_path / "data"
    make_tasks("q", 1)
    me = Identity.current("w")
    claim = claims.claim_ready_tasks("q", me, OwnerFile(me))[0]
    tree = worktrees.add(repo, "main", "q", claim.key)
    Task.objects.update(worktree=str(tree.path), branch=tree.branch, holder_pid=2**22 + 3)
    report = reaper.release_stale_claims("q")
    assert len(report.requeued) == 1
    task = Task.objects.get()
    assert (task.status, task.worktree) == (Status.QUEUED, "")
    assert worktree_list(repo) == [str(repo)]
    assert tree.branch in branches(repo)
    note = task.events.get(kind=EventKind.NOTE)
    assert note.message == f"worktree {tree.path} removed; branch {tree.branch} kept"


HOSTILE_KEYS = ["001", "a b", "a-b", "a/b", "a..b", "a...b", "x.lock", ".x", "-x", "@{u}", "ü"]
HOSTILE_KEYS += ["a~b^c:d?e*f[g\\h", "k" * 300, "k" * 300 + "x", "end.", "a/.b"]


def test_every_task_gets_its_own_valid_branch():
    """Keys that cleaned up alike shared a branch (the second task continued on the first's
    commits, or failed while the first had it checked out), and so did two queues' `001`."""
    from workqueue.worktrees import branch_name

    names = [branch_name(queue, key) for queue in ("bugs", "docs") for key in HOSTILE_KEYS]
    assert len(set(names)) == len(names)
    assert branch_name("bugs", "001") == "hypervisor/bugs/001"  # a plain key stays readable
    for name in names:
        check = ["git", "check-ref-format", "--branch", name]
        assert subprocess.run(check, capture_output=True).returncode == 0, name


@pytest.mark.django_db
def test_two_queues_tasks_of_one_key_get_two_worktrees_at_once(repo, settings, tmp_path):
    from workqueue import worktrees

    settings.HYPERVISOR_DATA_DIR = tmp_path / "data"
    first = worktrees.add(repo, "main", "bugs", "001")
    second = worktrees.add(repo, "main", "docs", "001")  # was: already checked out
    assert (first.branch, second.branch) == ("hypervisor/bugs/001", "hypervisor/docs/001")
    assert first.path != second.path
    assert sorted(worktree_list(repo)) == sorted([str(repo), str(first.path), str(second.path)])


@pytest.mark.slow
def test_two_herds_with_overlapping_filters_share_no_task(huey_env, consumer, tmp_path):
    from herds.models import Herd, Profile
    from tests.test_herds_processes import launch, wait_until, worker_logs

    log = tmp_path / "keys.log"
    append = [sys.executable, "-S", APPEND, str(log), "{key}"]
    for name, where in (("web-agent", "project=web"), ("mech-agent", "complexity=mechanical")):
        Profile.objects.update_or_create(
            name=name,
            defaults={
                "processor": "command",
                "command": append,
                "prefetch": 1,
                "filters": [where],
            },
        )
    tasks = make_tasks("q", 300)
    for i, task in enumerate(tasks):
        task.project = "web" if i % 2 else "ops"
        task.complexity = "mechanical" if i % 3 else "multi-step"
    Task.objects.bulk_update(tasks, ["project", "complexity"])
    herds = [
        launch(huey_env, "--queue", "q", "--profile", name, "--workers", "3")
        for name in ("web-agent", "mech-agent")
    ]
    wait_until(
        lambda: all(h.ended for h in Herd.objects.filter(pk__in=herds)),
        300,
        what="both herds to end",
    )
    seen = Counter(log.read_text().split())
    assert max(seen.values()) == 1, worker_logs()
    expected = {t.key for t in tasks if t.project == "web" or t.complexity == "mechanical"}
    assert set(seen) == expected
    done_by = Counter(
        Task.objects.filter(status=Status.DONE).values_list("holder_herd", flat=True)
    )
    assert set(done_by) == set(herds) and sum(done_by.values()) == len(expected)


def test_an_agent_that_removes_its_worktree_blocks_its_task_and_the_worker_goes_on(
    process_env, repo
):
    """The worker's `git rev-parse HEAD` in a worktree its agent removed raised out of the
    processor: the worker died with a traceback, holding its claims until the reaper."""
    make_tasks("q", 2)
    agent = "import shutil, sys; shutil.rmtree(sys.argv[1]); print('COMPLETED: ' + sys.argv[2])"
    result = run_manage(
        ["work", "--queue", "q", "--processor", "command", "--worktree-repo", str(repo),
         "--", sys.executable, "-c", agent, "{worktree}", "{key}"],
        process_env,
    )  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-1500:]
    for task in Task.objects.all():
        assert task.status == Status.BLOCKED
        assert task.reason.startswith(f"the task's worktree {task.worktree} is gone or broken")
