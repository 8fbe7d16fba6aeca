"""A task folder kept in a git repository and worked with git while workers run: real
repositories, real `git`, real worker processes."""

import subprocess

import pytest

from tests.conftest import run_manage, work_appending
from workqueue.models import Status, Task

pytestmark = pytest.mark.django_db(transaction=True)


def git(repo, *args) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    return done.stdout + done.stderr


@pytest.fixture
def repo(tmp_path):
    """A repository whose `tasks/` folder holds three committed task files."""
    root = tmp_path / "repo"
    (root / "tasks").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    for n in (1, 2, 3):
        (root / "tasks" / f"t{n}.md").write_text(
            f"---\nid: t{n}\ntitle: Task {n}  # kept\nstatus: inbox\npriority: 1\n---\n"
            f"# Task {n}\n\nBody {n}.\n"
        )
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tasks")
    return root


def test_a_file_git_left_in_a_merge_conflict_is_named_as_one_and_its_task_kept(repo, process_env):
    folder = str(repo / "tasks")
    assert run_manage(["import_tasks", folder, "--queue", "q"], process_env).returncode == 0
    assert run_manage(["work", "--queue", "q"], process_env).returncode == 0
    git(repo, "commit", "-q", "-am", "worked")  # status: done in all three
    git(repo, "checkout", "-q", "-b", "other", "HEAD~1")
    text = (repo / "tasks" / "t1.md").read_text()
    (repo / "tasks" / "t1.md").write_text(text.replace("status: inbox", "status: wontfix"))
    body = (repo / "tasks" / "t2.md").read_text()
    (repo / "tasks" / "t2.md").write_text(body.replace("Body 2.", "Body two."))
    git(repo, "commit", "-q", "-am", "other")
    git(repo, "checkout", "-q", "main")
    body = (repo / "tasks" / "t2.md").read_text()
    (repo / "tasks" / "t2.md").write_text(body.replace("Body 2.", "Body 2, more."))
    git(repo, "commit", "-q", "-am", "body")
    assert "CONFLICT" in git(repo, "merge", "other")
    assert "<<<<<<<" in (repo / "tasks" / "t2.md").read_text()  # in its body only

    result = run_manage(["import_tasks", folder, "--queue", "q"], process_env)

    assert result.returncode == 1
    for name, line in (("t1.md", 4), ("t2.md", 9)):
        assert (
            f"{folder}/{name}: unresolved merge conflict (git's '<<<<<<<' at line {line}): "
            "resolve it, then import again"
        ) in result.stderr
    # The rows stay as they were imported: a half-merged file says nothing yet.
    tasks = Task.objects.filter(queue="q").order_by("key")
    assert [t.status for t in tasks] == [Status.DONE] * 3
    assert "<<<<<<<" not in tasks[1].body


def test_conflict_marks_shown_in_a_code_block_are_a_task_like_any_other(write_task):
    from workqueue.importer import Importer

    write_task(
        "t.md",
        "---\nid: t\n---\nResolve this:\n\n```\n<<<<<<< HEAD\na\n=======\nb\n>>>>>>> x\n```\n",
    )
    report = Importer("q", [write_task.folder]).run([write_task.folder])
    assert report.errors == []
    assert "<<<<<<< HEAD" in Task.objects.get(key="t").body


def test_a_checkout_of_an_older_revision_says_the_tasks_it_sent_back_to_the_queue(
    repo, process_env
):
    folder = str(repo / "tasks")
    run_manage(["import_tasks", folder, "--queue", "q"], process_env)
    assert run_manage(["work", "--queue", "q", "--workers", "2"], process_env).returncode == 0
    # The finish wrote only the status lines.
    diff = git(repo, "diff", "-U0", "--no-color", "tasks")
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in "---+++"]
    assert sorted(changed) == ["+status: done"] * 3 + ["-status: inbox"] * 3
    git(repo, "commit", "-q", "-am", "worked")

    git(repo, "checkout", "-q", "HEAD~1")
    result = run_manage(["import_tasks", folder, "--queue", "q"], process_env)

    assert result.stdout.splitlines()[0] == (
        "0 imported, 3 updated, 0 unchanged, 0 closed, 0 deferred (claimed), 0 missing, "
        "0 errors; 3 done or blocked tasks went back to the queue (their files say open again)"
    )
    assert set(Task.objects.values_list("status", flat=True)) == {Status.QUEUED}
    # Back on the branch, the files close them again, and the import says nothing more.
    git(repo, "checkout", "-q", "main")
    result = run_manage(["import_tasks", folder, "--queue", "q", "--json"], process_env)
    assert '"closed": 3, "requeued": 0' in result.stdout
    assert set(Task.objects.values_list("status", flat=True)) == {Status.DONE}


