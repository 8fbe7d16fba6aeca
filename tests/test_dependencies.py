"""Tasks that wait for ever: a dependency on no task, on a blocked task, a ring of tasks
waiting on each other, and whatever waits on those, named with why by the import,
queue_stats, a worker that found nothing ready and an agent pulling over MCP."""

from __future__ import annotations

import html
import json
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command

from workqueue import dependencies
from workqueue.dependencies import STUCK_LISTED, stuck
from workqueue.importer import Importer
from workqueue.locks import Identity
from workqueue.models import Task
from workqueue.pull import PullSession

pytestmark = pytest.mark.django_db


def task(key: str, *depends_on: str, status: str = "inbox") -> str:
    needs = f"depends_on: [{', '.join(depends_on)}]\n" if depends_on else ""
    return f"---\nid: {key}\ntitle: Task {key}\nstatus: {status}\n{needs}---\n"


@pytest.fixture
def inbox(write_task):
    """An inbox with every way of waiting for ever, and tasks that wait as they should."""
    files = {
        "a": task("a", "b"),  # a and b wait on each other
        "b": task("b", "a"),
        "c": task("c", "zzz-missing"),  # no such task
        "e": task("e", "c"),  # waits on a stuck task
        "f": task("f", "g"),  # waits on a blocked task
        "g": task("g", status="blocked"),
        "s": task("s", "s"),  # waits on itself
        "h": task("h", "i"),  # waits on a task that will be done: not stuck
        "i": task("i"),
        "j": task("j", "k"),  # its dependency is done: ready
        "k": task("k", status="done"),
    }
    for key, text in files.items():
        write_task(f"{key}.md", text)
    write_task.folder.joinpath("other").mkdir()
    report = Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    assert not report.errors
    return write_task.folder


STUCK = {
    "a": "in a ring of tasks that wait on each other: 'a', 'b'",
    "b": "in a ring of tasks that wait on each other: 'a', 'b'",
    "c": "depends on 'zzz-missing': no task of queue 'inbox' has that id",
    "e": "depends on 'c', which cannot become ready",
    "f": "depends on 'g', which is blocked (blocked in the task file)",
    "s": "in a ring of tasks that wait on each other: 's'",
}


def test_every_task_that_cannot_become_ready_is_named_with_why(inbox, write_task):
    assert {s.key: s.why for s in stuck("inbox")} == STUCK
    assert {s.key: s.why for s in stuck()} == STUCK  # every queue
    # Another queue's task of the same id does not meet a dependency of this one.
    write_task("elsewhere/zzz-missing.md", task("zzz-missing"))
    Importer("other", roots=[inbox]).run([inbox / "elsewhere"])
    assert stuck("other") == []
    assert {s.key for s in stuck("inbox")} == set(STUCK)
    # The missing task arrives: c and e wait as they should now.
    write_task("zzz.md", task("zzz-missing"))
    Importer("inbox", roots=[inbox]).run([inbox / "zzz.md"])
    assert {s.key for s in stuck("inbox")} == set(STUCK) - {"c", "e"}


def test_chains_and_rings_thousands_long_are_found_without_recursion(write_task):
    depth = 3000
    for n in range(depth):  # t0 -> t1 -> ... -> t2999 -> missing
        nxt = f"t{n + 1}" if n + 1 < depth else "missing"
        write_task(f"t{n}.md", task(f"t{n}", nxt))
    for n in range(depth):  # r0 -> r1 -> ... -> r2999 -> r0
        write_task(f"r{n}.md", task(f"r{n}", f"r{(n + 1) % depth}"))
    assert not Importer("q", roots=[write_task.folder]).run([write_task.folder]).errors
    found = {s.key: s.why for s in stuck("q")}
    assert len(found) == 2 * depth
    assert found[f"t{depth - 1}"] == "depends on 'missing': no task of queue 'q' has that id"
    assert found["t0"] == "depends on 't1', which cannot become ready"
    assert found["r0"].startswith("in a ring of tasks that wait on each other: 'r0', 'r1'")


