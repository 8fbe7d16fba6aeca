"""Import: keys, closing rules, idempotence, and every class of bad input."""

import io
import json
import os

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from tests.conftest import run_manage, start_manage
from workqueue import claims, editing, transitions
from workqueue.importer import Importer
from workqueue.locks import Identity, OwnerFile
from workqueue.models import EventKind, Queue, Status, Task, TaskBody, TaskEvent
from workqueue.processing import Result
from workqueue.text import list_items

pytestmark = pytest.mark.django_db

GOOD = "---\nid: {id}\ntitle: {title}\npriority: 1\ntags: [a, b]\n---\n# Heading\n\nBody.\n"


def import_folder(folder, queue="q", **kwargs):
    return Importer(queue, [folder], **kwargs).run([folder])


def test_import_keeps_columns_frontmatter_and_body(write_task):
    write_task("a.md", GOOD.format(id="T-1", title="First"))
    report = import_folder(write_task.folder)
    task = Task.objects.get(key="T-1")
    assert report.imported == 1 and not report.errors
    assert (task.title, task.priority, task.tags, task.tag_index) == (
        "First",
        1,
        ["a", "b"],
        "|a|b|",
    )
    assert task.frontmatter["id"] == "T-1"
    assert task.body.startswith("# Heading")
    assert task.status == Status.QUEUED
    assert task.events.filter(kind=EventKind.IMPORTED).count() == 1


def test_depends_on_in_a_file_holds_the_task_back_until_its_dependency_is_done(write_task):
    write_task("build.md", "---\nid: build\npriority: 3\n---\nBuild.\n")
    write_task("ship.md", "---\nid: ship\npriority: 0\ndepends_on: [build]\n---\nShip.\n")
    import_folder(write_task.folder)
    ship = Task.objects.get(key="ship")
    assert (ship.depends_on, ship.has_dependencies) == (["build"], True)
    assert list(ship.dependencies.values_list("key", flat=True)) == ["build"]
    # ship is more urgent but waits for build.
    assert list(Task.objects.ready().values_list("key", flat=True)) == ["build"]
    Task.objects.filter(key="build").update(status=Status.DONE)
    assert list(Task.objects.ready().values_list("key", flat=True)) == ["ship"]


def test_key_without_id_is_the_relative_path_not_the_stem(write_task):
    write_task("one/notes.md", "# One\n")
    write_task("two/notes.md", "# Two\n")
    import_folder(write_task.folder)
    assert sorted(Task.objects.values_list("key", flat=True)) == ["one/notes.md", "two/notes.md"]


@pytest.mark.parametrize(
    ("text", "rule", "outcome"),
    [
        ("---\nstatus: done\n---\nx\n", "status_done", "closed"),
        ("---\nstatus: closed\n---\nx\n", "status_closed", "closed"),
        ("---\nstatus: cancelled\n---\nx\n", "status_cancelled", "cancelled"),
        (
            "---\ntitle: t\n---\n# T\n\n## Close Reason\nDuplicate.\n",
            "close_reason_section",
            "closed",
        ),
        ("---\ntitle: t\n---\n# T\n\n## Closed\n", "close_reason_section", "closed"),
        ("---\nclose_reason: obsolete\n---\nx\n", "close_reason_field", "closed"),
    ],
)
def test_closed_tasks_land_in_done_with_their_rule(write_task, text, rule, outcome):
    write_task("t.md", text)
    report = import_folder(write_task.folder)
    task = Task.objects.get()
    assert (task.status, task.closed_by, task.outcome) == (Status.DONE, rule, outcome)
    assert report.closed == 1


def test_file_status_maps_to_columns(write_task):
    write_task("b.md", "---\nstatus: blocked\n---\nx\n")
    write_task("p.md", "---\nstatus: in_progress\nassignee: nic\n---\nx\n")
    write_task("i.md", "---\nstatus: inbox\n---\nx\n")
    import_folder(write_task.folder)
    status = dict(Task.objects.values_list("key", "status"))
    assert status == {"b.md": "blocked", "p.md": "claimed", "i.md": "queued"}
    held = Task.objects.get(key="p.md")
    assert held.holder == "nic" and held.holder_pid is None


def test_reimport_is_idempotent_and_detects_changes(write_task):
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    again = import_folder(write_task.folder)
    assert (again.imported, again.updated, again.unchanged) == (0, 0, 1)
    path.write_text(GOOD.format(id="T-1", title="Renamed"))
    os.utime(path, ns=(1, 1))
    changed = import_folder(write_task.folder)
    assert changed.updated == 1
    assert Task.objects.get().title == "Renamed"
    path.write_text(GOOD.format(id="T-1", title="Renamed") + "\nA new paragraph.\n")
    os.utime(path, ns=(2, 2))
    assert import_folder(write_task.folder).updated == 1
    assert Task.objects.get().body.endswith("A new paragraph.\n")


