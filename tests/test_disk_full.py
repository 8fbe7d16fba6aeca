"""A full disk (no blocks, or no inodes) under the task folder, the lock root, the data
dir and the database: nothing lost or half-written, no claim kept for good, and a message
that names what could not be written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tasks
from workqueue.models import Status, Task
from workqueue.processors import CommandProcessor
from workqueue.worker import EXIT_OK, Worker


@pytest.fixture
def tiny_filesystem(tmp_path):
    """Mount a small tmpfs (`size`, `nr_inodes`) at a new folder; unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "256k", inodes: int = 64) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs these as root)")
        path = tmp_path / name
        path.mkdir()
        options = f"size={size},nr_inodes={inodes}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"mount refused: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Take every block left in `folder`'s filesystem."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass


@pytest.mark.django_db(transaction=True)
def test_agent_output_that_fills_the_data_dir_ends_its_log_not_the_worker(
    settings, tiny_filesystem
):
    settings.HYPERVISOR_DATA_DIR = tiny_filesystem("data")
    make_tasks("q", 2)
    # A megabyte of output into a 256 KiB filesystem, then its last word.
    loud = "for i in range(12000): print('x' * 80)\nprint('the end')"
    worker = Worker("q", CommandProcessor([sys.executable, "-c", loud]), batch=2)

    assert worker.run() == EXIT_OK
    tasks = list(Task.objects.order_by("key"))
    assert [t.status for t in tasks] == [Status.DONE, Status.DONE]
    for task in tasks:
        log = settings.HYPERVISOR_DATA_DIR / "logs" / "agents" / f"task-{task.pk}-1.log"
        assert task.reason == f"the agent's log {log} stops short: No space left on device"
        assert task.output_tail.endswith("the end\n")
