"""Worker start-up: `manage.py work` on an empty queue, beside a bare Python and a bare
`django.setup()` with the same settings and a bare import of Django's ORM (the floor of
any worker that uses it); then eight separate worker processes draining
no-op tasks, against the mkdir-lock script with 8 processes. Prints JSON.

    python bench/bench_startup.py [--runs 15] [--tasks 2000] [--prefetch 250] [--repeat 3]

The three start-up commands take turns, so that a busy moment of the machine falls on all
of them alike; each row gives the median and 90th percentile wall time, and the median CPU
time (user + system), which a loaded machine inflates less. Every child reads compiled
bytecode, as an installed deployment does, even where PYTHONDONTWRITEBYTECODE is set: it is
kept under a temporary PYTHONPYCACHEPREFIX, filled by a first untimed run.

The draining rows reuse bench_core's: the same tasks, queue reset, sync-and-pause before
every timed run, turns, median of --repeat runs, and the command that forks 8 workers from
one process beside the 8 separate ones.
"""

import argparse
import functools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(ROOT / "manage.py")
sys.path.insert(0, str(ROOT / "bench"))
from bench_core import (  # noqa: E402
    median_run,
    reset_queue,
    run_ours,
    run_script,
    settle,
    setup_django,
    write_tasks,
)

STARTUP_COMMANDS = {
    "work_empty_queue": [MANAGE, "work", "--queue", "empty"],
    "python_pass": ["-c", "pass"],
    "django_setup": ["-c", "import django; django.setup()"],
    # The floor of any worker that uses Django's ORM: importing it, nothing more.
    "django_orm_import": ["-c", "import django.db.models"],
}


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU seconds of one `python ARGS` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def startup_rows(env: dict, runs: int) -> dict:
    walls: dict[str, list[float]] = {name: [] for name in STARTUP_COMMANDS}
    cpus: dict[str, list[float]] = {name: [] for name in STARTUP_COMMANDS}
    for args in STARTUP_COMMANDS.values():
        timed(args, env)  # compiles what it imports into the cache, untimed
    for _ in range(runs):
        for name, args in STARTUP_COMMANDS.items():
            wall, cpu = timed(args, env)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {
        name: {
            "command": " ".join(["python", *args]).replace(str(ROOT) + "/", ""),
            "median_seconds": round(statistics.median(walls[name]), 3),
            "p90_seconds": round(statistics.quantiles(walls[name], n=10)[-1], 3),
            "min_seconds": round(min(walls[name]), 3),
            "median_cpu_seconds": round(statistics.median(cpus[name]), 3),
        }
        for name, args in STARTUP_COMMANDS.items()
    }


def run_separate(env: dict, workers: int, prefetch: int) -> dict:
    """`workers` separate `manage.py work` processes, started at once, timed as a whole."""
    from workqueue.models import EventKind, Status, Task, TaskEvent

    reset_queue()
    settle()
    total = Task.objects.count()
    args = [sys.executable, MANAGE, "work", "--queue", "bench", "--prefetch", str(prefetch)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen([*args, "--json"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    seconds = time.perf_counter() - started
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a worker failed: exit codes {[p.returncode for p in procs]}")
    summaries = [json.loads(out) for out in outputs]
    done = Task.objects.filter(status=Status.DONE).count()
    claims = TaskEvent.objects.filter(kind=EventKind.CLAIMED).count()
    return {
        "items": done,
        "seconds": round(seconds, 3),
        "items_per_second": round(total / seconds),
        "duplicates": claims - done,
        "slowest_claim_seconds": max(s["slowest_claim_seconds"] for s in summaries),
        "writer_hold_seconds": round(sum(s["writer_hold_seconds"] for s in summaries), 3),
        "writer_wait_seconds": round(sum(s["writer_wait_seconds"] for s in summaries), 3),
    }


def draining_rows(env: dict, tmp: Path, tasks: int, prefetch: int, repeat: int) -> dict:
    from workqueue.importer import Importer

    paths = write_tasks(tmp / "tasks", tasks)
    Importer("bench", [tmp / "tasks"]).run([tmp / "tasks"])
    queue_file = tmp / "queue.txt"
    queue_file.write_text("\n".join(paths) + "\n")
    runs: dict[str, list[dict]] = {}
    for rep in range(repeat):
        contenders = {
            "separate_processes": functools.partial(run_separate, env, 8, prefetch),
            "forked_from_one": functools.partial(run_ours, env, 8, prefetch),
            "mkdir_script": functools.partial(
                run_script,
                [
                    str(ROOT / "bench" / "mkdir_baseline.py"),
                    str(queue_file),
                    str(tmp / f"mkdir-locks-{rep}"),
                    str(tmp / f"mkdir-results-{rep}"),
                    "8",
                ],
                env=env,
                whole_process=True,
            ),
        }
        names = list(contenders)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            runs.setdefault(name, []).append(contenders[name]())
    row = {name: median_run(found) for name, found in runs.items()}
    mkdir = row["mkdir_script"]["items_per_second"]
    for name in ("separate_processes", "forked_from_one"):
        row[f"{name}_ratio_vs_mkdir"] = round(row[name]["items_per_second"] / mkdir, 2)
    return row


def run(
    runs: int = 15, tasks: int = 2000, prefetch: int = 250, repeat: int = 3, drain: bool = True
) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="hv-bench-startup-"))
    try:
        env = setup_django(tmp / "data")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "bytecode")
        result = {
            "runs": runs,
            "startup": startup_rows(env, runs),
            "target_work_empty_queue_median_seconds": 0.2,
        }
        if drain:
            result.update(tasks=tasks, prefetch=prefetch, repeat=repeat)
            result["drain_8_workers"] = draining_rows(env, tmp, tasks, prefetch, repeat)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--prefetch", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-drain", action="store_true", help="start-up rows only")
    args = parser.parse_args()
    result = run(args.runs, args.tasks, args.prefetch, args.repeat, drain=not args.skip_drain)
    print(json.dumps(result, indent=2))
