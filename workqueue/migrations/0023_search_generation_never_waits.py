"""PostgreSQL: a writer of text that finds every slot held adds a slot of its own.

Migration 0022 counted a transaction's change of searched text in one of 64 slot rows,
taken with SKIP LOCKED; with all 64 held it waited for its own slot's holder, and should
that holder then wait for a row the waiter held, PostgreSQL ended one of them with a
deadlock error. Now it inserts a row keyed by its own transaction id, which no other
transaction holds, so no writer of text ever waits for a slot. The generation is still
the rows' sum and still moves only when the writer commits (its new row is seen then).
Such rows appear only while more than 64 transactions write text at once.
"""

from importlib import import_module

from django.db import migrations

# The body of migration 0022's function, whose last resort changes here.
EARLIER = import_module("workqueue.migrations.0022_search_generation_postgresql")
FUNCTION = EARLIER.POSTGRES_CREATE[2]
WAITING = """    UPDATE queue_search_generation SET commits = commits + 1
        WHERE slot = coalesce(taken, (txid_current() % 64)::integer);"""
NEVER_WAITING = """    IF taken IS NULL THEN
        -- Every slot is held: a row of this transaction's own, which nobody else holds.
        INSERT INTO queue_search_generation VALUES (txid_current(), 1);
    ELSE
        UPDATE queue_search_generation SET commits = commits + 1 WHERE slot = taken;
    END IF;"""
assert WAITING in FUNCTION, "migration 0022's function is not the one this replaces"

POSTGRES_FORWARD = [
    "ALTER TABLE queue_search_generation ALTER COLUMN slot TYPE bigint",
    FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION").replace(
        WAITING, NEVER_WAITING
    ),
]
POSTGRES_BACKWARD = [
    FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
    # Fold the transactions' own rows into slot 0, so that the sum stays what it was.
    """UPDATE queue_search_generation SET commits = commits + coalesce(
        (SELECT sum(commits) FROM queue_search_generation WHERE slot >= 64), 0)
    WHERE slot = 0""",
    "DELETE FROM queue_search_generation WHERE slot >= 64",
    "ALTER TABLE queue_search_generation ALTER COLUMN slot TYPE integer",
]


class Migration(migrations.Migration):
    dependencies = [("queue", "0022_search_generation_postgresql")]

    operations = [
        migrations.RunPython(EARLIER.run(POSTGRES_FORWARD), EARLIER.run(POSTGRES_BACKWARD))
    ]
