"""The board's free-text search: a copy of each task's title, key and body in an index
that finds substrings, kept in sync by database triggers.

Triggers, not Python: the import, the write-back (raw UPDATEs), the admin, bulk edits and
any later path all write through the database, so none of them can forget the copy.

SQLite: an FTS5 table with the trigram tokenizer; a phrase query of three or more
characters is an exact, case-insensitive substring match on the index.
PostgreSQL: a plain table with pg_trgm GIN indexes; `ILIKE '%text%'` is answered from them
and rechecked on the row, so the match is exact. A tsvector was the other choice: it
matches words and stems, not the substrings (`bench-0077`, `webhoo`) people type.
The copy lives in its own table on both: claims update task rows all day, and a GIN index
on the task table would be written on each of those updates (the title does not change).

On SQLite a migration that remakes queue_task or queue_taskbody (most AlterFields do)
drops their triggers: recreate them there (tests/test_board_search.py notices).
"""

from django.db import migrations, models

SQLITE_CREATE = [
    "CREATE VIRTUAL TABLE queue_tasksearch USING fts5("
    "task_id UNINDEXED, title, key, body, tokenize='trigram')",
    "INSERT INTO queue_tasksearch (rowid, task_id, title, key, body) "
    "SELECT t.id, t.id, t.title, t.key, COALESCE(b.text, '') "
    "FROM queue_task t LEFT JOIN queue_taskbody b ON b.task_id = t.id",
    "CREATE TRIGGER queue_task_search_insert AFTER INSERT ON queue_task BEGIN "
    "INSERT INTO queue_tasksearch (rowid, task_id, title, key, body) "
    "VALUES (new.id, new.id, new.title, new.key, ''); END",
    "CREATE TRIGGER queue_task_search_update AFTER UPDATE OF title, key ON queue_task "
    "WHEN old.title IS NOT new.title OR old.key IS NOT new.key BEGIN "
    "UPDATE queue_tasksearch SET title = new.title, key = new.key WHERE rowid = new.id; END",
    "CREATE TRIGGER queue_task_search_delete AFTER DELETE ON queue_task BEGIN "
    "DELETE FROM queue_tasksearch WHERE rowid = old.id; END",
    "CREATE TRIGGER queue_taskbody_search_insert AFTER INSERT ON queue_taskbody BEGIN "
    "UPDATE queue_tasksearch SET body = new.text WHERE rowid = new.task_id; END",
    "CREATE TRIGGER queue_taskbody_search_update AFTER UPDATE OF text ON queue_taskbody "
    "WHEN old.text IS NOT new.text BEGIN "
    "UPDATE queue_tasksearch SET body = new.text WHERE rowid = new.task_id; END",
    "CREATE TRIGGER queue_taskbody_search_delete AFTER DELETE ON queue_taskbody BEGIN "
    "UPDATE queue_tasksearch SET body = '' WHERE rowid = old.task_id; END",
]
SQLITE_DROP = [
    *(
        f"DROP TRIGGER IF EXISTS {name}"
        for name in (
            "queue_task_search_insert", "queue_task_search_update", "queue_task_search_delete",
            "queue_taskbody_search_insert", "queue_taskbody_search_update",
            "queue_taskbody_search_delete",
        )
    ),
    "DROP TABLE IF EXISTS queue_tasksearch",
]  # fmt: skip

