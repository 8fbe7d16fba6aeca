"""Scale curves: claim-and-finish throughput as the queue grows (most tasks long done),
fairness between 8 workers, a worker's memory over 100,000 tasks, and board time at
10k/100k/1M tasks. Prints JSON.

    python bench/bench_scale.py [--sizes 10000,100000,1000000] [--skip-board]
Set BENCH_DATABASE_URL to a PostgreSQL URL to measure there (a `_bench_scale` database is
created next to it and dropped afterwards).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_core import setup_django  # noqa: E402

QUEUED = 10_000


def setup(data_dir: Path) -> dict:
    url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{data_dir / 'scale.sqlite3'}"
    if url.startswith("postgres"):
        base, _, name = url.rpartition("/")
        name = f"{name or 'hypervisor'}_bench_scale"
        subprocess.run(
            ["dropdb", "--if-exists", "-h", "127.0.0.1", "-U", "postgres", name], check=True
        )
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", name], check=True)
        url = f"{base}/{name}"
    return setup_django(data_dir, url)


def fill(total: int, already: int) -> None:
    """Grow the queue to `total` tasks, all but QUEUED of them done."""
    from django.utils import timezone

    from workqueue.models import Queue, Status, Task

    Queue.objects.get_or_create(name="scale")
    now = timezone.now()
    batch = []
    for i in range(already, total - QUEUED):
        batch.append(
            Task(
                queue="scale",
                key=f"done-{i:08d}",
                title=f"Done {i}",
                status=Status.DONE,
                outcome="success",
                priority=i % 5,
                created_at=now,
                updated_at=now,
                finished_at=now,
            )
        )
        if len(batch) == 10_000:
            Task.objects.bulk_create(batch)
            batch = []
    Task.objects.bulk_create(batch)


def reset_queued() -> None:
    from django.db import connection
    from django.utils import timezone

    from workqueue.models import Status, Task, TaskEvent

    Task.objects.filter(key__startswith="todo-").delete()
    TaskEvent.objects.all().delete()
    now = timezone.now()
    Task.objects.bulk_create(
        Task(
            queue="scale",
            key=f"todo-{i:06d}",
            title=f"To do {i}",
            priority=i % 5,
            status=Status.QUEUED,
            created_at=now,
            updated_at=now,
        )
        for i in range(QUEUED)
    )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE queue_task")


def claim_rate(env: dict, workers: int = 8, prefetch: int = 100) -> dict:
    from django.db.models import Max, Min

    from workqueue.models import Status, Task, TaskEvent

    reset_queued()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "manage.py"),
                "work",
                "--queue",
                "scale",
                "--prefetch",
                str(prefetch),
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    outputs = [p.communicate() for p in procs]
    summaries = [json.loads(o[0].strip().splitlines()[-1]) for o in outputs]
    span = TaskEvent.objects.aggregate(start=Min("at"), end=Max("at"))
    seconds = (span["end"] - span["start"]).total_seconds()
    done = Task.objects.filter(key__startswith="todo-", status=Status.DONE).count()
    fair = QUEUED / workers
    return {
        "claimed_and_finished": done,
        "seconds_first_claim_to_last_finish": round(seconds, 3),
        "items_per_second": round(done / seconds),
        "fairness_min_share": round(min(s["claimed"] for s in summaries) / fair, 2),
        "slowest_claim_seconds": max(s["slowest_claim_seconds"] for s in summaries),
    }


def worker_memory(env: dict, tasks: int = 100_000) -> dict:
    from django.utils import timezone

    from workqueue.models import Status, Task

    now = timezone.now()
    Task.objects.filter(queue="memory").delete()
    for start in range(0, tasks, 10_000):
        Task.objects.bulk_create(
            Task(
                queue="memory",
                key=f"m-{i:07d}",
                title=f"M {i}",
                status=Status.QUEUED,
                created_at=now,
                updated_at=now,
            )
            for i in range(start, min(tasks, start + 10_000))
        )
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "work",
            "--queue",
            "memory",
            "--prefetch",
            "250",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watched = psutil.Process(proc.pid)
    samples = []
    while proc.poll() is None:
        try:
            done = Task.objects.filter(queue="memory", status=Status.DONE).count()
            samples.append((done, watched.memory_info().rss))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    proc.communicate()
    # Samples after the first claims, and before the exiting process reads as empty.
    working = [s for s in samples if s[0] > 0 and s[1] > 0]
    start, end = working[0], working[-1]
    return {
        "tasks": tasks,
        "rss_mb_at_start": round(start[1] / 2**20, 1),
        "rss_mb_at_end": round(end[1] / 2**20, 1),
        "tasks_done_at_first_sample": start[0],
        "tasks_done_at_last_sample": end[0],
        "rss_mb_max": round(max(s[1] for s in working) / 2**20, 1),
    }


def board_curve(sizes: list[int]) -> dict:
    rows = {}
    for size in sizes:
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_board.py"), str(size)],
            capture_output=True,
            text=True,
        )
        data = json.loads(out.stdout)
        rows[str(size)] = {k: data[k] for k in ("render_ms", "refresh_ms", "page_bytes")}
    smallest, largest = rows[str(sizes[0])], rows[str(sizes[-1])]
    return {
        "sizes": rows,
        "render_growth": round(largest["render_ms"] / smallest["render_ms"], 2),
        "refresh_growth": round(largest["refresh_ms"] / max(smallest["refresh_ms"], 0.01), 2),
        "target_growth_below": 2.0,
    }


def run(sizes=(10_000, 100_000, 1_000_000), board: bool = True) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="hv-scale-"))
    try:
        env = setup(tmp)
        from django.db import connection

        curve, filled = {}, QUEUED
        for size in sizes:
            started = time.perf_counter()
            fill(size, max(0, filled - QUEUED))
            filled = size
            row = claim_rate(env)
            row["fill_seconds"] = round(time.perf_counter() - started, 1)
            curve[str(size)] = row
        first, last = curve[str(sizes[0])], curve[str(sizes[-1])]
        result = {
            "database": connection.vendor,
            "queued_per_run": QUEUED,
            "workers": 8,
            "throughput": curve,
            "rate_ratio_largest_to_smallest": round(
                last["items_per_second"] / first["items_per_second"], 2
            ),
            "target_ratio_at_least": 0.8,
            "worker_memory": worker_memory(env),
        }
        if board:
            result["board"] = board_curve(list(sizes))
        return result
    finally:
        if os.environ.get("BENCH_DATABASE_URL", "").startswith("postgres"):
            from django.db import connection

            name = connection.settings_dict["NAME"]
            connection.close()
            subprocess.run(["dropdb", "--if-exists", "-h", "127.0.0.1", "-U", "postgres", name])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--skip-board", action="store_true")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(json.dumps(run(sizes, not args.skip_board), indent=2))
