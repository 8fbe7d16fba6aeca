"""Core engine benchmark: no-op claim throughput against its peers, and import speed.
Prints JSON.

    python bench/bench_core.py [--tasks 10000] [--workers 1,2,8] [--prefetch 250] [--repeat 3]
                               [--postgres]

The peers, each doing the same per item (read the task file, write a result file): the
mkdir-lock script (and again giving each task file `status: done` as `sed -i` does, as
ours gives it durably), Huey's consumer on its SQLite storage, and the django-tasks database
backend on the same kind of database as ours. With --postgres, ours runs on a PostgreSQL
server ($BENCH_POSTGRES_URL, else the local one) and Procrastinate's worker joins, on the
same server; every peer on a database gets a fresh one per run. Each row gives the ratio
of ours to the best peer.

Both sides hit the same disk, whose speed swings with what ran just before (journal
commits, discards of freed blocks). So every timed run starts after a sync and a pause,
the contenders take turns, and each reports the median of --repeat runs.

Ours and the mkdir script are timed as whole processes, start-up included; Huey from
the start of its consumer (enqueueing is not timed). For ours the row also gives the
time the workers held the database's write lock (the writers take turns, so it is
serial) and the same command on an empty queue (start-up and shut-down alone).
"""

import argparse
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from uuid import uuid4

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASK = (
    "---\nid: bench-{i}\ntitle: Bench task {i}\npriority: {p}\nproject: bench\n"
    "tags: [bench, t{m}]\nstatus: inbox\n---\n# Bench task {i}\n\nSome body text for {i}.\n"
)


