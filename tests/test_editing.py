"""Editing tasks: only the changed lines rewritten, refusals, claims, transitions, bulk."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import threading
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_tasks
from workqueue import claims, editing, locks, transitions, writeback
from workqueue.editing import EditError, FileChanged
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import Dependency, EventKind, Queue, Status, Task, TaskEvent
from workqueue.processing import Result
from workqueue.text import unified_diff as diff_lines

pytestmark = pytest.mark.django_db

ACTOR = "user:alice"
TASK = """---
id: ex-1
title: 'Fix the login bug'   # keep this comment
status: inbox
priority: P1
project: webapp
assignee: nic
tags:
  - bug
  - auth
depends_on: [ex-0]
---
# Fix the login bug

- [ ] a test
"""


@pytest.fixture
def folder(write_task):
    def make(files: dict[str, str | bytes], queue: str = "inbox") -> dict[str, Task]:
        for name, text in files.items():
            write_task(name, text)
        report = Importer(queue, roots=[write_task.folder]).run([write_task.folder])
        assert not report.errors, report.errors
        return {
            name: Task.objects.get(source_path=str((write_task.folder / name).resolve()))
            for name in files
        }

    make.path = lambda name: write_task.folder / name
    return make


def changed_lines(before: bytes, after: bytes) -> list[str]:
    """The lines removed and added, removed first, each in file order."""
    diff = list(difflib.ndiff(before.decode().splitlines(), after.decode().splitlines()))
    return [line for line in diff if line[:1] == "-"] + [line for line in diff if line[:1] == "+"]


def reimport(folder) -> dict:
    return Importer("inbox", roots=[folder.path(".")]).run([folder.path(".")]).as_dict()


def test_edit_rewrites_exactly_the_changed_lines(folder):
    task = folder({"a.md": TASK})["a.md"]
    path = folder.path("a.md")
    before = path.read_bytes()
    result = editing.edit_task(task, {"title": "Fix the logout bug", "assignee": "bot"}, ACTOR)
    after = path.read_bytes()
    assert changed_lines(before, after) == [
        "- title: 'Fix the login bug'   # keep this comment",
        "- assignee: nic",
        "+ title: 'Fix the logout bug'   # keep this comment",
        "+ assignee: bot",
    ]
    assert result.changed == ["title", "assignee"]
    assert (result.written, result.deferred) == (True, False)
    task.refresh_from_db()
    assert (task.title, task.assignee) == ("Fix the logout bug", "bot")
    assert task.frontmatter["assignee"] == "bot"
    assert task.source_sha256 == hashlib.sha256(after).hexdigest()
    [event] = TaskEvent.objects.filter(task=task, kind=EventKind.EDITED)
    assert event.actor == ACTOR
    assert event.data["fields"] == {
        "title": {"from": "Fix the login bug", "to": "Fix the logout bug"},
        "assignee": {"from": "nic", "to": "bot"},
    }
    # The row is what an import would store: a re-import finds the file unchanged.
    assert reimport(folder)["unchanged"] == 1


def test_each_field_keeps_the_files_style(folder):
    task = folder({"a.md": TASK})["a.md"]
    path = folder.path("a.md")
    editing.edit_task(
        task,
        {
            "priority": "0",
            "tags": "bug, auth, urgent",
            "depends_on": ["ex-0", "ex-9"],
            "complexity": "mechanical",
            "type": "task",
            "parent": "[[epic-1]]",
            "body": "# Fix the login bug\r\n\r\n- [x] a test\r\n",
        },
        ACTOR,
    )
    text = path.read_text()
    assert "priority: P0\n" in text  # P-notation stays P-notation
    assert "tags:\n  - bug\n  - auth\n  - urgent\n" in text  # a block list stays one
    assert "depends_on: [ex-0, ex-9]\n" in text
    assert text.endswith("---\n# Fix the login bug\n\n- [x] a test\n")
    assert "complexity: mechanical\ntype: task\nparent: '[[epic-1]]'\n---" in text or (
        'parent: "[[epic-1]]"' in text
    )
    task.refresh_from_db()
    assert task.priority == 0
    assert task.tags == ["bug", "auth", "urgent"]
    assert task.tag_index == "|bug|auth|urgent|"
    assert sorted(Dependency.objects.filter(task=task).values_list("key", flat=True)) == [
        "ex-0",
        "ex-9",
    ]
    assert task.frontmatter["parent"] == "[[epic-1]]"
    assert task.body == "# Fix the login bug\n\n- [x] a test\n"
    assert reimport(folder)["unchanged"] == 1


def test_crlf_file_and_byte_order_mark_are_kept(folder):
    raw = ("\ufeff" + TASK).replace("\n", "\r\n").encode()
    task = folder({"a.md": raw})["a.md"]
    editing.edit_task(task, {"assignee": "bot", "body": "new body\nline two\n"}, ACTOR)
    after = folder.path("a.md").read_bytes()
    assert after.startswith(b"\xef\xbb\xbf---\r\n")
    assert b"assignee: bot\r\n" in after
    assert after.endswith(b"---\r\nnew body\r\nline two\r\n")
    assert b"\n" not in after.replace(b"\r\n", b"")


def test_emptied_field_loses_its_key_and_nothing_else_changes(folder):
    task = folder({"a.md": TASK})["a.md"]
    before = folder.path("a.md").read_bytes()
    editing.edit_task(task, {"assignee": "", "tags": []}, ACTOR)
    assert changed_lines(before, folder.path("a.md").read_bytes()) == [
        "- assignee: nic",
        "- tags:",
        "-   - bug",
        "-   - auth",
        "+ tags: []",
    ]
    task.refresh_from_db()
    assert (task.assignee, task.tags, task.tag_index) == ("", [], "")


def test_unchanged_values_write_nothing(folder):
    task = folder({"a.md": TASK})["a.md"]
    path = folder.path("a.md")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    Task.objects.filter(pk=task.pk).update(source_mtime_ns=1_000_000_000)
    result = editing.edit_task(
        task,
        {"title": "Fix the login bug", "priority": "P1", "tags": "bug auth", "assignee": "nic"},
        ACTOR,
    )
    assert result.changed == []
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert not TaskEvent.objects.filter(kind=EventKind.EDITED).exists()


BAD_VALUES = [
    ({"title": ""}, "title"),
    ({"title": "two\nlines"}, "title"),
    ({"title": "x" * 501}, "title"),
    ({"priority": "urgent!!"}, "priority"),
    ({"priority": 2**40}, "priority"),
    ({"tags": ["ok", "a|b"]}, "tags"),
    ({"depends_on": ["ex-1"]}, "depends_on"),  # itself
    ({"status": "claimed"}, "status"),
    ({"project": "p" * 201}, "project"),
    ({"assignee": "a\x00b"}, "assignee"),
    ({"body": "nul \x00 here"}, "body"),
    ({"colour": "red"}, "colour"),
    ({"parent": ["not", "text"]}, "parent"),
]


@pytest.mark.parametrize(("changes", "field"), BAD_VALUES)
def test_bad_value_names_its_field_and_writes_nothing(folder, changes, field):
    task = folder({"a.md": TASK})["a.md"]
    before = folder.path("a.md").read_bytes()
    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {"assignee": "bot", **changes}, ACTOR)
    assert list(refused.value.errors) == [field]
    assert str(refused.value).startswith(f"{field}: ")
    assert folder.path("a.md").read_bytes() == before
    assert Task.objects.get(pk=task.pk).assignee == "nic"
    assert not TaskEvent.objects.filter(kind=EventKind.EDITED).exists()


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("field", ["title", "project", "assignee", "complexity", "type", "parent"])
@pytest.mark.parametrize("line_break", LINE_BREAKS)
def test_any_line_break_in_a_one_line_field_is_one_line_only(folder, field, line_break):
    # U+2028 or U+0085 got "cannot edit this frontmatter in place" instead.
    task = folder({"a.md": TASK})["a.md"]
    before = folder.path("a.md").read_bytes()
    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {field: f"two{line_break}lines"}, ACTOR)
    assert refused.value.errors == {field: "one line only"}
    assert folder.path("a.md").read_bytes() == before


@pytest.mark.parametrize("field", ["tags", "depends_on"])
@pytest.mark.parametrize("line_break", LINE_BREAKS)
def test_any_line_break_in_an_item_of_a_list_is_one_line_only(folder, field, line_break):
    task = folder({"a.md": TASK})["a.md"]
    before = folder.path("a.md").read_bytes()
    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {field: ["ok", f"two{line_break}lines"]}, ACTOR)
    assert refused.value.errors[field].endswith(": one line only")
    assert folder.path("a.md").read_bytes() == before


def cjk(count: int, seed: int) -> str:
    """3 bytes a character in UTF-8, incompressible."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(count))


