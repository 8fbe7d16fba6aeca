"""A hostile task folder: special files, loops, depth, unreadable folders, bad values, bad
queue names. Each is named in the report with its path; the good file beside it imports."""

import io

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from herds.forms import LaunchForm
from herds.models import Profile
from workqueue.importer import Importer
from workqueue.models import Queue, Task

pytestmark = pytest.mark.django_db

GOOD = "---\nid: good\ntitle: Good\n---\nBody.\n"


def import_folder(folder, queue="q"):
    return Importer(queue, [folder]).run([folder])


def errors_by_path(report) -> dict[str, str]:
    return {e["path"]: e["error"] for e in report.errors}


# Queue names ---------------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "a/b", "-rf", "q\n", "x" * 65, "caf\xe9"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_queue_name_is_refused_by_import_tasks_naming_it(name, write_task):
    write_task("good.md", GOOD)
    with pytest.raises(CommandError, match="argument --queue: queue name"):
        call_command(
            "import_tasks", str(write_task.folder), f"--queue={name}", stdout=io.StringIO()
        )
    assert not Task.objects.exists() and not Queue.objects.exists()


@pytest.mark.parametrize("command", ["work", "herd"])
def test_work_and_herd_refuse_an_empty_queue_name(command):
    extra = ["--processor", "noop"] if command == "work" else ["--profile", "x", "--workers", "1"]
    with pytest.raises(CommandError, match="queue name '' is not allowed"):
        call_command(command, "--queue=", *extra)


def test_importer_and_queue_model_refuse_an_empty_queue_name():
    with pytest.raises(ValidationError):
        Importer("")
    with pytest.raises(ValidationError, match="queue name 'a/b' is not allowed"):
        Queue(name="a/b").full_clean()
    Queue(name="inbox-2.b_c").full_clean()


def test_launch_form_refuses_a_bad_queue_name_already_in_the_database():
    Task.objects.create(queue="a/b", key="k")
    profile = Profile.objects.first()
    form = LaunchForm(data={"queue": "a/b", "profile": profile.name, "workers": 1, "batch": 0})
    assert not form.is_valid()
    assert "queue name 'a/b' is not allowed" in form.errors["queue"][0]