def test_edit_of_a_done_task_does_not_requeue_it(write_task):
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    Task.objects.update(status=Status.DONE)
    path.write_text(GOOD.format(id="T-1", title="Edited"))
    os.utime(path, ns=(2, 2))
    import_folder(write_task.folder)
    assert Task.objects.get().status == Status.DONE


def test_change_to_a_claimed_task_is_deferred(write_task):
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    Task.objects.update(status=Status.CLAIMED, holder="w", holder_pid=os.getpid())
    path.write_text(GOOD.format(id="T-1", title="While claimed"))
    os.utime(path, ns=(3, 3))
    report = import_folder(write_task.folder)
    task = Task.objects.get()
    assert report.deferred == 1 and task.change_pending and task.title == "First"
    assert task.events.filter(kind=EventKind.CHANGE_DEFERRED).exists()


def test_disappeared_file_keeps_its_task_flagged_missing(write_task):
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    path.unlink()
    report = import_folder(write_task.folder)
    assert report.missing == 1
    assert Task.objects.get().source_missing


@pytest.mark.parametrize("edited", [False, True])
def test_a_renamed_or_moved_file_keeps_its_task_and_is_not_missing(write_task, edited):
    """A task file renamed (or moved to a subfolder) between imports: the task follows
    it. It was marked missing in the same run that followed it, its page saying the file
    had disappeared while the board showed the new path."""
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    (write_task.folder / "done").mkdir()
    moved = write_task.folder / "done" / "renamed.md"
    path.rename(moved)
    if edited:
        moved.write_text(GOOD.format(id="T-1", title="First, edited"))
    report = import_folder(write_task.folder)
    assert (report.missing, report.updated, report.imported) == (0, 1, 0)
    task = Task.objects.get()
    assert (task.source_path, task.source_missing) == (str(moved), False)
    assert task.title == ("First, edited" if edited else "First")
    assert not task.events.filter(kind=EventKind.MISSING).exists()
    assert task.events.filter(kind=EventKind.UPDATED).get().message == f"file moved from {path}"
    again = import_folder(write_task.folder)
    assert (again.missing, again.updated, again.unchanged) == (0, 0, 1)


def test_a_file_moved_while_its_task_was_finished_gets_the_finish_when_found(
    write_task, lock_root
):
    """The finish found no file to write `status: done` into (it was being moved); the
    import then followed the file to its new place, and it said `inbox` for good: the
    folder, and an import into a new database, saw an open task."""
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    identity = Identity.current("w-test")
    owner_file = OwnerFile(identity)
    [claim] = claims.claim_ready_tasks("q", identity, owner_file, limit=1)
    moved = write_task.folder / "done" / "a.md"
    moved.parent.mkdir()
    path.rename(moved)
    claims.finish_claims(identity, [(claim, Result(status=Status.DONE))], owner_file)
    assert "status" not in moved.read_text()
    assert import_folder(write_task.folder).updated == 1
    assert "status: done" in moved.read_text()
    task = Task.objects.get()
    assert (task.status, task.source_path) == (Status.DONE, str(moved))
    assert import_folder(write_task.folder).unchanged == 1


def test_a_file_given_a_new_id_gives_its_task_the_new_id_not_a_second_task(write_task):
    """The old task stayed, ready and not missing, beside a new one made from the same
    file: two workers worked the one file."""
    path = write_task("a.md", GOOD.format(id="A-1", title="Alpha"))
    import_folder(write_task.folder)
    first = Task.objects.get()
    path.write_text(GOOD.format(id="A-2", title="Alpha, renamed"))
    report = import_folder(write_task.folder)
    assert (report.imported, report.updated, report.errors) == (0, 1, [])
    task = Task.objects.get()
    assert (task.pk, task.key, task.title, task.source_missing) == (
        first.pk,
        "A-2",
        "Alpha, renamed",
        False,
    )
    assert task.events.filter(message="id changed from A-1").exists()
    assert import_folder(write_task.folder).unchanged == 1


def test_two_files_that_swap_ids_each_give_their_task_its_new_file(write_task):
    """A checkout or a renumbering that swaps two files' ids: a.md was named a duplicate of
    b.md at every import, both tasks pointed at b.md (two workers could work it), and
    a.md's text never reached the board."""
    write_task("a.md", GOOD.format(id="A", title="Alpha"))
    write_task("b.md", GOOD.format(id="B", title="Beta"))
    import_folder(write_task.folder)
    write_task("a.md", GOOD.format(id="B", title="Alpha, now B"))
    write_task("b.md", GOOD.format(id="A", title="Beta, now A"))
    report = import_folder(write_task.folder)
    assert (report.errors, report.updated) == ([], 2)
    tasks = {t.key: (t.title, os.path.basename(t.source_path)) for t in Task.objects.all()}
    assert tasks == {"A": ("Beta, now A", "b.md"), "B": ("Alpha, now B", "a.md")}
    again = import_folder(write_task.folder)
    assert (again.errors, again.unchanged) == ([], 2)


