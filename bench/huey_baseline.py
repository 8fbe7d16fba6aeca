"""Huey's own consumer on its SQLite storage: one task per item that reads the file and
appends to its result file. Used by bench_core as a baseline.

    BENCH_HUEY_DB=FILE python bench/huey_baseline.py QUEUE_FILE RESULT_DIR WORKERS
"""

import os
import subprocess
import sys
import time

from huey import SqliteHuey

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import arguments, report, work_item  # noqa: E402

huey = SqliteHuey(
    "bench", filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.db"), results=False
)


@huey.task()
def process(path: str, result_dir: str) -> None:
    work_item(path, result_dir)


def main() -> None:
    paths, result_dir, workers = arguments()
    # Enqueue under the module's own name, as the consumer imports it (not __main__).
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
            str(workers),
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
    report(result_dir, seconds)


if __name__ == "__main__":
    main()
