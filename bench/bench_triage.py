"""Triage benchmark: 10,000 task files, 8 worker processes, against the old pattern.

Both sides start from copies of the same folder; process start-up is included. Ours is
`manage.py work --processor triage` on a temporary SQLite database; the old pattern is
bench/old_triage.py (mkdir lock per file, whole frontmatter re-dumped). The same
folder through the `noop` processor shows what the engine costs without triage.
Prints JSON.

    python bench/bench_triage.py [--tasks 10000] [--workers 8] [--prefetch 250] [--repeat 3]

As in bench_core, every timed run starts after a sync and a pause, the two sides take
turns, and each reports its median run (every run's items/s beside it).
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(ROOT / "manage.py")
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import median_run, settle  # noqa: E402

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
    "## Acceptance\n\nIt works.\n",
    "Plain text that matches nothing in particular.\n",
]
PROJECTS = ["aops", "osb", "hdr", "garden", "reco", ""]


def write_inbox(folder: Path, count: int) -> list[str]:
    """An inbox like the real one: mostly untriaged, some already classified or assigned."""
    rng = random.Random(10000)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        lines = [f"id: task-{i:05d}", f'title: "{rng.choice(TITLES)} {i}"', "status: inbox"]
        lines.append(f"priority: {rng.randint(0, 4)}")
        if i % 50 == 0:
            lines.append("type: epic")
        if rng.random() < 0.2:
            lines.append("assignee: nic  # set by hand")
        if rng.random() < 0.1:
            lines.append("complexity: multi-step")
        project = rng.choice(PROJECTS)
        if project:
            lines.append(f"project: {project}")
        lines.append("tags: [inbox, imported]")
        lines.append("created: 2026-01-15")
        heading = f"# Task {i}\n\n" if rng.random() < 0.7 else ""
        path = folder / f"task-{i:05d}.md"
        path.write_text("---\n" + "\n".join(lines) + "\n---\n" + heading + rng.choice(BODIES))
        paths.append(str(path))
    return paths


def manage(args: list[str], env: dict) -> str:
    done = subprocess.run(
        [sys.executable, MANAGE, *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout


def run_ours(folder: Path, data: Path, workers: int, prefetch: int, processor: str) -> dict:
    data.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL")
        or f"sqlite:///{data / 'bench.sqlite3'}",
        "HYPERVISOR_DATA_DIR": str(data),
        "HYPERVISOR_LOCK_ROOT": str(data / "locks"),
        "HYPERVISOR_IMPORT_ROOTS": str(folder),
    }
    manage(["migrate", "-v0"], env)
    settle()
    started = time.perf_counter()
    imported = json.loads(
        manage(["import_tasks", str(folder), "--queue", "triage", "--json"], env)
    )
    import_seconds = time.perf_counter() - started
    settle()
    started, cpu = time.perf_counter(), children_cpu()
    # One command forking the workers after Django is loaded, as the old pattern's pool does.
    proc = subprocess.run(
        [sys.executable, MANAGE, "work", "--queue", "triage", "--processor", processor]
        + ["--workers", str(workers), "--prefetch", str(prefetch), "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds, cpu = time.perf_counter() - started, children_cpu() - cpu
    if proc.returncode:
        raise RuntimeError("a worker failed: " + proc.stderr[-2000:])
    summaries = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    stats = json.loads(manage(["queue_stats", "--queue", "triage", "--json"], env))
    done = sum(s["done"] for s in summaries)
    return {
        "items": done,
        "blocked": sum(s["blocked"] for s in summaries),
        "seconds": round(seconds, 3),
        "items_per_second": round(done / seconds),
        "cpu_seconds": round(cpu, 2),
        "import_seconds": round(import_seconds, 3),
        "imported": imported["imported"],
        "items_per_second_with_import": round(done / (seconds + import_seconds)),
        "counts": stats.get("counts", stats),
        "slowest_claim_seconds": max(s["slowest_claim_seconds"] for s in summaries),
    }


def run_old(folder: Path, workers: int) -> dict:
    queue_file = folder.parent / f"{folder.name}-queue.txt"
    queue_file.write_text("\n".join(sorted(str(p) for p in folder.iterdir())) + "\n")
    settle()
    cpu = children_cpu()
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "old_triage.py"), str(queue_file)]
        + [str(folder.parent / f"{folder.name}-locks"), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    result["cpu_seconds"] = round(children_cpu() - cpu, 2)
    result["items_per_second"] = round(result["items"] / result["seconds"])
    result["seconds"] = round(result["seconds"], 3)
    return result


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def changed_files(original: Path, triaged: Path) -> int:
    return sum((triaged / p.name).read_bytes() != p.read_bytes() for p in original.iterdir())


def run(tasks: int = 10000, workers: int = 8, prefetch: int = 250, repeat: int = 3) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="hv-bench-triage-"))
    try:
        original = tmp / "original"
        write_inbox(original, tasks)
        runs: dict[str, list[dict]] = {"ours": [], "old": [], "noop": []}
        for rep in range(repeat):
            for side in ["ours", "old"] if rep % 2 == 0 else ["old", "ours"]:
                folder = tmp / f"{side}-{rep}"
                shutil.copytree(original, folder)
                if side == "ours":
                    found = run_ours(folder, tmp / f"data-{rep}", workers, prefetch, "triage")
                else:
                    found = run_old(folder, workers)
                found["files_changed"] = changed_files(original, folder)
                runs[side].append(found)
            # The engine alone (claim, read, finish) on the same folder: what triage adds.
            folder = tmp / f"noop-{rep}"
            shutil.copytree(original, folder)
            runs["noop"].append(
                run_ours(folder, tmp / f"data-noop-{rep}", workers, prefetch, "noop")
            )
        ours, old, noop = (median_run(runs[side]) for side in ("ours", "old", "noop"))
        return {
            "tasks": tasks,
            "workers": workers,
            "prefetch": prefetch,
            "repeat": repeat,
            "hypervisor_triage": ours,
            "old_pattern": old,
            "engine_with_noop_processor": noop,
            "triage_cpu_ms_per_file_over_noop": round(
                (ours["cpu_seconds"] - noop["cpu_seconds"]) * 1000 / tasks, 3
            ),
            "ratio_vs_old": round(ours["items_per_second"] / old["items_per_second"], 2),
            "target_ratio": 1.2,  # issue 17: at least 1.2x the old pattern, with less CPU
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.tasks, args.workers, args.prefetch, args.repeat), indent=2))
