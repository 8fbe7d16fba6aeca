"""A hostile task folder: special files, loops, depth, unreadable folders, bad values, bad
queue names. Each is named in the report with its path; the good file beside it imports."""

import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from herds.forms import LaunchForm
from herds.models import Profile
from tests.conftest import MANAGE, ROOT, run_manage
from workqueue.importer import Importer
from workqueue.models import BOARD_INDEX_BYTES, Queue, Task

pytestmark = pytest.mark.django_db

GOOD = "---\nid: good\ntitle: Good\n---\nBody.\n"


def import_folder(folder, queue="q"):
    return Importer(queue, [folder]).run([folder])


def errors_by_path(report) -> dict[str, str]:
    return {e["path"]: e["error"] for e in report.errors}


@pytest.fixture
def chain(write_task):
    """Build folder/name/name/... through dir fds (the path soon passes what open() takes);
    removed level by level afterwards, since shutil.rmtree recurses once per level."""
    made = []

    def build(name: str, depth: int, files: dict[int, bytes]) -> None:
        made.append(name)
        fd = os.open(write_task.folder, os.O_RDONLY | os.O_DIRECTORY)
        for level in range(depth):
            os.mkdir(name, dir_fd=fd)
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            if level in files:
                out = os.open("task.md", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(out, files[level])
                os.close(out)
        os.close(fd)

    yield build
    top = write_task.folder
    for name in made:
        while (top / name).is_dir():
            level, spare = top / name, top / f"{name}.up"
            if (level / name).is_dir():
                (level / name).rename(spare)
            for entry in level.iterdir():
                entry.unlink()
            level.rmdir()
            if spare.is_dir():
                spare.rename(level)


# Queue names ---------------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "a/b", "-rf", "q\n", "x" * 65, "caf\xe9"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_queue_name_is_refused_by_import_tasks_naming_it(name, write_task):
    write_task("good.md", GOOD)
    with pytest.raises(CommandError, match="argument --queue: queue name"):
        call_command(
            "import_tasks", str(write_task.folder), f"--queue={name}", stdout=io.StringIO()
        )
    assert not Task.objects.exists() and not Queue.objects.exists()


@pytest.mark.parametrize("command", ["work", "herd"])
def test_work_and_herd_refuse_an_empty_queue_name(command):
    extra = ["--processor", "noop"] if command == "work" else ["--profile", "x", "--workers", "1"]
    with pytest.raises(CommandError, match="queue name '' is not allowed"):
        call_command(command, "--queue=", *extra)


def test_importer_and_queue_model_refuse_an_empty_queue_name():
    with pytest.raises(ValidationError):
        Importer("")
    with pytest.raises(ValidationError, match="queue name 'a/b' is not allowed"):
        Queue(name="a/b").full_clean()
    Queue(name="inbox-2.b_c").full_clean()


def test_launch_form_refuses_a_bad_queue_name_already_in_the_database():
    Task.objects.create(queue="a/b", key="k")
    profile = Profile.objects.first()
    form = LaunchForm(data={"queue": "a/b", "profile": profile.name, "workers": 1, "batch": 0})
    assert not form.is_valid()
    assert "queue name 'a/b' is not allowed" in form.errors["queue"][0]


# Special files and odd trees -------------------------------------------------------------


@pytest.mark.timeout(20)  # the old importer blocked for ever opening the FIFO
def test_fifo_named_md_is_refused_and_the_good_file_imported(write_task):
    write_task("good.md", GOOD)
    fifo = write_task.folder / "x.md"
    os.mkfifo(fifo)
    report = import_folder(write_task.folder)
    assert errors_by_path(report) == {str(fifo): "not a regular file: a FIFO, not read"}
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


@pytest.mark.timeout(20)  # the old importer read /dev/zero's twin until memory ran out
def test_device_node_named_md_is_never_read(write_task):
    if os.geteuid() != 0:
        pytest.skip("creating a character device node needs root")
    write_task("good.md", GOOD)
    device = write_task.folder / "z.md"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # the same device as /dev/zero
    report = import_folder(write_task.folder)
    assert errors_by_path(report) == {
        str(device): "not a regular file: a character device, not read"
    }
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


def test_fifo_named_on_the_command_line_or_in_a_queue_file_is_refused(write_task):
    fifo = write_task.folder / "named.md"
    os.mkfifo(fifo)
    os.mkfifo(write_task.folder / "listed.md")
    queue_file = write_task.folder / "list.txt"
    queue_file.write_text("listed.md\n")
    report = Importer("q", [write_task.folder]).run([fifo, queue_file])
    assert [e["error"] for e in report.errors] == ["not a regular file: a FIFO, not read"] * 2
    fifo_list = write_task.folder / "fifo.txt"
    os.mkfifo(fifo_list)
    report = Importer("q", [write_task.folder]).run([fifo_list])
    assert errors_by_path(report) == {str(fifo_list): "not a regular file: a FIFO, not read"}


@pytest.mark.timeout(20)
def test_import_tasks_names_a_fifo_given_on_its_command_line(write_task):
    fifo = write_task.folder / "x.md"
    os.mkfifo(fifo)
    out = io.StringIO()
    with pytest.raises(CommandError, match="nothing could be imported"):
        call_command("import_tasks", fifo, "--json", stdout=out)
    assert json.loads(out.getvalue())["errors"] == [
        {"path": str(fifo), "error": "not a regular file: a FIFO, not read"}
    ]


# What import_tasks names, and how it reaches outside the folder it names.
NAMED_WAYS_OUT = {
    "a linked file": ("tasks/x.md", "symlink points outside the import roots (to {decoy})"),
    "a linked folder": ("tasks/linked", "symlink points outside the import roots (to {out})"),
    "a file in a linked folder": ("tasks/linked/decoy.md", "path is outside the import roots"),
    "a `..` after a link": ("tasks/deep/../decoy.md", "path is outside the import roots"),
}


@pytest.mark.parametrize("named", NAMED_WAYS_OUT.values(), ids=NAMED_WAYS_OUT.keys())
def test_a_symlink_named_on_the_command_line_is_confined_like_one_in_a_folder(
    tmp_path, monkeypatch, named
):
    """A work run writes the task's status into its file: a decoy imported through a link
    named on the command line had it written outside the import roots."""
    name, error = named
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    decoy = outside / "decoy.md"
    decoy.write_text("---\nstatus: inbox\n---\nx\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "x.md").symlink_to(decoy)
    (tasks / "linked").symlink_to(outside)
    (tasks / "deep").symlink_to(outside / "deep")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with pytest.raises(CommandError, match="nothing could be imported"):
        call_command("import_tasks", name, "--queue", "q", "--json", stdout=out)
    [refused] = json.loads(out.getvalue())["errors"]
    assert refused["path"] in (name, str(decoy))
    assert error.format(decoy=decoy, out=outside) in refused["error"]
    assert not Task.objects.exists()


def test_symlink_loops_are_named_and_the_rest_imported(write_task):
    write_task("good.md", GOOD)
    folder = write_task.folder
    (folder / "self.md").symlink_to(folder / "self.md")
    (folder / "a.md").symlink_to(folder / "b.md")
    (folder / "b.md").symlink_to(folder / "a.md")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)
    (folder / "sub" / "twice.md").symlink_to(folder / "good.md")
    report = import_folder(folder)
    errors = errors_by_path(report)
    assert errors == {
        str(folder / "a.md"): "symlink loop",
        str(folder / "b.md"): "symlink loop",
        str(folder / "self.md"): "symlink loop",
        str(folder / "sub" / "up"): f"symlink to a folder already read ({folder.resolve()})",
    }
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


def test_a_file_name_that_is_not_utf8_is_named_and_the_rest_imported(write_task, process_env):
    """Python keeps such a name's bytes as lone surrogates: encoding the path for the
    database stopped the whole import with UnicodeEncodeError."""
    write_task("good.md", GOOD)
    folder = write_task.folder
    bad = os.path.join(os.fsencode(folder), b"caf\xe9 \xff.md")
    with open(bad, "wb") as f:
        f.write(b"---\ntitle: Latin-1 name\n---\nBody.\n")
    (folder / "new\nline.md").write_text("---\ntitle: A newline\n---\n")  # UTF-8: imported
    report = import_folder(folder)
    assert report.errors == [
        {
            "path": f"{folder}/caf\ufffd \ufffd.md",
            "error": "the file's path is not UTF-8 text: rename it to import it",
        }
    ]
    assert sorted(Task.objects.values_list("title", flat=True)) == ["A newline", "Good"]
    for output in (["--json"], []):  # and printed to a terminal's UTF-8
        out = run_manage(["import_tasks", "--queue", "q", *output, str(folder)], process_env)
        assert out.returncode == 1, out.stderr  # one file refused
        said = json.loads(out.stdout)["errors"][0]["path"] if output else out.stderr
        assert "caf\ufffd \ufffd.md" in said


def test_a_tree_deeper_than_the_recursion_limit_is_walked(write_task, chain):
    write_task("good.md", GOOD)
    depth = sys.getrecursionlimit() + 100  # 1,100 nested folders
    chain("d", depth, {300: b"---\nid: mid\n---\nHalf way.\n", depth - 1: b"# Bottom\n"})
    report = import_folder(write_task.folder)
    assert sorted(Task.objects.values_list("key", flat=True)) == ["good", "mid"]
    ((where, why),) = errors_by_path(report).items()
    # The bottom file's key (its path, having no id) is longer than the key column.
    assert where.endswith("/d/d/task.md") and why == "key: 2,207 characters, over the column's 500"


def test_paths_longer_than_path_max_are_named(write_task, chain):
    write_task("good.md", GOOD)
    chain("n" * 250, 20, {19: b"# Too far\n"})  # 5,000 characters: past PATH_MAX (4,096)
    report = import_folder(write_task.folder)
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]
    ((where, why),) = errors_by_path(report).items()
    assert len(where) > os.pathconf("/", "PC_PATH_MAX") and "File name too long" in why


