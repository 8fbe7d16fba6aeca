"""An index of the tasks a herd's workers held, by herd and status.

A herd's triage review lists its proposals and refusals (polled every 2 s while it runs),
and its run summary lists what it finished: each read every task, 0.7 s a poll at
1,000,000 tasks on PostgreSQL. Only tasks a herd held have an entry.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("queue", "0026_task_status_postgresql")]

    operations = [
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("holder_herd__isnull", False)),
                fields=["holder_herd", "status"],
                name="task_herd",
            ),
        ),
    ]