POSTGRES_CREATE = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    # One GIN index per column: an OR of three ILIKEs is a BitmapOr of three index scans.
    "CREATE INDEX queue_tasksearch_title_trgm ON queue_tasksearch USING gin (title gin_trgm_ops)",
    "CREATE INDEX queue_tasksearch_key_trgm ON queue_tasksearch USING gin (key gin_trgm_ops)",
    "CREATE INDEX queue_tasksearch_body_trgm ON queue_tasksearch USING gin (body gin_trgm_ops)",
    "INSERT INTO queue_tasksearch (task_id, title, key, body) "
    "SELECT t.id, t.title, t.key, COALESCE(b.text, '') "
    "FROM queue_task t LEFT JOIN queue_taskbody b ON b.task_id = t.id",
    """CREATE FUNCTION queue_task_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_tasksearch (task_id, title, key, body)
        VALUES (NEW.id, NEW.title, NEW.key, '')
        ON CONFLICT (task_id) DO UPDATE SET title = EXCLUDED.title, key = EXCLUDED.key, body = '';
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE queue_tasksearch SET title = NEW.title, key = NEW.key WHERE task_id = NEW.id;
    ELSE
        DELETE FROM queue_tasksearch WHERE task_id = OLD.id;
    END IF;
    RETURN NULL;
END $$""",
    """CREATE FUNCTION queue_taskbody_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE queue_tasksearch SET body = '' WHERE task_id = OLD.task_id;
    ELSE
        UPDATE queue_tasksearch SET body = NEW.text WHERE task_id = NEW.task_id;
    END IF;
    RETURN NULL;
END $$""",
    "CREATE TRIGGER queue_task_search_insert AFTER INSERT OR DELETE ON queue_task "
    "FOR EACH ROW EXECUTE FUNCTION queue_task_search_sync()",
    "CREATE TRIGGER queue_task_search_update AFTER UPDATE OF title, key ON queue_task "
    "FOR EACH ROW WHEN (OLD.title IS DISTINCT FROM NEW.title OR OLD.key IS DISTINCT FROM NEW.key) "
    "EXECUTE FUNCTION queue_task_search_sync()",
    "CREATE TRIGGER queue_taskbody_search_write AFTER INSERT OR DELETE ON queue_taskbody "
    "FOR EACH ROW EXECUTE FUNCTION queue_taskbody_search_sync()",
    "CREATE TRIGGER queue_taskbody_search_update AFTER UPDATE OF text ON queue_taskbody "
    "FOR EACH ROW WHEN (OLD.text IS DISTINCT FROM NEW.text) "
    "EXECUTE FUNCTION queue_taskbody_search_sync()",
]
POSTGRES_DROP = [
    "DROP TRIGGER IF EXISTS queue_task_search_insert ON queue_task",
    "DROP TRIGGER IF EXISTS queue_task_search_update ON queue_task",
    "DROP TRIGGER IF EXISTS queue_taskbody_search_write ON queue_taskbody",
    "DROP TRIGGER IF EXISTS queue_taskbody_search_update ON queue_taskbody",
    "DROP FUNCTION IF EXISTS queue_task_search_sync()",
    "DROP FUNCTION IF EXISTS queue_taskbody_search_sync()",
]


def create_search(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        statements = SQLITE_CREATE
    elif schema_editor.connection.vendor == "postgresql":
        schema_editor.create_model(apps.get_model("queue", "TaskSearch"))
        statements = POSTGRES_CREATE
    else:
        raise NotImplementedError(f"no text search for {schema_editor.connection.vendor}")
    for sql in statements:
        schema_editor.execute(sql, params=None)


def drop_search(apps, schema_editor):
    statements = SQLITE_DROP if schema_editor.connection.vendor == "sqlite" else POSTGRES_DROP
    for sql in statements:
        schema_editor.execute(sql, params=None)
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.delete_model(apps.get_model("queue", "TaskSearch"))


class Migration(migrations.Migration):
    dependencies = [
        ("queue", "0013_transition_tally"),
    ]

    operations = [
        # The model is for Django's flush and the admin's reach; its table is made below.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="TaskSearch",
                    fields=[
                        (
                            "task",
                            models.OneToOneField(
                                db_constraint=False,
                                on_delete=models.deletion.DO_NOTHING,
                                primary_key=True,
                                related_name="+",
                                serialize=False,
                                to="queue.task",
                            ),
                        ),
                        ("title", models.TextField()),
                        ("key", models.TextField()),
                        ("body", models.TextField()),
                    ],
                ),
            ],
        ),
        migrations.RunPython(create_search, drop_search),
    ]
