"""PostgreSQL: a count of the commits that changed any task's searched text.

The board keeps a text's search across requests until the searched text changes
(TaskSearch.generation). SQLite tells through FTS5's structure record; PostgreSQL had no
such thing, so its board searched again after every claim and finish (750-850 ms for a
text in every task at 1,000,000). Here each transaction that writes the search copy adds
one to a slot row, and the generation is the slots' sum: it changes when such a
transaction commits, and only then (an uncommitted change is not seen, so a search is
never kept under a generation that its text was not yet part of). The transaction's own
later statements are counted in a local setting that its own reads of the generation
add: one write of the slot's row each, however many rows an import changes.

A transaction takes a slot no other holds (SKIP LOCKED), so writers of text never wait
on each other for it; only with every slot taken does one wait for its own slot.
"""

from django.db import migrations

# 64 slots: as many writers of text at once as that never wait for one.
POSTGRES_CREATE = [
    "CREATE TABLE queue_search_generation (slot integer PRIMARY KEY, commits bigint NOT NULL)",
    "INSERT INTO queue_search_generation SELECT s, 0 FROM generate_series(0, 63) s",
    """CREATE FUNCTION queue_search_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held text[] := string_to_array(current_setting('hypervisor.search_changes', true), ':');
    taken integer;
BEGIN
    IF held[1] = txid_current()::text THEN
        -- A later statement of this transaction: counted in the setting alone (local, so
        -- it ends with the transaction), which the transaction's own reads see.
        PERFORM set_config(
            'hypervisor.search_changes', held[1] || ':' || (held[2]::bigint + 1), true);
        RETURN NULL;
    END IF;
    SELECT slot INTO taken FROM queue_search_generation
        ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED;
    UPDATE queue_search_generation SET commits = commits + 1
        WHERE slot = coalesce(taken, (txid_current() % 64)::integer);
    PERFORM set_config('hypervisor.search_changes', txid_current()::text || ':1', true);
    RETURN NULL;
END $$""",
    "CREATE TRIGGER queue_tasksearch_changed "
    "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON queue_tasksearch "
    "FOR EACH STATEMENT EXECUTE FUNCTION queue_search_changed()",
]
POSTGRES_DROP = [
    "DROP TRIGGER IF EXISTS queue_tasksearch_changed ON queue_tasksearch",
    "DROP FUNCTION IF EXISTS queue_search_changed()",
    "DROP TABLE IF EXISTS queue_search_generation",
]


def run(statements):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            for sql in statements:
                schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("queue", "0021_reread_capitalised_keys")]

    operations = [migrations.RunPython(run(POSTGRES_CREATE), run(POSTGRES_DROP))]
