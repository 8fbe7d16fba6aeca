"""A batch of finishes writes each file's new status word over its old one, in place.

Creating a temporary and renaming it over each file queued on the folder's lock and the
filesystem's journal: a few thousand files a second however many workers wrote, and most
of a no-op herd's time. These pin what a write in place may and may not do.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_manage, start_manage
from workqueue import claims, editing
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task
from workqueue.processing import Result
from workqueue.writeback import SECTOR, Document, overwrite_spot

FILES = {
    "inbox.md": "---\nid: a-1\ntitle: A\nstatus: inbox\ntags: [x]\n---\n# A\n",
    "todo.md": "---\nid: a-2\ntitle: B\nstatus: todo\n---\n# B\n",
    "queued.md": "---\r\nid: a-3\r\ntitle: C\r\nstatus: queued\r\n---\r\n# C\r\n",
    "comment.md": "---\nid: a-4\ntitle: D\nstatus: open # by hand\n---\n# D\n",
}
WRITTEN = {
    "inbox.md": "---\nid: a-1\ntitle: A\nstatus: done \ntags: [x]\n---\n# A\n",
    "todo.md": "---\nid: a-2\ntitle: B\nstatus: done\n---\n# B\n",
    "queued.md": "---\r\nid: a-3\r\ntitle: C\r\nstatus: done  \r\n---\r\n# C\r\n",
    "comment.md": "---\nid: a-4\ntitle: D\nstatus: done # by hand\n---\n# D\n",
}


@pytest.fixture
def tasks(lock_root, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()

    def make(files: dict[str, str]) -> dict:
        for name, text in files.items():
            (folder / name).write_bytes(text.encode())
        report = Importer("q", roots=[folder]).run([folder])
        assert (report.imported, report.errors) == (len(files), [])
        return {name: folder / name for name in files}

    make.folder = folder
    return make


def finish_all(status: str = Status.DONE, reason: str = "") -> list:
    identity = Identity.current("w-test")
    owner_file = OwnerFile(identity)
    taken = claims.claim_ready_tasks("q", identity, owner_file, limit=100)
    result = Result(status=status, reason=reason)
    claims.finish_claims(identity, [(c, result) for c in taken], owner_file)
    return taken


def notes() -> dict[str, str]:
    return dict(
        Task.objects.filter(events__kind=EventKind.NOTE).values_list("key", "events__message")
    )


@pytest.mark.django_db
def test_a_batch_writes_each_status_word_over_the_old_one(tasks):
    paths = tasks(FILES)
    inodes = {name: path.stat().st_ino for name, path in paths.items()}
    finish_all()
    for name, path in paths.items():
        assert path.read_bytes() == WRITTEN[name].encode(), name
        assert path.stat().st_ino == inodes[name], f"{name} was replaced, not written in place"
    assert not list(tasks.folder.glob(".*.tmp"))
    # The rows know the files as written (padding and all): an import finds nothing new,
    for task in Task.objects.all():
        raw = Path(task.source_path).read_bytes()
        assert task.source_sha256 == hashlib.sha256(raw).hexdigest()
        assert (task.status, task.frontmatter["status"]) == (Status.DONE, "done")
    again = Importer("q", roots=[tasks.folder]).run([tasks.folder])
    assert (again.unchanged, again.updated, again.errors) == (4, 0, [])
    # and a new database reads every one as done.
    Task.objects.all().delete()
    Queue.objects.all().delete()
    Importer("fresh", roots=[tasks.folder]).run([tasks.folder])
    assert set(Task.objects.values_list("status", flat=True)) == {Status.DONE}
    assert notes() == {}


@pytest.mark.django_db
def test_a_lone_finish_replaces_its_file_without_padding(tasks):
    """An agent's finish comes one at a time: its file says `status: done` exactly."""
    path = tasks({"inbox.md": FILES["inbox.md"]})["inbox.md"]
    inode = path.stat().st_ino
    finish_all()
    assert path.read_text() == "---\nid: a-1\ntitle: A\nstatus: done\ntags: [x]\n---\n# A\n"
    assert path.stat().st_ino != inode


