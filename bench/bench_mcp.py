"""MCP benchmark: claim-and-complete round trips through `manage.py mcp` over stdio, with
the SDK's own client, N sessions at once. Prints JSON.

    python bench/bench_mcp.py [--tasks 400] [--sessions 4] [--database-url URL]

Against a private SQLite database in a temporary folder by default (or the database URL
given, which must be empty and migratable). Each session loops claim_next_task then
complete_task until QUEUE EMPTY; a round trip is both calls, as an agent makes them. The
sessions' start-up (Django and the SDK loading, the MCP handshake) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(ROOT / "manage.py")

SETUP = """
from workqueue.models import Queue, Task
Queue.objects.get_or_create(name="bench")
Task.objects.bulk_create(Task(queue="bench", key=f"b{i:06d}", title=f"Task {i}") for i in range(N))
"""


def manage(args: list[str], env: dict) -> None:
    result = subprocess.run(
        [sys.executable, MANAGE, *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed: {result.stderr[-2000:]}")


async def session(name: str, env: dict, ready: anyio.Event, go: anyio.Event) -> dict:
    params = StdioServerParameters(
        command=sys.executable,
        args=[MANAGE, "mcp", "--queue", "bench", "--name", name],
        env=env,
        cwd=str(ROOT),
    )
    started = time.monotonic()
    async with Client(params, read_timeout_seconds=120) as client:
        startup = time.monotonic() - started
        ready.set()
        await go.wait()
        claims, trips = [], []
        while True:
            begun = time.monotonic()
            answer = await client.call_tool("claim_next_task", {})
            claimed = time.monotonic()
            result = json.loads(answer.content[0].text)
            if not result["success"]:
                break
            claims.append(claimed - begun)
            done = await client.call_tool("complete_task", {"id": result["task"]["id"]})
            if not json.loads(done.content[0].text)["success"]:
                raise RuntimeError(done.content[0].text)
            trips.append(time.monotonic() - begun)
    return {"startup": startup, "claims": claims, "trips": trips}


async def run_sessions(count: int, env: dict) -> tuple[list[dict], float]:
    readies = [anyio.Event() for _ in range(count)]
    go = anyio.Event()
    results: list[dict] = [{}] * count
    began = 0.0

    async def one(i: int) -> None:
        results[i] = await session(f"bench-{i}", env, readies[i], go)

    async with anyio.create_task_group() as group:
        for i in range(count):
            group.start_soon(one, i)
        for ready in readies:
            await ready.wait()
        began = time.monotonic()
        go.set()
    return results, time.monotonic() - began


def run(tasks: int = 400, sessions: int = 4, database_url: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-mcp-") as tmp:
        folder = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HUEY_REDIS_URL")}
        env.update(
            DATABASE_URL=database_url or f"sqlite:///{folder / 'bench.sqlite3'}",
            HYPERVISOR_DATA_DIR=str(folder),
            HYPERVISOR_LOCK_ROOT=str(folder / "locks"),
            PYTHONUNBUFFERED="1",
        )
        manage(["migrate", "--verbosity", "0"], env)
        manage(["shell", "-c", f"N = {tasks}\n{SETUP}"], env)
        results, seconds = anyio.run(run_sessions, sessions, env)
    trips = [t for r in results for t in r["trips"]]
    claims = [c for r in results for c in r["claims"]]
    if len(trips) != tasks:
        raise RuntimeError(f"{len(trips)} round trips for {tasks} tasks")
    return {
        "database": "postgresql" if database_url else "sqlite",
        "tasks": tasks,
        "sessions": sessions,
        "round_trips_per_second": round(len(trips) / seconds, 1),
        "seconds": round(seconds, 3),
        "round_trip_median_ms": round(statistics.median(trips) * 1000, 2),
        "claim_median_ms": round(statistics.median(claims) * 1000, 2),
        "slowest_claim_ms": round(max(claims) * 1000, 2),
        "per_session": [len(r["trips"]) for r in results],
        "session_startup_seconds": [round(r["startup"], 2) for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.tasks, args.sessions, args.database_url)))


if __name__ == "__main__":
    main()