def setup_django(data_dir: Path, database_url: str | None = None) -> dict:
    """Point this process (and the workers it starts) at a throwaway database; migrate it."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url
        or os.environ.get("BENCH_DATABASE_URL")
        or f"sqlite:///{data_dir / 'bench.sqlite3'}",
        "HYPERVISOR_DATA_DIR": str(data_dir),
        "HYPERVISOR_LOCK_ROOT": str(data_dir / "locks"),
        "DJANGO_SETTINGS_MODULE": "hypervisor_site.settings",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from workqueue.models import Queue

    # Start-up is timed on `work --queue empty`: a queue that exists and has no task (a
    # queue no task names gets a warning that lists the queues).
    Queue.objects.get_or_create(name="empty")
    return env


def write_tasks(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"task-{i:07d}.md"
        path.write_text(TASK.format(i=i, p=i % 5, m=i % 7))
        paths.append(str(path))
    return paths


def bench_import(folder: Path) -> dict:
    from workqueue.importer import Importer

    started = time.perf_counter()
    first = Importer("bench", [folder]).run([folder])
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    again = Importer("bench", [folder]).run([folder])
    again_seconds = time.perf_counter() - started
    return {
        "files": first.imported,
        "first_import_files_per_second": round(first.imported / first_seconds),
        "reimport_unchanged_files_per_second": round(again.unchanged / again_seconds),
        "errors": len(first.errors) + len(again.errors),
        "targets": {"first_import": 2000, "reimport": 20000},
    }


def reset_queue(queue: str | None = None) -> None:
    """Every task (or `queue`'s) back to queued, its events but the import gone."""
    from workqueue.models import Status, Task, TaskEvent

    TaskEvent.objects.filter(task__in=Task.objects.in_queue(queue)).exclude(
        kind="imported"
    ).delete()
    Task.objects.in_queue(queue).update(
        status=Status.QUEUED,
        attempts=0,
        holder="",
        holder_pid=None,
        lease_expires_at=None,
        finished_at=None,
        outcome="",
    )
    reset_files(queue)


def reset_files(queue: str | None = None) -> None:
    """The files say `status: inbox` again where the last round's finishes wrote the
    task's state, and the rows know them so: every round writes its files as the first."""
    from workqueue.models import Task

    written = re.compile(r"^status: (done|blocked)\n(blocked_reason: .*\n)?", re.MULTILINE)
    tasks = Task.objects.in_queue(queue).exclude(source_path="")
    changed = []
    for task in tasks.only("pk", "source_path", "frontmatter").iterator():
        path = Path(task.source_path)
        text = path.read_text(encoding="utf-8")
        back = written.sub("status: inbox\n", text)
        if back == text:
            continue
        path.write_text(back, encoding="utf-8")
        stat = path.stat()
        task.source_sha256 = hashlib.sha256(back.encode()).hexdigest()
        task.source_size, task.source_mtime_ns = stat.st_size, stat.st_mtime_ns
        task.frontmatter = {**task.frontmatter, "status": "inbox"}
        task.frontmatter.pop("blocked_reason", None)
        changed.append(task)
    fields = ["source_sha256", "source_size", "source_mtime_ns", "frontmatter"]
    Task.objects.bulk_update(changed, fields, batch_size=1000)


def postgres_database(server: str, name: str) -> str:
    """A new, empty database on the PostgreSQL server; its URL."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server.rsplit('/', 1)[0]}/{name}"


def drop_postgres_databases(server: str, prefix: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
        ).fetchall()
        for (name,) in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settle() -> None:
    """Let the disk finish what the previous run left before the next one is timed."""
    os.sync()
    time.sleep(1)


def median_run(runs: list[dict]) -> dict:
    """The run with the median items/s, and every run's items/s beside it."""
    ordered = sorted(runs, key=lambda r: r["items_per_second"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs_items_per_second"] = [r["items_per_second"] for r in runs]
    if "duplicates" in chosen:
        chosen["duplicates"] = max(r["duplicates"] for r in runs)
    return chosen


def run_ours(env: dict, workers: int, prefetch: int) -> dict:
    from workqueue.models import EventKind, Status, Task, TaskEvent

    reset_queue()
    settle()
    total = Task.objects.count()
    started = time.perf_counter()
    # One command forking N workers after loading Django once, like the mkdir script's pool.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "work",
            "--queue",
            "bench",
            "--workers",
            str(workers),
            "--prefetch",
            str(prefetch),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    done = Task.objects.filter(status=Status.DONE).count()
    claims = TaskEvent.objects.filter(kind=EventKind.CLAIMED).count()
    summaries = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    return {
        "items": done,
        "seconds": round(seconds, 3),
        "items_per_second": round(total / seconds),
        "duplicates": claims - done,
        "slowest_claim_seconds": max(s["slowest_claim_seconds"] for s in summaries),
        # Summed over the workers: the writers take turns, so held time is serial.
        "writer_hold_seconds": round(sum(s["writer_hold_seconds"] for s in summaries), 3),
        "writer_wait_seconds": round(sum(s["writer_wait_seconds"] for s in summaries), 3),
    }


def empty_queue_seconds(env: dict, workers: int, repeat: int) -> float:
    """The same command on a queue with no task: start-up and shut-down alone."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "work", "--queue", "empty"]
            + ["--workers", str(workers), "--json"],
            env=env,
            capture_output=True,
            check=True,
        )
        runs.append(time.perf_counter() - started)
    return round(statistics.median(runs), 3)


def run_script(args: list[str], env: dict | None = None, whole_process: bool = False) -> dict:
    """Run a baseline script; with `whole_process`, time it from outside, start-up included,
    as ours is timed (the script's own figure is kept as seconds_in_script)."""
    settle()
    started = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if out.returncode:
        sys.exit(f"{Path(args[0]).name} exited with {out.returncode}: {out.stderr[-3000:]}")
    result = json.loads(out.stdout)
    if whole_process:
        result["seconds_in_script"] = round(result["seconds"], 3)
        result["seconds"] = seconds
    result["items_per_second"] = round(result["items"] / result["seconds"])
    result["seconds"] = round(result["seconds"], 3)
    return result


def run_on_tmpfs(env: dict, workers: int, prefetch: int) -> dict:
    shm = tempfile.mkdtemp(prefix="hv-locks-", dir="/dev/shm")
    try:
        return run_ours({**env, "HYPERVISOR_LOCK_ROOT": shm}, workers, prefetch)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


PEERS = (
    "mkdir_script", "mkdir_script_writing_status", "huey_sqlite", "django_tasks",
    "procrastinate_postgres",
)  # fmt: skip


def run_mkdir_writing_status(tmp: Path, n: int, rep: int) -> dict:
    """The mkdir script giving each task file `status: done` as ours does, on a copy of
    the folder of its own (ours reads the originals, put back between its runs)."""
    folder = tmp / f"mkdir-status-tasks-{n}-{rep}"
    shutil.copytree(tmp / "tasks", folder)
    queue_file = tmp / f"mkdir-status-queue-{n}-{rep}.txt"
    queue_file.write_text("".join(f"{p}\n" for p in sorted(map(str, folder.iterdir()))))
    return run_script(
        [
            str(ROOT / "bench" / "mkdir_baseline.py"),
            str(queue_file),
            str(tmp / f"mkdir-status-locks-{n}-{rep}"),
            str(tmp / f"mkdir-status-results-{n}-{rep}"),
            str(n),
            "--write-status",
        ],
        whole_process=True,
    )


def peer(script: str, tmp: Path, queue_file: Path, n: int, new_database) -> dict:
    """A peer baseline script on a fresh database, timed from outside as ours is."""
    results = tmp / f"results-{uuid4().hex}"
    return run_script(
        [str(ROOT / "bench" / script), str(queue_file), str(results), str(n)],
        env={**os.environ, "BENCH_PEER_DATABASE_URL": new_database()},
        whole_process=True,
    )


def run(
    tasks: int = 10000,
    workers=(1, 2, 8),
    prefetch: int = 250,
    repeat: int = 3,
    postgres: str | None = None,
) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="hv-bench-"))
    prefix = f"hv_bench_{os.getpid()}_"
    counter = itertools.count()

    def peer_database() -> str:
        """A fresh database for one peer run, of the kind ours runs on."""
        if postgres:
            return postgres_database(postgres, f"{prefix}{next(counter)}")
        return f"sqlite:///{tmp / f'peer-{next(counter)}.sqlite3'}"

    try:
        env = setup_django(
            tmp / "data", postgres_database(postgres, f"{prefix}ours") if postgres else None
        )
        paths = write_tasks(tmp / "tasks", tasks)
        queue_file = tmp / "queue.txt"
        queue_file.write_text("\n".join(paths) + "\n")
        result = {
            "tasks": tasks,
            "database": "postgresql" if postgres else "sqlite",
            "prefetch": prefetch,
            "repeat": repeat,
            "import": bench_import(tmp / "tasks"),
            "throughput": {},
        }
        for n in workers:
            runs: dict[str, list[dict]] = {}
            for rep in range(repeat):
                contenders = {
                    "hypervisor": functools.partial(run_ours, env, n, prefetch),
                    "mkdir_script": functools.partial(
                        run_script,
                        [
                            str(ROOT / "bench" / "mkdir_baseline.py"),
                            str(queue_file),
                            str(tmp / f"mkdir-locks-{n}-{rep}"),
                            str(tmp / f"mkdir-results-{n}-{rep}"),
                            str(n),
                        ],
                        whole_process=True,
                    ),
                    "mkdir_script_writing_status": functools.partial(
                        run_mkdir_writing_status, tmp, n, rep
                    ),
                    "huey_sqlite": functools.partial(
                        run_script,
                        [
                            str(ROOT / "bench" / "huey_baseline.py"),
                            str(queue_file),
                            str(tmp / f"huey-results-{n}-{rep}"),
                            str(n),
                        ],
                        env={**os.environ, "BENCH_HUEY_DB": str(tmp / f"huey-{n}-{rep}.db")},
                    ),
                    "django_tasks": functools.partial(
                        peer, "django_tasks_baseline.py", tmp, queue_file, n, peer_database
                    ),
                }
                if postgres:
                    contenders["procrastinate_postgres"] = functools.partial(
                        peer, "procrastinate_baseline.py", tmp, queue_file, n, peer_database
                    )
                elif Path("/dev/shm").is_dir():
                    # The same run with the lock root on tmpfs: what the lock disk costs.
                    contenders["hypervisor_lock_root_on_tmpfs"] = functools.partial(
                        run_on_tmpfs, env, n, prefetch
                    )
                # Take turns, starting with a different contender each round.
                names = list(contenders)
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    runs.setdefault(name, []).append(contenders[name]())
            row = {name: median_run(found) for name, found in runs.items()}
            row["hypervisor"]["empty_queue_seconds"] = empty_queue_seconds(env, n, repeat)
            ours = row["hypervisor"]["items_per_second"]
            row["ratio_vs_mkdir"] = round(ours / row["mkdir_script"]["items_per_second"], 2)
            row["ratio_vs_mkdir_writing_status"] = round(
                ours / row["mkdir_script_writing_status"]["items_per_second"], 2
            )
            row["ratio_vs_huey"] = round(ours / row["huey_sqlite"]["items_per_second"], 2)
            best = max((p for p in PEERS if p in row), key=lambda p: row[p]["items_per_second"])
            row["best_peer"] = best
            row["ratio_vs_best_peer"] = round(ours / row[best]["items_per_second"], 2)
            result["throughput"][f"{n}_workers"] = row
        return result
    finally:
        if postgres:
            from django.db import connections

            connections.close_all()
            drop_postgres_databases(postgres, prefix)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--workers", default="1,2,8")
    parser.add_argument("--prefetch", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="ours and the database peers on PostgreSQL ($BENCH_POSTGRES_URL)",
    )
    args = parser.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    server = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    postgres = server if args.postgres else None
    print(json.dumps(run(args.tasks, workers, args.prefetch, args.repeat, postgres), indent=2))