def test_a_claimed_tasks_new_id_waits_for_the_claim_and_says_so(write_task):
    path = write_task("a.md", GOOD.format(id="A-1", title="Alpha"))
    import_folder(write_task.folder)
    Task.objects.update(status=Status.CLAIMED, holder="w1")
    path.write_text(GOOD.format(id="A-2", title="Alpha"))
    report = import_folder(write_task.folder)
    assert [e["error"] for e in report.errors] == [
        "its id changed from 'A-1' to 'A-2' while 'A-1' is claimed: an import after the "
        "claim ends gives the task its new id"
    ]
    assert list(Task.objects.values_list("key", flat=True)) == ["A-1"]
    Task.objects.update(status=Status.QUEUED, holder="")
    assert import_folder(write_task.folder).updated == 1
    assert list(Task.objects.values_list("key", flat=True)) == ["A-2"]


def test_a_new_id_that_waited_for_a_claim_is_given_by_the_next_import(write_task, lock_root):
    """The claim's finish took in the file, new id and all, and the next import found it
    unchanged: the task kept its old id for good."""
    path = write_task("a.md", GOOD.format(id="A-1", title="Alpha"))
    import_folder(write_task.folder)
    identity = Identity.current("w-test")
    owner_file = OwnerFile(identity)
    [claim] = claims.claim_ready_tasks("q", identity, owner_file, limit=1)
    path.write_text(GOOD.format(id="A-2", title="Alpha"))
    assert "while 'A-1' is claimed" in import_folder(write_task.folder).errors[0]["error"]
    claims.finish_claims(identity, [(claim, Result(status=Status.DONE))], owner_file)
    assert Task.objects.get().change_pending  # the board says the file's change waits
    report = import_folder(write_task.folder)
    assert (report.updated, report.errors) == (1, [])
    task = Task.objects.get()
    assert (task.key, task.status, task.change_pending) == ("A-2", Status.DONE, False)
    assert import_folder(write_task.folder).unchanged == 1


def test_a_file_the_finish_writes_while_an_import_reads_it_is_not_taken_back(
    write_task, lock_root, monkeypatch
):
    """A person's edit waits for the claim; an import reads the edited file, and before it
    records it the worker's finish takes the edit in and writes `status: done`. The
    import then recorded the text it had read, `status: inbox` and all: the finished task
    went back to the queue (a herd worked it again) and the row said other than the file."""
    from workqueue import importer

    path = write_task("a.md", GOOD.format(id="A-1", title="Alpha"))
    import_folder(write_task.folder)
    identity = Identity.current("w-test")
    owner_file = OwnerFile(identity)
    [claim] = claims.claim_ready_tasks("q", identity, owner_file, limit=1)
    path.write_text(
        GOOD.format(id="A-1", title="Alpha, edited").replace("id:", "status: inbox\nid:")
    )
    assert import_folder(write_task.folder).deferred == 1
    read = importer.taskfile.read_regular_file

    def read_then_finish(*args):
        found = read(*args)
        if Task.objects.filter(status=Status.CLAIMED).exists():
            claims.finish_claims(identity, [(claim, Result(status=Status.DONE))], owner_file)
        return found

    monkeypatch.setattr(importer.taskfile, "read_regular_file", read_then_finish)
    report = import_folder(write_task.folder)
    assert (report.updated, report.requeued) == (0, 0)
    task = Task.objects.get()
    assert (task.status, task.title) == (Status.DONE, "Alpha, edited")
    assert "status: done" in path.read_text()
    monkeypatch.undo()
    assert import_folder(write_task.folder).unchanged == 1


def test_a_task_file_that_became_a_folder_is_missing(write_task):
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    path.unlink()
    path.mkdir()
    report = import_folder(write_task.folder)
    assert report.missing == 1
    assert Task.objects.get().source_missing


def test_a_file_moved_with_a_symlink_left_in_its_place_takes_its_task_along(write_task):
    """`mv a.md archive/ && ln -s archive/a.md a.md`: the import named the moved file a
    duplicate of the link at every run, and the task stayed at the link, which no write
    goes through (its finishes and edits were refused for ever)."""
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    import_folder(write_task.folder)
    moved = write_task.folder / "archive" / "a.md"
    moved.parent.mkdir()
    path.rename(moved)
    path.symlink_to("archive/a.md")
    report = import_folder(write_task.folder)
    assert (report.errors, report.updated, report.missing) == ([], 1, 0)
    task = Task.objects.get()
    assert (task.source_path, task.source_missing) == (str(moved), False)
    assert import_folder(write_task.folder).as_dict()["errors"] == []


