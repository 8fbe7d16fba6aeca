"""Triage: each decision rule and branch, write-back byte for byte, refusals, idempotence."""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workqueue import actions, claims, taskfile, triage
from workqueue.importer import Importer
from workqueue.models import EventKind, Queue, Status, Task
from workqueue.processors import load_processor
from workqueue.triage_rules import Rules, decide, insert_link, triage_bytes
from workqueue.worker import Worker
from workqueue.writeback import Document, EditRefused, edit_yaml

RULES = Rules(
    human="nic",
    bot="bot",
    project_links=(("aops", "[[academicOps]]"), ("osb", "[[oversight-board]]")),
)


def no_children(task_id):
    return False


# Close ----------------------------------------------------------------------

CLOSE_CASES = [
    (
        "close reason section",
        {"status": "todo"},
        "# T\n\n## Close Reason\nDone.\n",
        "close_reason_section",
    ),
    ("closed section, any case", {}, "text\n## CLOSED\n", "close_reason_section"),
    ("status done", {"status": "done"}, "body", "status_done"),
    ("status Done", {"status": "Done"}, "body", "status_done"),
    ("status cancelled", {"status": "cancelled"}, "body", "status_cancelled"),
    ("close_reason field", {"close_reason": "dup"}, "body", "close_reason_field"),
    ("section wins over status", {"status": "done"}, "## Closed\n", "close_reason_section"),
    ("blocked wins over section", {"status": "blocked"}, "## Close Reason\nx\n", ""),
    ("status wins over field", {"status": "done", "close_reason": "x"}, "b", "status_done"),
    ("open task", {"status": "todo", "close_reason": ""}, "## Closing thoughts? no", ""),
    ("a closed subsection", {"status": "todo"}, "## Plan\n### Closed\nold items\n", ""),
    ("inline mention", {"status": "todo"}, "See ## Closed below.\n", ""),
]


@pytest.mark.parametrize(
    ("fm", "body", "reason"), [c[1:] for c in CLOSE_CASES], ids=[c[0] for c in CLOSE_CASES]
)
def test_close_rule(fm, body, reason):
    decision = decide(fm, body, "title", False, RULES)
    if reason:
        assert decision.action == "close"
        assert decision.close_reason == reason
        # Closing skips the complexity and assignee rules.
        assert "complexity" not in decision.set_keys
        assert "assignee" not in decision.set_keys
    else:
        assert decision.action.startswith("assign:")


def test_close_sets_status_done_only_when_not_done_already():
    assert decide({"status": "todo"}, "## Closed", "t", False, RULES).changes == ["status->done"]
    assert decide({"status": "done"}, "## Closed", "t", False, RULES).changes == []


# Complexity -----------------------------------------------------------------

LONG = " ".join(["word"] * 510)
MEDIUM = " ".join(["word"] * 60)
COMPLEXITY_CASES = [
    # (id, frontmatter, body, title, has_children, expected)
    ("type learn", {"type": "learn"}, "x", "t", False, "blocked-human"),
    ("human tag", {"tags": ["peer_review"]}, "x", "t", False, "blocked-human"),
    ("human tag in a string", {"tags": "misc, needs-review"}, "x", "t", False, "blocked-human"),
    ("word review", {}, "Please review it", "t", False, "blocked-human"),
    ("word in title", {}, "x", "Budget meeting", False, "blocked-human"),
    ("word policy", {}, "about the POLICY", "t", False, "blocked-human"),
    ("word boundary", {}, "previewed reviewing", "t", False, "requires-judgment"),
    # Precedence: human wins over a mechanical title.
    ("human beats mechanical", {}, "review", "Rename the module", False, "blocked-human"),
    ("container, no children", {"type": "epic"}, MEDIUM, "t", False, "needs-decomposition"),
    ("container, short, no list", {"type": "goal"}, "short", "t", True, "needs-decomposition"),
    ("choice, no checklist", {}, "choose a library", "t", False, "needs-decomposition"),
    ("which, with checklist", {}, "which one\n- [ ] a", "t", False, "requires-judgment"),
    (
        "decomposition beats mechanical",
        {},
        "choose",
        "Delete old files",
        False,
        "needs-decomposition",
    ),
    ("title rename", {}, "x", "Rename the module", False, "mechanical"),
    ("title update config", {}, "x", "Update config for CI", False, "mechanical"),
    ("checklist and path", {}, "- [x] edit /src/app.py", "t", False, "mechanical"),
    ("checklist, no path", {}, "- [ ] edit app", "t", False, "requires-judgment"),
    ("fix in title and path", {}, "in src\\util.js", "Fix the crash", False, "mechanical"),
    ("fix in body only", {}, "fix /src/util.js", "Crash", False, "requires-judgment"),
    ("container with children", {"type": "project"}, MEDIUM, "t", True, "multi-step"),
    ("long with acceptance", {}, LONG + "\n## Acceptance\n", "t", False, "multi-step"),
    ("long with criteria", {}, LONG + " acceptance criteria", "t", False, "multi-step"),
    ("long, no acceptance", {}, LONG, "t", False, "requires-judgment"),
    ("nothing matches", {}, "write docs", "t", False, "requires-judgment"),
]


