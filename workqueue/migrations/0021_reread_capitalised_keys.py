"""Files read before frontmatter keys were read in any case (`Status: done`, `Title:`)
are read again by the next import: their rows hold the keys as spelt and missed what
they say (a done task queued, no title), and an unchanged file is otherwise never read
again. Only those rows: the import's test for an unchanged file fails on them alone."""

from django.db import migrations

CHUNK = 2000


def forget_what_was_read(apps, schema_editor):
    Task = apps.get_model("queue", "Task")
    stale = []
    rows = Task.objects.exclude(source_path="").only("pk", "frontmatter")
    for task in rows.iterator(chunk_size=CHUNK):
        if any(isinstance(key, str) and key != key.lower() for key in task.frontmatter or {}):
            stale.append(task.pk)
    for start in range(0, len(stale), CHUNK):
        Task.objects.filter(pk__in=stale[start : start + CHUNK]).update(
            source_size=None, source_sha256=""
        )


class Migration(migrations.Migration):
    dependencies = [("queue", "0020_board_field_indexes_hold_values_only")]

    operations = [migrations.RunPython(forget_what_was_read, migrations.RunPython.noop)]