def wide_task(folder) -> Task:
    """A task whose tags take 1,807 of the 2,400 bytes the board's indexes hold."""
    tags = ", ".join(cjk(100, seed) for seed in range(6))
    return folder({"w.md": f"---\nid: w\ntitle: Wide\ntags: [{tags}]\n---\nBody\n"})["w.md"]


def test_an_edit_the_boards_indexes_cannot_hold_names_the_field_and_writes_nothing(folder):
    task = wide_task(folder)
    before = folder.path("w.md").read_bytes()
    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {"project": cjk(200, 9), "assignee": cjk(200, 8)}, ACTOR)
    assert refused.value.errors == {
        "project": "tags, project and assignee: 3,007 bytes together in UTF-8, over the "
        "2,400 the board's indexes hold"
    }
    assert folder.path("w.md").read_bytes() == before
    assert Task.objects.get(pk=task.pk).project == ""
    editing.edit_task(task, {"project": cjk(197, 9)}, ACTOR)  # 2,398 bytes: written
    assert Task.objects.get(pk=task.pk).project == cjk(197, 9)


def test_a_bulk_edit_skips_the_task_it_would_overfill_and_edits_the_rest(folder):
    wide = wide_task(folder)
    others = many(folder, 3)
    before = folder.path("w.md").read_bytes()
    report = editing.edit_tasks(
        [wide.pk, *(t.pk for t in others)],
        ACTOR,
        {"assignee": cjk(200, 8)},
        add_tags=[cjk(200, 7)],
    )
    assert report.changed == 3
    assert [(s["key"], s["why"]) for s in report.skipped] == [
        (
            "w",
            "tags and assignee: 3,008 bytes together in UTF-8, over the 2,400 the board's "
            "indexes hold",
        )
    ]
    assert folder.path("w.md").read_bytes() == before
    assert all(cjk(200, 7) in t.tags for t in Task.objects.exclude(pk=wide.pk))


