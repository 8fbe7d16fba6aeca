from django.db import migrations, models

TRIAGE = {
    "name": "triage",
    "description": "The built-in triage rules: close, classify, assign and link markdown tasks. "
    "The board's 'Triage this view' runs it as a dry run first.",
    "processor": "triage",
    "command": [],
    "prefetch": 50,
    "max_workers": 8,
}


def create_triage_profile(apps, schema_editor):
    Profile = apps.get_model("herds", "Profile")
    Profile.objects.get_or_create(name=TRIAGE["name"], defaults=TRIAGE)


def remove_triage_profile(apps, schema_editor):
    Profile = apps.get_model("herds", "Profile")
    Profile.objects.filter(name=TRIAGE["name"], herds__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("herds", "0005_herd_launcher")]

    operations = [
        migrations.AddField(
            model_name="herd",
            name="dry_run",
            field=models.BooleanField(
                default=False,
                help_text="Processors that write files only report what they would do.",
            ),
        ),
        migrations.RunPython(create_triage_profile, remove_triage_profile),
    ]
