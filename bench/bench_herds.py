"""Herd benchmark: launch latency, load balance, and a herd of no-op workers draining a
queue beside the mkdir-lock script, all through a real Huey consumer. Prints JSON.

    python bench/bench_herds.py [--launches 10] [--tasks 200] [--workers 8]
                                [--drain-tasks 10000] [--repeat 3]

Everything runs in child processes against a private SQLite database and SQLite Huey
storage in a temporary folder, so that `run()` can be called from another benchmark.

The draining row times a herd as a person starts one: from the `herd` command (its own
start-up, the consumer picking the launch up, the workers forked by the preloaded fork
server) to the last task finished. The mkdir script is timed as a whole process, start-up
included, on the same task files; the two take turns after a sync and a pause, median of
--repeat runs each (bench_core's rules).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(ROOT / "manage.py")
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import median_run, run_script, settle, write_tasks  # noqa: E402

SETUP = """
import json
from herds.models import Profile
from workqueue.models import Queue, Task
spec = json.loads(SPEC)
Profile.objects.update_or_create(
    name="bench-sleep",
    defaults={"processor": "command", "command": ["sleep", "{title}"], "prefetch": 1,
              "max_workers": 64, "timeout_seconds": 60},
)
Profile.objects.filter(name="noop").update(prefetch=1)
# As bench_core's `work --prefetch 250`.
Profile.objects.update_or_create(
    name="bench-noop",
    defaults={"processor": "noop", "command": [], "prefetch": 250, "max_workers": 64},
)
for queue, titles in spec.items():
    Queue.objects.get_or_create(name=queue)
    Task.objects.bulk_create(
        Task(queue=queue, key=f"{queue}-{i:05d}", title=title) for i, title in enumerate(titles)
    )
