"""Huey's own consumer on its SQLite storage: one task per item that reads the file and
writes a result file. Used by bench_core as a baseline.

    BENCH_HUEY_DB=FILE python bench/huey_baseline.py QUEUE_FILE RESULT_DIR WORKERS
"""

import json
import os
import subprocess
import sys
import time

from huey import SqliteHuey

huey = SqliteHuey(
    "bench", filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.db"), results=False
)


@huey.task()
def process(path: str, result_dir: str) -> None:
    with open(path, "rb") as task:
        task.read()
    name = os.path.basename(path)
    with open(os.path.join(result_dir, name + ".done"), "w") as result:
        result.write("done\n")


def main() -> None:
    queue_file, result_dir, workers = sys.argv[1:4]
    os.makedirs(result_dir, exist_ok=True)
    with open(queue_file) as f:
        paths = f.read().split()
    # Enqueue under the module's own name, as the consumer imports it (not __main__).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from huey_baseline import process as enqueue

    for path in paths:
        enqueue(path, result_dir)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    started = time.perf_counter()
    consumer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            "huey_baseline.huey",
            "-w",
            workers,
            "-k",
            "process",
            "-d",
            "0.01",
            "-m",
            "0.05",
            "-q",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while len(os.listdir(result_dir)) < len(paths):
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    consumer.terminate()
    consumer.wait(timeout=30)
    print(json.dumps({"items": len(os.listdir(result_dir)), "seconds": seconds, "duplicates": 0}))


if __name__ == "__main__":
    main()
