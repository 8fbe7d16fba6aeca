"""Chaos: workers SIGKILLed at random and the Huey consumer killed and restarted during a
herd. Nothing is lost; a key runs twice only where its holder died mid-command."""

import os
import random
import signal
import sys
import time
from collections import Counter

import pytest

from herds import processes
from herds.models import Herd, HerdWorker, Profile
from tests.conftest import APPEND, make_tasks, run_manage, start_manage, work_appending
from tests.test_claims import lock_dirs
from tests.test_herds_processes import launch, wait_until, worker_logs
from workqueue.models import EventKind, Status, Task, TaskEvent

pytestmark = pytest.mark.slow


def test_herd_survives_killed_workers_and_a_killed_consumer(
    huey_env, consumer, tmp_path, lock_root
):
    log = tmp_path / "keys.log"
    Profile.objects.update_or_create(
        name="append",
        defaults={
            "processor": "command",
            "prefetch": 1,
            "timeout_seconds": 60,
            "max_workers": 8,
            "command": [sys.executable, "-S", APPEND, str(log), "{key}"],
        },
    )
    make_tasks("chaos", 2000)
    herd_id = launch(huey_env, "--queue", "chaos", "--profile", "append", "--workers", "8")
    wait_until(
        lambda: HerdWorker.objects.filter(herd_id=herd_id, pid__isnull=False).count() == 8,
        60,
        what="eight workers",
    )
    rng = random.Random(7)
    killed, restarted = [], None
    try:
        while len(killed) < 5:
            time.sleep(rng.uniform(0.2, 0.5))
            alive = [
                w
                for w in HerdWorker.objects.filter(herd_id=herd_id)
                if w.pid not in killed and processes.leader(w.pid, w.process_started)
            ]
            if not alive:
                break
            victim = rng.choice(alive)
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)
            if len(killed) == 2:
                consumer.kill()
                consumer.wait()
                with open(tmp_path / "consumer2.log", "w") as out:
                    restarted = start_manage(["run_huey"], huey_env, stdout=out, stderr=out)
        wait_until(lambda: Herd.objects.get(pk=herd_id).ended, 600, what="the herd to end")
    finally:
        if restarted is not None:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=30)
    # After the herd: reap what is left, and finish what the killed workers gave back.
    assert run_manage(["reap_locks"], huey_env).returncode == 0
    if Task.objects.filter(queue="chaos", status=Status.QUEUED).exists():
        rest = run_manage(
            work_appending(log, "chaos"),
            huey_env,
        )
        assert rest.returncode == 0, rest.stderr
    counts = Task.objects.filter(queue="chaos").counts()
    assert counts == {"queued": 0, "claimed": 0, "done": 2000, "blocked": 0}, worker_logs()
    seen = Counter(log.read_text().split())
    assert set(seen) == {f"t{i:06d}" for i in range(2000)}
    # Every run of a key after its first follows a reap of a claim whose holder died.
    reaps = Counter(
        TaskEvent.objects.filter(kind=EventKind.REAPED, task__queue="chaos").values_list(
            "task__key", flat=True
        )
    )
    unexplained = {key: n for key, n in seen.items() if n - 1 > reaps[key]}
    assert unexplained == {}, f"runs beyond the reaps of their claims: {unexplained}"
    assert lock_dirs(lock_root) == []
    herd = Herd.objects.get(pk=herd_id)
    crashed = [w for w in herd.summary["worker_processes"] if w["exit_class"] == "crashed"]
    assert sorted(w["pid"] for w in crashed) == sorted(killed), [
        (w["name"], w["exit_code"], w["exit_detail"]) for w in crashed
    ]