"""


def manage(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, MANAGE, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed: {result.stderr[-2000:]}")
    return result


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


class Bench:
    def __init__(self, folder: Path):
        self.db_path = folder / "bench.sqlite3"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HUEY_REDIS_URL")}
        self.env = {
            **env,
            "DATABASE_URL": f"sqlite:///{self.db_path}",
            "HYPERVISOR_DATA_DIR": str(folder),
            "HYPERVISOR_LOCK_ROOT": str(folder / "locks"),
            "HYPERVISOR_IMPORT_ROOTS": str(folder),
            "HUEY_NAME": "bench-herds",
            "HUEY_IMMEDIATE": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.folder = folder
        self.consumer: subprocess.Popen | None = None

    def query(self, sql: str, *params):
        with sqlite3.connect(self.db_path, timeout=30) as db:
            return db.execute(sql, params).fetchone()

    def start(self, spec: dict[str, list[str]]) -> None:
        manage(["migrate", "--verbosity", "0"], self.env)
        manage(["shell", "-c", f"SPEC = {json.dumps(json.dumps(spec))}\n{SETUP}"], self.env)
        log = open(self.folder / "consumer.log", "w")  # noqa: SIM115 (lives as long as the consumer)
        self.consumer = subprocess.Popen(
            [sys.executable, MANAGE, "run_huey"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(2)  # let the consumer start and run its startup periodic tasks

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.terminate()
            self.consumer.wait(timeout=30)

    def wait_for_herd(self, herd_id: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            (status,) = self.query("SELECT status FROM herds_herd WHERE id = ?", herd_id)
            if status in ("finished", "failed", "cancelled"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"herd {herd_id} did not finish in {timeout} s")

    def launch_latency(self, queue: str) -> dict:
        started = time.time()
        result = manage(
            ["herd", "--queue", queue, "--profile", "noop", "--workers", "1", "--json"], self.env
        )
        herd_id = json.loads(result.stdout.strip().splitlines()[-1])["herd"]
        first = None
        deadline = time.monotonic() + 60
        while first is None and time.monotonic() < deadline:
            (first,) = self.query("SELECT MIN(claimed_at) FROM queue_task WHERE queue = ?", queue)
            if first is None:
                time.sleep(0.005)
        (created,) = self.query("SELECT created_at FROM herds_herd WHERE id = ?", herd_id)
        self.wait_for_herd(herd_id)
        first_claim = parse_time(first)
        return {
            "from_command": first_claim - started,
            "from_herd_row": first_claim - parse_time(created),
        }

    def balance(self, queue: str, durations: list[float], workers: int) -> dict:
        manage(
            [
                "herd",
                "--queue",
                queue,
                "--profile",
                "bench-sleep",
                "--workers",
                str(workers),
                "--wait",
                "--json",
            ],
            self.env,
            timeout=600,
        )
        first, last = self.query(
            "SELECT MIN(claimed_at), MAX(finished_at) FROM queue_task WHERE queue = ?", queue
        )
        (done,) = self.query(
            "SELECT COUNT(*) FROM queue_task WHERE queue = ? AND status = 'done'", queue
        )
        makespan = parse_time(last) - parse_time(first)
        ideal = max(sum(durations) / workers, max(durations))
        return {
            "tasks": len(durations),
            "done": done,
            "workers": workers,
            "makespan_seconds": round(makespan, 3),
            "ideal_seconds": round(ideal, 3),
            "over_ideal_percent": round(100 * (makespan / ideal - 1), 1),
            "target_percent": 15,
        }

    def drain(self, queue: str, workers: int) -> dict:
        """A herd of no-op workers over every task of `queue`, timed from its command."""
        reset = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        reset += f"from bench_core import reset_queue; reset_queue({queue!r})"
        manage(["shell", "-c", reset], self.env)
        settle()
        started = time.time()
        manage(
            ["herd", "--queue", queue, "--profile", "bench-noop"]
            + ["--workers", str(workers), "--wait", "--json"],
            self.env,
            timeout=600,
        )
        first, last, done = self.query(
            "SELECT MIN(claimed_at), MAX(finished_at), SUM(status = 'done') FROM queue_task"
            " WHERE queue = ?",
            queue,
        )
        (claims,) = self.query(
            "SELECT COUNT(*) FROM queue_taskevent e JOIN queue_task t ON t.id = e.task_id"
            " WHERE t.queue = ? AND e.kind = 'claimed'",
            queue,
        )
        seconds = parse_time(last) - started
        return {
            "items": done,
            "seconds": round(seconds, 3),
            "items_per_second": round(done / seconds),
            "seconds_first_claim_to_last_finish": round(parse_time(last) - parse_time(first), 3),
            "launch_to_first_claim_seconds": round(parse_time(first) - started, 3),
            "duplicates": claims - done,
        }


def drain_rows(bench: Bench, tasks: int, workers: int, repeat: int) -> dict:
    paths = write_tasks(bench.folder / "drain", tasks)
    manage(["import_tasks", "--queue", "drain", str(bench.folder / "drain")], bench.env)
    queue_file = bench.folder / "drain-queue.txt"
    queue_file.write_text("\n".join(paths) + "\n")
    runs: dict[str, list[dict]] = {"herd": [], "mkdir_script": []}
    for rep in range(repeat):
        runs["herd"].append(bench.drain("drain", workers))
        script = [str(ROOT / "bench" / "mkdir_baseline.py"), str(queue_file)]
        script += [str(bench.folder / f"mkdir-{name}-{rep}") for name in ("locks", "results")]
        runs["mkdir_script"].append(run_script([*script, str(workers)], whole_process=True))
    row = {name: median_run(results) for name, results in runs.items()}
    row["workers"] = workers
    row["tasks"] = tasks
    row["ratio_vs_mkdir"] = round(
        row["herd"]["items_per_second"] / row["mkdir_script"]["items_per_second"], 2
    )
    row["target_ratio"] = 1.0
    return row


def run(
    launches: int = 10,
    tasks: int = 200,
    workers: int = 8,
    drain_tasks: int = 10000,
    repeat: int = 3,
    seed: int = 7,
) -> dict:
    rng = random.Random(seed)
    durations = [round(rng.uniform(0.05, 0.5), 3) for _ in range(tasks)]
    spec = {f"latency-{i}": [f"t{j}" for j in range(5)] for i in range(launches)}
    spec["balance"] = [f"{d:.3f}" for d in durations]
    with tempfile.TemporaryDirectory(prefix="bench-herds-") as tmp:
        bench = Bench(Path(tmp))
        try:
            bench.start(spec)
            latencies = [bench.launch_latency(f"latency-{i}") for i in range(launches)]
            balance = bench.balance("balance", durations, workers)
            drain = drain_rows(bench, drain_tasks, workers, repeat) if drain_tasks else None
        finally:
            bench.stop()
    from_command = [round(x["from_command"], 3) for x in latencies]
    from_row = [round(x["from_herd_row"], 3) for x in latencies]
    return {
        "launch_latency": {
            "launches": launches,
            "huey_storage": "sqlite",
            "median_seconds_from_herd_command": round(statistics.median(from_command), 3),
            "median_seconds_from_herd_created": round(statistics.median(from_row), 3),
            "samples_from_herd_command": from_command,
            "target_seconds": 1.0,
        },
        "balance": balance,
        "drain_noop": drain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--drain-tasks", type=int, default=10000, help="0 leaves the row out")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    result = run(args.launches, args.tasks, args.workers, args.drain_tasks, args.repeat)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