@pytest.mark.parametrize(
    ("fm", "body", "title", "children", "expected"),
    [c[1:] for c in COMPLEXITY_CASES],
    ids=[c[0] for c in COMPLEXITY_CASES],
)
def test_complexity_rule(fm, body, title, children, expected):
    decision = decide(fm, body, title, children, RULES)
    assert decision.complexity == expected
    assert decision.set_keys["complexity"] == expected
    assert f"complexity->{expected}" in decision.changes


def test_existing_complexity_is_kept():
    decision = decide({"complexity": "mechanical"}, "review this", "t", False, RULES)
    assert decision.complexity == "mechanical"
    assert "complexity" not in decision.set_keys
    assert decision.assignee == "bot"


# Assignee -------------------------------------------------------------------

ASSIGNEE_CASES = [
    ("blocked-human keeps a person", {"assignee": "alice", "type": "learn"}, "x", "t", "alice"),
    ("mechanical keeps a person", {"assignee": "alice"}, "x", "Remove dead code", "alice"),
    ("blocked-human takes it from the bot", {"assignee": "bot", "type": "learn"}, "x", "t", "nic"),
    ("mechanical takes it from the human", {"assignee": "Nic"}, "x", "Remove it", "bot"),
    ("existing kept", {"assignee": "alice"}, "refactor it", "t", "alice"),
    ("respond to email", {}, "respond quickly to the email", "t", "nic"),
    ("design decision", {}, "a design choice", "t", "nic"),
    ("receipt", {}, "file the receipt", "t", "nic"),
    ("phrase underspecified", {}, "this is underspecified", "t", "nic"),
    ("bot tag", {"tags": ["bot-assigned"]}, "x", "t", "bot"),
    ("implement a function", {}, "implement the parse function", "t", "bot"),
    ("fix a bug", {}, "fix that nasty bug", "t", "bot"),
    ("test coverage", {}, "test the unit parts", "t", "bot"),
    ("refactor", {}, "refactor it", "t", "bot"),
    ("update schema", {}, "update the schema", "t", "bot"),
    ("add option", {}, "add an option", "t", "bot"),
    ("human beats bot", {}, "refactor after the meeting... decision", "t", "nic"),
    ("acceptance section", {}, "## Acceptance\nit works", "t", "bot"),
    ("open checkbox", {"complexity": "requires-judgment"}, "- [ ] do it", "t", "bot"),
    ("nothing: human", {}, "write docs", "t", "nic"),
]


@pytest.mark.parametrize(
    ("fm", "body", "title", "expected"),
    [c[1:] for c in ASSIGNEE_CASES],
    ids=[c[0] for c in ASSIGNEE_CASES],
)
def test_assignee_rule(fm, body, title, expected):
    decision = decide(fm, body, title, False, RULES)
    assert decision.assignee == expected
    assert decision.action == f"assign:{expected}"
    changed = fm.get("assignee") != expected
    assert (f"assignee->{expected}" in decision.changes) is changed


@pytest.mark.timeout(60)  # `implement.*function` tried every "implement": about ten minutes
@pytest.mark.parametrize(
    ("word", "after", "expected"),
    [
        ("implement ", "\nfunction", "nic"),  # the other word on another line: no match
        ("design ", "\nchoice", "nic"),
        ("update ", "\nupdate the schema", "bot"),
    ],
)
def test_a_megabyte_line_of_one_rule_word_is_decided_in_linear_time(word, after, expected):
    body = word * 110_000 + after
    assert decide({}, body, "t", False, RULES).assignee == expected


def test_assignee_names_come_from_the_rules():
    rules = Rules(human="Ada", bot="robot")
    assert decide({"type": "learn"}, "x", "t", False, rules).assignee == "Ada"
    assert decide({}, "x", "Rename it", False, rules).assignee == "robot"


# Project link ---------------------------------------------------------------

LINK_CASES = [
    ("mapped", {"project": "aops"}, "x", "[[academicOps]]"),
    ("mapped, any case", {"project": "OSB"}, "x", "[[oversight-board]]"),
    ("unmapped", {"project": "garden"}, "x", "[[garden]]"),
    ("mapped link present", {"project": "aops"}, "see [[academicops]]", ""),
    ("own name present", {"project": "aops"}, "see [[aops]]", ""),
    ("no project", {}, "x", ""),
]


@pytest.mark.parametrize(
    ("fm", "body", "link"), [c[1:] for c in LINK_CASES], ids=[c[0] for c in LINK_CASES]
)
def test_project_link_rule(fm, body, link):
    decision = decide(fm, body, "t", False, RULES)
    assert decision.link == link
    assert ("added_wikilink" in decision.changes) is bool(link)


