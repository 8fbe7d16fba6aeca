"""Keep a herd's HerdWorker row current from inside the worker process.

The worker hot path pays one UPDATE per batch or heartbeat. That UPDATE is conditional on
the row having no drain reason, so the same statement tells the worker when to stop.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from decimal import Decimal

from django.db.models import F
from django.dispatch import receiver

from workqueue import clock, signals
from workqueue.models import Status

log = logging.getLogger("herds")

WORKER_ENV = "HYPERVISOR_HERD_WORKER"


def _worker_id() -> int | None:
    # Read each time, not cached: one process may run several workers (tests, herds'
    # fork server), and a cached "not a herd worker" would stick to all of them.
    try:
        return int(os.environ.get(WORKER_ENV, ""))
    except ValueError:
        return None


def _row(sender):
    """The HerdWorker row of this process, when it runs as part of a herd."""
    from herds.models import HerdWorker

    worker_id = _worker_id()
    if worker_id is None or sender.identity.herd is None:
        return None, None
    return HerdWorker, worker_id


def _update_or_stop(sender, HerdWorker, worker_id: int, **values) -> None:
    # Only a live row: one recorded exited (a cancel during the launch, before this
    # process came up) is not made "running" again on a herd that may have ended.
    if HerdWorker.objects.filter(pk=worker_id, drain_reason="").live().update(**values):
        return
    reason = HerdWorker.objects.filter(pk=worker_id).values_list("drain_reason", flat=True).first()
    HerdWorker.objects.filter(pk=worker_id).live().update(**values)
    sender.stop(f"herd draining: {reason}" if reason else "herd worker row is gone")


@receiver(signals.worker_started)
def worker_started(sender, **kwargs) -> None:
    HerdWorker, worker_id = _row(sender)
    if HerdWorker is None:
        return
    identity = sender.identity
    _update_or_stop(
        sender,
        HerdWorker,
        worker_id,
        pid=identity.pid,
        host=identity.host,
        process_started=identity.started,
        state="running",
        heartbeat_at=clock.stamp(),
    )


@receiver(signals.worker_heartbeat)
def worker_heartbeat(sender, **kwargs) -> None:
    HerdWorker, worker_id = _row(sender)
    if HerdWorker is None:
        return
    current = sender.current
    _update_or_stop(
        sender,
        HerdWorker,
        worker_id,
        heartbeat_at=clock.stamp(),
        current_task=current.key[:500] if current else "",
    )


@receiver(signals.task_started)
def task_started(sender, claim, **kwargs) -> None:
    # Said at once: the heartbeat comes up to 10 s later, after a short task has ended.
    # Only said: a drain is heeded after this task, as before (stopping here would end the
    # agent just started, and count an attempt the task was not at fault for).
    HerdWorker, worker_id = _row(sender)
    if HerdWorker is not None:
        HerdWorker.objects.filter(pk=worker_id).update(current_task=claim.key[:500])


@receiver(signals.tasks_finished)
def tasks_finished(sender, finished, refused, **kwargs) -> None:
    HerdWorker, worker_id = _row(sender)
    if HerdWorker is None:
        return
    refused = set(refused)
    done = blocked = tokens = 0
    cost = Decimal(0)
    quota = None
    for claim, result in finished:
        if claim.id in refused:
            continue
        done += result.status == Status.DONE
        blocked += result.status == Status.BLOCKED
        tokens += result.tokens
        cost += result.cost_usd or 0
        # The adapter gave the task back already, in the finish: the herd stops here.
        if result.status == Status.QUEUED and result.data.get("quota"):
            quota = quota or result
    _update_or_stop(
        sender,
        HerdWorker,
        worker_id,
        done=F("done") + done,
        blocked=F("blocked") + blocked,
        tokens=F("tokens") + tokens,
        cost_usd=F("cost_usd") + cost,
        heartbeat_at=clock.stamp(),
        current_task="",
    )
    if quota is not None:
        _drain_for_quota(sender, worker_id, quota)
    elif tokens or cost:
        _drain_if_budget_spent(sender)


def _drain_if_budget_spent(sender) -> None:
    # The worker checks after each batch, so a budget holds however late supervision runs.
    from herds.models import Herd

    herd = Herd.objects.filter(pk=sender.identity.herd).first()
    if herd is None or herd.draining:
        return
    if spent := herd.budget_spent():
        herd.drain(spent)
        sender.stop(f"herd draining: {spent}")


def _drain_for_quota(sender, worker_id: int, result) -> None:
    from herds.models import Herd, HerdWorker

    reason = f"{result.reason} in {sender.identity.worker}"
    resets_at = result.data.get("resets_at")
    HerdWorker.objects.filter(pk=worker_id).update(quota_hit=True)
    herd = Herd.objects.filter(pk=sender.identity.herd).first()
    if herd is not None:
        herd.quota_reached(reason, datetime.fromisoformat(resets_at) if resets_at else None)
    log.warning("%s: %s; draining the herd", sender.identity.worker, reason)
    sender.stop(reason)


@receiver(signals.worker_lock_failed)
def worker_lock_failed(sender, message, **kwargs) -> None:
    HerdWorker, worker_id = _row(sender)
    if HerdWorker is None:
        return
    HerdWorker.objects.filter(pk=worker_id).update(exit_detail=message[:500])


@receiver(signals.worker_stopped)
def worker_stopped(sender, exit_code, **kwargs) -> None:
    # Only the code: supervision marks the row exited once the process is really gone.
    HerdWorker, worker_id = _row(sender)
    if HerdWorker is None:
        return
    HerdWorker.objects.filter(pk=worker_id).update(exit_code=exit_code, current_task="")