def test_the_import_warns_of_them_and_its_json_lists_them(inbox):
    out, err = StringIO(), StringIO()
    call_command("import_tasks", str(inbox), "--queue", "inbox", stdout=out, stderr=err)
    warnings = err.getvalue().splitlines()
    assert warnings == [
        f"warning: {inbox / key}.md: cannot become ready: {why}" for key, why in STUCK.items()
    ]
    out = StringIO()
    call_command("import_tasks", str(inbox), "--queue", "inbox", "--json", stdout=out)
    listed = json.loads(out.getvalue())["stuck"]
    assert [(s["key"], s["why"], s["path"]) for s in listed] == [
        (key, why, f"{inbox / key}.md") for key, why in STUCK.items()
    ]


def test_queue_stats_counts_the_waiting_and_lists_at_most_twenty(write_task):
    for n in range(STUCK_LISTED + 5):
        write_task(f"m{n:02d}.md", task(f"m{n:02d}", "nowhere"))
    Importer("q", roots=[write_task.folder]).run([write_task.folder])
    out = StringIO()
    call_command("queue_stats", "--queue", "q", stdout=out)
    lines = out.getvalue().splitlines()
    assert "waiting on dependencies: 25" in lines
    assert "cannot become ready: 25" in lines
    listed = [line for line in lines if "cannot become ready: depends on 'nowhere'" in line]
    assert len(listed) == STUCK_LISTED
    assert "  and 5 more: python manage.py queue_stats --queue q --json lists each" in lines
    out = StringIO()
    call_command("queue_stats", "--queue", "q", "--json", stdout=out)
    stats = json.loads(out.getvalue())
    assert (stats["waiting"], len(stats["stuck"])) == (25, 25)


def test_a_worker_that_found_nothing_ready_says_what_the_tasks_wait_on(inbox, write_task, capsys):
    call_command("import_tasks", str(inbox), "--queue", "inbox", stdout=StringIO())
    for key in "hijk":  # the tasks that can run, run
        write_task(f"{key}.md", task(key, status="done"))
    Importer("inbox", roots=[inbox]).run([inbox])
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        call_command("work", "--queue", "inbox", "--processor", "noop")
    assert ended.value.code == 0
    assert (
        "nothing was ready: 6 queued tasks wait on dependencies not done; 6 cannot become "
        "ready as things stand (python manage.py queue_stats --queue inbox says which)"
    ) in capsys.readouterr().err


def test_a_worker_whose_where_left_out_the_ready_tasks_says_so(inbox, capsys):
    # It blamed the dependencies while 2 ready tasks were only outside its --where.
    call_command("import_tasks", str(inbox), "--queue", "inbox", stdout=StringIO())
    done = Task.objects.filter(status="done").count()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        call_command(
            "work", "--queue", "inbox", "--processor", "noop", "--where", "project=nowhere"
        )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "nothing matched --where project=nowhere: 2 ready tasks are in queue 'inbox' outside it"
    )
    assert Task.objects.filter(status="done").count() == done


def test_a_worker_that_did_work_or_had_nothing_waiting_says_nothing_more(inbox, capsys):
    with pytest.raises(SystemExit):
        call_command("work", "--queue", "inbox", "--processor", "noop")
    assert "nothing was ready" not in capsys.readouterr().err  # i and j were done
    with pytest.raises(SystemExit):
        call_command("work", "--queue", "empty-queue", "--processor", "noop")
    assert "nothing was ready" not in capsys.readouterr().err


def test_an_agent_pulling_over_mcp_is_told_which_cannot_become_ready(inbox):
    agent = PullSession("inbox", Identity.current("mcp:agent"))
    claimed = []
    while (answer := agent.call("claim_next_task"))["success"]:
        claimed.append(answer["task"]["id"])
        assert agent.call("complete_task", {"id": answer["task"]["id"]})["success"]
    assert sorted(claimed) == ["h", "i", "j"]
    assert (
        "6 cannot become ready as things stand (a: in a ring of tasks that wait on each "
        "other: 'a', 'b'; b: in a ring of tasks that wait on each other: 'a', 'b'; c: depends "
        "on 'zzz-missing': no task of queue 'inbox' has that id; and 3 more)"
    ) in answer["message"]
    stats = agent.call("get_index_stats")
    assert stats["waiting"] == 6
    assert {s["id"]: s["why"] for s in stats["cannot_become_ready"]} == STUCK