def test_file_changed_on_disk_is_refused_with_the_difference(folder):
    task = folder({"a.md": TASK})["a.md"]
    path = folder.path("a.md")
    outside = TASK.replace("assignee: nic", "assignee: carol").encode()
    path.write_bytes(outside)
    with pytest.raises(FileChanged) as refused:
        editing.edit_task(task, {"title": "Mine"}, ACTOR)
    assert refused.value.why == "changed on disk since import"
    assert '-assignee: "nic"' in refused.value.diff
    assert '+assignee: "carol"' in refused.value.diff
    assert path.read_bytes() == outside
    task.refresh_from_db()
    assert (task.title, task.assignee) == ("Fix the login bug", "nic")
    assert not TaskEvent.objects.filter(kind=EventKind.EDITED).exists()
    # Reload reads the file again; then the edit goes through.
    task = editing.reload_from_disk(task)
    assert task.assignee == "carol"
    editing.edit_task(task, {"title": "Mine"}, ACTOR)
    assert b"assignee: carol" in path.read_bytes()
    assert b"title: 'Mine'" in path.read_bytes()


@pytest.mark.timeout(60)  # difflib took 213 s over these two orders of 60,000 lines
def test_the_difference_of_a_file_rewritten_on_disk_is_shown_in_bounded_time(folder):
    lines = [f"line {i}\n" for i in range(60_000)]
    task = folder({"long.md": "# Long\n" + "".join(lines)})["long.md"]
    folder.path("long.md").write_text("# Long\n" + "".join(lines[::2] + lines[1::2]))
    with pytest.raises(FileChanged) as refused:
        editing.edit_task(task, {"title": "Mine"}, ACTOR)
    assert refused.value.diff.splitlines()[2] == (
        "(lines 5 to 60,002 against 5 to 60,002 differ: more than 5,000 lines to compare)"
    )


def test_a_difference_is_numbered_as_in_the_whole_file():
    before = [f"{i}\n" for i in range(1000)]
    after = before[:500] + ["changed\n"] + before[501:] + ["added\n"]
    want = "".join(difflib.unified_diff(before, after, "a", "b"))
    assert diff_lines(before, after, "a", "b") == want
    assert "@@ -498,7 +498,7 @@" in want and "@@ -998,3 +998,4 @@" in want
    assert diff_lines(before, before, "a", "b") == ""


def test_missing_file_is_refused(folder):
    task = folder({"a.md": TASK})["a.md"]
    folder.path("a.md").unlink()
    with pytest.raises(FileChanged, match="missing"):
        editing.edit_task(task, {"title": "Mine"}, ACTOR)
    assert not folder.path("a.md").exists()


def test_a_task_whose_file_is_gone_can_be_closed_or_blocked_but_not_edited(folder):
    """Its field edits have nowhere to go, but closing it was refused too: a task whose
    file was deleted could leave the queue only through the admin's delete."""
    tasks = folder({"a.md": TASK, "b.md": TASK.replace("ex-1", "ex-2")})
    for name in ("a.md", "b.md"):
        folder.path(name).unlink()
    Importer("inbox", roots=[folder.path(".")]).run([folder.path(".")])
    a, b = (Task.objects.get(pk=tasks[n].pk) for n in ("a.md", "b.md"))
    assert a.source_missing and b.source_missing
    editing.edit_task(a, {"status": "done"}, ACTOR, reason="deleted: not needed")
    editing.edit_task(b, {"status": "blocked"}, ACTOR, reason="the file went")
    assert Task.objects.get(pk=a.pk).status == Status.DONE
    assert Task.objects.get(pk=b.pk).status == Status.BLOCKED
    assert list(folder.path(".").iterdir()) == []  # no file made for them
    with pytest.raises(FileChanged, match="missing"):
        editing.edit_task(Task.objects.get(pk=a.pk), {"title": "Mine"}, ACTOR)


