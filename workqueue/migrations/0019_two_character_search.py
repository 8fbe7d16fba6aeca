"""A text of two characters on SQLite: through the trigram index instead of a scan of every
task's text (TaskSearch._two_characters_sql). The search index's vocabulary lists the
trigrams that begin with the two characters; an index of the last two characters of each
title, key and body finds them where they begin no trigram. Claims and finishes never
write these indexes (SQLite updates an index on an expression only when a column in it
changes). PostgreSQL's trigram indexes do not serve two characters either, but there an
index on an expression is written by every claim, so it has none.

Like the search triggers (0014), these indexes go when a later migration remakes
queue_task or queue_taskbody on SQLite: create them again there."""

from django.db import migrations

SQLITE_CREATE = [
    "CREATE VIRTUAL TABLE queue_tasksearch_terms USING fts5vocab(queue_tasksearch, 'row')",
    "CREATE INDEX task_title_end ON queue_task (substr(title, -2))",
    "CREATE INDEX task_key_end ON queue_task (substr(key, -2))",
    "CREATE INDEX taskbody_text_end ON queue_taskbody (substr(text, -2))",
]
SQLITE_DROP = [
    "DROP TABLE IF EXISTS queue_tasksearch_terms",
    "DROP INDEX IF EXISTS task_title_end",
    "DROP INDEX IF EXISTS task_key_end",
    "DROP INDEX IF EXISTS taskbody_text_end",
]


def run(statements):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "sqlite":
            for sql in statements:
                schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [
        ("queue", "0018_tag_combinations_index"),
    ]

    operations = [migrations.RunPython(run(SQLITE_CREATE), run(SQLITE_DROP))]
