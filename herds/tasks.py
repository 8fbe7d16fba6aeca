"""Huey tasks: launching herds, supervising them, and reaping stale claims."""

from __future__ import annotations

import logging

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task, on_commit_task, on_startup

from herds import supervision, zygote
from workqueue.claims import release_stale_claims

log = logging.getLogger("herds")


@on_startup()
def start_fork_server() -> None:
    # Ready before the first launch: starting it costs what it saves.
    zygote.warm_up()


@on_commit_task()
def launch_herd(herd_id: int) -> None:
    # Holds one consumer thread for the life of the herd: it is the workers' parent.
    supervision.launch(herd_id)


@on_commit_task()
def cancel_herd(herd_id: int) -> None:
    from herds.models import Herd

    herd = Herd.objects.select_related("profile").filter(pk=herd_id).first()
    if herd is not None:
        supervision.supervise(herd)


@db_periodic_task(crontab())
def supervise_herds() -> None:
    for herd_id in supervision.adopt_orphans():
        watch_herd(herd_id)
    supervision.supervise_running_herds()


@db_task()
def watch_herd(herd_id: int) -> None:
    # A herd adopted after its launch task was lost: watched every period until it ends.
    supervision.watch_adopted(herd_id)


@db_task()
def reap_stale_claims_now() -> None:
    report = release_stale_claims(actor="reaper (huey)")
    if report.requeued or report.blocked or report.orphan_locks:
        log.info("reaper: %s", report.as_dict())


@db_periodic_task(crontab())
def reap_stale_claims() -> None:
    # Huey's periodic tasks tick once a minute; shorter intervals are scheduled from here.
    reap_stale_claims_now.call_local()
    interval = settings.HYPERVISOR_REAP_INTERVAL
    for delay in range(interval, 60, interval):
        reap_stale_claims_now.schedule(delay=delay)