def test_a_file_left_out_as_no_task_is_not_written_by_an_edit(folder):
    """A README imported as a task at an earlier stop, left out now and its task marked
    missing: an edit wrote frontmatter into the README. Closing the task is its row's."""
    readme = "# Our tasks\n\nHow we work.\n"
    task = folder({"notes.md": "---\nid: n\n---\nx\n"})["notes.md"]
    Task.objects.filter(pk=task.pk).update(source_missing=True)  # as the import marks it
    folder.path("notes.md").write_text(readme)
    Task.objects.filter(pk=task.pk).update(
        source_sha256=hashlib.sha256(readme.encode()).hexdigest()
    )
    task = Task.objects.get(pk=task.pk)
    with pytest.raises(FileChanged, match="missing"):
        editing.edit_task(task, {"assignee": "bot"}, ACTOR)
    editing.edit_task(task, {"status": "done"}, ACTOR, reason="not a task")
    assert folder.path("notes.md").read_text() == readme
    assert Task.objects.get(pk=task.pk).status == Status.DONE


def test_a_finish_does_not_write_a_file_its_task_was_let_go_of(folder):
    task = folder({"notes.md": "---\nid: n\n---\nx\n"})["notes.md"]
    before = folder.path("notes.md").read_bytes()
    Task.objects.filter(pk=task.pk).update(source_missing=True, status=Status.DONE)
    editing.write_finished_status([task.pk], "w1")
    assert folder.path("notes.md").read_bytes() == before
    note = TaskEvent.objects.filter(task=task, kind=EventKind.NOTE).get()
    assert note.message.endswith("the file is missing on disk")


def test_a_renamed_temporary_is_not_removed_again(folder, monkeypatch):
    # Each finish and edit unlinked its temporary after renaming it: a failed syscall a
    # file (0.25 s of a 5,000-task no-op run). Only what was never renamed is discarded.
    tasks = folder({f"t{i}.md": TASK.replace("id: ex-1", f"id: t{i}") for i in range(3)})
    discarded = []
    monkeypatch.setattr(editing, "discard", discarded.append)
    editing.edit_tasks([t.pk for t in tasks.values()], ACTOR, {"assignee": "bot"})
    Task.objects.update(status=Status.DONE)
    editing.write_finished_status([t.pk for t in tasks.values()], "w1")
    assert discarded == []
    assert all("status: done" in folder.path(n).read_text() for n in tasks)
    assert sorted(p.name for p in folder.path(".").iterdir()) == ["t0.md", "t1.md", "t2.md"]


def test_a_temporary_name_taken_by_a_link_is_not_written_through(folder, monkeypatch, tmp_path):
    """The temporary was opened with O_TRUNC, following whatever lay at its name: a link
    planted there had what it led to emptied and written."""
    task = folder({"a.md": TASK})["a.md"]
    monkeypatch.setattr(writeback.secrets, "token_hex", lambda n: "0badf00d")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    folder.path(f".a.md.{os.getpid()}.0badf00d.tmp").symlink_to(victim)
    with pytest.raises(editing.EditError, match="cannot write the file: File exists"):
        editing.edit_task(task, {"assignee": "bot"}, ACTOR)
    assert victim.read_text() == "keep me\n"
    assert folder.path("a.md").read_text() == TASK


def test_a_save_from_an_older_form_is_refused(folder):
    task = folder({"a.md": TASK})["a.md"]
    opened_with = task.source_sha256
    editing.edit_task(task, {"assignee": "bot"}, "user:bob")
    after_bob = folder.path("a.md").read_bytes()
    with pytest.raises(FileChanged, match="since you opened it"):
        editing.edit_task(task, {"title": "Alice's"}, ACTOR, base_sha256=opened_with)
    assert folder.path("a.md").read_bytes() == after_bob


def test_a_file_changed_between_read_and_rename_is_not_replaced(folder, monkeypatch):
    task = folder({"a.md": TASK})["a.md"]
    path = folder.path("a.md")
    real_sync = writeback.sync_files

    def someone_saves_meanwhile(temporaries):
        real_sync(temporaries)
        path.write_text(TASK + "A person's line.\n")

    monkeypatch.setattr(editing, "sync_files", someone_saves_meanwhile)
    with pytest.raises(FileChanged):
        editing.edit_task(task, {"assignee": "bot"}, ACTOR)
    assert path.read_text() == TASK + "A person's line.\n"
    assert [p.name for p in path.parent.iterdir()] == ["a.md"]  # no temporary left