def test_project_link_applies_to_closed_tasks_too():
    decision = decide({"project": "aops", "status": "done"}, "x", "t", False, RULES)
    assert decision.action == "close"
    assert decision.changes == ["added_wikilink"]


INSERT_CASES = [
    ("after heading", "# Title\n\nText\n", "# Title\n\nProject: [[p]]\n\nText\n"),
    ("heading, no blank", "# Title\nText\n", "# Title\n\nProject: [[p]]\n\nText\n"),
    ("heading last line", "# Title", "# Title\n\nProject: [[p]]\n"),
    (
        "first h1 only",
        "intro\n## Sub\n# One\n# Two\n",
        "intro\n## Sub\n# One\n\nProject: [[p]]\n\n# Two\n",
    ),
    ("no heading", "Text\n", "Project: [[p]]\n\nText\n"),
    ("no heading, blank first", "\nText\n", "Project: [[p]]\n\nText\n"),
    ("empty body", "", "Project: [[p]]\n"),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in INSERT_CASES], ids=[c[0] for c in INSERT_CASES]
)
def test_link_insertion(body, expected):
    assert insert_link(body, "[[p]]") == expected


def test_children_rule_counts_only_tasks_naming_this_id(db):
    Queue.objects.create(name="q")
    Task.objects.create(queue="q", key="child", frontmatter={"parent": "epic-1"})
    Task.objects.create(queue="q", key="link-child", frontmatter={"parent": "[[epic-2]]"})
    Task.objects.create(queue="other", key="elsewhere", frontmatter={"parent": "epic-3"})
    index = triage.ChildIndex()
    assert index.has_children("q", "epic-1")
    assert index.has_children("q", "epic-2")
    assert not index.has_children("q", "epic-3")
    assert not index.has_children("q", "child")


# Write-back, byte for byte -----------------------------------------------------

ORIGINAL = (
    "---\n"
    "id: t-1   # the id\n"
    "title: 'Rename: the \"old\" module'\n"
    "status: todo\n"
    'assignee: "nic"  # was assigned on Monday\n'
    "tags:\n"
    "  - infra   # infra team\n"
    "  - cleanup\n"
    "# a comment between keys\n"
    "complexity: mechanical\n"
    "due: 2026-01-31\n"
    "---\n"
    "# Rename it\n"
    "\n"
    "Body   with  odd   spacing.\t\n"
    "\n"
    "- [ ] step\n"
)


def changed_lines(old: bytes, new: bytes) -> list[str]:
    diff = difflib.unified_diff(old.decode().splitlines(), new.decode().splitlines(), n=0)
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def test_one_change_differs_only_in_that_line():
    new, decision, _ = triage_bytes(ORIGINAL.encode(), "t-1", no_children, RULES)
    assert decision.changes == ["assignee->bot"]
    assert changed_lines(ORIGINAL.encode(), new) == [
        '-assignee: "nic"  # was assigned on Monday',
        '+assignee: "bot"  # was assigned on Monday',
    ]


def test_added_key_goes_at_the_end_of_the_frontmatter():
    raw = ORIGINAL.replace("complexity: mechanical\n", "").replace('"nic"', "bot").encode()
    new, decision, _ = triage_bytes(raw, "t-1", no_children, RULES)
    assert decision.changes == ["complexity->mechanical"]
    assert changed_lines(raw, new) == ["+complexity: mechanical"]
    assert new.decode().index("complexity: mechanical\n---\n") > 0


def test_link_insertion_touches_nothing_else():
    raw = ORIGINAL.replace('"nic"', "bot").replace("due:", "project: aops\ndue:").encode()
    new, decision, _ = triage_bytes(raw, "t-1", no_children, RULES)
    assert decision.changes == ["added_wikilink"]
    assert changed_lines(raw, new) == ["+Project: [[academicOps]]", "+"]


def test_crlf_file_keeps_its_line_endings():
    raw = ORIGINAL.replace('"nic"', "bot").replace("due:", "project: x\ndue:")
    raw = raw.replace("\n", "\r\n").encode()
    new, _, _ = triage_bytes(raw, "t-1", no_children, RULES)
    assert new.count(b"\n") == new.count(b"\r\n")
    assert b"Project: [[x]]\r\n" in new


def test_byte_order_mark_stays():
    raw = "\ufeff---\nid: x\nassignee: bot\ncomplexity: mechanical\nproject: p\n---\nText\n"
    new, decision, _ = triage_bytes(raw.encode(), "x", no_children, RULES)
    assert decision.changes == ["added_wikilink"]
    assert new == raw.replace("---\nText", "---\nProject: [[p]]\n\nText").encode()


def test_file_without_frontmatter_gets_one():
    raw = b"# Fix the bug in /src/a.py\n\nIt crashes.\n"
    new, decision, _ = triage_bytes(raw, "fix-bug", no_children, RULES)
    assert new.startswith(b"---\ncomplexity: mechanical\nassignee: bot\n---\n# Fix")
    assert new.endswith(raw)
    assert decision.action == "assign:bot"