def test_unreadable_folder_is_named(write_task, process_env):
    write_task("good.md", GOOD)
    locked = write_task.folder / "locked"
    locked.mkdir()
    (locked / "hidden.md").write_text("# hidden\n")
    locked.chmod(0)
    command = [sys.executable]
    if os.geteuid() == 0:
        # Root reads any folder; the import runs without the two capabilities that allow it,
        # as every other user does.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is not installed")
        caps = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *command]
    try:
        result = subprocess.run(
            [*command, MANAGE, "import_tasks", str(write_task.folder), "--queue=q", "--json"],
            env=process_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        locked.chmod(0o700)
    assert result.returncode == 1, result.stderr  # the folder was refused
    report = json.loads(result.stdout)
    assert report["errors"] == [
        {"path": str(locked), "error": "cannot read folder: Permission denied"}
    ]
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


# Values their columns cannot hold -------------------------------------------------------

BAD_VALUES = [
    ("inf.md", "priority: .inf", "priority: inf is not a finite number"),
    ("nan.md", "priority: .nan", "priority: nan is not a finite number"),
    ("huge.md", f"priority: {2**70}", f"priority: {2**70} is outside the column's range"),
    ("int32.md", "priority: 3000000000", "priority: 3000000000 is outside the column's range"),
    # A digit int() cannot read: the whole import stopped with ValueError.
    ("superscript.md", 'priority: "\u00b2"', "priority: '\u00b2' is not a number or P0-P4"),
    ("nul-title.md", 'title: "a\\0b"', "title: contains a NUL character"),
    ("nul-tag.md", 'tags: ["x\\0"]', "tags: contains a NUL character"),
    ("nul-extra.md", 'notes: {deep: "x\\0"}', "notes: contains a NUL character"),
    ("nul-key.md", '"k\\0": 1', "frontmatter 'k\\x00': contains a NUL character"),
    ("inf-extra.md", "estimate: -.inf", "estimate: -inf is not a finite number"),
    ("long-title.md", "title: " + "t" * 501, "title: 501 characters, over the column's 500"),
    ("long-id.md", "id: " + "k" * 501, "key: 501 characters, over the column's 500"),
    ("long-project.md", "project: " + "p" * 201, "project: 201 characters, over the column's 200"),
    ("long-assignee.md", "assignee: " + "a" * 201, "assignee: 201 characters"),
    ("long-type.md", "type: " + "y" * 101, "type: 101 characters, over the column's 100"),
    ("many-tags.md", "tags: [" + ", ".join(["tag"] * 300) + "]", "tag_index: 1,201 characters"),
    ("long-dep.md", "depends_on: [" + "d" * 501 + "]", "depends_on: an id of 501 characters"),
    # What PyYAML's constructor raises past its syntax errors stopped the whole import.
    # The YAML loader's "month must be in 1..12" named no field.
    ("bad-date.md", "due: 2024-13-45", "due: 2024-13-45 is not a date"),
    ("feb-30.md", "title: t\ndue: 2026-02-30", "due: 2026-02-30 is not a date"),
    ("month-13.md", "Created: 2026-13-01", "Created: 2026-13-01 is not a date"),
    ("bad-time.md", "at: 2026-01-01 25:00:00", "at: 2026-01-01 25:00:00 is not a date"),
    ("nested-date.md", "plan:\n  due: 2026-02-30", "due: 2026-02-30 is not a date"),
    ("listed-date.md", "dates: [2026-02-30]", "2026-02-30 is not a date (line 2)"),
    ("long-int.md", "estimate: 1" + "0" * 5000, "cannot be read: Exceeds the limit (4300"),
    ("sexagesimal.md", "estimate: 1:" + "59:" * 3000 + "1", "estimate: a number of more than"),
    ("sexagesimal-key.md", "? 1:" + "59:" * 3000 + "1\n: x", "a field name of more than 4,000"),
    ("sexagesimal-float.md", "e: 1:" + "59:" * 3000 + "1.5", "int too large to convert to float"),
    ("deep.md", "tags: " + "[" * 900 + "]" * 900, "tags: nested more than 64 levels deep"),
    ("deep-extra.md", "notes: " + "[" * 66 + "]" * 66, "notes: nested more than 64 levels deep"),
]


@pytest.mark.parametrize(("name", "yaml", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_value_its_column_cannot_hold_names_file_and_field(write_task, name, yaml, message):
    write_task("good.md", GOOD)
    bad = write_task(name, f"---\n{yaml}\n---\nBody.\n")
    report = import_folder(write_task.folder)
    assert [e["path"] for e in report.errors] == [str(bad)]
    assert message in report.errors[0]["error"]
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


def ideographs(count: int, seed: int) -> str:
    """`count` random CJK ideographs: 3 bytes each in UTF-8, and nothing PostgreSQL's
    compression of a long index entry can shrink."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(count))


def board_fields(tags: list[str], text: int) -> str:
    """Frontmatter with these tags and `text` ideographs in each of project, assignee,
    type and complexity (each within its column's characters)."""
    return (
        f"tags: [{', '.join(tags)}]\nproject: {ideographs(text, 1)}\n"
        f"assignee: {ideographs(text, 2)}\ntype: {ideographs(text, 3)}\n"
        f"complexity: {ideographs(text, 4)}\n"
    )


def test_values_the_boards_indexes_cannot_hold_together_name_the_fields(write_task):
    """Each within its column, together over what a PostgreSQL index entry holds: there,
    before the rule, the whole import failed with an exception."""
    write_task("good.md", GOOD)
    tags = [ideographs(100, seed) for seed in range(10, 16)]  # "|a|...|f|": 1,807 bytes
    bad = write_task("wide.md", f"---\ntitle: Wide\n{board_fields(tags, 100)}---\nBody.\n")
    report = import_folder(write_task.folder)
    assert errors_by_path(report) == {
        str(bad): "tags, project, assignee, type and complexity: 3,007 bytes together in "
        "UTF-8, over the 2,400 the board's indexes hold"
    }
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


def test_values_at_the_limit_are_indexed_on_every_database(write_task):
    """Exactly BOARD_INDEX_BYTES of incompressible text, in a queue of the longest name:
    imported and found by a filter, so the limit fits a real PostgreSQL index entry."""
    rest = BOARD_INDEX_BYTES - 4 * 300  # what "|a|b|" may take beside 4 x 100 ideographs
    tags = [ideographs(200, 20), ideographs((rest - 3) // 3 - 200, 21)]
    assert len(("|" + "|".join(tags) + "|").encode()) == rest
    write_task("edge.md", f"---\nid: edge\ntitle: Edge\n{board_fields(tags, 100)}---\nBody.\n")
    queue = "q" * 64
    report = import_folder(write_task.folder, queue)
    assert not report.errors, report.errors
    found = Task.objects.filter(queue=queue, project=ideographs(100, 1))
    assert list(found.values_list("key", flat=True)) == ["edge"]
    assert Task.objects.filter(tag_index__contains=f"|{tags[1]}|").count() == 1


def test_a_path_over_what_its_index_holds_is_named_not_a_crash(write_task):
    """A path within the column's characters but over its index's bytes (non-ASCII)."""
    write_task("good.md", GOOD)
    deep = "/".join(ideographs(80, level) for level in range(11))  # 240 bytes a folder
    bad = write_task(f"{deep}/task.md", GOOD.replace("good", "deep"))
    assert len(str(bad)) <= 1000 and len(str(bad).encode()) > 2400  # the column's, the index's
    report = import_folder(write_task.folder)
    assert errors_by_path(report) == {
        str(bad): f"the file's path: {len(str(bad).encode()):,} bytes in UTF-8, over the "
        "2,400 its index holds"
    }
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


def test_a_nul_in_the_body_past_the_binary_sniff_is_refused(write_task):
    write_task("good.md", GOOD)
    bad = write_task("late-nul.md", b"# Late\n" + b"x" * 9000 + b"\x00\n")
    report = import_folder(write_task.folder)
    assert errors_by_path(report) == {str(bad): "body: contains a NUL character"}
    assert list(Task.objects.values_list("key", flat=True)) == ["good"]


def test_a_file_saved_as_latin_1_is_named_with_the_line_of_its_first_such_byte(write_task):
    """It said only `invalid byte at offset 27`: a count no editor shows."""
    write_task("good.md", GOOD)
    bad = write_task("latin.md", "---\nid: l1\ntitle: Caf\u00e9\n---\n".encode("latin-1"))
    report = import_folder(write_task.folder)
    assert errors_by_path(report) == {
        str(bad): "not UTF-8 text: byte 0xe9 at line 3, column 11 (saved as Latin-1 or "
        "Windows-1252?): save it as UTF-8"
    }


def test_a_bare_id_too_long_in_a_queue_file_is_named_by_line(write_task):
    queue_file = write_task.folder / "list.txt"
    queue_file.write_text("fine-id\n" + "k" * 501 + "\n")
    report = Importer("q", [write_task.folder]).run([queue_file])
    assert errors_by_path(report) == {
        f"{queue_file}:2": "key: 501 characters, over the column's 500"
    }
    assert list(Task.objects.values_list("key", flat=True)) == ["fine-id"]


@pytest.mark.timeout(60)  # `(.+?)[ \t#]*$` was quadratic on such a line: about half an hour
def test_a_heading_of_a_megabyte_of_closing_marks_is_read_in_linear_time(write_task):
    write_task("marks.md", "# " + " #" * 500_000 + " title ##\n")
    report = import_folder(write_task.folder)
    assert report.errors == []
    title = Task.objects.get().title
    assert (len(title), title.startswith("# # #")) == (500, True)


def test_a_heading_longer_than_the_title_column_is_cut_not_refused(write_task):
    write_task("long.md", "# " + "h" * 700 + "\n")
    report = import_folder(write_task.folder)
    assert not report.errors
    assert Task.objects.get().title == "h" * 500
