from django.db import migrations, models

# Plain SQL: the same on SQLite and PostgreSQL, and one statement for a million tasks.
COPY_OUT = 'INSERT INTO "queue_taskbody" ("task_id", "text") SELECT "id", "body" FROM "queue_task"'
COPY_BACK = (
    'UPDATE "queue_task" SET "body" = COALESCE((SELECT "text" FROM "queue_taskbody" '
    'WHERE "queue_taskbody"."task_id" = "queue_task"."id"), \'\')'
)


class Migration(migrations.Migration):
    dependencies = [
        ("queue", "0005_task_change_pending_index"),
    ]

    operations = [
        migrations.CreateModel(
            name="TaskBody",
            fields=[
                (
                    "task",
                    models.OneToOneField(
                        on_delete=models.deletion.CASCADE,
                        primary_key=True,
                        related_name="content",
                        serialize=False,
                        to="queue.task",
                    ),
                ),
                ("text", models.TextField(blank=True)),
            ],
        ),
        migrations.RunSQL(COPY_OUT, COPY_BACK),
        migrations.RemoveField(model_name="task", name="body"),
    ]