def test_block_value_is_replaced_as_a_whole():
    yaml_text = "assignee: |\n  someone\n  else\ntitle: x\n"
    assert edit_yaml(yaml_text, {"assignee": "bot"}) == "assignee: bot\ntitle: x\n"


def test_removed_key_takes_its_lines_with_it():
    yaml_text = "a: 1\nclaimed_by: w1\nherd: '3'\nb: 2\n"
    assert edit_yaml(yaml_text, {"claimed_by": None, "herd": None}) == "a: 1\nb: 2\n"


def test_quoting_follows_the_old_value_and_stays_valid():
    assert edit_yaml("a: 'x'\n", {"a": "it's"}) == "a: 'it''s'\n"
    assert edit_yaml("a: x\n", {"a": "yes"}) == 'a: "yes"\n'
    assert edit_yaml("a: x\n", {"a": "@nic"}) == 'a: "@nic"\n'


def test_flow_style_frontmatter_is_refused_not_damaged():
    doc = Document.parse(b"---\n{title: x, status: todo}\n---\nbody\n")
    with pytest.raises(EditRefused):
        doc.set_keys({"status": "done"})


# The processor on real files ---------------------------------------------------


@pytest.fixture
def queue_folder(db, write_task):
    def make(files: dict[str, str], stamp: bool = False) -> dict[str, bytes]:
        for name, text in files.items():
            write_task(name, text)
        Queue.objects.update_or_create(
            name="inbox",
            defaults={
                "stamp_claims": stamp,
                "human_assignee": RULES.human,
                "bot_assignee": RULES.bot,
                "project_links": dict(RULES.project_links),
            },
        )
        report = Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
        assert not report.errors
        return {name: (write_task.folder / name).read_bytes() for name in files}

    make.folder = write_task.folder
    return make


def work(dry_run: bool = False, prefetch: int = 10) -> Worker:
    worker = Worker("inbox", load_processor("triage"), prefetch=prefetch, dry_run=dry_run)
    while worker.work_one_batch():
        pass
    return worker


UNCHANGED = "---\nid: a\ncomplexity: mechanical\nassignee: bot\n---\nnothing to do\n"
NEEDS_WORK = "---\nid: b\ntitle: Fix the bug in /src/x.py\nproject: osb\n---\n# B\n\nText.\n"


def test_no_change_file_is_not_touched(queue_folder):
    queue_folder({"a.md": UNCHANGED})
    path = queue_folder.folder / "a.md"
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.stat()
    work()
    assert path.read_bytes() == UNCHANGED.encode()
    assert path.stat().st_mtime_ns == before.st_mtime_ns == 1_000_000_000
    assert path.stat().st_ino == before.st_ino
    task = Task.objects.get(key="a")
    assert task.status == Status.DONE
    assert task.result["action"] == "assign:bot"
    assert task.result["changes"] == []


def test_a_persons_name_in_the_file_is_kept_with_the_default_names(db, write_task):
    # blocked-human and mechanical work went to `human` and `bot` over anyone's name.
    write_task("a.md", "---\nid: a\ntype: learn\nassignee: alice\n---\nRead up on it.\n")
    write_task("b.md", "---\nid: b\nassignee: bob\n---\n# Rename the module\n")
    write_task("c.md", "---\nid: c\ntype: learn\nassignee: bot\n---\nRead up on it.\n")
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    work()
    text = {n: (write_task.folder / f"{n}.md").read_text() for n in "abc"}
    assert "assignee: alice\n" in text["a"] and "assignee: bob\n" in text["b"]
    assert "assignee: human\n" in text["c"]  # triage's own name moves to the other
    assignees = dict(Task.objects.values_list("key", "assignee"))
    assert assignees == {"a": "alice", "b": "bob", "c": "human"}
    assert Task.objects.get(key="a").result["action"] == "assign:alice"


def test_written_file_and_row_agree_so_reimport_sees_no_change(queue_folder):
    queue_folder({"b.md": NEEDS_WORK})
    path = queue_folder.folder / "b.md"
    os.chmod(path, 0o640)
    work()
    task = Task.objects.get(key="b")
    assert task.status == Status.DONE
    assert task.result["changes"] == ["complexity->mechanical", "assignee->bot", "added_wikilink"]
    assert task.result["complexity"] == "mechanical"
    assert (task.complexity, task.assignee) == ("mechanical", "bot")
    assert "Project: [[oversight-board]]" in path.read_text()
    assert task.body == path.read_text().split("---\n", 2)[2]
    assert path.stat().st_mode & 0o777 == 0o640
    assert task.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in os.listdir(queue_folder.folder) if p.startswith(".triage-")]
    report = Importer("inbox", roots=[queue_folder.folder]).run([queue_folder.folder])
    assert (report.unchanged, report.updated) == (1, 0)


