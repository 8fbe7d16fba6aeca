"""PostgreSQL: each task's status and updated_at by id, in a narrow index of their own.

A board filtered by a text found in many tasks counts them by joining its kept ids
(workqueue.search_hits) to the tasks: a read of every task row, 53-65 ms of a 170-210 ms
first render at 100,000 tasks for two letters in a third of them, and again after every
claim while the board is open. The board's own indexes hold status, id and updated_at too,
but with every filtered field beside them in each entry: this one holds only what the
count reads, and the count reads it alone (18-25 ms). SQLite counts such a board from its
temporary table of ids instead, and its workers' claims would pay for an index it does not
use.
"""

from importlib import import_module

from django.db import migrations

EARLIER = import_module("workqueue.migrations.0022_search_generation_postgresql")

POSTGRES_CREATE = [
    "CREATE INDEX task_status_by_id ON queue_task (id) INCLUDE (status, updated_at)"
]
POSTGRES_DROP = ["DROP INDEX IF EXISTS task_status_by_id"]


class Migration(migrations.Migration):
    dependencies = [("queue", "0024_kept_searches_postgresql")]

    operations = [migrations.RunPython(EARLIER.run(POSTGRES_CREATE), EARLIER.run(POSTGRES_DROP))]
