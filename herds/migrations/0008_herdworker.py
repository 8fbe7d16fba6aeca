from django.db import migrations


class Migration(migrations.Migration):
    """One class named Worker (the engine's): the herd's worker process row is HerdWorker."""

    dependencies = [
        ("herds", "0007_agent_profiles_and_quota"),
    ]

    operations = [migrations.RenameModel(old_name="Worker", new_name="HerdWorker")]
