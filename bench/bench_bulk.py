"""Bulk actions from the board over 10,000 selected tasks, while the board is in use.

10,000 task files are imported into a throwaway database. Then, as the board does, three
bulk actions run one after another on a real Huey consumer (`manage.py run_huey`):
assign all 10,000, close them with a reason (state changes through the engine), and undo
the close (every file's bytes put back); then a triage review of all 10,000: the dry run
(in this process), its page, and "Apply all" carried out on the consumer. While each runs,
this process asks for the whole board every half second (four times as often as the board
refreshes itself) and times every answer.
Prints JSON: `python bench/bench_bulk.py [TASKS]`; bench/run.py calls run().
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"action_seconds": 10.0}
POLL_SECONDS = 0.5
TASK = """---
id: b{n:05d}
title: Bulk task number {n}   # as written by hand
status: inbox
priority: {priority}
project: {project}
tags: [bench, t{tag}]
---
# Bulk task number {n}

Some text for the body of task {n}.

- [ ] a step
"""


def _setup_django(data_dir: Path) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ["HYPERVISOR_DATA_DIR"] = str(data_dir)
    os.environ["HUEY_NAME"] = f"bench-bulk-{uuid.uuid4().hex[:8]}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hypervisor_site.settings")
    import django

    django.setup()


def _write_tasks(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for n in range(count):
        text = TASK.format(n=n, priority=n % 5, project=f"p{n % 7}", tag=n % 3)
        (folder / f"b{n:05d}.md").write_text(text)


def _database_url(connection) -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _watch(client, action_id: int, timeout: float = 600) -> dict:
    """Ask for the whole board every POLL_SECONDS until the action is done (the board
    itself refreshes every 2 s); the answers' times in ms."""
    from workqueue.models import BulkAction

    times = []
    deadline = time.monotonic() + timeout
    while True:
        action = BulkAction.objects.get(pk=action_id)
        if action.finished or time.monotonic() > deadline:
            break
        start = time.perf_counter()
        response = client.get("/", {"queue": "bulk"})
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.status_code
        time.sleep(max(0.0, POLL_SECONDS - (time.perf_counter() - start)))
    assert action.status == "done", (action.status, action.error)
    return {
        "requests": len(times),
        "median_ms": round(statistics.median(times), 1) if times else None,
        "p95_ms": round(_percentile(times, 0.95), 1) if times else None,
        "max_ms": round(max(times), 1) if times else None,
    }


def _run_action(client, user, action: str, value: str, ids: list[int]) -> dict:
    from workqueue import bulk
    from workqueue.models import BulkAction

    started = time.perf_counter()
    record = bulk.start(user, action, value, ids)
    board = _watch(client, record.pk)
    seconds = time.perf_counter() - started
    record = BulkAction.objects.get(pk=record.pk)
    return {
        "action": action,
        "tasks": record.total,
        "changed": record.changed,
        "skipped": record.skipped_count,
        "action_seconds": round(seconds, 2),
        "consumer_seconds": round((record.finished_at - record.started_at).total_seconds(), 2),
        "board_while_running": board,
    }


def _undo(client, user) -> dict:
    from workqueue import bulk
    from workqueue.models import BulkAction

    original = BulkAction.objects.exclude(action="undo").first()
    started = time.perf_counter()
    record = bulk.start_undo(user, original)
    board = _watch(client, record.pk)
    record = BulkAction.objects.get(pk=record.pk)
    return {
        "action": f"undo {original.action}",
        "tasks": record.total,
        "changed": record.changed,
        "action_seconds": round(time.perf_counter() - started, 2),
        "consumer_seconds": round((record.finished_at - record.started_at).total_seconds(), 2),
        "board_while_running": board,
    }


