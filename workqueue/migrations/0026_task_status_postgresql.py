"""PostgreSQL: an index of each task's status alone.

A board's first render counts its columns (TaskQuerySet.counts_and_stamp); so does the
board of a text found in every task (the whole board). Every other index that holds the
status holds much beside it, and the commonest column (done) was counted from the narrow
index of 0025, all 1,000,000 entries of its 39 MB at 1,000,000 tasks: 68 ms. Equal keys
are kept once each with their rows' places (deduplication, PostgreSQL 13+): 7 MB, and the
four counts 91 -> 57 ms. Each claim and finish moves its task's entry, as in the board's
other indexes. SQLite's claims would pay for an index it has no need of: its columns are
counted from the board's index and the claim path.
"""

from importlib import import_module

from django.db import migrations

EARLIER = import_module("workqueue.migrations.0022_search_generation_postgresql")

POSTGRES_CREATE = ["CREATE INDEX task_status ON queue_task (status)"]
POSTGRES_DROP = ["DROP INDEX IF EXISTS task_status"]


class Migration(migrations.Migration):
    dependencies = [("queue", "0025_task_status_by_id_postgresql")]

    operations = [migrations.RunPython(EARLIER.run(POSTGRES_CREATE), EARLIER.run(POSTGRES_DROP))]
