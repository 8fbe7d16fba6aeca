"""A consumer whose Redis goes away for a while: a few lines, not a traceback a second.

A real consumer (`manage.py run_huey`) on a real redis-server of the test's own, on a free
port, which the test stops and starts again; the machine's Redis is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from herds.consumer import QueueOutage, without_password
from tests.conftest import make_tasks, start_manage
from tests.test_herds_processes import wait_until
from tests.test_lock_root_hostile import dead_pid
from workqueue.models import Status, Task

PASSWORD = "not-for-the-log"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@contextlib.contextmanager
def redis_server(port: int, log_path):
    with open(log_path, "a") as log:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", PASSWORD],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: answers(port), 20, interval=0.05, what="redis-server to listen")
        yield server
    finally:
        server.terminate()
        server.wait(timeout=20)


def stale_claim(queue: str) -> Task:
    """A claim whose holder is gone and whose lease ran out: the reaper's to give back."""
    [task] = make_tasks(queue, 1)
    Task.objects.filter(pk=task.pk).update(
        status=Status.CLAIMED,
        holder="gone",
        holder_host=settings.HYPERVISOR_HOST,
        holder_pid=dead_pid(),
        holder_started=1.0,
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        claimed_at=timezone.now() - timedelta(minutes=5),
    )
    return task


def given_back(task: Task) -> bool:
    return Task.objects.get(pk=task.pk).status == Status.QUEUED


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_consumer_whose_redis_goes_away_says_so_in_a_few_lines_and_runs_on(
    process_env, tmp_path, monkeypatch
):
    # Huey's scheduler logged a traceback each second Redis was down, and each worker
    # thread one each time it tried again: some hundred in a minute.
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    shown = f"redis://127.0.0.1:{port}/0"
    name = f"test-outage-{uuid.uuid4().hex[:12]}"
    # Set here, whatever this run's own Huey is: the consumer's queue is this Redis.
    env = {**process_env, "HUEY_REDIS_URL": url, "HUEY_NAME": name, "HUEY_LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "consumer.log"
    first = stale_claim("before")
    with redis_server(port, tmp_path / "redis.log"):
        with open(log_path, "w") as log:
            consumer = start_manage(["run_huey"], env, stdout=log, stderr=log)
        # Its start-up reap gives the claim back: it runs, and reaches Redis.
        wait_until(lambda: given_back(first), 60, what="the consumer's start-up reap")
    try:
        time.sleep(13)  # Redis is down: the first line and one reminder at most
        down = log_path.read_text()
        assert consumer.poll() is None, down
        assert "Traceback" not in down
        said = [line for line in down.splitlines() if "Huey's queue" in line]
        assert 1 <= len(said) <= 3, down
        assert all(shown in line for line in said), said
        assert f"Huey's queue at {shown} is out of reach (" in said[0]
        noise = [line for line in down.splitlines() if "ERROR" in line or "WARNING" in line]
        assert noise == said, down

        with redis_server(port, tmp_path / "redis.log"):
            wait_until(
                lambda: f"Huey's queue at {shown} answers again" in log_path.read_text(),
                30,
                what="the consumer to say Redis answers again",
            )
            # And it takes work again: a reap enqueued into its queue runs.
            from huey.contrib.djhuey import HUEY
            from huey.storage import RedisStorage

            from herds.tasks import reap_stale_claims_now

            monkeypatch.setattr(HUEY, "name", name)
            monkeypatch.setattr(HUEY, "storage", RedisStorage(name, url=url))
            second = stale_claim("after")
            reap_stale_claims_now()
            wait_until(lambda: given_back(second), 60, what="a reap run after Redis came back")
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(timeout=30)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    whole = log_path.read_text()
    assert "Traceback" not in whole
    assert PASSWORD not in whole
    said = [line for line in whole.splitlines() if "Huey's queue" in line]
    assert len(said) <= 4, whole


def test_a_redis_url_is_shown_without_its_password():
    assert without_password("redis://:pw@10.0.0.5:6380/2") == "redis://10.0.0.5:6380/2"
    assert without_password("rediss://ops:pw@cache:6379/0?password=pw&ssl_cert_reqs=none") == (
        "rediss://ops@cache:6379/0?ssl_cert_reqs=none"
    )
    assert without_password("unix:///run/redis.sock?db=1&password=pw") == (
        "unix:///run/redis.sock?db=1"
    )
    assert without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_an_outage_is_said_once_reminded_every_ten_seconds_and_its_end_said(caplog):
    now = [100.0]
    outage = QueueOutage("redis://q:6379/0", clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="huey.consumer"):
        outage.reached()  # nothing was wrong: nothing to say
        for _ in range(25):  # a failed read every half second for 12 s
            outage.lost(ConnectionError("Error 111 connecting"), "reading the schedule")
            now[0] += 0.5
        outage.reached()
        outage.reached()
        outage.lost(ConnectionError("Error 111 connecting"), "reading the queue")
    said = [record.getMessage() for record in caplog.records]
    assert said == [
        "Huey's queue at redis://q:6379/0 is out of reach (reading the schedule): Error 111 "
        "connecting; retrying, with a reminder every 10 s while it lasts",
        "Huey's queue at redis://q:6379/0 is still out of reach after 10 s (21 failed reads "
        "and writes): Error 111 connecting",
        "Huey's queue at redis://q:6379/0 answers again, after 12 s out of reach",
        "Huey's queue at redis://q:6379/0 is out of reach (reading the queue): Error 111 "
        "connecting; retrying, with a reminder every 10 s while it lasts",
    ]