def test_frontmatter_that_cannot_be_edited_in_place_is_refused_untouched(folder):
    flow = "---\n{id: f-1, title: Flow, assignee: nic}\n---\nbody\n"
    task = folder({"f.md": flow})["f.md"]
    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {"assignee": "bot"}, ACTOR)
    assert list(refused.value.errors) == ["file"]
    assert folder.path("f.md").read_text() == flow


def test_a_read_only_task_file_is_not_edited(folder):
    text = "---\nid: r-1\ntitle: Locked\n---\nbody\n"
    task = folder({"r.md": text})["r.md"]
    folder.path("r.md").chmod(0o444)
    # As any file that cannot be written: the form says why.
    with pytest.raises(
        editing.EditError, match="^file: cannot write the file: the file is read-only$"
    ):
        editing.edit_task(task, {"assignee": "bot"}, ACTOR)
    assert folder.path("r.md").read_text() == text
    assert Task.objects.get(pk=task.pk).assignee == ""


OWNER_FILES: dict[str, OwnerFile] = {}


def claim_all(queue: str = "inbox") -> tuple[Identity, list]:
    identity = Identity.current("w-test")
    owner_file = OWNER_FILES[identity.worker] = OwnerFile(identity)
    taken = claims.claim_ready_tasks(queue, identity, owner_file, limit=100)
    assert taken
    return identity, taken


def test_claimed_task_edit_waits_for_the_claim_to_end(folder):
    task = folder({"a.md": TASK.replace("depends_on: [ex-0]\n", "")})["a.md"]
    path = folder.path("a.md")
    before = path.read_bytes()
    identity, taken = claim_all()
    result = editing.edit_task(task, {"assignee": "bot", "title": "Renamed"}, ACTOR)
    assert (result.written, result.deferred) == (False, True)
    assert path.read_bytes() == before  # the worker's file is left alone
    task.refresh_from_db()
    assert (task.assignee, task.title, task.change_pending) == ("bot", "Renamed", True)
    assert task.status == Status.CLAIMED
    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {"status": "done"}, ACTOR)
    assert list(refused.value.errors) == ["status"]
    # The worker finishes; the file gets the edit as the claim ends, then its status.
    claims.finish_claims(identity, [(c, Result()) for c in taken], OWNER_FILES[identity.worker])
    after = path.read_bytes()
    assert changed_lines(before, after) == [
        "- title: 'Fix the login bug'   # keep this comment",
        "- status: inbox",
        "- assignee: nic",
        "+ title: 'Renamed'   # keep this comment",
        "+ status: done",
        "+ assignee: bot",
    ]
    task.refresh_from_db()
    assert (task.status, task.assignee, task.change_pending, task.pending_edit) == (
        Status.DONE,
        "bot",
        False,
        {},
    )
    assert task.source_sha256 == hashlib.sha256(after).hexdigest()
    kinds = list(TaskEvent.objects.filter(task=task).order_by("id").values_list("kind", "data"))
    edited = [data for kind, data in kinds if kind == EventKind.EDITED]
    assert edited[0]["deferred"] is True
    assert edited[1]["deferred"] is False


def test_a_field_changed_in_the_file_while_claimed_is_not_overwritten_by_a_waiting_edit(folder):
    """Both changed the title from the same text while a worker held the task: the edit
    that waited wrote its title over the file's when the claim ended, saying only
    `from 'Hand title'` in its event. The file wins, as it does over an edit made from an
    older form; the waiting edit's other fields are written, and the one left is noted."""
    task = folder({"a.md": ONE})["a.md"]
    path = folder.path("a.md")
    identity, taken = claim_all()
    editing.edit_task(task, {"title": "Board title", "priority": 0}, ACTOR)
    editing.edit_task(task, {"title": "Board title, again"}, ACTOR)
    path.write_text(ONE.replace("Original title", "Hand title").replace("Body.", "Hand body."))
    claims.finish_claims(identity, [(c, Result()) for c in taken], OWNER_FILES[identity.worker])
    assert path.read_text() == (
        "---\nid: ex-1\ntitle: Hand title\npriority: 0\nstatus: done\n---\nHand body.\n"
    )
    task.refresh_from_db()
    assert (task.title, task.priority, task.pending_edit) == ("Hand title", 0, {})
    note = task.events.filter(kind=EventKind.NOTE).get()
    assert note.message == (
        "edit made while claimed not written: title: the file was changed to say 'Hand title' "
        "meanwhile (the edit said 'Board title, again')"
    )


