from tests.conftest import make_tasks, run_manage
from workqueue.models import Task


def test_work_command_finishes_every_task(process_env):
    make_tasks("q", 20)
    result = run_manage(["work", "--queue", "q", "--prefetch", "5", "--json"], process_env)
    assert result.returncode == 0, result.stderr
    assert Task.objects.counts()["done"] == 20