def test_a_task_file_replaced_by_a_symlink_to_another_is_missing(write_task):
    """The link leads to b.md, b's task: a's file is gone, and a's task with it (it
    stayed ready, its file a link that nothing of ours writes through)."""
    path = write_task("a.md", GOOD.format(id="T-1", title="First"))
    write_task("b.md", GOOD.format(id="T-2", title="Second"))
    import_folder(write_task.folder)
    path.unlink()
    path.symlink_to("b.md")
    report = import_folder(write_task.folder)
    assert (report.errors, report.missing) == ([], 1)
    assert Task.objects.get(key="T-1").source_missing
    assert not Task.objects.get(key="T-2").source_missing


def test_a_fields_text_is_read_as_written_not_as_a_yaml_number_flag_or_date(write_task):
    """YAML 1.1 read `id: 007` as 7, `1.10` as 1.1, `no` as False (stored "False"),
    `12:30` as 750, and refused `title: 2026-02-30` as no date: the board, the agent's
    {key} and a dependency said other than the file (`id: 1.1` and `id: 1.10`, one id)."""
    write_task(
        "a.md",
        "---\nid: 007\ntitle: 2026-02-30\nassignee: no\nproject: 12:30\n"
        "tags: [1.10, on]\ndepends_on:\n  - 0x1F\nparent: 1.0\n---\nBody\n",
    )
    write_task("b.md", "---\nid: 0x1F\ntitle: 1.10\nstatus: done\n---\nBody\n")
    write_task("c.md", "---\nid: 1.1\ntitle: yes\n---\nBody\n")
    report = import_folder(write_task.folder)
    assert (report.imported, report.errors) == (3, [])
    a = Task.objects.get(key="007")
    assert (a.title, a.assignee, a.project, a.tags) == (
        "2026-02-30",
        "no",
        "12:30",
        ["1.10", "on"],
    )
    assert (a.depends_on, a.frontmatter["parent"]) == (["0x1F"], "1.0")
    assert Task.objects.get(key="0x1F").title == "1.10"
    assert Task.objects.get(key="1.1").title == "yes"
    assert set(Task.objects.ready().values_list("key", flat=True)) == {"1.1", "007"}
    editing.edit_task(a, {"assignee": "nic"}, "user:alice")
    assert import_folder(write_task.folder).unchanged == 3


def test_queue_file_lists_paths_and_bare_ids(write_task, tmp_path):
    write_task("a.md", GOOD.format(id="T-1", title="First"))
    queue_file = write_task.folder / "queue.txt"
    queue_file.write_text("a.md\n\nbare-id-7\n")
    report = Importer("q").run([queue_file])
    assert report.imported == 2 and not report.errors
    assert set(Task.objects.values_list("key", flat=True)) == {"T-1", "bare-id-7"}


