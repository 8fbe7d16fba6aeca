"""The django-tasks database backend (django-tasks-db): one task per item that reads the
file and appends to its result file, worked by N `db_worker --batch` processes (each
exits when the queue is empty). Used by bench_core as a baseline.

    BENCH_PEER_DATABASE_URL=URL \
        python bench/django_tasks_baseline.py QUEUE_FILE RESULT_DIR WORKERS

Timed from the start of the workers (start-up included, as ours); enqueueing is not timed.
Prints {"items": N, "seconds": S, "duplicates": D}: D counts items run more than once.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["DJANGO_SETTINGS_MODULE"] = "django_tasks_settings"  # not the caller's

import django  # noqa: E402

django.setup()

from django_tasks import task  # noqa: E402
from peers import arguments, report, run_workers, work_item  # noqa: E402


@task()
def process(path: str, result_dir: str) -> None:
    work_item(path, result_dir)


def main() -> None:
    from django.core.management import call_command
    from django.db import transaction

    paths, result_dir, workers = arguments()
    call_command("migrate", verbosity=0)
    # Enqueue under the module's own name, as the workers import it (not __main__).
    from django_tasks_baseline import process as job

    with transaction.atomic():
        for path in paths:
            job.enqueue(path, result_dir)
    command = [sys.executable, "-m", "django", "db_worker", "--batch", "--interval", "0.01"]
    seconds = run_workers(
        [command + ["--worker-id", f"bench-{n}"] for n in range(workers)],
        {**os.environ, "PYTHONPATH": HERE},
    )
    report(result_dir, seconds)


if __name__ == "__main__":
    main()