def test_git_mergetools_copies_of_a_conflicted_file_are_no_tasks(repo, process_env):
    folder = str(repo / "tasks")
    run_manage(["import_tasks", folder, "--queue", "q"], process_env)
    run_manage(["work", "--queue", "q"], process_env)
    git(repo, "commit", "-q", "-am", "worked")
    git(repo, "checkout", "-q", "-b", "other", "HEAD~1")
    text = (repo / "tasks" / "t1.md").read_text()
    (repo / "tasks" / "t1.md").write_text(text.replace("status: inbox", "status: wontfix"))
    git(repo, "commit", "-q", "-am", "other")
    git(repo, "checkout", "-q", "main")
    assert "CONFLICT" in git(repo, "merge", "other")
    # A merge tool that takes its time: git leaves the base, both sides and a backup of
    # the conflicted file beside it while the tool runs.
    git(repo, "config", "mergetool.slow.cmd", 'while [ ! -e "$MERGED.go" ]; do sleep 0.05; done')
    tool = subprocess.Popen(
        ["git", "mergetool", "--tool=slow", "--no-prompt", "tasks/t1.md"],
        cwd=repo,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while len(list((repo / "tasks").glob("t1_*.md"))) < 4:
            assert tool.poll() is None
        result = run_manage(["import_tasks", folder, "--queue", "q"], process_env)
    finally:
        (repo / "tasks" / "t1.md.go").touch()
        tool.wait(timeout=30)

    assert result.stderr.splitlines()[:-1] == [
        f"{folder}/t1.md: unresolved merge conflict (git's '<<<<<<<' at line 4): "
        "resolve it, then import again"
    ]
    task = Task.objects.get(key="t1")
    assert (task.status, task.source_path) == (Status.DONE, f"{folder}/t1.md")
    assert Task.objects.count() == 3


def test_a_task_whose_file_git_left_half_merged_is_blocked_not_given_to_its_command(
    repo, process_env, tmp_path
):
    folder = str(repo / "tasks")
    run_manage(["import_tasks", folder, "--queue", "q"], process_env)
    git(repo, "checkout", "-q", "-b", "other")
    body = (repo / "tasks" / "t1.md").read_text()
    (repo / "tasks" / "t1.md").write_text(body.replace("Body 1.", "Do it this way."))
    git(repo, "commit", "-q", "-am", "other")
    git(repo, "checkout", "-q", "main")
    (repo / "tasks" / "t1.md").write_text(body.replace("Body 1.", "Do it that way."))
    git(repo, "commit", "-q", "-am", "main")
    assert "CONFLICT" in git(repo, "merge", "other")
    conflicted = (repo / "tasks" / "t1.md").read_bytes()
    log = tmp_path / "ran.log"

    result = run_manage([*work_appending(log), "--workers", "2"], process_env)

    assert result.returncode == 0, result.stderr
    assert sorted(log.read_text().split()) == ["t2", "t3"]
    task = Task.objects.get(key="t1")
    assert (task.status, task.reason) == (
        Status.BLOCKED,
        "its file has an unresolved merge conflict (git's '<<<<<<<' at line 9): "
        "resolve it, then requeue",
    )
    assert (repo / "tasks" / "t1.md").read_bytes() == conflicted  # nothing written into it


def test_a_task_file_made_read_only_is_not_written_by_its_finish(repo, process_env):
    # As `git lfs lock` leaves a lockable file that is not locked, or a person's chmod a-w.
    folder = str(repo / "tasks")
    run_manage(["import_tasks", folder, "--queue", "q"], process_env)
    locked = repo / "tasks" / "t1.md"
    locked.chmod(0o444)
    before = locked.read_bytes()

    assert run_manage(["work", "--queue", "q"], process_env).returncode == 0

    assert locked.read_bytes() == before
    assert oct(locked.stat().st_mode & 0o777) == "0o444"
    task = Task.objects.get(key="t1")
    assert task.status == Status.DONE  # the finish stands, and says why the file did not
    assert task.events.filter(
        message=f"done, but not written into {locked}: cannot write the file: the file is "
        "read-only"
    ).exists()
    assert "status: done" in (repo / "tasks" / "t2.md").read_text()
