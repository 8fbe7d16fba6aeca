"""The `herd` command's own checks, before anything is enqueued."""

from __future__ import annotations

import json
import signal
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from herds.management.commands.herd import Command
from herds.models import Herd, Profile
from tests.conftest import make_tasks, start_manage
from workqueue.models import Queue

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def inbox():
    Queue.objects.get_or_create(name="inbox")


def test_a_queue_no_task_is_in_is_refused_naming_the_queues_there_are(capsys):
    """A mistyped queue launched a herd that ended at once, having done nothing."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("reviews", 1)
    with pytest.raises(
        CommandError, match=r"no task is in a queue named 'inbx' \(queues: inbox, reviews\)"
    ):
        call_command("herd", "--queue", "inbx", "--profile", "noop", "--workers", "2")
    assert not Herd.objects.exists()
    # A worker started by hand is warned, not stopped: tasks may come to its queue later.
    with pytest.raises(SystemExit) as ended:
        call_command("work", "--queue", "inbx", "--processor", "noop")
    assert ended.value.code == 0
    assert "warning: no task is in a queue named 'inbx' (queues: inbox, reviews)" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        call_command("work", "--queue", "inbox", "--processor", "noop")  # none, but it exists
    assert "warning" not in capsys.readouterr().err


def test_unknown_profile_is_refused_with_the_known_names():
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    with pytest.raises(CommandError, match="no profile 'nope'; profiles: .*noop"):
        call_command("herd", "--queue", "inbox", "--profile", "nope", "--workers", "2")
    assert not Herd.objects.exists()


def test_more_workers_than_the_profile_allows_is_refused():
    Profile.objects.update_or_create(
        name="small", defaults={"processor": "noop", "max_workers": 2}
    )
    with pytest.raises(CommandError, match="at most 2 workers"):
        call_command("herd", "--queue", "inbox", "--profile", "small", "--workers", "3")
    assert not Herd.objects.exists()


@pytest.mark.parametrize("value", ["abc", "NaN", "sNaN"])
def test_a_cost_budget_that_is_not_a_number_is_a_usage_error(value):
    """Decimal's own error passed through argparse: a traceback; so did a NaN, which
    compares with nothing."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    with pytest.raises(CommandError, match=f"--cost-budget: '{value}' is not an amount in USD"):
        call_command(
            "herd", "--queue", "inbox", "--profile", "noop", "--workers", "1",
            "--cost-budget", value,
        )  # fmt: skip
    assert not Herd.objects.exists()


