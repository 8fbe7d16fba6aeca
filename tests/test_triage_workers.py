"""Triage of a 5,000-file folder by a herd of 4 workers, checked against one process."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db.models import Count, Q

from herds.models import Herd, HerdStatus, Profile
from tests.conftest import run_manage
from tests.test_herds_processes import launch, wait_until, worker_logs
from workqueue.importer import Importer
from workqueue.models import EventKind, Queue, Status, Task
from workqueue.triage import rules_for
from workqueue.triage_rules import triage_bytes

FILES = 2000
WORKERS = 4

TITLES = [
    "Rename the settings module",
    "Fix the login crash",
    "Review the grant budget",
    "Write the release notes",
    "Choose a charting library",
    "Implement the export function",
    "Plan the next quarter",
]
BODIES = [
    "Some context.\n\n- [ ] edit /src/app.py\n- [ ] run tests\n",
    "Which option is better?\n",
    "Refactor the parser and add an option for strict mode.\n",
    "Prepare for the meeting on Friday.\n",
    "Notes. Done already, see ## Closed below.\n",
    "## Acceptance\n\nIt works.\n",
    "Plain text that matches nothing in particular.\n",
]
PROJECTS = ["aops", "osb", "hdr", "garden", "reco", ""]


def task_folder(folder: Path, count: int) -> None:
    """A reproducible inbox: containers with and without children, links, quoting."""
    rng = random.Random(20261128)
    epics = [f"t{i:05d}" for i in range(0, count, 40)]
    for i in range(count):
        key = f"t{i:05d}"
        lines = [f"id: {key}", f"title: {json.dumps(rng.choice(TITLES) + f' {i}')}"]
        if key in epics:
            lines.append("type: epic")
        elif rng.random() < 0.3:
            lines.append(f"parent: {rng.choice(epics[: len(epics) // 2])}  # epic")
        if rng.random() < 0.2:
            lines.append("assignee: 'alice'")
        if rng.random() < 0.1:
            lines.append("complexity: multi-step")
        project = rng.choice(PROJECTS)
        if project:
            lines.append(f"project: {project}")
        lines.append("tags: [inbox]")
        heading = f"# Task {i}\n\n" if rng.random() < 0.7 else ""
        text = "---\n" + "\n".join(lines) + "\n---\n" + heading + rng.choice(BODIES)
        (folder / f"{key}.md").write_text(text, encoding="utf-8")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_herd_of_four_triages_every_file_exactly_once(huey_env, consumer, tmp_path, lock_root):
    folder = tmp_path / "inbox"
    folder.mkdir()
    task_folder(folder, FILES)
    original = tmp_path / "original"
    shutil.copytree(folder, original)
    report = Importer("herd", roots=[folder]).run([folder])
    assert (report.imported, report.errors) == (FILES, [])
    Queue.objects.filter(name="herd").update(human_assignee="nic")

    Profile.objects.update_or_create(
        name="triage", defaults={"processor": "triage", "prefetch": 50, "max_workers": WORKERS}
    )
    herd_id = launch(huey_env, "--queue", "herd", "--profile", "triage", "--workers", str(WORKERS))
    herd = wait_until(
        lambda: Herd.objects.ended().filter(pk=herd_id).first(),
        200,
        what="the herd to end",
    )
    assert herd.status == HerdStatus.FINISHED, worker_logs()
    rows = herd.summary["worker_processes"]
    assert len(rows) == WORKERS
    assert all(r["exit_class"] == "finished" and r["blocked"] == 0 for r in rows), rows
    assert sum(r["done"] for r in rows) == FILES
    assert Task.objects.filter(queue="herd", status=Status.DONE).count() == FILES
    once = Task.objects.filter(queue="herd").annotate(
        done=Count("events", filter=Q(events__kind=EventKind.DONE)),
        claims=Count("events", filter=Q(events__kind=EventKind.CLAIMED)),
    )
    assert set(once.values_list("done", "claims")) == {(1, 1)}
    assert not any(lock_root.rglob("owner.json"))

    # The same rules in this one process, on the untouched copy, with children read
    # from the files themselves rather than from the database.
    parents = {
        line.split(":")[1].split("#")[0].strip()
        for path in original.iterdir()
        for line in path.read_text().splitlines()
        if line.startswith("parent:")
    }
    results = dict(Task.objects.filter(queue="herd").values_list("key", "result"))
    actions = set()
    for path in sorted(original.iterdir()):
        expected, decision, _ = triage_bytes(
            path.read_bytes(), path.stem, lambda task_id: task_id in parents, rules_for("herd")
        )
        assert (folder / path.name).read_bytes() == expected, path.name
        result = results[path.stem]
        assert (result["action"], result["changes"]) == (decision.action, decision.changes)
        actions.add(decision.action)
    # "see ## Closed below" closes neither at import nor in triage (one rule for both).
    assert actions == {"assign:nic", "assign:bot", "assign:alice"}

    again = Importer("herd", roots=[folder]).run([folder])
    assert (again.unchanged, again.updated) == (FILES, 0)


def triage_killed_by(folder: Path, count: int, script: str, env: dict) -> dict[str, bytes]:
    """Import `count` tasks from a new folder, then run one batch of them through
    tests/scripts/SCRIPT.py's triage, whose worker SIGKILLs itself; the files before."""
    folder.mkdir()
    task_folder(folder, count)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    report = Importer("q", roots=[folder]).run([folder])
    assert (report.imported, report.errors) == (count, [])
    died = run_manage(
        ["work", "--queue", "q", "--prefetch", str(count)]
        + ["--processor", f"tests.scripts.{script}.Triage"],
        env,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    return before


def test_the_reaper_removes_the_temporaries_a_killed_triage_worker_left(
    process_env, tmp_path, lock_root
):
    folder = tmp_path / "inbox"
    before = triage_killed_by(folder, 5, "killed_before_renames", process_env)
    [pid] = set(Task.objects.values_list("holder_pid", flat=True))
    left = sorted(p.name for p in folder.glob(".*.tmp"))
    assert len(left) == 5
    assert all(re.fullmatch(rf"\.t\d{{5}}\.md\.{pid}\.[0-9a-f]{{8}}\.tmp", n) for n in left), left
    assert {p.name: p.read_bytes() for p in folder.glob("*.md")} == before

    # Names that only look like a dead worker's temporaries stay, and a link is not followed.
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    decoys = [
        folder / f".t00000.md.{os.getpid()}.0123abcd.tmp",  # a live process's
        folder / f".t00000.md.{pid}.0123abcd.tmp.keep",
        folder / f".t00000.md.{pid}.0123ABCD.tmp",
        folder / f".other.md.{pid}.0123abcd.tmp",  # beside no reaped task
    ]
    for decoy in decoys:
        decoy.write_text("someone's")
    link = folder / f".t00001.md.{pid}.0123abcd.tmp"
    link.symlink_to(outside)

    out = io.StringIO()
    call_command("reap_locks", "--queue", "q", stdout=out)
    lines = out.getvalue().splitlines()
    assert sorted(line for line in lines if line.startswith("removed ")) == sorted(
        f"removed {folder / name}, a temporary file its dead worker left" for name in left
    )
    # The orphan: the dead worker's owner file in the lock root.
    assert lines[-1] == "5 requeued, 0 blocked, 1 orphan locks, 5 temporary files"
    assert all(d.read_text() == "someone's" for d in decoys)
    assert link.is_symlink() and outside.read_text() == "keep"
    link.unlink()
    for decoy in decoys:
        decoy.unlink()

    # Nothing was renamed, so the next worker triages every file, none "changed on disk".
    again = run_manage(["work", "--queue", "q", "--processor", "triage"], process_env)
    assert again.returncode == 0, again.stderr
    assert set(Task.objects.values_list("status", flat=True)) == {Status.DONE}
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert sum(p.read_bytes() != before[p.name] for p in folder.iterdir()) > 0


def test_a_triage_worker_killed_between_its_renames_and_its_finish_is_retried_cleanly(
    process_env, tmp_path, lock_root
):
    """Its files hold exactly triage's decision and its rows do not say so yet: the retry
    records them as they are (before, each was blocked "changed on disk since claim")."""
    folder = tmp_path / "inbox"
    before = triage_killed_by(folder, 100, "killed_after_renames", process_env)
    renamed = {p.name: p.read_bytes() for p in folder.glob("*.md")}
    changed = {name for name in renamed if renamed[name] != before[name]}
    assert len(changed) > 10 and not list(folder.glob(".*.tmp"))

    out = io.StringIO()
    call_command("reap_locks", "--queue", "q", stdout=out)
    assert out.getvalue().splitlines()[-1].startswith("100 requeued, 0 blocked")

    again = run_manage(["work", "--queue", "q", "--processor", "triage"], process_env)
    assert again.returncode == 0, again.stderr
    statuses = dict(Task.objects.values_list("key", "status"))
    assert set(statuses.values()) == {Status.DONE}, Task.objects.exclude(
        status=Status.DONE
    ).values_list("key", "reason")[:5]
    adopted = {
        f"{key}.md"
        for key, result in Task.objects.values_list("key", "result")
        if result.get("written_by_an_earlier_attempt")
    }
    assert adopted == changed
    # Nothing written twice, nothing lost: the files are the killed run's, and the rows
    # say so (a re-import finds nothing to update).
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == renamed
    again = Importer("q", roots=[folder]).run([folder])
    assert (again.imported, again.updated, again.errors) == (0, 0, [])