def _triage_review(client, tasks: int) -> dict:
    """A dry run of the triage rules over every task, its review page, and "Apply all"."""
    from herds.models import Herd, HerdStatus, Profile
    from workqueue import triage_review
    from workqueue.models import BulkAction
    from workqueue.processors import load_processor
    from workqueue.worker import Worker

    herd = Herd.objects.create(
        queue="bulk",
        profile=Profile.objects.get(name=triage_review.PROFILE),
        size=1,
        dry_run=True,
        preflight={"ready": tasks},
    )
    started = time.perf_counter()
    worker = Worker("bulk", load_processor("triage"), prefetch=250, herd=herd.pk, dry_run=True)
    while worker.work_one_batch():
        pass
    dry_run_seconds = time.perf_counter() - started
    Herd.objects.filter(pk=herd.pk).update(status=HerdStatus.FINISHED)
    started = time.perf_counter()
    page = client.get(f"/triage/{herd.pk}/")
    page_ms = (time.perf_counter() - started) * 1000
    assert page.status_code == 200, page.status_code
    started = time.perf_counter()
    answer = client.post(f"/triage/{herd.pk}/apply/", {"everything": "accept"})
    request_ms = (time.perf_counter() - started) * 1000
    assert answer.status_code == 302, answer.status_code
    decision = triage_review.latest_decision(herd)
    board = _watch(client, decision.pk)
    decision = BulkAction.objects.get(pk=decision.pk)
    return {
        "action": "triage review, apply all",
        "tasks": decision.total,
        "changed": decision.changed,
        "skipped": decision.skipped_count,
        "dry_run_seconds": round(dry_run_seconds, 2),
        "review_page_ms": round(page_ms, 1),
        "review_page_kb": round(len(page.content) / 1024),
        "apply_request_ms": round(request_ms, 1),
        "action_seconds": round(time.perf_counter() - started, 2),
        "consumer_seconds": round((decision.finished_at - decision.started_at).total_seconds(), 2),
        "board_while_running": board,
    }


def run(tasks: int = 10_000) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    _setup_django(data_dir)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment, teardown_test_environment

    settings_dict = connection.settings_dict
    settings_dict.setdefault("TEST", {})
    if connection.vendor == "sqlite":
        settings_dict["TEST"]["NAME"] = str(data_dir / "bench-bulk.sqlite3")
    else:
        settings_dict["TEST"]["NAME"] = f"{settings_dict['NAME']}_bench_bulk"
    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    consumer = None
    try:
        from workqueue.importer import Importer
        from workqueue.models import Task

        folder = data_dir / "tasks"
        _write_tasks(folder, tasks)
        settings.HYPERVISOR_IMPORT_ROOTS = [data_dir]
        started = time.perf_counter()
        report = Importer("bulk").run([folder])
        import_seconds = time.perf_counter() - started
        assert not report.errors, report.errors[:3]
        env = {
            **os.environ,
            "DATABASE_URL": _database_url(connection),
            "HYPERVISOR_IMPORT_ROOTS": str(data_dir),
            "HUEY_WORKERS": "1",
        }
        log = open(data_dir / "consumer.log", "w")  # noqa: SIM115 - closed below
        consumer = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "run_huey"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        time.sleep(3)  # the consumer's start-up is not the action's time
        user = get_user_model().objects.create_superuser("bench", "", "bench-password")
        client = Client()
        client.force_login(user)
        idle = []
        for _ in range(10):
            start = time.perf_counter()
            client.get("/", {"queue": "bulk"})
            idle.append((time.perf_counter() - start) * 1000)
        ids = list(Task.objects.filter(queue="bulk").values_list("pk", flat=True))
        actions = [
            _run_action(client, user, "assign", "bot", ids),
            _run_action(client, user, "close", "superseded by the bench", ids),
            _undo(client, user),
            _triage_review(client, tasks),
        ]
        sample = (folder / "b00042.md").read_text()
        assert "assignee: bot\n" in sample and "close_reason" not in sample, sample
        assert Task.objects.get(key="b00042").result.get("review") == "applied", sample
        result = {
            "database": connection.vendor,
            "tasks": tasks,
            "import_seconds": round(import_seconds, 2),
            "board_idle_median_ms": round(statistics.median(idle[1:]), 1),
            "actions": actions,
        }
    finally:
        if consumer is not None:
            consumer.send_signal(signal.SIGINT)
            try:
                consumer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                consumer.kill()
        connection.creation.destroy_test_db(old_name, verbosity=0)
        teardown_test_environment()
        shutil.rmtree(data_dir, ignore_errors=True)
    result["targets"] = TARGETS
    result["meets_targets"] = all(
        a["action_seconds"] < TARGETS["action_seconds"] for a in result["actions"]
    )
    return result


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    print(json.dumps(run(count), indent=2))