def test_a_file_as_imported_is_not_loaded_again_its_frontmatter_taken_from_the_row(
    queue_folder, monkeypatch
):
    # The hash says the file is the one imported, so its row holds its frontmatter (it was
    # two loads a task, a third of the worker's CPU in bench/bench_triage.py). A plain
    # frontmatter's edit needs no load to be checked either; a quoted value's does.
    files = {f"b{i}.md": NEEDS_WORK.replace("id: b", f"id: b{i}") for i in range(3)}
    quoted = NEEDS_WORK.replace("id: b", "id: q").replace("title: Fix", "title: 'Fix")
    queue_folder({**files, "q.md": quoted.replace(".py\n", ".py'\n")})
    loads = []
    load_yaml = taskfile.load_yaml
    monkeypatch.setattr(taskfile, "load_yaml", lambda text: loads.append(text) or load_yaml(text))
    work()
    assert Task.objects.filter(status=Status.DONE).count() == 4
    assert len(loads) == 1
    assert "id: q" in loads[0] and "complexity: mechanical" in loads[0]
    for name in files:
        assert "\ncomplexity: mechanical\n" in (queue_folder.folder / name).read_text()


def test_a_row_edited_apart_from_its_file_never_puts_the_rows_keys_in_the_file(queue_folder):
    # The admin edits a row's frontmatter without the file (the hash still matches): the
    # edit is checked against the file's own YAML, and only the decision's keys change.
    queue_folder({"b.md": NEEDS_WORK})
    fm = Task.objects.get(key="b").frontmatter
    Task.objects.filter(key="b").update(frontmatter={**fm, "x": 1})
    work()
    task = Task.objects.get(key="b")
    assert task.status == Status.DONE, task.reason
    text = (queue_folder.folder / "b.md").read_text()
    assert text.startswith(NEEDS_WORK.split("---\n# B")[0] + "complexity: mechanical\n")
    assert "x: 1" not in text
    assert "x" not in task.frontmatter
    report = Importer("inbox", roots=[queue_folder.folder]).run([queue_folder.folder])
    assert (report.unchanged, report.updated) == (1, 0)


def test_an_edit_judged_on_a_frontmatter_that_is_not_the_files_checks_the_file():
    raw = b"---\nid: a\nowner: 'nic'\n---\nbody\n"
    doc = Document.parse(raw, {"id": "a", "owner": "someone else"})
    doc.set_keys({"status": "done"})
    assert doc.frontmatter == {"id": "a", "owner": "nic", "status": "done"}
    assert doc.render() == b"---\nid: a\nowner: 'nic'\nstatus: done\n---\nbody\n"
    # A plain frontmatter's edit is judged by its lines, against the keys given: a key
    # the file does not have (a row edited apart from it) sends it to the file's own.
    plain = Document.parse(b"---\nid: a\n---\nbody\n", {"id": "a", "x": 1})
    plain.set_keys({"status": "done"})
    assert plain.frontmatter == {"id": "a", "status": "done"}
    assert plain.render() == b"---\nid: a\nstatus: done\n---\nbody\n"
    flow = Document.parse(b"---\n{id: a}\n---\n", {"id": "a"})
    with pytest.raises(EditRefused):
        flow.set_keys({"status": "done"})
    assert flow.yaml_text == "{id: a}\n"


def test_file_changed_since_claim_is_refused_and_left_alone(queue_folder):
    queue_folder({"b.md": NEEDS_WORK})
    path = queue_folder.folder / "b.md"
    edited = NEEDS_WORK.replace("Text.", "Edited by a person.").encode()
    path.write_bytes(edited)
    work()
    task = Task.objects.get(key="b")
    assert task.status == Status.BLOCKED
    assert task.reason == "changed on disk since claim"
    assert path.read_bytes() == edited


def test_a_file_an_earlier_attempt_triaged_is_recorded_not_refused(queue_folder):
    """Its worker died between renaming the file and recording it: the file is the import
    with exactly triage's decision applied. The retry records it as it is."""
    originals = queue_folder({"b.md": NEEDS_WORK})
    path = queue_folder.folder / "b.md"
    triaged, decision, _ = triage_bytes(originals["b.md"], "b", lambda _: False, RULES)
    assert triaged != originals["b.md"] and decision.link
    path.write_bytes(triaged)
    before = path.stat()
    work()
    task = Task.objects.get(key="b")
    assert (task.status, task.outcome) == (Status.DONE, "success")
    assert task.result["written_by_an_earlier_attempt"] is True
    assert task.result["changes"] == decision.changes
    assert path.read_bytes() == triaged and path.stat().st_ino == before.st_ino
    assert task.source_sha256 == hashlib.sha256(triaged).hexdigest()
    assert task.body == Document.parse(triaged).body
    again = Importer("inbox", roots=[queue_folder.folder]).run([queue_folder.folder])
    assert (again.imported, again.updated) == (0, 0)  # the row is the file