def test_outside_holders_file_is_edited_at_once(folder):
    task = folder({"a.md": TASK.replace("status: inbox", "status: in_progress")})["a.md"]
    assert (task.status, task.holder_pid) == (Status.CLAIMED, None)
    result = editing.edit_task(task, {"priority": 3}, ACTOR)
    assert result.written
    assert "priority: P3" in folder.path("a.md").read_text()


def test_a_file_an_outside_lock_holds_is_not_edited_until_let_go(folder, lock_root):
    # An outside script holding the task's lock directory may be rewriting the file: an
    # edit written now would be undone by its write, or undo it.
    tasks = folder({"a.md": TASK, "b.md": TASK.replace("ex-1", "ex-2")})
    task, other = tasks["a.md"], tasks["b.md"]
    path = folder.path("a.md")
    before = path.read_bytes()
    outside = locks.lock_dir("inbox", task.key)
    outside.mkdir(parents=True)
    (outside / "owner.json").write_text(
        json.dumps({"host": "elsewhere", "pid": 4242, "worker": "mkdir-script"})
    )
    for attempt in (
        lambda: editing.edit_task(task, {"priority": 3}, ACTOR),
        lambda: editing.edit_task(task, {"status": "done"}, ACTOR, reason="dup"),
    ):
        with pytest.raises(EditError) as refused:
            attempt()
        why = refused.value.errors["file"]
        assert "held by an outside process: host elsewhere, pid 4242" in why
    assert path.read_bytes() == before
    assert Task.objects.get(pk=task.pk).status == Status.QUEUED

    report = editing.edit_tasks([task.pk, other.pk], ACTOR, changes={"assignee": "bob"})
    assert len(report.skipped) == 1 and "outside process" in report.skipped[0]["why"]
    assert "assignee: bob" in folder.path("b.md").read_text()
    assert path.read_bytes() == before

    locks.remove(outside)
    editing.edit_task(task, {"priority": 3}, ACTOR)
    assert "priority: P3" in path.read_text()


def test_status_edits_go_through_the_engine_and_into_the_file(folder):
    task = folder({"a.md": TASK})["a.md"]
    path = folder.path("a.md")
    editing.edit_task(task, {"status": "done"}, ACTOR, reason="duplicate of ex-2")
    text = path.read_text()
    assert "status: done\n" in text and "close_reason: duplicate of ex-2\n" in text
    task.refresh_from_db()
    assert (task.status, task.outcome) == (Status.DONE, "closed")
    done = TaskEvent.objects.get(task=task, kind=EventKind.DONE)
    assert (done.actor, done.message) == (ACTOR, "duplicate of ex-2")
    assert not TaskEvent.objects.filter(task=task, kind=EventKind.EDITED).exists()

    editing.edit_task(task, {"status": "queued"}, ACTOR)
    text = path.read_text()
    assert "status: queued\n" in text and "close_reason" not in text
    assert Task.objects.get(pk=task.pk).status == Status.QUEUED

    with pytest.raises(EditError) as refused:
        editing.edit_task(task, {"status": "blocked"}, ACTOR)
    assert list(refused.value.errors) == ["reason"]
    editing.edit_task(task, {"status": "blocked"}, ACTOR, reason="needs the API key")
    assert "blocked_reason: needs the API key\n" in path.read_text()
    task.refresh_from_db()
    assert (task.status, task.reason) == (Status.BLOCKED, "needs the API key")
    assert reimport(folder)["unchanged"] == 1


def test_status_change_refused_when_the_task_moved_meanwhile(folder, monkeypatch):
    task = folder({"a.md": TASK})["a.md"]
    before = folder.path("a.md").read_bytes()
    monkeypatch.setattr(transitions, "mark_done", lambda *a, **k: [])
    with pytest.raises(editing.Conflict):
        editing.edit_task(task, {"status": "done", "assignee": "bot"}, ACTOR)
    assert folder.path("a.md").read_bytes() == before
    assert [p.name for p in folder.path(".").iterdir()] == ["a.md"]


def test_task_without_a_file_is_edited_in_its_row(db):
    (task,) = make_tasks("rows", 1)
    result = editing.edit_task(task, {"assignee": "bot", "tags": "x y", "parent": "p"}, ACTOR)
    assert result.changed == ["assignee", "tags", "parent"]
    task.refresh_from_db()
    assert (task.assignee, task.tags, task.tag_index) == ("bot", ["x", "y"], "|x|y|")
    assert task.frontmatter["parent"] == "p"