def test_a_waiting_tasks_page_says_what_it_waits_on_and_whether_it_ever_can_run(
    inbox, client, django_user_model
):
    user = django_user_model.objects.create_user("viewer", password="pw-12345")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(user)

    def page(key: str) -> str:
        task = Task.objects.get(queue="inbox", key=key)
        return html.unescape(client.get(f"/tasks/{task.pk}/").content.decode())

    i = Task.objects.get(key="i")
    assert f'Waits on <a href="/tasks/{i.pk}/"><code>i</code></a> (queued).</p>' in page("h")
    assert (
        "Waits on <code>zzz-missing</code> (no task of queue 'inbox'): it cannot become ready "
        "as things stand (depends on 'zzz-missing': no task of queue 'inbox' has that id).</p>"
    ) in page("c")
    assert "(blocked): it cannot become ready as things stand (depends on 'g', which" in page("f")
    assert "(queued): it cannot become ready as things stand (depends on 'c', which" in page("e")
    assert "(in a ring of tasks that wait on each other: 'a', 'b')." in page("a")
    assert "Waits on" not in page("i") and "Waits on" not in page("j")


def test_a_page_judges_only_as_far_as_its_walk_reaches(
    write_task, client, admin_user, monkeypatch
):
    """A task's page follows what it waits on for at most WALK_LIMIT tasks: beyond, it
    lists the dependency and does not judge (the commands judge the whole queue)."""
    for n in range(6):  # t0 -> t1 -> ... -> t5 -> nowhere
        write_task(f"t{n}.md", task(f"t{n}", f"t{n + 1}" if n < 5 else "nowhere"))
    Importer("q", roots=[write_task.folder]).run([write_task.folder])
    client.force_login(admin_user)
    t0 = Task.objects.get(key="t0")
    assert "as things stand (depends on 't1'" in html.unescape(
        client.get(f"/tasks/{t0.pk}/").content.decode()
    )
    monkeypatch.setattr(dependencies, "WALK_LIMIT", 3)
    shown = html.unescape(client.get(f"/tasks/{t0.pk}/").content.decode())
    assert "(queued).</p>" in shown and "cannot become ready" not in shown
    assert {s.key for s in stuck("q")} == {f"t{n}" for n in range(6)}


def test_a_herds_pre_flight_names_what_can_never_be_claimed(inbox):
    from django.template.loader import render_to_string

    from herds.models import Herd, Profile
    from herds.supervision import nothing_ready_reason

    noop, _ = Profile.objects.get_or_create(name="noop", defaults={"processor": "noop"})
    preflight = Herd(queue="inbox", profile=noop, size=2).compute_preflight()
    assert (preflight["waiting"], preflight["stuck_count"], len(preflight["stuck"])) == (7, 6, 5)
    assert preflight["stuck"][0] == {"key": "a", "why": STUCK["a"]}
    assert (
        "7 waiting on dependencies (6 of them cannot become ready: a: in a ring of tasks that "
        "wait on each other: 'a', 'b'; b: "
    ) in nothing_ready_reason(preflight)
    assert nothing_ready_reason(preflight).endswith("; and 1 more), 0 claimed, 1 blocked")
    page = html.unescape(render_to_string("herds/preflight.html", {"preflight": preflight}))
    assert "6 of the tasks waiting on dependencies cannot become ready as things stand" in page
    assert f"<li><code>c</code>: {STUCK['c']}</li>" in page
    assert "… 6 in all: <code>python manage.py queue_stats --queue inbox</code> lists them" in page
