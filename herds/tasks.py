"""Huey tasks: launching herds, short supervision passes, and reaping stale claims.

No task here holds a consumer thread for longer than a launch (a pre-flight and N forks) or
one look at each running herd. Huey's periodic tasks tick once a minute; the passes and
reaps in between are scheduled through this minute and the next, each minute by whichever
consumer claims it first.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task, on_commit_task, on_startup

from herds import supervision, zygote
from workqueue.reaper import release_stale_claims

log = logging.getLogger("herds")

PASSES = "herds:supervision-passes"
LAUNCH_UNSENT = 60  # seconds a herd may wait for its launch before it is sent again
REAPS = "herds:reaps"

_first_start = threading.Lock()
_started = False


@on_startup()
def start_consumer() -> None:
    # Ready before the first launch: starting it costs what it saves.
    zygote.warm_up()
    global _started
    with _first_start:
        # Startup hooks run once per consumer thread; this once per consumer.
        if _started:
            return
        _started = True
    # A consumer that starts after another died looks at once: a herd whose launch died
    # with it is adopted now, and claims its workers left behind are reaped now, not at
    # the next minute's tick.
    from herds.models import Herd

    launch_unsent(older_than=0)
    supervise_herds_now()
    if Herd.objects.running().exists():
        keep_covered(supervise_herds_now, PASSES, settings.HYPERVISOR_SUPERVISE_INTERVAL)
    reap_stale_claims_now()
    keep_covered(reap_stale_claims_now, REAPS, settings.HYPERVISOR_REAP_INTERVAL)


@on_commit_task()
def launch_herd(herd_id: int) -> None:
    supervision.launch(herd_id)
    keep_covered(supervise_herds_now, PASSES, settings.HYPERVISOR_SUPERVISE_INTERVAL)


@on_commit_task()
def cancel_herd(herd_id: int) -> None:
    from herds.models import Herd

    herd = Herd.objects.select_related("profile").filter(pk=herd_id).first()
    if herd is not None:
        supervision.supervise(herd)


@on_commit_task()
def herd_ended(herd_id: int) -> None:
    """Once a herd has ended: the webhook, and the next herd after a quota end."""
    from herds.models import Herd
    from herds.webhook import post_summary

    herd = Herd.objects.select_related("profile").filter(pk=herd_id).first()
    if herd is None:
        return
    if settings.HYPERVISOR_HERD_WEBHOOK:
        outcome = post_summary(
            settings.HYPERVISOR_HERD_WEBHOOK,
            herd.summary,
            settings.HYPERVISOR_HERD_WEBHOOK_TIMEOUT,
        )
        Herd.objects.filter(pk=herd.pk).update(webhook_result=outcome[:500])
    delay = herd.schedule_resume()
    if delay is not None:
        log.info("herd %s ended on quota; the next herd starts in %.0f s", herd.pk, delay)


@db_task()
def resume_herd(herd_id: int) -> None:
    from herds.models import Herd

    herd = Herd.objects.select_related("profile", "created_by").filter(pk=herd_id).first()
    if herd is None:
        return
    said = herd.resume_refused
    resumed = herd.resume()
    if resumed is not None:
        log.info("herd %s resumes herd %s after its quota", resumed.pk, herd.pk)
    elif herd.resume_refused and not said:
        log.warning("herd %s after its quota: %s", herd.pk, herd.resume_refused)


@db_task()
def supervise_herds_now() -> None:
    supervision.supervise_running_herds()


def launch_unsent(older_than: float) -> None:
    """Send the launch of every herd still pending after `older_than` seconds again. A
    launch is sent once the herd's row is committed: a process that died (or Huey's
    storage that was down) between the two left a herd no consumer was told of. A launch
    sent twice starts the herd once (Herd.start), so one merely slow to come is harmless."""
    from herds.models import Herd

    waited = Herd.objects.pending().filter(
        created_at__lte=timezone.now() - timedelta(seconds=older_than)
    )
    for herd_id in waited.values_list("pk", flat=True):
        launch_herd(herd_id)


@db_periodic_task(crontab())
def supervise_herds() -> None:
    from herds.models import Herd

    forget_earlier_minutes(PASSES)
    launch_unsent(older_than=LAUNCH_UNSENT)
    if Herd.objects.running().exists():
        supervise_herds_now.call_local()
        keep_covered(supervise_herds_now, PASSES, settings.HYPERVISOR_SUPERVISE_INTERVAL)


@db_task()
def reap_stale_claims_now() -> None:
    report = release_stale_claims(actor="reaper (huey)")
    if report.requeued or report.blocked or report.orphan_locks:
        log.info("reaper: %s", report.as_dict())


@db_periodic_task(crontab())
def reap_stale_claims() -> None:
    forget_earlier_minutes(REAPS)
    reap_stale_claims_now.call_local()
    keep_covered(reap_stale_claims_now, REAPS, settings.HYPERVISOR_REAP_INTERVAL)


def keep_covered(task, name: str, interval: int) -> None:
    """Schedule `task` every `interval` s through the rest of this minute and all of the next.

    Huey's periodic tick comes 60 s after the last, counted from when the consumer started,
    not on the minute: a tick at :50 must cover until the next one at :50, so covering only
    this minute's rest would leave 50 s with no pass. Each minute is scheduled once across
    every consumer sharing this Huey (the first to store its key does it), so ten launches
    at once do not schedule ten sets of passes. The scheduled runs live in Huey's storage
    and outlast a consumer that dies.
    """
    if interval >= 60:
        return  # the periodic tick is often enough
    now = time.time()
    this_minute = int(now // 60) * 60
    for minute in (this_minute, this_minute + 60):
        if not HUEY.put_if_empty(f"{name}:{minute}", True):
            continue
        for at in range(minute, minute + 60, interval):
            if at > now:
                task.schedule(delay=at - now)


def forget_earlier_minutes(name: str) -> None:
    minute = int(time.time() // 60) * 60
    for earlier in (minute - 60, minute - 120):
        HUEY.delete(f"{name}:{earlier}")
