"""What every peer baseline does per item, and how its results are counted."""

import json
import os
import subprocess
import sys
import time


def arguments() -> tuple[list[str], str, int]:
    """QUEUE_FILE RESULT_DIR WORKERS from the command line: the task paths, the result
    folder (made here) and the number of workers."""
    queue_file, result_dir, workers = sys.argv[1:4]
    os.makedirs(result_dir, exist_ok=True)
    with open(queue_file) as f:
        return f.read().split(), result_dir, int(workers)


def work_item(path: str, result_dir: str) -> None:
    """Read the task file and append a line to its result file (one line per run)."""
    with open(path, "rb") as task:
        task.read()
    with open(os.path.join(result_dir, os.path.basename(path) + ".done"), "a") as result:
        result.write("done\n")


def count(result_dir: str) -> tuple[int, int]:
    """Items done, and how many runs were extra (an item run twice has two lines)."""
    items = runs = 0
    for name in os.listdir(result_dir):
        with open(os.path.join(result_dir, name)) as result:
            runs += result.read().count("\n")
        items += 1
    return items, runs - items


def run_workers(commands: list[list[str]], env: dict) -> float:
    """Start one process per command, wait for all; seconds from the first start to the
    last exit. A worker that fails ends the baseline with its error."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    ]
    errors = [proc.communicate()[1] for proc in procs]
    seconds = time.perf_counter() - started
    for proc, error in zip(procs, errors, strict=True):
        if proc.returncode:
            sys.exit(f"{commands[0][:4]} exited with {proc.returncode}: {error[-2000:]}")
    return seconds


def report(result_dir: str, seconds: float) -> None:
    items, duplicates = count(result_dir)
    print(json.dumps({"items": items, "seconds": seconds, "duplicates": duplicates}))