def test_two_people_saving_at_once_never_both_win(transactional_db, folder):
    task = folder({"a.md": TASK})["a.md"]
    seen = task.source_sha256  # what both people opened
    barrier = threading.Barrier(2)
    outcomes = []

    def save(name):
        from django.db import connection

        try:
            barrier.wait()
            # Both saves are of the version both opened (a save started after the other's
            # whole save was, without it, an edit of the newer version, and won too).
            editing.edit_task(task, {"assignee": name}, f"user:{name}", base_sha256=seen)
            outcomes.append(name)
        except (FileChanged, editing.Conflict):
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=save, args=(n,)) for n in ("bob", "carol")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("refused") == 1, outcomes
    text = folder.path("a.md").read_text()
    winner = next(o for o in outcomes if o != "refused")
    assert f"assignee: {winner}\n" in text
    assert Task.objects.get(pk=task.pk).assignee == winner


SAFE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"), max_size=30
).map(str.strip)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    # A title of format characters alone (a soft hyphen) is refused as no title at all.
    title=SAFE_TEXT.filter(
        lambda t: any(not (c.isspace() or unicodedata.category(c) == "Cf") for c in t)
    ),
    assignee=SAFE_TEXT,
    tags=st.lists(
        SAFE_TEXT.filter(lambda t: t and "|" not in t and "," not in t and " " not in t),
        max_size=4,
    ),
)
def test_any_values_load_back_exactly_and_leave_other_keys_alone(folder, title, assignee, tags):
    Task.objects.all().delete()
    task = folder({"a.md": TASK})["a.md"]
    before = writeback.Document.parse(folder.path("a.md").read_bytes()).frontmatter
    try:
        editing.edit_task(task, {"title": title, "assignee": assignee, "tags": tags}, ACTOR)
    except EditError as exc:
        # Only an in-place edit that would not load back exactly may be refused.
        assert list(exc.errors) == ["file"]
        return
    after = writeback.Document.parse(folder.path("a.md").read_bytes()).frontmatter
    assert after["title"] == title
    assert after.get("assignee", "") == assignee
    assert after["tags"] == list(dict.fromkeys(tags))
    others = {k: v for k, v in before.items() if k not in ("title", "assignee", "tags")}
    assert {k: v for k, v in after.items() if k in others} == others


# Many tasks --------------------------------------------------------------------


def many(folder, count: int, queue: str = "inbox") -> list[Task]:
    files = {
        f"t{i:03d}.md": f"---\nid: t{i:03d}\ntitle: Task {i}\nstatus: inbox\n---\nBody {i}\n"
        for i in range(count)
    }
    made = folder(files, queue)
    return [made[name] for name in sorted(made)]


def test_bulk_assign_writes_in_batches_with_one_sync_each_and_lists_changed_files(
    folder, monkeypatch
):
    tasks = many(folder, 10)
    changed_outside = folder.path("t004.md")
    changed_outside.write_text(changed_outside.read_text() + "outside edit\n")
    syncs, batches = [], []
    real_sync = writeback.sync_files
    monkeypatch.setattr(editing, "sync_files", lambda t: (syncs.append(len(t)), real_sync(t)))
    report = editing.edit_tasks(
        [t.pk for t in tasks],
        ACTOR,
        {"assignee": "bot", "priority": 1},
        batch_size=4,
        on_batch=lambda r, applied: batches.append([a.key for a in applied]),
    )
    assert syncs == [4, 3, 2]
    assert batches == [
        ["t000", "t001", "t002", "t003"],
        ["t005", "t006", "t007"],
        ["t008", "t009"],
    ]
    assert report.changed == 9
    assert report.skipped == [
        {
            "task": tasks[4].pk,
            "key": "t004",
            "path": str(changed_outside.resolve()),
            "why": "changed on disk since import",
        }
    ]
    assert changed_outside.read_text().endswith("outside edit\n")
    for task in tasks:
        text = folder.path(f"{task.key}.md").read_text()
        assert ("assignee: bot\npriority: 1\n" in text) == (task.key != "t004")
    assert TaskEvent.objects.filter(kind=EventKind.EDITED).count() == 9
    assert set(TaskEvent.objects.filter(kind=EventKind.EDITED).values_list("task", flat=True)) == {
        t.pk for t in tasks if t.key != "t004"
    }
    assert reimport(folder)["updated"] == 1  # only the file changed outside


def test_bulk_close_with_a_reason_ends_claims_through_the_engine(folder):
    tasks = many(folder, 6)
    Task.objects.filter(pk=tasks[5].pk).update(status=Status.DONE)
    identity = Identity.current("w-held")
    taken = claims.claim_ready_tasks("inbox", identity, OwnerFile(identity), limit=1)
    assert [c.key for c in taken] == ["t000"]
    report = editing.edit_tasks(
        [t.pk for t in tasks], ACTOR, action="close", reason="out of scope for 2.0"
    )
    assert report.changed == 5
    assert [(s["key"], s["why"]) for s in report.skipped] == [("t005", "is done")]
    for task in tasks[:5]:
        text = folder.path(f"{task.key}.md").read_text()
        assert "status: done\n" in text
        assert "close_reason: out of scope for 2.0\n" in text
        task.refresh_from_db()
        assert (task.status, task.outcome) == (Status.DONE, "closed")
        [event] = TaskEvent.objects.filter(task=task, kind__in=[EventKind.DONE, EventKind.EDITED])
        assert (event.kind, event.message) == (EventKind.DONE, "out of scope for 2.0")
    assert not locks.lock_dir("inbox", "t000").exists()


