"""Triage of a 5,000-file folder by a herd of 4 workers, checked against one process."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from django.db.models import Count, Q

from herds.models import Herd, HerdStatus, Profile
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
