"""/metrics for Prometheus: the queues, the herds and the agents' spend, read at each scrape.

Workers are separate processes, often on other hosts, so this process counts nothing
itself: every number is an aggregate query on an index, or a tally the transitions keep
in the same transaction as their events (TransitionTally). A scrape costs the
same few queries however many tasks there are.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.views.decorators.cache import never_cache
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from herds.models import ENDED, Herd, HerdStatus, HerdWorker
from workqueue.models import (
    CLAIM_WAIT_BUCKETS,
    NOT_TIMED,
    EventKind,
    Status,
    Task,
    TransitionTally,
    waiting_by_queue,
)

FINISHED = (Status.DONE, Status.BLOCKED)  # event kinds named as the statuses they lead to


def queue_metrics() -> Iterator[Metric]:
    tasks = Task.objects.count_by("queue", "status")
    # A stale claim as the reaper sees it from any host: claimed, with a lease that ran
    # out. Its other half, a holder provably dead, needs the holder's own host's process
    # table; a dead holder stops renewing, so its lease runs out soon enough.
    stale = Task.objects.lease_expired().count_by("queue")
    # Ready, as Task.objects.ready() means it: queued, less those waiting on a dependency.
    waiting = waiting_by_queue()
    tally: dict[tuple[str, str], int] = {}
    waits: dict[tuple[str, int], tuple[int, float]] = {}
    for queue, kind, bucket, n, seconds in TransitionTally.objects.totals():
        tally[queue, kind] = tally.get((queue, kind), 0) + n
        if kind == EventKind.CLAIMED and bucket != NOT_TIMED:
            waits[queue, bucket] = (n, seconds)
    queues = sorted({q for q, _ in tasks} | {q for q, _ in tally})

    by_status = GaugeMetricFamily(
        "hypervisor_tasks", "Tasks by queue and status.", labels=["queue", "status"]
    )
    ready_tasks = GaugeMetricFamily(
        "hypervisor_tasks_ready",
        "Queued tasks whose dependencies are all done: what a worker would claim next.",
        labels=["queue"],
    )
    stale_claims = GaugeMetricFamily(
        "hypervisor_stale_claims",
        "Claims whose lease ran out: the reaper puts them back.",
        labels=["queue"],
    )
    claims = CounterMetricFamily(
        "hypervisor_task_claims", "Tasks claimed (claimed events).", labels=["queue"]
    )
    finishes = CounterMetricFamily(
        "hypervisor_task_finishes",
        "Tasks finished done or blocked, by workers or people (done and blocked events).",
        labels=["queue", "status"],
    )
    reaped = CounterMetricFamily(
        "hypervisor_stale_claims_reaped",
        "Stale claims the reaper took back (reaped events).",
        labels=["queue"],
    )
    claim_wait = HistogramMetricFamily(
        "hypervisor_claim_wait_seconds",
        "Seconds a task waited queued (since it was queued or last changed) until claimed.",
        labels=["queue"],
    )
    for queue in queues:
        for status in Status.values:
            by_status.add_metric([queue, status], tasks.get((queue, status), 0))
        queued = tasks.get((queue, Status.QUEUED), 0)
        # Two statements: a task claimed between them must not make the difference negative.
        ready_tasks.add_metric([queue], max(0, queued - waiting.get(queue, 0)))
        stale_claims.add_metric([queue], stale.get((queue,), 0))
        claims.add_metric([queue], tally.get((queue, EventKind.CLAIMED), 0))
        for status in FINISHED:
            finishes.add_metric([queue, status], tally.get((queue, status), 0))
        reaped.add_metric([queue], tally.get((queue, EventKind.REAPED), 0))
        buckets, total, seconds = [], 0, 0.0
        for bucket, le in enumerate(CLAIM_WAIT_BUCKETS):
            n, s = waits.get((queue, bucket), (0, 0.0))
            total, seconds = total + n, seconds + s
            buckets.append((floatToGoString(le), total))
        claim_wait.add_metric([queue], buckets, sum_value=seconds)
    yield from (by_status, ready_tasks, stale_claims, claims, finishes, reaped, claim_wait)


def herd_metrics() -> Iterator[Metric]:
    herds = Herd.objects.count_by_profile_and_status()
    workers = HerdWorker.objects.live_by_profile_and_state()
    usage = HerdWorker.objects.usage_by_profile()
    profiles = sorted({p for p, _ in herds} | set(usage))

    running = GaugeMetricFamily(
        "hypervisor_herds_running", "Herds running, by profile.", labels=["profile"]
    )
    ended = CounterMetricFamily(
        "hypervisor_herds_ended",
        "Herds ended, by profile and how: finished, failed, cancelled, quota (stopped by "
        "an agent's quota or rate limit).",
        labels=["profile", "status"],
    )
    live_workers = GaugeMetricFamily(
        "hypervisor_workers_running",
        "Worker processes of pending or running herds not yet exited (starting or running).",
        labels=["profile"],
    )
    tokens = CounterMetricFamily(
        "hypervisor_agent_tokens", "Tokens the agents of herds' workers used.", labels=["profile"]
    )
    cost = CounterMetricFamily(
        "hypervisor_agent_cost_usd",
        "USD the agents of herds' workers cost, as their CLIs reported it.",
        labels=["profile"],
    )
    for profile in profiles:
        running.add_metric([profile], herds.get((profile, HerdStatus.RUNNING), 0))
        for status in ENDED:
            ended.add_metric([profile, status], herds.get((profile, status), 0))
        live_workers.add_metric([profile], sum(n for (p, _), n in workers.items() if p == profile))
        used_tokens, used_usd = usage.get(profile, (0, 0))
        tokens.add_metric([profile], used_tokens)
        cost.add_metric([profile], float(used_usd))
    yield from (running, ended, live_workers, tokens, cost)


class DatabaseCollector:
    """The prometheus_client collector: everything from the database, at each scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from queue_metrics()
        yield from herd_metrics()


def scrape_refused(request: HttpRequest) -> HttpResponse | None:
    """Who may read: a scraper with the metrics token, or a staff user's session."""
    kind, _, secret = request.headers.get("Authorization", "").partition(" ")
    if kind:  # a scraper: its token alone decides, whoever's session rides along
        if kind.lower() == "bearer" and token_matches(secret.strip()):
            return None
        return _unauthorized("wrong metrics token")
    if not request.user.is_authenticated:
        return _unauthorized("log in as staff, or send Authorization: Bearer <metrics token>")
    if not request.user.is_staff:
        return HttpResponse("metrics are for staff\n", status=403, content_type="text/plain")
    return None


def token_matches(secret: str) -> bool:
    expected = settings.HYPERVISOR_METRICS_TOKEN
    # No token configured: staff only, and an empty secret never matches.
    return bool(expected) and hmac.compare_digest(secret.encode(), expected.encode())


def _unauthorized(message: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=401, content_type="text/plain")
    response["WWW-Authenticate"] = 'Bearer realm="hypervisor metrics"'
    return response


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    # Who asks comes before how: a stranger learns nothing, not even the methods.
    if refused := scrape_refused(request):
        return refused
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    registry = CollectorRegistry()
    registry.register(DatabaseCollector())
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
