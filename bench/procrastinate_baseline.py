"""Procrastinate's worker on PostgreSQL: one job per item that reads the file and appends
to its result file, worked by N `procrastinate worker --one-shot` processes (concurrency 1
each; each exits when the queue is empty). Used by bench_core as a baseline.

    BENCH_PEER_DATABASE_URL=URL \
        python bench/procrastinate_baseline.py QUEUE_FILE RESULT_DIR WORKERS

URL names an empty PostgreSQL database: its schema is applied here. Timed from the start
of the workers (start-up included, as ours); deferring the jobs is not timed.
Prints {"items": N, "seconds": S, "duplicates": D}: D counts items run more than once.
"""

import os
import sys

import procrastinate

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from peers import arguments, report, run_workers, work_item  # noqa: E402

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ["BENCH_PEER_DATABASE_URL"])
)


@app.task(name="process")
def process(path: str, result_dir: str) -> None:
    work_item(path, result_dir)


def main() -> None:
    paths, result_dir, workers = arguments()
    # Defer under the module's own name, as the workers import it (not __main__).
    from procrastinate_baseline import app as shared
    from procrastinate_baseline import process as job

    with shared.open():
        shared.schema_manager.apply_schema()
        job.batch_defer(*({"path": path, "result_dir": result_dir} for path in paths))
    command = [sys.executable, "-m", "procrastinate", "--app", "procrastinate_baseline.app"]
    command += ["worker", "--concurrency", "1", "--one-shot"]
    seconds = run_workers(
        [command + ["--name", f"bench-{n}"] for n in range(workers)],
        {**os.environ, "PYTHONPATH": HERE},
    )
    report(result_dir, seconds)


if __name__ == "__main__":
    main()