@pytest.mark.django_db
def test_a_block_with_its_reason_replaces_the_files_whole(tasks):
    paths = tasks({"inbox.md": FILES["inbox.md"], "todo.md": FILES["todo.md"]})
    finish_all(Status.BLOCKED, "needs a key")
    assert paths["todo.md"].read_text() == (
        "---\nid: a-2\ntitle: B\nstatus: blocked\nblocked_reason: needs a key\n---\n# B\n"
    )
    assert (
        "status: blocked\ntags: [x]\nblocked_reason: needs a key\n"
        in paths["inbox.md"].read_text()
    )


@pytest.mark.django_db
def test_a_hard_linked_file_is_not_written_through_its_other_name(tasks, tmp_path):
    """A write in place would change every name of the file: one outside the task folder
    too. Such a file is replaced whole, as before: its other name keeps its bytes."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    paths = tasks(FILES)
    os.link(paths["todo.md"], outside / "todo-copy.md")
    finish_all()
    assert (outside / "todo-copy.md").read_text() == FILES["todo.md"]
    assert paths["todo.md"].read_text() == WRITTEN["todo.md"]
    assert paths["inbox.md"].read_text() == WRITTEN["inbox.md"]


@pytest.mark.django_db
@pytest.mark.parametrize("swap", ["edited", "symlink", "fifo", "hard link"])
def test_a_file_swapped_between_its_read_and_its_write_is_left_alone(
    tasks, tmp_path, monkeypatch, swap
):
    paths = tasks(FILES)
    victim = paths["todo.md"]
    named = str(victim.resolve())
    target = tmp_path / "target.md"
    target.write_text(FILES["todo.md"])
    real = editing.overwrite_if_unchanged

    def swapped_meanwhile(path, seen, offset, data):
        if path == named:
            if swap == "edited":  # an editor's save: a new file renamed over it
                new = victim.with_name(".new")
                new.write_text(FILES["todo.md"].replace("title: B", "title: Q"))
                os.replace(new, victim)
            elif swap == "hard link":  # the same file, now with a second name
                os.link(victim, tmp_path / "second-name.md")
            else:
                victim.unlink()
                if swap == "symlink":
                    victim.symlink_to(target)
                else:
                    os.mkfifo(victim)  # opened for writing, it would block without a reader
        return real(path, seen, offset, data)

    monkeypatch.setattr(editing, "overwrite_if_unchanged", swapped_meanwhile)
    finish_all()
    assert target.read_text() == FILES["todo.md"]
    if swap == "edited":
        assert "title: Q\nstatus: todo\n" in victim.read_text()
    if swap == "hard link":
        assert (tmp_path / "second-name.md").read_text() == FILES["todo.md"]
    assert notes() == {"a-2": f"done, but not written into {named}: changed on disk "
                              "since import"}  # fmt: skip
    assert paths["inbox.md"].read_text() == WRITTEN["inbox.md"]


@pytest.mark.django_db
def test_a_padded_status_line_is_edited_again_like_any_other(tasks):
    paths = tasks(FILES)
    finish_all()
    task = Task.objects.get(key="a-1")
    editing.edit_task(task, {"status": "queued", "title": "A again"}, "user:alice")
    assert paths["inbox.md"].read_text() == (
        "---\nid: a-1\ntitle: A again\nstatus: queued\ntags: [x]\n---\n# A\n"
    )


def test_a_worker_process_writes_its_batches_in_place(process_env, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for i in range(40):
        (folder / f"t{i:02d}.md").write_text(f"---\nid: t-{i}\ntitle: T{i}\nstatus: inbox\n---\n")
    inodes = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert not Importer("q", roots=[folder]).run([folder]).errors
    argv = ["work", "--queue", "q", "--processor", "noop", "--prefetch", "20", "--workers", "2"]
    result = run_manage(argv, process_env)
    assert result.returncode == 0, result.stderr
    for path in folder.iterdir():
        index = path.stem[1:].lstrip("0") or "0"
        expected = f"---\nid: t-{index}\ntitle: T{index}\nstatus: done \n---\n"
        assert (path.read_text(), path.stat().st_ino) == (expected, inodes[path.name])
    assert Task.objects.filter(status=Status.DONE).count() == 40


def spot(raw: str, changes: dict, pad: bool = True) -> tuple[int, bytes] | None:
    doc = Document.parse(raw.encode())
    doc.set_keys(changes)
    return overwrite_spot(raw.encode(), doc.render(), doc.frontmatter_end(), pad=pad)


def test_only_one_top_level_line_in_one_sector_no_longer_than_before_is_written_in_place():
    assert spot("---\nid: x\nstatus: inbox\n---\n", {"status": "done"}) == (18, b"done ")
    # Padding only when asked (a batch); a word as long as the old one needs none.
    assert spot("---\nstatus: inbox\n---\n", {"status": "done"}, pad=False) is None
    assert spot("---\nstatus: todo\n---\n", {"status": "done"}, pad=False) == (12, b"done")
    # Not: a longer word, a new line, two lines, a word across two sectors.
    assert spot("---\nid: x\nstatus: new\n---\n", {"status": "done"}) is None
    assert spot("---\nid: x\n---\nbody\n", {"status": "done"}) is None
    two = "---\nstatus: inbox\nreason: a\n---\n"
    assert spot(two, {"status": "todo", "reason": "b"}) is None
    long = "---\nid: x\ntitle: " + "t" * (SECTOR - 28) + "\nstatus: inbox\n---\n"
    start = long.index("status: ") + len("status: ")
    assert start // SECTOR != (start + 4) // SECTOR
    assert spot(long, {"status": "done"}) is None
    # Bytes cut from the end only: no line of the frontmatter changed.
    assert (
        overwrite_spot(b"---\nstatus: x\n---\nab", b"---\nstatus: x\n---\na", 14, pad=True) is None
    )


def test_only_a_top_level_keys_line_is_padded():
    """Spaces at the end of an indented line may be a block scalar's text; in the body
    they are the body's."""
    raw = b"---\nnotes: |\n  status: inbox\nstatus: inbox\n---\nsome text\n"
    nested = raw.replace(b"  status: inbox", b"  status: done")
    assert overwrite_spot(raw, nested, len(nested) - 14, pad=True) is None
    body = raw.replace(b"some", b"any")
    assert overwrite_spot(raw, body, len(body) - 14, pad=True) is None


