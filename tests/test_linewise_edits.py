"""A frontmatter edit judged by its lines (writeback._linewise) must be the edit a YAML
load would have judged: whenever the lines are trusted, the edited text loads as exactly
the file's mapping with the changed keys. Hostile shapes go to the load."""

import random

import pytest

from workqueue import taskfile
from workqueue.writeback import Document, _linewise, _with_changes, edit_yaml

CHANGES = [
    {"status": "done"},
    {"status": "blocked", "blocked_reason": "it failed"},
    {"status": "blocked", "blocked_reason": "x: y"},
    {"Status": "done", "blocked_reason": None},
    {"complexity": "mechanical"},
    {"tags": None},
    {"title": "yes"},
]
PIECES = list("abk01:::  --##[]{},'\"&*!|>%@`?<=~.\n\n\n\n\t\r\x85\u2028\x0c") + [
    "...", "<<: ", "true: ", "\n  - ", "\n# c\n", "status: ", "\nstatus: ", "\n  ", "\n- ",
    "tags:", "\nid: x",
]  # fmt: skip


def judged_by_lines(text: str, changes: dict) -> bool:
    """Whether the lines were trusted, and if so, that the load agrees with them."""
    frontmatter = taskfile.load_yaml(text)
    if not _linewise(text, frontmatter, changes):
        return False
    assert taskfile.load_yaml(edit_yaml(text, changes)) == _with_changes(frontmatter, changes)
    return True


def test_random_frontmatters_judged_by_their_lines_load_as_judged():
    rnd = random.Random(39)
    loaded = trusted = 0
    for _ in range(60_000):
        text = "".join(rnd.choice(PIECES) for _ in range(rnd.randint(1, 40)))
        try:
            taskfile.load_yaml(text)
        except taskfile.TaskFileError:
            continue
        loaded += 1
        trusted += judged_by_lines(text, rnd.choice(CHANGES))
    assert loaded > 1_000 and 300 < trusted < loaded  # both ways were taken, often


@pytest.mark.parametrize(
    "text",
    [
        "tags:\n# a comment at the edge\n  status: y\n",  # the value goes on past it
        "blocked_reason:\n# note\n  more words",
        "\n   {}#:",  # a whole mapping, indented
        "status: \n-",  # a list whose last line ends bare
        "tags: [a,\n  b]\nstatus: queued\n",  # a list over two lines
        "title: |\n  status: queued\nstatus: x\n",
        "<<:\n  status: queued\n",  # a merge key
        "? status\n: queued\n",  # a complex key
        "title: 'a\n  status: queued'\nid: x\n",  # a quoted value over two lines
        "on: x\nstatus: queued\n",  # `on` loads as true
        "status:\tqueued\n",
        "status: queued\n  more\n",  # a plain value over two lines
    ],
)
def test_shapes_whose_lines_can_mislead_are_loaded(text):
    frontmatter = taskfile.load_yaml(text)
    assert not _linewise(text, frontmatter, {"status": "done", "blocked_reason": "x"})


def test_plain_frontmatters_are_judged_by_their_lines():
    for text in (
        "id: a\ntitle: Fix the bug in /src/x.py\ntags: [a, b]\nstatus: inbox\n",
        "id: a\r\nstatus: queued # from the inbox\r\ntags:\r\n- x\r\n- y\r\n",
        "# about\nid: a\nmeta:\n  owner: nic\n\nstatus: queued\n",
        "",
    ):
        assert judged_by_lines(text, {"status": "done"}), text
        assert judged_by_lines(text, {"status": "blocked", "blocked_reason": "no tests"}), text


def test_a_value_given_to_a_key_that_had_only_a_comment_keeps_the_comment_a_comment():
    # `status: # note` was rewritten `status: done# note`: a value of "done#".
    assert edit_yaml("status: # note\n", {"status": "done"}) == "status: done # note\n"
    doc = Document.parse(b"---\nid: a\nstatus: # note\n---\n")
    doc.set_keys({"status": "done"})
    assert doc.frontmatter == {"id": "a", "status": "done"}


def test_a_list_whose_last_line_is_a_bare_item_is_the_keys():
    assert edit_yaml("tags:\n-", {"tags": "x"}) == "tags: x\n"
    assert edit_yaml("tags:\n-", {"id": "a"}) == "tags:\n-\nid: a\n"