@pytest.mark.parametrize(
    ("option", "too_many"), [("--wall-clock", "99999999999999"), ("--token-budget", str(10**16))]
)
def test_a_limit_past_any_herd_is_refused(option, too_many):
    """A wall clock of 10**14 s was taken, and every supervision pass of its herd then
    died in timedelta: the herd stayed running after its workers ended, no summary."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("inbox", 1)
    with pytest.raises(CommandError, match="less than or equal to"):
        call_command(
            "herd", "--queue", "inbox", "--profile", "noop", "--workers", "1", option, too_many
        )
    assert not Herd.objects.exists()


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--workers", "-2", "--workers: Ensure this value is greater than or equal to 0. "),
        ("--batch", "-1", "--batch: Ensure this value is greater than or equal to 0."),
        ("--where", "colour=red", "--where: "),
    ],
)
def test_a_refused_launch_names_the_option(option, value, said):
    """Each message was said without the option it was about ("Ensure this value is
    greater than or equal to 0.; A herd has at least one worker.")."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("inbox", 1)
    given = {"--workers": "1", option: value}
    with pytest.raises(CommandError) as caught:
        call_command(
            "herd", "--queue", "inbox", "--profile", "noop", *(a for p in given.items() for a in p)
        )
    assert str(caught.value).startswith(said), str(caught.value)
    assert not Herd.objects.exists()


@pytest.mark.parametrize("option", ["--token-budget", "--wall-clock", "--cost-budget"])
def test_a_budget_of_zero_is_refused_as_the_launch_form_does(option):
    """0 was taken and read as "no budget": a herd given one ran without any."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("inbox", 1)
    with pytest.raises(CommandError, match=f"^{option} must be above 0 "):
        call_command(
            "herd", "--queue", "inbox", "--profile", "noop", "--workers", "1", option, "0"
        )
    assert not Herd.objects.exists()


@pytest.mark.parametrize("adapter", ["gemini", "codex", "generic"])
def test_a_cost_budget_for_agents_that_report_no_cost_is_refused(adapter):
    """Only Claude Code says what a run cost: a cost budget on another agent was taken,
    could never be reached, and the herd's page said $0.0000."""
    command = ["true"] if adapter == "generic" else []
    defaults = {"processor": "command", "adapter": adapter, "command": command}
    Profile.objects.update_or_create(name=adapter, defaults=defaults)
    make_tasks("inbox", 1)
    with pytest.raises(CommandError, match=f"agent \\({adapter}\\) reports no cost"):
        call_command(
            "herd", "--queue", "inbox", "--profile", adapter, "--workers", "1",
            "--cost-budget", "5",
        )  # fmt: skip
    assert not Herd.objects.exists()
    herd = Herd(queue="inbox", profile=Profile.objects.get(name=adapter), size=1)
    assert not herd.reports_cost


def test_launch_without_wait_enqueues_after_commit_and_prints_the_id(
    django_capture_on_commit_callbacks,
):
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        call_command(
            "herd",
            *["--queue", "inbox", "--profile", "noop", "--workers", "2", "--batch", "5"],
            *["--where", "complexity=mechanical", "--json"],
            stdout=out,
        )
    herd = Herd.objects.get()
    assert json.loads(out.getvalue()) == {"herd": herd.pk, "status": "pending"}
    assert (herd.size, herd.batch, herd.filters) == (2, 5, ["complexity=mechanical"])
    assert len(callbacks) == 1


def test_a_person_waiting_on_a_herd_gets_a_line_per_worker_not_every_task():
    """`herd --wait` printed the whole run summary as JSON: a line per task, 60,000 lines
    for a herd over 10,000 tasks, before the one line that says how it went."""
    noop = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="inbox", profile=noop, size=2, status="finished")
    for index, done in enumerate([6_000, 4_000]):
        herd.workers.create(
            index=index, name=f"herd{herd.pk}-w{index}", host="h", state="exited",
            exit_class="finished", exit_code=0, done=done,
        )  # fmt: skip
    summary = herd.build_summary()
    summary["workers"] = [{"task_id": f"t{i}.md", "status": "done"} for i in range(10_000)]
    summary["counts"] = {"success": 9_990, "blocked": 10}
    out = StringIO()
    Command(stdout=out).report(summary, as_json=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith(f"  herd{herd.pk}-w0: finished (exit 0), 6000 done, 0 blocked")
    assert lines[2] == "  outcomes: 10 blocked, 9990 success"
    assert lines[3].startswith(f"herd {herd.pk} finished: ")
    # Claims that went back to the queue are counted beside done and blocked.
    assert ", 0 given back (of 0 claims) in " in lines[3]
    # Its agents report no cost: not "$0.0000", which reads as free.
    assert lines[3].endswith(" 0 tokens, no cost reported")
    assert summary["total_cost_usd"] is None
    assert f"/herds/{herd.pk}/summary.json" in lines[4]
    assert "t1.md" not in out.getvalue()
    out = StringIO()
    Command(stdout=out).report(summary, as_json=True)  # --json: the whole summary, one line
    assert json.loads(out.getvalue())["workers"][1] == {"task_id": "t1.md", "status": "done"}


LAUNCH = "launch_herd"  # a Huey task's name: its function's


@pytest.mark.parametrize("after", [0, 0.05, 0.5])
@pytest.mark.django_db(transaction=True)
def test_ctrl_c_on_herd_wait_says_the_herd_goes_on(huey_env, consumer_huey, after):
    """A traceback, and nothing said of the herd: a person used to `work` thought it
    stopped (no consumer runs here: the herd waits as pending). Pressed just after the
    herd's row was committed, before its launch was sent to Huey, it left a traceback and
    a herd no consumer was told of: Ctrl-C waits for the launch to be sent."""
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("inbox", 3)
    waiting = start_manage(
        ["herd", "--queue", "inbox", "--profile", "noop", "--workers", "1", "--wait"], huey_env
    )
    deadline = time.monotonic() + 60
    while not Herd.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(after)
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=30)
    herd = Herd.objects.get()
    assert waiting.returncode == 130, err
    assert err.strip() == (
        f"stopped following herd {herd.pk}; it goes on: drain or cancel it on the Herds page"
    )
    assert herd.status == "pending"
    from herds import tasks  # noqa: F401 - registers the launch with this Huey, to read it

    assert [t.args for t in consumer_huey.pending() if t.name == LAUNCH] == [(herd.pk,)]


@pytest.mark.django_db(transaction=True)
def test_herd_says_so_when_hueys_queue_could_not_be_reached(huey_down, caplog):
    Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})
    make_tasks("inbox", 1)
    out, err = StringIO(), StringIO()
    call_command(
        "herd", "--queue", "inbox", "--profile", "noop", "--workers", "1", stdout=out, stderr=err
    )
    herd = Herd.objects.get()
    assert err.getvalue().strip() == (
        f"herd {herd.pk} is made, but Huey's queue could not be reached to launch it: a "
        "consumer launches it as it starts, or within two minutes while one runs"
    )
    assert out.getvalue().strip() == f"herd {herd.pk} launched (pending)"
    # The storage's refusal in one line, not its traceback above those sentences.
    [record] = [r for r in caplog.records if r.name == "herds"]
    assert record.exc_info is None
    assert record.getMessage().startswith(
        f"herd {herd.pk}: its launch could not be sent to Huey: "
    )
    assert "\n" not in record.getMessage()