def test_a_command_finishing_tasks_one_by_one_gives_exact_files(process_env, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for i in range(3):
        (folder / f"t{i}.md").write_text(f"---\nid: t-{i}\ntitle: T{i}\nstatus: inbox\n---\n")
    assert not Importer("q", roots=[folder]).run([folder]).errors
    argv = ["work", "--queue", "q", "--processor", "command", "--", sys.executable, "-c", "pass"]
    assert run_manage(argv, process_env).returncode == 0
    assert {p.read_text().split("status: ")[1] for p in folder.iterdir()} == {"done\n---\n"}


@pytest.mark.slow
def test_workers_killed_mid_run_leave_every_file_whole_and_a_rerun_ends_them_all(
    process_env, tmp_path
):
    """SIGKILL while batches are written in place: each file is its old bytes or its new,
    never torn; the reaper gives the dead workers' claims back and a second run ends every
    task, each file saying so."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    before, after = {}, {}
    for i in range(3000):
        name = f"t{i:04d}.md"
        before[name] = f"---\nid: t-{i}\ntitle: T{i}\nstatus: inbox\n---\n# T{i}\n"
        after[name] = before[name].replace("status: inbox", "status: done ")
        (folder / name).write_text(before[name])
    assert not Importer("q", roots=[folder]).run([folder]).errors
    argv = ["work", "--queue", "q", "--processor", "noop", "--prefetch", "50", "--workers", "4"]
    herd = start_manage(argv, process_env, start_new_session=True)
    wait_until = time.monotonic() + 60
    while Task.objects.filter(status=Status.DONE).count() < 600:
        assert time.monotonic() < wait_until and herd.poll() is None
        time.sleep(0.01)
    os.killpg(herd.pid, signal.SIGKILL)
    herd.wait()
    texts = {path.name: path.read_text() for path in folder.iterdir()}
    assert set(texts) == set(before)
    torn = [n for n, text in texts.items() if text not in (before[n], after[n])]
    assert torn == []
    assert 0 < sum(texts[n] == after[n] for n in texts) < 3000
    # Killed between a batch's finish and its files, a worker may hold no claim: the
    # owner file it did not live to discard names it to the reaper.
    assert run_manage(["reap_locks", "--queue", "q"], process_env).returncode == 0
    done = set(Task.objects.filter(status=Status.DONE).values_list("source_path", flat=True))
    saying_done = {str(p.resolve()) for p in folder.iterdir() if "status: done" in p.read_text()}
    assert done == saying_done
    assert run_manage(argv, process_env).returncode == 0
    assert Task.objects.filter(status=Status.DONE).count() == 3000
    lagging = sorted(p.name for p in folder.iterdir() if "status: done" not in p.read_text())
    assert lagging == []


def test_the_reaper_removes_the_temporaries_of_a_worker_killed_after_its_finish(
    process_env, tmp_path
):
    """Files without a status key are replaced whole: a temporary each, renamed after the
    batch's finish was recorded. A worker killed between the two holds no claim, yet its
    temporaries lie beside the files of the tasks it finished."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for i in range(5):
        (folder / f"t{i}.md").write_text(f"---\nid: t-{i}\ntitle: T{i}\n---\n# T{i}\n")
    assert not Importer("q", roots=[folder]).run([folder]).errors
    argv = ["work", "--queue", "q", "--prefetch", "5"]
    died = run_manage([*argv, "--processor", "tests.scripts.killed_writing_finishes.Noop"],
                      process_env)  # fmt: skip
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert set(Task.objects.values_list("status", flat=True)) == {Status.DONE}
    assert len(list(folder.glob(".*.tmp"))) == 5

    reaped = run_manage(["reap_locks", "--queue", "q"], process_env)
    assert reaped.returncode == 0, reaped.stderr
    assert list(folder.glob(".*.tmp")) == [], reaped.stdout
    assert reaped.stdout.splitlines()[-1].endswith(", 5 temporary files"), reaped.stdout
    assert all("status: done" in p.read_text() for p in folder.iterdir())


@pytest.mark.django_db
def test_a_finish_overtaken_by_an_edit_planned_before_it_still_writes_its_status(
    tasks, monkeypatch
):
    """A bulk assign planned while the task was queued wrote its file after the finish had
    read it and before it wrote: the finish took the new file for its own change's and
    left it, and the file never said done (seen by a herd finishing a bulk's tasks)."""
    paths = tasks({"todo.md": FILES["todo.md"]})
    task = Task.objects.get(key="a-2")
    bulk = editing._plan(task, editing.validate({"assignee": "carol"}, task), None, "")
    real = editing._write_finish_plans
    overtaken = []

    def overtaken_by_an_edit(plans, notes):
        if not overtaken:  # the bulk's write, between the finish's read and its write
            overtaken.append(editing._commit([bulk], "user:ann", editing.BulkReport(total=1)))
        return real(plans, notes)

    monkeypatch.setattr(editing, "_write_finish_plans", overtaken_by_an_edit)
    finish_all()
    text = paths["todo.md"].read_text()
    assert "assignee: carol\n" in text and "status: done\n" in text
    task = Task.objects.get(key="a-2")
    assert task.status == Status.DONE
    assert hashlib.sha256(paths["todo.md"].read_bytes()).hexdigest() == task.source_sha256
    assert notes() == {}
