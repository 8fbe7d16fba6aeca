"""The worker side of a herd: one UPDATE per batch keeps the row current and carries the stop."""

from __future__ import annotations

import sys
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from herds import receivers
from herds.models import ExitClass, Herd, HerdStatus, Profile, WorkerState
from tests.conftest import make_tasks
from workqueue import signals
from workqueue.models import EventKind, Status, Task
from workqueue.processing import Result
from workqueue.processors import CommandProcessor, NoopProcessor
from workqueue.worker import Worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def herd_worker(monkeypatch):
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="hot", profile=profile, size=1, status=HerdStatus.RUNNING)
    row = herd.workers.create(index=0, name="herd-w0", host="here")
    monkeypatch.setenv(receivers.WORKER_ENV, str(row.pk))
    return herd, row


def test_a_batch_costs_one_update_of_the_worker_row(herd_worker):
    herd, row = herd_worker
    make_tasks("hot", 30)
    worker = Worker("hot", NoopProcessor(), prefetch=10, herd=herd.pk, name="herd-w0")
    assert worker.work_one_batch()

    with CaptureQueriesContext(connection) as queries:
        assert worker.work_one_batch()

    herd_queries = [q["sql"] for q in queries.captured_queries if "herds_" in q["sql"]]
    assert len(herd_queries) == 1 and herd_queries[0].startswith("UPDATE")
    row.refresh_from_db()
    assert (row.done, row.blocked, row.current_task) == (20, 0, "")
    assert row.heartbeat_at is not None


def test_a_draining_herd_stops_its_workers_on_their_next_batch(herd_worker):
    herd, row = herd_worker
    make_tasks("hot", 30)
    worker = Worker("hot", NoopProcessor(), prefetch=10, herd=herd.pk, name="herd-w0")
    worker.work_one_batch()

    herd.drain("drained by the test")
    worker.work_one_batch()

    assert worker.stop_requested
    assert worker.stop_reason == "herd draining: drained by the test"
    row.refresh_from_db()
    assert row.done == 20  # the batch in hand still counts


def test_workers_outside_a_herd_are_left_alone(herd_worker):
    _herd, row = herd_worker
    make_tasks("hot", 5)
    worker = Worker("hot", NoopProcessor(), prefetch=5)
    with CaptureQueriesContext(connection) as queries:
        worker.work_one_batch()
    assert not [q for q in queries.captured_queries if "herds_" in q["sql"]]
    row.refresh_from_db()
    assert row.done == 0


class OneAtATime(NoopProcessor):
    """Takes a task at a time, as a command or an agent does; notes `look(context)` as
    each task begins."""

    finish_in_batches = False

    def __init__(self, look):
        self.look, self.seen = look, []

    def process(self, claim, context):
        self.seen.append(self.look(context))
        return super().process(claim, context)


def test_a_task_at_a_time_is_named_on_the_worker_row_as_it_starts(herd_worker):
    # The heartbeat named it up to 10 s later: a herd's page showed "–" for tasks of 5 s
    # while its agents' transcripts named them.
    herd, row = herd_worker
    make_tasks("hot", 1)
    processor = OneAtATime(lambda context: type(row).objects.get(pk=row.pk).current_task)
    worker = Worker("hot", processor, prefetch=1, herd=herd.pk, name="herd-w0")
    assert worker.work_one_batch()
    assert processor.seen == ["t000000"]
    row.refresh_from_db()
    assert (row.current_task, row.done) == ("", 1)


def test_a_drain_lets_the_task_just_started_run_to_its_end(herd_worker):
    # Naming the task must not heed the drain: stopping there ended the agent at once and
    # counted an attempt the task was not at fault for (a herd draining on a quota).
    herd, row = herd_worker
    make_tasks("hot", 2)
    processor = OneAtATime(lambda context: context.stopping())
    worker = Worker("hot", processor, prefetch=1, herd=herd.pk, name="herd-w0")
    herd.drain("drained by the test")
    assert worker.work_one_batch()
    assert processor.seen == [False]
    assert worker.stop_requested  # heeded at the finish, as before
    row.refresh_from_db()
    assert row.done == 1


def test_a_drained_workers_tasks_it_never_started_go_back_with_no_attempt_counted(herd_worker):
    """A worker holding a batch of 10 gave back the 9 it had not started with an attempt
    counted: three drains and one crash, and a task that never ran was blocked
    "abandoned after 3 attempts"."""
    herd, _row = herd_worker
    make_tasks("hot", 10)
    worker = None
    processor = OneAtATime(lambda context: worker.stop("herd draining: by the test"))
    worker = Worker("hot", processor, prefetch=10, herd=herd.pk, name="herd-w0")
    assert worker.work_one_batch()
    assert len(processor.seen) == 1
    tasks = Task.objects.order_by("key")
    assert [(t.status, t.attempts) for t in tasks] == [(Status.DONE, 1)] + [(Status.QUEUED, 0)] * 9
    released = tasks[1].events.get(kind=EventKind.RELEASED)
    assert released.message == "worker stopping: herd draining: by the test"


