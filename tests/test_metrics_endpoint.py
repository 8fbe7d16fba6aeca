"""/metrics: who may read it, that its numbers are the database's, and what a scrape costs."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
import yaml
from django.db import connection
from django.db.models import Count
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from herds.models import ExitClass, Herd, HerdStatus, HerdWorker, Profile, WorkerState
from tests.conftest import ROOT, make_tasks
from tests.test_lock_root_hostile import dead_pid
from workqueue import reaper, transitions
from workqueue.locks import Identity
from workqueue.models import (
    Dependency,
    EventKind,
    Status,
    Task,
    TaskEvent,
    TransitionTally,
)
from workqueue.processing import Result

TOKEN = "m" * 40


@pytest.fixture
def token(settings) -> str:
    settings.HYPERVISOR_METRICS_TOKEN = TOKEN
    return TOKEN


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("ops", password="pw-ops-123", is_staff=True)


def scrape(client, **headers) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def bearer(secret: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


# Who may read -------------------------------------------------------------------------


@pytest.mark.django_db
def test_anonymous_is_refused_without_data(client, token):
    make_tasks("alpha", 1)
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"hypervisor_" not in response.content


@pytest.mark.django_db
def test_a_user_who_is_not_staff_is_refused(client, django_user_model, token):
    make_tasks("alpha", 1)
    client.force_login(django_user_model.objects.create_user("plain", password="pw-plain-123"))
    response = client.get("/metrics")
    assert response.status_code == 403
    assert b"hypervisor_" not in response.content


@pytest.mark.django_db
def test_a_staff_session_reads_the_metrics(client, staff):
    make_tasks("alpha", 2)
    client.force_login(staff)
    samples = scrape(client)
    assert value(samples, "hypervisor_tasks", queue="alpha", status="queued") == 2


@pytest.mark.django_db
def test_the_metrics_token_reads_the_metrics_without_a_session(client, token):
    make_tasks("alpha", 3)
    samples = scrape(client, **bearer(token))
    assert value(samples, "hypervisor_tasks_ready", queue="alpha") == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
    ],
)
def test_a_wrong_token_is_refused_even_with_a_staff_session(client, staff, token, authorization):
    make_tasks("alpha", 1)
    client.force_login(staff)  # a header that is sent decides alone
    response = client.get("/metrics", HTTP_AUTHORIZATION=authorization)
    assert response.status_code == 401
    assert b"hypervisor_" not in response.content


@pytest.mark.django_db
def test_without_a_configured_token_no_bearer_gets_in(client, settings):
    settings.HYPERVISOR_METRICS_TOKEN = ""
    assert client.get("/metrics", **bearer("")).status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer").status_code == 401


@pytest.mark.django_db
def test_metrics_answer_only_get_and_only_to_readers(client, django_user_model, staff):
    assert client.post("/metrics").status_code == 401
    client.force_login(django_user_model.objects.create_user("plain", password="pw-plain-123"))
    assert client.post("/metrics").status_code == 403
    client.force_login(staff)
    assert client.post("/metrics").status_code == 405
    assert client.head("/metrics").status_code == 200


# The numbers --------------------------------------------------------------------------


def worker(name: str) -> Identity:
    return Identity.current(name)


def known_queues() -> None:
    """alpha: 2 done, 1 blocked, 1 claimed with its lease run out, 2 ready, 1 waiting on
    a dependency; 4 claims after waiting 100 s. beta: one claim of a dead worker, reaped."""
    make_tasks("alpha", 6)
    Task.objects.filter(queue="alpha").update(updated_at=timezone.now() - timedelta(seconds=100))
    waits = Task.objects.create(queue="alpha", key="waits", depends_on=["t000005"])
    Task.objects.filter(pk=waits.pk).update(has_dependencies=True, priority=9)
    Dependency.objects.create(task=waits, key="t000005")
    me = worker("w-alpha")
    claimed = transitions.claim("alpha", me, 4, 300)
    assert [c.key for c in claimed] == ["t000000", "t000001", "t000002", "t000003"]
    transitions.finish(
        me,
        [
            (claimed[0], Result(status=Status.DONE)),
            (claimed[1], Result(status=Status.DONE)),
            (claimed[2], Result(status=Status.BLOCKED, reason="no")),
        ],
    )
    Task.objects.filter(pk=claimed[3].id).update(
        lease_expires_at=timezone.now() - timedelta(seconds=5)
    )

    make_tasks("beta", 2)
    dead = Identity("w-dead", me.host, dead_pid(), 1.0)
    assert len(transitions.claim("beta", dead, 1, 300)) == 1
    report = reaper.release_stale_claims(queue="beta")
    assert len(report.requeued) == 1


def known_herds() -> None:
    claude = Profile.objects.create(name="claude-m")
    gemini = Profile.objects.create(name="gemini-m")
    running = Herd.objects.create(queue="alpha", profile=claude, size=3, status=HerdStatus.RUNNING)
    quota = Herd.objects.create(queue="alpha", profile=claude, size=1, status=HerdStatus.QUOTA)
    done = Herd.objects.create(queue="beta", profile=gemini, size=1, status=HerdStatus.FINISHED)
    for herd, index, state, tokens, cost in [
        (running, 0, WorkerState.RUNNING, 1000, "0.50"),
        (running, 1, WorkerState.STARTING, 0, "0"),
        (running, 2, WorkerState.EXITED, 500, "0.25"),
        (quota, 0, WorkerState.EXITED, 300, "0.10"),
        (done, 0, WorkerState.EXITED, 200, "0.05"),
    ]:
        HerdWorker.objects.create(
            herd=herd,
            index=index,
            name=f"h{herd.pk}-w{index}",
            host="here",
            state=state,
            exit_class=ExitClass.QUOTA if herd == quota else "",
            tokens=tokens,
            cost_usd=Decimal(cost),
        )


@pytest.mark.django_db
def test_the_numbers_match_a_known_queue(client, token):
    known_queues()
    m = scrape(client, **bearer(token))
    assert {s: value(m, "hypervisor_tasks", queue="alpha", status=s) for s in Status.values} == {
        "queued": 3,
        "claimed": 1,
        "done": 2,
        "blocked": 1,
    }
    assert value(m, "hypervisor_tasks", queue="beta", status="queued") == 2
    assert value(m, "hypervisor_tasks_ready", queue="alpha") == 2
    assert value(m, "hypervisor_tasks_ready", queue="beta") == 2
    assert Task.objects.ready().count_by("queue") == {("alpha",): 2, ("beta",): 2}
    assert value(m, "hypervisor_stale_claims", queue="alpha") == 1
    assert value(m, "hypervisor_stale_claims", queue="beta") == 0
    assert value(m, "hypervisor_task_claims_total", queue="alpha") == 4
    assert value(m, "hypervisor_task_claims_total", queue="beta") == 1
    assert value(m, "hypervisor_task_finishes_total", queue="alpha", status="done") == 2
    assert value(m, "hypervisor_task_finishes_total", queue="alpha", status="blocked") == 1
    assert value(m, "hypervisor_task_finishes_total", queue="beta", status="done") == 0
    assert value(m, "hypervisor_stale_claims_reaped_total", queue="beta") == 1
    assert value(m, "hypervisor_stale_claims_reaped_total", queue="alpha") == 0

    def bucket(queue, le):
        return value(m, "hypervisor_claim_wait_seconds_bucket", queue=queue, le=le)

    # alpha's four claims waited 100 s (a little more by the time they were claimed).
    assert [bucket("alpha", le) for le in ("60.0", "300.0", "+Inf")] == [0, 4, 4]
    assert value(m, "hypervisor_claim_wait_seconds_count", queue="alpha") == 4
    assert 400 <= value(m, "hypervisor_claim_wait_seconds_sum", queue="alpha") < 440
    # beta's was claimed as soon as it was made.
    assert bucket("beta", "5.0") == 1
    assert value(m, "hypervisor_claim_wait_seconds_count", queue="beta") == 1


def depending(queue: str, key: str, *on: str, status: str = Status.QUEUED) -> Task:
    task = Task.objects.create(queue=queue, key=key, depends_on=list(on), status=status)
    Task.objects.filter(pk=task.pk).update(has_dependencies=True)
    Dependency.objects.bulk_create(Dependency(task=task, key=k) for k in on)
    return task


@pytest.mark.django_db
def test_ready_counts_what_ready_means_for_every_shape_of_dependency(client, token):
    make_tasks("alpha", 2)  # t000000 and t000001, queued
    Task.objects.filter(key="t000000").update(status=Status.DONE)
    depending("alpha", "half-done", "t000000", "t000001")  # waits on t000001
    depending("alpha", "all-done", "t000000")  # ready
    depending("alpha", "on-nothing-known", "nowhere")  # waits: never done
    depending("alpha", "claimed", "t000001", status=Status.CLAIMED)  # not queued at all
    depending("beta", "other-queue", "t000000")  # waits: beta has no t000000
    m = scrape(client, **bearer(token))
    ready = {q: value(m, "hypervisor_tasks_ready", queue=q) for q in ("alpha", "beta")}
    assert ready == {"alpha": 2, "beta": 0}  # t000001 and all-done
    assert {q: n for (q,), n in Task.objects.ready().count_by("queue").items()} == {"alpha": 2}


@pytest.mark.django_db
def test_the_numbers_match_known_herds(client, token):
    known_herds()
    m = scrape(client, **bearer(token))
    assert value(m, "hypervisor_herds_running", profile="claude-m") == 1
    assert value(m, "hypervisor_herds_running", profile="gemini-m") == 0
    assert value(m, "hypervisor_herds_ended_total", profile="claude-m", status="quota") == 1
    assert value(m, "hypervisor_herds_ended_total", profile="claude-m", status="finished") == 0
    assert value(m, "hypervisor_herds_ended_total", profile="gemini-m", status="finished") == 1
    assert value(m, "hypervisor_workers_running", profile="claude-m") == 2
    assert value(m, "hypervisor_workers_running", profile="gemini-m") == 0
    assert value(m, "hypervisor_agent_tokens_total", profile="claude-m") == 1800
    assert value(m, "hypervisor_agent_tokens_total", profile="gemini-m") == 200
    assert value(m, "hypervisor_agent_cost_usd_total", profile="claude-m") == pytest.approx(0.85)
    assert value(m, "hypervisor_agent_cost_usd_total", profile="gemini-m") == pytest.approx(0.05)


@pytest.mark.django_db
def test_the_tally_counts_every_event_the_transitions_record():
    known_queues()
    me = worker("w-more")
    [claim] = transitions.claim("alpha", me, 1, 300)
    [task] = Task.objects.filter(pk=claim.id)
    transitions.release_by_person([task], "nic")
    done = list(Task.objects.filter(queue="alpha", status=Status.DONE))
    transitions.requeue(done, "nic")
    transitions.mark_done(Task.objects.filter(queue="beta"), "nic")
    [late] = transitions.claim("alpha", me, 1, 300)
    transitions.release_by_person(Task.objects.filter(pk=late.id), "nic")
    transitions.finish(me, [(late, Result(status=Status.DONE))])  # refused: claim lost

    rows = TaskEvent.objects.values_list("task__queue", "kind").annotate(n=Count("id"))
    recorded = {(queue, kind): n for queue, kind, n in rows.order_by()}
    assert recorded[("alpha", EventKind.LATE_FINISH_REFUSED)] == 1
    assert recorded[("alpha", EventKind.RELEASED)] == 2
    assert tallied() == recorded


def tallied() -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for queue, kind, _, n, _ in TransitionTally.objects.totals():
        counts[queue, kind] = counts.get((queue, kind), 0) + n
    return counts


@pytest.mark.django_db
def test_processes_add_to_their_own_rows_and_the_scrape_sums_them(client, token, monkeypatch):
    make_tasks("alpha", 4)
    for shard in (3, 11):
        monkeypatch.setattr("workqueue.models.tally_shard", lambda shard=shard: shard)
        transitions.claim("alpha", worker(f"w{shard}"), 2, 300)
    assert TransitionTally.objects.filter(queue="alpha").count() == 2
    assert tallied() == {("alpha", EventKind.CLAIMED): 4}
    m = scrape(client, **bearer(token))
    assert value(m, "hypervisor_task_claims_total", queue="alpha") == 4
    assert value(m, "hypervisor_claim_wait_seconds_count", queue="alpha") == 4


@pytest.mark.django_db
def test_a_hold_from_a_file_counts_as_a_claim_without_a_wait(client, token):
    [task] = make_tasks("alpha", 1)
    assert transitions.hold_for_outside([task], "nic")
    m = scrape(client, **bearer(token))
    assert value(m, "hypervisor_task_claims_total", queue="alpha") == 1
    assert value(m, "hypervisor_claim_wait_seconds_count", queue="alpha") == 0


@pytest.mark.django_db
def test_the_readme_alert_rules_use_metrics_the_endpoint_serves(client, token):
    known_queues()
    known_herds()
    served = {name for name, _ in scrape(client, **bearer(token))}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics") : readme.index("## Benchmarks")]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    rules = [rule for block in blocks for g in block.get("groups", []) for rule in g["rules"]]
    assert len(rules) == 3
    for rule in rules:
        for name in re.findall(r"hypervisor_\w+", rule["expr"]):
            assert name in served, f"{rule['alert']}: {name}"


# The cost of a scrape -----------------------------------------------------------------


def scrape_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        scrape(client, **bearer(TOKEN))
    return len(queries)


@pytest.mark.django_db
def test_a_scrape_costs_the_same_few_queries_however_many_tasks(client, token):
    known_queues()
    known_herds()
    few = scrape_queries(client)
    assert few <= 8
    for queue in ("gamma", "delta"):
        make_tasks(queue, 1500)
        me = worker(f"w-{queue}")
        claimed = transitions.claim(queue, me, 300, 300)
        transitions.finish(me, [(c, Result(status=Status.DONE)) for c in claimed[:200]])
    assert Task.objects.count() > 3000
    assert scrape_queries(client) == few