def test_bulk_tags_add_and_remove(folder):
    files = {
        "a.md": "---\nid: a\ntags: [bug, auth]\n---\n",
        "b.md": "---\nid: b\n---\n",
        "c.md": "---\nid: c\ntags:\n- old\n- bug\n---\n",
    }
    made = folder(files)
    report = editing.edit_tasks(
        [t.pk for t in made.values()], ACTOR, add_tags=["triaged"], remove_tags=["bug"]
    )
    assert report.changed == 3
    assert folder.path("a.md").read_text() == "---\nid: a\ntags: [auth, triaged]\n---\n"
    assert folder.path("b.md").read_text() == "---\nid: b\ntags: [triaged]\n---\n"
    assert folder.path("c.md").read_text() == "---\nid: c\ntags:\n- old\n- triaged\n---\n"
    assert Task.objects.filter(tag_index__contains="|triaged|").count() == 3
    assert not Task.objects.filter(tag_index__contains="|bug|").exists()


def test_bulk_release_writes_the_edits_made_while_claimed(folder):
    tasks = many(folder, 2)
    identity, taken = claim_all()
    editing.edit_task(tasks[0], {"assignee": "bot"}, ACTOR)
    assert "assignee" not in folder.path("t000.md").read_text()
    report = editing.edit_tasks([t.pk for t in tasks], ACTOR, action="release")
    assert report.changed == 2
    assert "assignee: bot\n" in folder.path("t000.md").read_text()
    assert Task.objects.filter(status=Status.QUEUED).count() == 2
    assert Task.objects.get(pk=tasks[0].pk).pending_edit == {}


def test_bulk_refuses_bad_input_before_writing_anything(folder):
    tasks = many(folder, 2)
    before = [folder.path(f"{t.key}.md").read_bytes() for t in tasks]
    for kwargs, name in [
        ({"changes": {"priority": "soon"}}, "priority"),
        ({"changes": {"status": "done"}}, "status"),
        ({"action": "block"}, "reason"),
        ({"action": "explode"}, "action"),
        ({"add_tags": ["a|b"]}, "tags"),
    ]:
        with pytest.raises(EditError) as refused:
            editing.edit_tasks([t.pk for t in tasks], ACTOR, **kwargs)
        assert list(refused.value.errors) == [name]
    assert [folder.path(f"{t.key}.md").read_bytes() for t in tasks] == before


def test_bulk_skips_unknown_ids_and_self_dependencies(folder):
    tasks = many(folder, 2)
    report = editing.edit_tasks(
        [tasks[0].pk, 999_999, tasks[1].pk], ACTOR, {"depends_on": ["t001"]}
    )
    assert report.changed == 1
    assert sorted(s["why"] for s in report.skipped) == [
        "depends_on: a task cannot depend on itself",
        "no such task",
    ]
    assert Queue.objects.filter(name="inbox").exists()


ONE = "---\nid: ex-1\ntitle: Original title\npriority: 2\n---\nBody.\n"


@pytest.mark.parametrize("how", ["release_task", "session ends", "reaper"])
def test_an_edit_made_while_an_agent_held_the_task_is_written_however_the_claim_ends(folder, how):
    """Only a finish wrote the edits that waited for the claim: a release, a session's end
    or the reaper left the file as it was, and the next edit took them out of the row."""
    from tests.test_pull import session
    from workqueue import reaper

    task = folder({"a.md": ONE})["a.md"]
    path = folder.path("a.md")
    agent = session("agent", queue="inbox")
    assert agent.call("claim_next_task")["success"]
    assert editing.edit_task(task, {"title": "Person's title"}, ACTOR).deferred
    if how == "release_task":
        assert agent.call("release_task", {"id": "ex-1"})["success"]
    elif how == "session ends":
        assert agent.release_all("MCP session ended") == 1
    else:
        Task.objects.filter(pk=task.pk).update(lease_expires_at="2000-01-01T00:00:00Z")
        assert len(reaper.release_stale_claims("inbox").requeued) == 1
    task.refresh_from_db()
    assert (task.status, task.change_pending, task.pending_edit) == (Status.QUEUED, False, {})
    assert path.read_text() == ONE.replace("Original title", "Person's title")
    editing.edit_task(task, {"priority": 0}, ACTOR)
    task.refresh_from_db()
    assert (task.title, task.priority) == ("Person's title", 0)
