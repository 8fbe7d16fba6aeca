"""PostgreSQL: a board's text search that found many tasks, kept across requests.

A text found in more than a few tasks and missing from more than a few (two letters, say)
was searched into a temporary table by every request, a claim's refresh included: 80 ms
of its 145-170 at 100,000 tasks. Since migration 0022 PostgreSQL tells when any task's
searched text changed, so such a search is now kept in a table of its own, listed here
and read by every web process, until its text's generation moves or nobody has used it
for a while (workqueue.search_hits). Unlogged: a copy that a crash may empty, never a
record; a search no longer listed is searched again.
"""

from importlib import import_module

from django.db import migrations

EARLIER = import_module("workqueue.migrations.0022_search_generation_postgresql")

POSTGRES_CREATE = [
    # Its own sequence, which a crash does not take back: a number is never used twice.
    "CREATE SEQUENCE queue_kept_search_number",
    """CREATE UNLOGGED TABLE queue_kept_search (
        id bigint PRIMARY KEY DEFAULT nextval('queue_kept_search_number'),
        key text NOT NULL,
        generation text NOT NULL,
        used_at timestamptz NOT NULL DEFAULT now())""",
]
POSTGRES_DROP = [
    """DO $$
DECLARE kept record;
BEGIN
    FOR kept IN SELECT relname FROM pg_class
        WHERE relkind = 'r' AND starts_with(relname::text, 'queue_kept_hits_') LOOP
        EXECUTE format('DROP TABLE %I', kept.relname);
    END LOOP;
END $$""",
    "DROP TABLE IF EXISTS queue_kept_search",
    "DROP SEQUENCE IF EXISTS queue_kept_search_number",
]


class Migration(migrations.Migration):
    dependencies = [("queue", "0023_search_generation_never_waits")]

    operations = [migrations.RunPython(EARLIER.run(POSTGRES_CREATE), EARLIER.run(POSTGRES_DROP))]
