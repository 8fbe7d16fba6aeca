"""Herd benchmark: launch latency and load balance through a real Huey consumer. Prints JSON.

    python bench/bench_herds.py [--launches 10] [--tasks 200] [--workers 8]

Everything runs in child processes against a private SQLite database and SQLite Huey
storage in a temporary folder, so that `run()` can be called from another benchmark.
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


def run(launches: int = 10, tasks: int = 200, workers: int = 8, seed: int = 7) -> dict:
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(run(args.launches, args.tasks, args.workers), indent=2))


if __name__ == "__main__":
    main()
