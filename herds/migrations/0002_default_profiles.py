from django.db import migrations

DEFAULTS = [
    {
        "name": "noop",
        "description": "Reads each task and marks it done: the baseline for throughput.",
        "processor": "noop",
        "command": [],
        "prefetch": 10,
        "max_workers": 16,
    },
    {
        "name": "example-agent",
        "description": "The bundled example agent: reads the task, waits a little, reports JSON.",
        "processor": "command",
        "command": [
            "{python}",
            "{base_dir}/examples/agents/example_agent.py",
            "{path}",
            "--sleep",
            "0.5",
        ],
        "timeout_seconds": 60,
        "prefetch": 1,
        "max_workers": 8,
        "quota_pattern": r"\b429\b|rate limit|quota exceeded",
    },
]


def create_profiles(apps, schema_editor):
    Profile = apps.get_model("herds", "Profile")
    for values in DEFAULTS:
        Profile.objects.get_or_create(name=values["name"], defaults=values)


def remove_profiles(apps, schema_editor):
    Profile = apps.get_model("herds", "Profile")
    Profile.objects.filter(name__in=[d["name"] for d in DEFAULTS], herds__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("herds", "0001_initial")]

    operations = [migrations.RunPython(create_profiles, remove_profiles)]