@pytest.mark.parametrize(
    "edit",
    [
        lambda triaged: triaged + b"A person adds a line.\n",
        lambda triaged: triaged.replace(b"project: osb", b"project: other"),
        lambda triaged: triaged.replace(b"Project: ", b"Project:  "),
    ],
)
def test_the_decision_and_more_is_someones_edit_and_refused(queue_folder, edit):
    originals = queue_folder({"b.md": NEEDS_WORK})
    path = queue_folder.folder / "b.md"
    triaged, _, _ = triage_bytes(originals["b.md"], "b", lambda _: False, RULES)
    path.write_bytes(edit(triaged))
    work()
    task = Task.objects.get(key="b")
    assert (task.status, task.reason) == (Status.BLOCKED, "changed on disk since claim")
    assert path.read_bytes() == edit(triaged)


def test_file_changed_between_read_and_write_is_refused(queue_folder):
    queue_folder({"b.md": NEEDS_WORK})
    path = queue_folder.folder / "b.md"
    worker = Worker("inbox", load_processor("triage"), prefetch=10)
    [claim] = claims.claim_ready_tasks("inbox", worker.identity, worker.owner_file, 10)
    result = worker.processor.process(claim, worker.context)
    assert result.status == Status.DONE
    path.write_text(NEEDS_WORK + "A person adds a line.\n")
    worker.finish([(claim, result)])
    task = Task.objects.get(key="b")
    assert (task.status, task.reason) == (Status.BLOCKED, "changed on disk since claim")
    assert path.read_text() == NEEDS_WORK + "A person adds a line.\n"
    assert [p.name for p in queue_folder.folder.iterdir()] == ["b.md"]


@pytest.mark.parametrize("processor", ["triage", "noop"])
def test_a_task_file_swapped_for_a_fifo_or_a_link_is_not_read_through_it(
    queue_folder, tmp_path, processor
):
    """Each opened the path as it found it: a FIFO held the worker until someone wrote
    into it (its lease ran out meanwhile), and a link was read through."""
    queue_folder({"b.md": NEEDS_WORK, "c.md": NEEDS_WORK.replace("id: b", "id: c")})
    (queue_folder.folder / "b.md").unlink()
    os.mkfifo(queue_folder.folder / "b.md")
    (queue_folder.folder / "c.md").unlink()
    (tmp_path / "elsewhere.md").write_text(NEEDS_WORK.replace("id: b", "id: c"))
    (queue_folder.folder / "c.md").symlink_to(tmp_path / "elsewhere.md")
    worker = Worker("inbox", load_processor(processor), prefetch=10)
    claimed = claims.claim_ready_tasks("inbox", worker.identity, worker.owner_file, 10)

    class Held(Exception):  # no OSError: the processors turn those into a block
        pass

    def held(signum, frame):
        raise Held("still waiting on the FIFO")

    previous = signal.signal(signal.SIGALRM, held)
    signal.alarm(60)  # not a measure of speed: what ends the wait the FIFO would hold
    try:
        results = {c.key: worker.processor.process(c, worker.context) for c in claimed}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert {key: result.status for key, result in results.items()} == {
        "b": Status.BLOCKED,
        "c": Status.BLOCKED,
    }
    folder = queue_folder.folder
    assert (
        results["b"].reason
        == f"cannot read {folder / 'b.md'}: not a regular file: a FIFO, not read"
    )
    assert results["c"].reason == (
        f"cannot read {folder / 'c.md'}: not a regular file: a symlink, not read"
    )


def test_a_file_moved_and_linked_back_between_read_and_write_is_not_replaced(queue_folder):
    """The link named the file as it was read (same inode, size and time), so the rename
    replaced the link with the new file, and the moved file kept the old text."""
    originals = queue_folder({"b.md": NEEDS_WORK})
    path = queue_folder.folder / "b.md"
    worker = Worker("inbox", load_processor("triage"), prefetch=10)
    [claim] = claims.claim_ready_tasks("inbox", worker.identity, worker.owner_file, 10)
    result = worker.processor.process(claim, worker.context)
    moved = queue_folder.folder / "archive" / "b.md"
    moved.parent.mkdir()
    path.rename(moved)
    path.symlink_to("archive/b.md")
    worker.finish([(claim, result)])
    task = Task.objects.get(key="b")
    assert (task.status, task.reason) == (Status.BLOCKED, "changed on disk since claim")
    assert path.is_symlink() and moved.read_bytes() == originals["b.md"]


def test_dry_run_stores_the_diff_and_writes_nothing(queue_folder):
    originals = queue_folder({"b.md": NEEDS_WORK})
    work(dry_run=True)
    task = Task.objects.get(key="b")
    assert (queue_folder.folder / "b.md").read_bytes() == originals["b.md"]
    assert task.result["dry_run"] is True
    assert "+complexity: mechanical" in task.result["diff"]
    assert "+Project: [[oversight-board]]" in task.result["diff"]
    assert task.complexity == ""


