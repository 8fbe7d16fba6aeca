"""What task files and agents print reaches a person's terminal as text, never as escape
sequences it obeys: the workers' log lines, the commands' own lines."""

import io
import logging
import sys

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import make_tasks, run_manage
from workqueue.models import Status, Task
from workqueue.text import printable

# A terminal's title set, the screen cleared, and the C1 form of an escape sequence.
SEQUENCES = "\x1b]0;owned\x07\x1b[2J\x9b31m"
WRITTEN = "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m"


def test_printable_writes_control_characters_as_escapes_but_tabs_and_newlines():
    assert printable("a\tb\nc\r\x00\x7f" + SEQUENCES + "é€") == (
        "a\tb\nc\\x0d\\x00\\x7f" + WRITTEN + "é€"
    )


def test_an_agents_escape_sequences_reach_the_workers_log_as_text(process_env):
    (task,) = make_tasks("esc", 1)
    agent = f"import sys; sys.stderr.write({SEQUENCES!r}); sys.exit(3)"
    ran = run_manage(
        ["work", "--queue", "esc", "--processor", "command", "--", sys.executable, "-c", agent],
        process_env,
    )
    task.refresh_from_db()
    assert task.status == Status.BLOCKED and SEQUENCES in task.reason  # kept as it was said
    assert f"{task.key} blocked" in ran.stderr and WRITTEN in ran.stderr
    assert not any(c in ran.stdout + ran.stderr for c in "\x1b\x07\x9b")


@pytest.mark.django_db
def test_a_file_names_escape_sequences_reach_import_tasks_lines_as_text(write_task):
    write_task(f"bad{SEQUENCES}.md", "---\ntitle: [unclosed\n---\n")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="nothing could be imported"):
        call_command("import_tasks", str(write_task.folder), stdout=out, stderr=err)
    assert f"bad{WRITTEN}.md: " in err.getvalue()
    assert not any(c in out.getvalue() + err.getvalue() for c in "\x1b\x07\x9b")
    assert not Task.objects.exists()


def test_the_consumers_lines_in_hueys_own_format_are_printable_too():
    """Huey's command gives its logger a handler of its own (its format) just before it
    makes the consumer: a task's exception reached the terminal as it was."""
    from huey import MemoryHuey

    from herds.consumer import Consumer

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[huey] %(levelname)s:%(name)s:%(message)s"))
    huey_log = logging.getLogger("huey")
    huey_log.addHandler(handler)
    try:
        Consumer(MemoryHuey("printable"))
        logging.getLogger("huey.consumer").error("task failed: %s", SEQUENCES)
    finally:
        huey_log.removeHandler(handler)
    assert stream.getvalue() == f"[huey] ERROR:huey.consumer:task failed: {WRITTEN}\n"