BAD_INPUTS = [
    ("unclosed.md", b"---\ntitle: x\nno end\n", "unclosed frontmatter"),
    ("syntax.md", b"---\ntitle: [unclosed\n---\nbody\n", "YAML syntax error at line"),
    ("list.md", b"---\n- a\n- b\n---\nbody\n", "not a mapping"),
    ("empty.md", b"", "empty file"),
    ("binary.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary file"),
    ("latin1.md", "---\ntitle: caf\xe9\n---\n".encode("latin-1"), "not UTF-8"),
    ("alias.md", b"---\na: &a [x, x]\nb: [*a, *a]\n---\n", "aliases"),
    ("pytag.md", b"---\nx: !!python/object/apply:os.system ['true']\n---\n", "safe loading"),
    ("priority.md", b"---\npriority: whenever\n---\n", "priority: 'whenever'"),
    # Stored before as Python's repr, or cut to the most urgent priority, without a word.
    ("id-map.md", b"---\nid: {a: 1}\n---\n", "id: a mapping, not text"),
    ("id-list.md", b"---\nid: [a, b]\n---\n", "id: a list, not one value"),
    ("status-list.md", b"---\nstatus: [done, queued]\n---\n", "status: a list, not one"),
    ("project-map.md", b"---\nproject: {a: [1, 2]}\n---\n", "project: a mapping, not text"),
    ("title-map.md", b"---\ntitle: {x: 1}\n---\n", "title: a mapping, not text"),
    ("tags-map.md", b"---\ntags: {x: 1, y: 2}\n---\n", "tags: a mapping, not a list"),
    ("deps-nested.md", b"---\ndepends_on: [a, [b, c]]\n---\n", "depends_on: item 2 is a list"),
    ("priority-0.9.md", b"---\npriority: 0.9\n---\n", "priority: 0.9 is not a whole number"),
    # PyYAML keeps the last of a key given twice: a merge's `status: queued` won.
    ("twice.md", b"---\nid: d\nstatus: done\ntitle: t\nstatus: queued\n---\n",
     "status: given twice (line 5)"),
    # Read in any case, `Status` is the `status` above it given again.
    ("twice-cased.md", b"---\nid: d\nstatus: done\ntitle: t\nStatus: queued\n---\n",
     "status (line 3) and Status (line 5): one key given twice, in two spellings"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_file_is_reported_by_path_and_left_unchanged(write_task, name, raw, message):
    good = write_task("good.md", GOOD.format(id="G", title="Good"))
    bad = write_task(name, raw)
    before = bad.read_bytes()
    report = import_folder(write_task.folder)
    assert report.imported == 1
    assert [e["path"] for e in report.errors] == [str(bad)]
    assert message in report.errors[0]["error"]
    assert bad.read_bytes() == before
    assert good.exists()


def test_oversized_file_is_refused(write_task, settings):
    settings.HYPERVISOR_MAX_FILE_BYTES = 100
    big = write_task("big.md", "x" * 200)
    report = import_folder(write_task.folder)
    assert "over the 100-byte limit" in report.errors[0]["error"]
    assert report.errors[0]["path"] == str(big)


def test_duplicate_id_names_both_paths(write_task):
    first = write_task("a.md", GOOD.format(id="SAME", title="A"))
    second = write_task("b.md", GOOD.format(id="SAME", title="B"))
    report = import_folder(write_task.folder)
    assert report.imported == 1
    assert report.errors == [
        {"path": str(second), "error": f"duplicate id 'SAME': also used by {first}"}
    ]


def test_symlink_out_of_the_roots_is_refused(write_task, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.md"
    secret.write_text("# secret\n")
    (write_task.folder / "link.md").symlink_to(secret)
    (write_task.folder / "linkdir").symlink_to(outside)
    write_task("ok.md", "# ok\n")
    report = import_folder(write_task.folder)
    assert report.imported == 1
    errors = {e["path"]: e["error"] for e in report.errors}
    assert "outside the import roots" in errors[str(write_task.folder / "link.md")]
    assert any("linkdir" in p and "outside the import roots" in e for p, e in errors.items())
    assert not Task.objects.filter(title="secret").exists()


def test_a_link_out_of_the_roots_to_a_file_that_is_no_task_is_passed_over(write_task, tmp_path):
    """A project folder's virtualenv linked its python outside: an error per link buried
    the errors that mattered."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "python3").write_text("#!/bin/sh\n")
    (outside / "notes.md").write_text("# notes\n")
    bin_folder = write_task.folder / "venv" / "bin"
    bin_folder.mkdir(parents=True)
    (bin_folder / "python").symlink_to(outside / "python3")
    (write_task.folder / "cert.pem").symlink_to(outside / "python3")
    (write_task.folder / "notes.md").symlink_to(outside / "notes.md")
    write_task("ok.md", "# ok\n")
    report = import_folder(write_task.folder)
    assert report.imported == 1
    assert [e["path"] for e in report.errors] == [str(write_task.folder / "notes.md")]


def test_queue_file_cannot_reach_outside_with_dotdot(write_task, tmp_path):
    (tmp_path / "elsewhere.md").write_text("# elsewhere\n")
    queue_file = write_task.folder / "queue.txt"
    queue_file.write_text("../elsewhere.md\n")
    report = Importer("q").run([queue_file])
    assert report.imported == 0
    assert "outside the import roots" in report.errors[0]["error"]


def test_a_file_named_on_the_command_line_is_allowed_like_a_named_folder(tmp_path):
    # No configured roots in the tests: what the operator names is what may be read.
    (tmp_path / "inbox").mkdir()
    named = tmp_path / "inbox" / "fix-login.md"
    named.write_text("---\ntitle: Fix login\n---\nBody.\n")
    (tmp_path / "inbox" / "other.md").write_text("# Not named\n")
    out = io.StringIO()
    call_command("import_tasks", str(named), "--queue", "q", "--json", stdout=out)
    assert json.loads(out.getvalue())["imported"] == 1
    assert list(Task.objects.values_list("key", "title")) == [("fix-login.md", "Fix login")]
    # The same file reached through a queue file elsewhere is still confined.
    (tmp_path / "lists").mkdir()
    queue_file = tmp_path / "lists" / "queue.txt"
    queue_file.write_text(f"{tmp_path / 'inbox' / 'other.md'}\n")
    assert "outside the import roots" in Importer("q").run([queue_file]).errors[0]["error"]


def test_a_refused_import_makes_no_queue(write_task, tmp_path):
    """An empty queue made by a mistyped path was listed as one of the queues, and a herd
    could be launched on it."""
    write_task("bad.md", b"")
    for path in (tmp_path / "nonexistent", write_task.folder):
        with pytest.raises(CommandError, match="nothing could be imported"):
            call_command("import_tasks", str(path), "--queue", "q9", stdout=io.StringIO())
    assert not Queue.objects.filter(name="q9").exists()
    assert "q9" not in Queue.objects.names()
    # A queue there already stays; one file taken makes the queue.
    Queue.objects.create(name="kept")
    assert Importer("kept").run([tmp_path / "nonexistent"]).refused
    write_task("good.md", "# good\n")
    assert not import_folder(write_task.folder).refused
    assert set(Queue.objects.values_list("name", flat=True)) == {"kept", "q"}


def test_command_exits_non_zero_when_any_file_is_refused(process_env, write_task):
    write_task("bad.md", b"")
    result = run_manage(
        ["import_tasks", str(write_task.folder), "--queue", "q", "--json"], process_env
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["errors"][0]["error"] == "empty file"
    assert "nothing could be imported" in result.stderr
    # One refused file among good ones still fails the command (a cron job hears of
    # it); the good ones are in.
    write_task("good.md", GOOD.format(id="G", title="Good"))
    result = run_manage(
        ["import_tasks", str(write_task.folder), "--queue", "q", "--json"], process_env
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["imported"] == 1
    assert "1 file could not be imported (each named with its path); the others were" in (
        result.stderr
    )
    assert Task.objects.filter(key="G").exists()
    (write_task.folder / "bad.md").unlink()
    result = run_manage(["import_tasks", str(write_task.folder), "--queue", "q"], process_env)
    assert result.returncode == 0, result.stderr


def test_an_import_that_another_beat_to_its_new_files_counts_them_unchanged(
    write_task, monkeypatch
):
    """The other import's insert lands between this one's read of the files and its own."""
    for i in range(3):
        write_task(f"t{i}.md", GOOD.format(id=f"T-{i}", title=f"Task {i}"))
    write_task("done.md", GOOD.format(id="D", title="Done").replace("priority", "status: done\np"))
    first = Importer("q", [write_task.folder])
    flush = Importer._flush
    other = []

    def beaten(importer):
        if importer is first and not other:
            other.append(import_folder(write_task.folder))
        flush(importer)

    monkeypatch.setattr(Importer, "_flush", beaten)
    report = first.run([write_task.folder])
    assert other[0].imported == 4
    assert (report.imported, report.unchanged, report.closed, report.errors) == (0, 4, 0, [])
    assert Task.objects.count() == 4
    assert TaskEvent.objects.filter(kind=EventKind.IMPORTED).count() == 4


@pytest.mark.django_db(transaction=True)
def test_imports_of_one_folder_at_once_each_finish_and_make_each_task_once(
    process_env, write_task
):
    """The consumer's minute, the board's "Read the folder again" and an import_tasks can
    read one folder at once: all but the first to insert its new files died of the
    unique key (`IntegrityError`, a traceback), whatever else they had to do."""
    for i in range(300):
        write_task(f"t{i:03d}.md", GOOD.format(id=f"T-{i}", title=f"Task {i}"))
    args = ["import_tasks", str(write_task.folder), "--queue", "q", "--json"]
    imports = [start_manage(args, process_env) for _ in range(3)]
    results = [(*p.communicate(timeout=120), p.returncode) for p in imports]
    assert [code for _, _, code in results] == [0, 0, 0], [err for _, err, _ in results]
    reports = [json.loads(out) for out, _, _ in results]
    assert sum(r["imported"] for r in reports) == 300
    assert all(r["imported"] + r["unchanged"] == 300 for r in reports)
    assert Task.objects.count() == 300
    assert TaskEvent.objects.filter(kind=EventKind.IMPORTED).count() == 300
    assert TaskBody.objects.count() == 300


@pytest.mark.django_db(transaction=True)
def test_migration_moves_bodies_out_of_the_task_rows():
    # Bodies left the task row (SQLite rewrites a whole row on each claim and finish).
    executor = MigrationExecutor(connection)
    executor.migrate([("queue", "0005_task_change_pending_index")])
    try:
        old = executor.loader.project_state(("queue", "0005_task_change_pending_index")).apps
        old.get_model("queue", "Task").objects.create(queue="q", key="k", body="# Kept\n")
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    finally:
        call_command("migrate", verbosity=0)
    assert Task.objects.get(key="k").body == "# Kept\n"


@pytest.mark.django_db(transaction=True)
def test_rows_read_before_keys_were_read_in_any_case_are_read_again(write_task):
    """`Status: done` was read as no status before keys were read in any case; the row
    kept it queued, and its file, unchanged since, was never read again."""
    write_task("a.md", "---\nid: a\nStatus: done\nTitle: Ship it\n---\nBody.\n")
    write_task("b.md", "---\nid: b\nstatus: done\n---\nBody.\n")
    import_folder(write_task.folder)
    # As the earlier reader left them: the keys as spelt, what they say missed.
    Task.objects.filter(key="a").update(
        frontmatter={"id": "a", "Status": "done", "Title": "Ship it"},
        status=Status.QUEUED,
        title="a",
        outcome="",
    )
    executor = MigrationExecutor(connection)
    executor.migrate([("queue", "0020_board_field_indexes_hold_values_only")])
    try:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    finally:
        call_command("migrate", verbosity=0)
    report = import_folder(write_task.folder)
    assert (report.updated, report.unchanged) == (1, 1)
    task = Task.objects.get(key="a")
    assert (task.status, task.title, task.frontmatter["status"]) == (
        Status.DONE,
        "Ship it",
        "done",
    )


@pytest.mark.parametrize(
    ("word", "status", "outcome"),
    [
        ("completed", Status.DONE, "closed"),
        ("Finished", Status.DONE, "closed"),
        ("resolved", Status.DONE, "closed"),
        ("wontfix", Status.DONE, "cancelled"),
        ("todo", Status.QUEUED, ""),
        ("review", Status.QUEUED, ""),  # no one knows: queued, as a new task
    ],
)
def test_the_common_words_for_a_finished_task_close_it(write_task, word, status, outcome):
    """`status: completed` (a word many folders use) was imported queued, and the finished
    task handed to an agent again."""
    write_task("a.md", f"---\nid: a\nstatus: {word}\n---\nBody.\n")
    import_folder(write_task.folder)
    assert Task.objects.values_list("status", "outcome").get() == (status, outcome)


@pytest.mark.parametrize("word", ["in_progress", "todo", "review", "completed"])
def test_a_status_word_moves_a_finished_task_only_when_it_means_another_state(write_task, word):
    """A worker finished the task; then its agent wrote `status: completed` before that
    was a known word, or `in_progress` as it started (mkdir-era agents do), or a person
    changed the folder's word `open` to `todo`: each re-import requeued the task (or held
    it "outside" for ever) and it was worked again."""
    path = write_task("a.md", "---\nid: a\nstatus: open\n---\nBody.\n")
    import_folder(write_task.folder)
    transitions.mark_done([Task.objects.get()], "w-1", "", "success")
    path.write_text(f"---\nid: a\nstatus: {word}\n---\nBody.\n")
    import_folder(write_task.folder)
    assert Task.objects.values_list("status", "outcome").get() == (Status.DONE, "success")


def test_a_file_that_says_open_after_it_said_closed_reopens_its_task(write_task):
    path = write_task("a.md", "---\nid: a\nstatus: done\n---\nBody.\n")
    import_folder(write_task.folder)
    assert Task.objects.get().status == Status.DONE
    path.write_text("---\nid: a\nstatus: todo\n---\nBody.\n")
    import_folder(write_task.folder)
    assert Task.objects.get().status == Status.QUEUED


def test_a_comma_list_keeps_an_item_with_a_space_whole(write_task):
    """`tags: bug, needs review, ui` became four tags (needs, review), unlike the board's
    editor; a list without commas is still split on spaces."""
    write_task("a.md", "---\nid: a\ntags: bug, needs review, ui\ndepends_on: x y\n---\nB.\n")
    import_folder(write_task.folder)
    assert Task.objects.values_list("tags", "depends_on").get() == (
        ["bug", "needs review", "ui"],
        ["x", "y"],
    )


QUOTED_TAGS = 'bug, urgent, "needs review", "a, b"'


def test_quoted_items_of_a_list_written_as_text_are_read_as_the_editor_reads_them(write_task):
    """`tags: bug, urgent, "needs review"` kept its quotes in the tag; the board's editor
    reads the same text as `needs review`. A quote left open stays part of its item."""
    write_task("a.md", f"---\nid: a\ntags: '{QUOTED_TAGS}'\ndepends_on: '\"x y\" z'\n---\n")
    write_task("b.md", "---\nid: b\ntags: '6\" screen, bug'\n---\n")
    assert not import_folder(write_task.folder).errors
    tags = dict(Task.objects.values_list("key", "tags"))
    assert tags["a"] == ["bug", "urgent", "needs review", "a, b"] == list_items(QUOTED_TAGS)
    assert tags["b"] == ['6" screen', "bug"]
    assert Task.objects.get(key="a").depends_on == ["x y", "z"]


PROJECT_DOCUMENTS = [
    "README.md",
    "CHANGELOG.md",
    "CONTRIBUTING.md",
    "LICENSE.md",
    "code_of_conduct.md",
    "TEMPLATE.md",
    "_template.md",
    "templates/bug.md",
]


def test_project_documents_without_frontmatter_are_left_out_and_named(write_task, process_env):
    """A task folder's README, CHANGELOG, LICENSE and templates came in as queued tasks:
    workers worked them, and triage wrote frontmatter into the README."""
    for name in PROJECT_DOCUMENTS:
        write_task(name, f"# {name}\n\nThe project's own words.\n")
    readme = write_task.folder / "README.md"
    before = readme.read_bytes()
    write_task("notes.md", "# A task without frontmatter\n")
    write_task("docs/README.md", "---\nid: doc-task\ntitle: Rewrite the README\n---\nB.\n")
    report = import_folder(write_task.folder)
    assert (report.imported, report.errors) == (2, [])
    assert sorted(Task.objects.values_list("key", flat=True)) == ["doc-task", "notes.md"]
    assert report.left_out == sorted(str(write_task.folder / n) for n in PROJECT_DOCUMENTS)
    assert report.summary().endswith(
        "; left out 8 files that are not tasks (no frontmatter): CHANGELOG.md, "
        "CONTRIBUTING.md, LICENSE.md, README.md, TEMPLATE.md, _template.md, "
        "code_of_conduct.md, templates/bug.md"
    )
    assert readme.read_bytes() == before
    result = run_manage(["import_tasks", str(write_task.folder), "--queue", "q"], process_env)
    assert result.returncode == 0, result.stderr  # not an error
    assert "left out 8 files that are not tasks (no frontmatter): CHANGELOG.md" in result.stdout
    result = run_manage(
        ["import_tasks", str(write_task.folder), "--queue", "q", "--json"], process_env
    )
    assert len(json.loads(result.stdout)["left_out"]) == 8


def test_a_task_made_earlier_from_a_project_document_is_flagged_missing_once(write_task):
    """Imported before documents were left out: the task is kept, with its history, and
    marked missing like a task whose file was deleted (its file is no task any more)."""
    write_task("README.md", "# Read me\n")
    Importer("q", [write_task.folder]).run([write_task.folder / "README.md"])
    task = Task.objects.get(key="README.md")
    report = import_folder(write_task.folder)
    assert (report.missing, report.left_out) == (1, [str(write_task.folder / "README.md")])
    task.refresh_from_db()
    assert (task.status, task.source_missing) == (Status.QUEUED, True)
    assert task.events.get(kind=EventKind.MISSING).message == (
        f"left out: {write_task.folder / 'README.md'} is a project document without "
        "frontmatter, not a task"
    )
    assert import_folder(write_task.folder).missing == 0
    assert task.events.filter(kind=EventKind.MISSING).count() == 1


def test_capitalised_keys_are_read_and_written_back_as_spelt(write_task):
    """`Status: done`, `Title:`, `Priority: P1` were not read: the task came in queued and
    untitled. An edit then added a second, lower-case key beside the file's own."""
    done = write_task("done.md", "---\nID: c-1\nStatus: done\nTitle: Ship it\n---\nB.\n")
    path = write_task(
        "open.md", "---\nId: c-2\nStatus: todo\nTitle: Fix it\nPriority: P1\nTags: [x]\n---\nB.\n"
    )
    report = import_folder(write_task.folder)
    assert (report.imported, report.closed, report.errors) == (2, 1, [])
    rows = Task.objects.order_by("key").values_list("key", "title", "status", "priority", "tags")
    assert list(rows) == [
        ("c-1", "Ship it", Status.DONE, 2, []),
        ("c-2", "Fix it", Status.QUEUED, 1, ["x"]),
    ]
    task = Task.objects.get(key="c-2")
    editing.edit_task(task, {"status": Status.BLOCKED, "priority": 0}, "user:alice", "waits")
    assert path.read_text() == (
        "---\nId: c-2\nStatus: blocked\nTitle: Fix it\nPriority: P0\nTags: [x]\n"
        "blocked_reason: waits\n---\nB.\n"
    )
    assert done.read_text().startswith("---\nID: c-1\nStatus: done\n")
    assert import_folder(write_task.folder).errors == []
    assert Task.objects.get(key="c-2").status == Status.BLOCKED


def test_a_folder_another_queue_imports_is_refused_naming_that_queue(write_task, tmp_path):
    # Each queue locks its own tasks: one file in two queues could be worked twice at once.
    write_task("a.md", GOOD.format(id="T-1", title="First"))
    write_task("sub/b.md", GOOD.format(id="T-2", title="Second"))
    assert import_folder(write_task.folder, queue="q").imported == 2
    for path in (write_task.folder, write_task.folder / "sub", write_task.folder / "a.md"):
        report = Importer("r", [tmp_path]).run([path])
        assert [e["path"] for e in report.errors] == [str(path)]
        assert "the queue 'q' imports" in report.errors[0]["error"]
    assert not Task.objects.filter(queue="r").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.md").write_text(GOOD.format(id="T-3", title="Third"))
    assert Importer("r", [tmp_path]).run([tmp_path / "other"]).imported == 1
    report = Importer("s", [tmp_path]).run([tmp_path])  # around both queues' folders
    assert len(report.errors) == 1 and not Task.objects.filter(queue="s").exists()