def test_close_is_recorded_on_the_row(queue_folder):
    # Closed in its file, requeued by a person: triage reads the file and closes it again.
    queue_folder({"c.md": "---\nid: c\nstatus: todo\n---\n## Close Reason\nDone elsewhere.\n"})
    assert actions.requeue(Task.objects.get(key="c"), "nic")
    work()
    task = Task.objects.get(key="c")
    assert (task.status, task.outcome, task.closed_by) == (
        "done",
        "closed",
        "triage:close_reason_section",
    )
    assert task.frontmatter["status"] == "done"
    assert task.result["close_reason"] == "close_reason_section"


@pytest.mark.parametrize(
    ("body", "closes"),
    [
        ("## Closed\nDuplicate.\n", True),
        ("## Close Reason\nDone.\n", True),
        ("## Plan\n### Closed\nold items\n", False),
        ("Notes: see ## Closed below.\n", False),
    ],
)
def test_import_and_triage_agree_on_what_closes_a_task(queue_folder, body, closes):
    queue_folder({"c.md": f"---\nid: c\nstatus: todo\n---\n{body}"})
    imported = Task.objects.get(key="c")
    assert (imported.status == Status.DONE) is closes
    decision = decide({"status": "todo"}, body, "c", False, RULES)
    assert (decision.action == "close") is closes


def test_stamp_is_in_the_file_while_held_and_gone_when_done(queue_folder, monkeypatch):
    queue_folder({"b.md": NEEDS_WORK, "a.md": UNCHANGED}, stamp=True)
    stamps = []
    real_write = triage.atomic_write

    def record(path, data, *seen_and_mode):
        stamps.append((os.path.basename(path), Document.parse(data).frontmatter))
        return real_write(path, data, *seen_and_mode)

    monkeypatch.setattr(triage, "atomic_write", record)
    work()
    assert [name for name, _ in stamps] == ["a.md", "b.md"]
    assert all(fm["claimed_by"] and fm["claimed_at"] for _, fm in stamps)
    assert (queue_folder.folder / "a.md").read_bytes() == UNCHANGED.encode()
    final = Document.parse((queue_folder.folder / "b.md").read_bytes()).frontmatter
    assert final["complexity"] == "mechanical"
    assert not set(final) & set(triage.STAMP_KEYS)
    assert Task.objects.filter(status=Status.DONE).count() == 2


def test_a_save_between_the_read_and_the_claim_stamp_is_not_written_over(
    queue_folder, monkeypatch
):
    """The stamp replaced the file with the text read plus the stamp, whatever had been
    saved since: the person's save was gone without a word."""
    queue_folder({"b.md": NEEDS_WORK}, stamp=True)
    path = queue_folder.folder / "b.md"
    saved = NEEDS_WORK.replace("Text.", "Saved by a person meanwhile.")
    decide = triage.triage_bytes

    def decide_then_save(*args):
        found = decide(*args)
        path.write_text(saved)
        return found

    monkeypatch.setattr(triage, "triage_bytes", decide_then_save)
    work()
    assert path.read_text() == saved
    task = Task.objects.get(key="b")
    assert (task.status, task.reason) == (Status.BLOCKED, "changed on disk since claim")


def stamped_by_a_dead_worker(raw: bytes) -> bytes:
    doc = Document.parse(raw)
    doc.set_keys(
        {"claimed_by": "host:4242", "herd": "7", "claimed_at": "2026-12-05T06:00:00+00:00"}
    )
    return doc.render()


@pytest.mark.parametrize("stamp", [True, False])
def test_a_dead_attempts_claim_stamp_is_taken_out_on_the_retry(queue_folder, stamp):
    """A worker killed between stamping a file and the batch's write left its stamp: on
    a queue that stamps, the retry triages the file as imported and the stamp goes. On a
    queue that does not, such keys are someone's edit."""
    originals = queue_folder({"b.md": NEEDS_WORK, "a.md": UNCHANGED}, stamp=stamp)
    for name, raw in originals.items():
        (queue_folder.folder / name).write_bytes(stamped_by_a_dead_worker(raw))
    work()
    statuses = dict(Task.objects.values_list("key", "status"))
    if not stamp:
        assert statuses == {"a": Status.BLOCKED, "b": Status.BLOCKED}
        return
    assert statuses == {"a": Status.DONE, "b": Status.DONE}
    assert (queue_folder.folder / "a.md").read_bytes() == UNCHANGED.encode()
    triaged, _, _ = triage_bytes(originals["b.md"], "b", lambda _: False, RULES)
    assert (queue_folder.folder / "b.md").read_bytes() == triaged
    again = Importer("inbox", roots=[queue_folder.folder]).run([queue_folder.folder])
    assert (again.imported, again.updated) == (0, 0)


def test_a_stamp_beside_a_persons_edit_is_still_refused(queue_folder):
    originals = queue_folder({"b.md": NEEDS_WORK}, stamp=True)
    path = queue_folder.folder / "b.md"
    edited = stamped_by_a_dead_worker(originals["b.md"]) + b"A person adds a line.\n"
    path.write_bytes(edited)
    work()
    task = Task.objects.get(key="b")
    assert (task.status, task.reason) == (Status.BLOCKED, "changed on disk since claim")
    assert path.read_bytes() == edited