class DrainedWhileTheAgentWorks(CommandProcessor):
    """A person presses Drain while the agent works, and the worker's heartbeat (every 10 s
    in a herd) beats before the agent is done."""

    def __init__(self, herd, worker_of):
        agent = "import time; time.sleep(0.5); print('the work is done')"
        super().__init__([sys.executable, "-c", agent])
        self.herd, self.worker_of = herd, worker_of

    def process(self, claim, context, extra=None, cwd=None):
        self.herd.drain("drained by the test")
        signals.worker_heartbeat.send(sender=self.worker_of())
        return super().process(claim, context, extra, cwd)


def test_a_drain_heard_at_a_heartbeat_lets_the_agent_at_work_finish(herd_worker):
    """README: Drain "stops claiming and lets current tasks finish". The heartbeat heard
    the drain and stopped the worker, and the agent was ended on the same flag: the task
    went back as "worker stopped", its work thrown away and an attempt counted."""
    herd, _row = herd_worker
    make_tasks("hot", 2)
    worker = None
    processor = DrainedWhileTheAgentWorks(herd, lambda: worker)
    worker = Worker("hot", processor, prefetch=1, herd=herd.pk, name="herd-w0")
    worker.work_one_batch()
    first = Task.objects.get(key="t000000")
    assert (first.status, first.reason) == (Status.DONE, "")
    assert "the work is done" in first.output_tail
    assert worker.stop_requested and not worker.work_one_batch()
    assert Task.objects.get(key="t000001").status == Status.QUEUED


class GivesBackAfterSpending(NoopProcessor):
    """An agent that spent tokens, then gave its task back (a drain, a quota, exit 75)."""

    finish_in_batches = False

    def process(self, claim, context):
        return Result(status=Status.QUEUED, reason="worker stopped", tokens=500)


def test_the_run_summary_counts_the_tokens_the_herd_page_counts(herd_worker):
    """The page said "8,193 tokens" above a run summary of "0 tokens": the summary counted
    only the tasks done or blocked."""
    herd, _row = herd_worker
    make_tasks("hot", 1)
    worker = Worker("hot", GivesBackAfterSpending(), prefetch=1, herd=herd.pk, name="herd-w0")
    worker.work_one_batch()
    assert herd.total_tokens() == 500
    assert herd.build_summary()["total_tokens"] == 500


class SpendsThenFinishes(NoopProcessor):
    """A run that spent and gave its task back (a quota, a drain), then one that did it."""

    finish_in_batches = False

    def __init__(self):
        self.results = [
            Result(status=Status.QUEUED, reason="quota", tokens=5000, cost_usd=Decimal("0.027"),
                   data={"quota": True}),
            Result(status=Status.DONE, tokens=300, cost_usd=Decimal("0.002")),
        ]  # fmt: skip

    def process(self, claim, context):
        return self.results.pop(0)


def test_every_runs_spend_reaches_the_task_and_the_queues_totals():
    """A run that gave its task back kept its spend off the task's row: `queue_stats` said
    0 where the worker counted 5,000 tokens, and the next run's finish overwrote it."""
    make_tasks("hot", 1)
    runs = SpendsThenFinishes()
    for _ in runs.results[:]:  # a worker stopped by its quota; another one later
        Worker("hot", runs, prefetch=1).work_one_batch()
    task = Task.objects.get()
    assert (task.status, task.tokens, task.cost_usd) == (Status.DONE, 5300, Decimal("0.029"))
    usage = Task.objects.stats("hot")["usage"]["hot"]
    assert usage == {"tokens": 5300, "cost_usd": 0.029}


def test_a_worker_coming_up_after_its_row_was_recorded_exited_leaves_it_exited(monkeypatch):
    """A cancel during the launch records a row not yet started exited; the process
    arriving later wrote "running" back, on a herd already ended: its page and the admin
    showed the worker running, its heartbeat ageing for ever."""
    profile = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    herd = Herd.objects.create(queue="hot", profile=profile, size=1, status=HerdStatus.RUNNING)
    row = herd.workers.create(index=0, name="herd-w0", host="here")
    herd.request_cancel("cancelled by the test")
    row.refresh_from_db()
    row.record_exit(None, ExitClass.CANCELLED, "cancelled by the test")
    herd.finish(HerdStatus.CANCELLED, "cancelled by the test")
    monkeypatch.setenv(receivers.WORKER_ENV, str(row.pk))
    worker = Worker("hot", NoopProcessor(), herd=herd.pk, name="herd-w0")
    worker.run()
    row.refresh_from_db()
    assert worker.stop_requested
    assert (row.state, row.exit_class, row.pid) == (WorkerState.EXITED, ExitClass.CANCELLED, None)