def test_one_event_per_transition_and_no_lock_left(queue_folder, lock_root):
    queue_folder({f"t{i}.md": NEEDS_WORK.replace("id: b", f"id: t{i}") for i in range(25)})
    work(prefetch=7)
    assert Task.objects.filter(status=Status.DONE).count() == 25
    for task in Task.objects.all():
        kinds = list(task.events.values_list("kind", flat=True))
        assert kinds.count(EventKind.DONE) == 1
    assert not any(p.is_dir() for p in lock_root.rglob("*") if p.name.startswith("t"))


# Idempotence ------------------------------------------------------------------

WORDS = st.sampled_from(
    [
        *("review", "fix", "bug", "rename", "decide", "which", "choose", "implement"),
        *("function", "refactor", "meeting", "add", "option", "receipt", "the", "a"),
        *("docs", "/src/app.py", "C:\\x\\y.json", "acceptance", "criteria", "epic"),
    ]
)
LINES = st.one_of(
    st.lists(WORDS, min_size=1, max_size=8).map(" ".join),
    st.sampled_from(
        ["# Heading", "## Acceptance", "- [ ] step", "- [x] done", "", "## Closed", "Text"]
    ),
)
VALUES = st.one_of(
    st.sampled_from(["epic", "learn", "goal", "task", "aops", "osb", "alice", "bot", "done"]),
    st.lists(WORDS, min_size=1, max_size=3).map(" ".join),
)
KEYS = st.sampled_from(
    [
        "title",
        "status",
        "type",
        "complexity",
        "assignee",
        "project",
        "close_reason",
        "tags",
        "priority",
        "notes",
        "id",
    ]
)


@st.composite
def task_files(draw) -> bytes:
    lines = []
    for key in draw(st.lists(KEYS, unique=True, max_size=8)):
        value = draw(VALUES)
        style = draw(st.sampled_from(["plain", "double", "single", "comment", "null", "list"]))
        if style == "double":
            lines.append(f'{key}: "{value}"')
        elif style == "single":
            lines.append(f"{key}: '{value}'")
        elif style == "comment":
            lines.append(f"{key}:   {value.split()[0]}   # note")
        elif style == "null":
            lines.append(f"{key}:")
        elif style == "list":
            lines.append(f"{key}:\n  - {value.split()[0]}\n  - x")
        else:
            lines.append(f"{key}: {value.split()[0]}")
    body = "\n".join(draw(st.lists(LINES, max_size=12)))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = "---\n" + "".join(line + "\n" for line in lines) + "---\n" + body
    return text.replace("\n", newline).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=task_files(), children=st.booleans())
def test_triage_twice_equals_triage_once(raw, children):
    try:
        once, decision, _ = triage_bytes(raw, "stem", lambda _id: children, RULES)
    except (EditRefused, ValueError):
        return  # a file the editor refuses is never written
    twice, again, _ = triage_bytes(once, "stem", lambda _id: children, RULES)
    assert twice == once
    assert again.changes == []
    assert again.action == decision.action
    # Keys triage does not decide keep their values.
    before = Document.parse(raw).frontmatter
    after = Document.parse(once).frontmatter
    for key in set(before) - {"status", "complexity", "assignee"}:
        assert after[key] == before[key]


def test_example_folder_triages_and_survives_a_second_pass(tmp_path):
    folder = tmp_path / "inbox"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "examples", "inbox"), folder)
    triaged = 0
    for path in folder.rglob("*.md"):
        once, _, _ = triage_bytes(path.read_bytes(), path.stem, no_children, RULES)
        twice, again, _ = triage_bytes(once, path.stem, no_children, RULES)
        assert twice == once and again.changes == []
        triaged += 1
    assert triaged > 0


def test_a_queues_triage_names_and_links_come_from_its_settings(db):
    Queue.objects.create(
        name="team", human_assignee="ada", bot_assignee="robot", project_links={"OSB": "[[b]]"}
    )
    rules = triage.rules_for("team")
    assert (rules.human, rules.bot, rules.project_link("osb")) == ("ada", "robot", "[[b]]")
    fresh = triage.rules_for("never-seen")
    assert (fresh.human, fresh.bot, fresh.project_link("x")) == ("human", "bot", "[[x]]")


def test_the_admin_refuses_project_links_that_are_not_an_object(admin_client):
    response = admin_client.post(
        "/admin/queue/queue/add/",
        {
            "name": "team",
            "max_attempts": 3,
            "human_assignee": "ada",
            "bot_assignee": "bot",
            "project_links": '["not", "an", "object"]',
        },
    )
    assert response.status_code == 200
    assert "An object of project names to wikilinks" in response.content.decode()
    assert not Queue.objects.filter(name="team").exists()
