"""Launch a herd's workers, then look at every running herd in short passes.

No consumer thread waits for a herd: the launch task starts the workers and returns, and a
pass every few seconds (herds.tasks) looks at each running herd once. The workers are the
fork server's children; their exit statuses come back to this process, kept in `children`
for whichever pass (in whichever consumer thread) looks next.

Every pass is idempotent: passes may overlap, with each other and with a cancel, and each
state change is a conditional UPDATE that only one of them wins.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from datetime import datetime

from django.conf import settings

from herds import processes, zygote
from herds.models import LAUNCH_FAILED, ExitClass, Herd, HerdStatus, HerdWorker
from herds.receivers import WORKER_ENV
from workqueue import clock, cpu_slots
from workqueue.dependencies import in_words
from workqueue.reaper import release_stale_claims

log = logging.getLogger("herds")

STAGGER_SECONDS = 0.05  # most random delay between two worker starts
# A worker row without a pid once its launch is lost: the process may still be starting
# (forked just before the consumer died) and will report its pid itself within this time.
START_GRACE_SECONDS = 10

# HerdWorker pk -> the process this consumer started, until its exit is recorded.
children: dict[int, zygote.WorkerProcess] = {}
_children_lock = threading.Lock()


def cancel_grace() -> float:
    return float(getattr(settings, "HYPERVISOR_CANCEL_GRACE", 5))


def log_path(herd: Herd, index: int):
    return settings.HYPERVISOR_DATA_DIR / "logs" / "herds" / str(herd.pk) / f"worker-{index}.log"


def worker_argv(herd: Herd, worker: HerdWorker) -> list[str]:
    """The arguments of `manage.py work` for one worker of this herd: the worker reads
    its profile (adapter, prompt, environment, limits, routing) from the database."""
    # `--name=value`: a value starting with "-" (a profile named `-fast`) is no option.
    argv = [
        f"--queue={herd.queue}",
        f"--herd={herd.pk}",
        f"--name={worker.name}",
        # A replacement finishes what is left of the batch of the worker it replaces.
        f"--batch={herd.batch_left(worker.index) or 0}",
        f"--profile={herd.profile.name}",
    ]
    if herd.dry_run:
        argv.append("--dry-run")
    argv += [f"--where={where}" for where in herd.filters]
    if herd.cores_taken_in_turns:
        # A replacement (index + size) takes the slot of the worker it replaces.
        folder = log_path(herd, worker.index).parent
        argv.append(f"--cpu-slot={cpu_slots.slot_path(folder, worker.index % herd.size)}")
    return argv


def start_worker(
    herd: Herd, index: int, replaces: HerdWorker | None = None
) -> tuple[HerdWorker, zygote.WorkerProcess | None]:
    worker = HerdWorker.objects.create(
        herd=herd,
        index=index,
        name=f"herd{herd.pk}-w{index}",
        host=settings.HYPERVISOR_HOST,
        log_path=str(log_path(herd, index)),
        replaces=replaces,
    )
    # A drain that came after the caller looked passed this row by: it tells live rows only.
    drained = Herd.objects.filter(pk=herd.pk, draining=True).values_list("reason", flat=True)
    for reason in drained:
        HerdWorker.objects.filter(pk=worker.pk, drain_reason="").update(
            drain_reason=reason[:500] or "draining"
        )
    # The profile's own environment (API keys, perhaps) goes to its agents only: the
    # worker reads it from the profile.
    env = {**os.environ, WORKER_ENV: str(worker.pk), "PYTHONUNBUFFERED": "1"}
    try:
        child = zygote.start(worker_argv(herd, worker), env, log_path(herd, index))
    except OSError as exc:
        worker.record_exit(None, ExitClass.CRASHED, f"could not start: {exc}")
        return worker, None
    with _children_lock:
        children[worker.pk] = child
    started = processes.create_time(child.pid)
    HerdWorker.objects.filter(pk=worker.pk).update(pid=child.pid, process_started=started)
    worker.pid, worker.process_started = child.pid, started
    return worker, child


def launch(herd_id: int) -> None:
    """Pre-flight and start the workers, then return: supervision passes do the rest."""
    herd = Herd.objects.select_related("profile").filter(pk=herd_id).first()
    if herd is None or not herd.start():
        return
    try:
        preflight = herd.record_preflight()
        agent = preflight.get("agent") or {}
        if agent.get("missing"):
            herd.finish(HerdStatus.FAILED, f"{LAUNCH_FAILED}: {agent['missing']}")
            return
        count = herd.workers_to_start()
        if count == 0:
            herd.finish(HerdStatus.FINISHED, nothing_ready_reason(preflight))
            return
        for index in range(count):
            if index:
                time.sleep(random.uniform(0, STAGGER_SECONDS))
            flags = Herd.objects.filter(pk=herd.pk).values("draining", "cancel_requested")[0]
            if flags["draining"] or flags["cancel_requested"]:
                break
            start_worker(herd, index)
        herd.mark_launched()
    except Exception as exc:
        log.exception("launch of herd %s failed", herd.pk)
        herd.mark_launched()
        herd.request_cancel(f"{LAUNCH_FAILED}: {exc}")


def stuck_words(preflight: dict) -> str:
    """What follows "N waiting on dependencies": the tasks that can never be claimed,
    " (2 of them cannot become ready: a: why; b: why)", or "" when none is."""
    count = preflight.get("stuck_count")
    if not count:
        return ""
    named = in_words([(s["key"], s["why"]) for s in preflight["stuck"]], count)
    return f" ({count} of them cannot become ready: {named})"


def nothing_ready_reason(preflight: dict) -> str:
    return (
        f"nothing ready in queue {preflight['queue']!r}: "
        f"{preflight['skipped_complete']} skipped (already complete), "
        f"{preflight['waiting']} waiting on dependencies{stuck_words(preflight)}, "
        f"{preflight['claimed']} claimed, {preflight['blocked']} blocked"
        + (
            f", {preflight['filtered_out']} ready but filtered out"
            if preflight.get("filtered_out")
            else ""
        )
    )


def supervise(herd: Herd) -> bool:
    """One pass over a running herd. Returns True while it still runs."""
    herd.refresh_from_db()
    if herd.status != HerdStatus.RUNNING:
        return False
    if herd.cancel_requested:
        end_processes(herd)
    elif not herd.draining:
        if herd.deadline_passed():
            herd.drain(f"wall-clock limit of {herd.wall_clock_limit} s reached")
        elif spent := herd.budget_spent():
            herd.drain(spent)
    lost = herd.launch_lost()
    now = clock.now()  # one read of the database's clock for the pass, not one a worker
    for worker in herd.workers.live():
        if worker.pid is None:
            # Being started right now by the launch task, unless that launch is over.
            if (lost or herd.launched_at is not None) and never_started(worker, now):
                worker.record_exit(
                    None, ExitClass.CRASHED, "never started: its launch stopped first"
                )
            continue
        check_worker(herd, worker, child_of(worker), now)
    herd.record_pass()
    if herd.workers.live().exists():
        return True
    if herd.launched_at is None:
        if not lost:
            return True
        # The workers the lost launch did start are the herd; its end says how they did.
        herd.mark_launched()
        if not herd.workers.exclude(pid=None).exists():
            return not herd.finish(
                HerdStatus.FAILED, "the launching consumer stopped before any worker started"
            )
    status = herd.end_status()
    herd.finish(status, herd.end_reason(status))
    return False


def never_started(worker: HerdWorker, now: datetime | None = None) -> bool:
    worker.refresh_from_db(fields=["pid", "heartbeat_at"])
    if worker.pid is not None or worker.heartbeat_at is not None:
        return False
    return ((now or clock.now()) - worker.started_at).total_seconds() > START_GRACE_SECONDS


def child_of(worker: HerdWorker) -> zygote.WorkerProcess | None:
    with _children_lock:
        return children.get(worker.pk)


def forget_exited_children() -> None:
    """Drop the processes whose exit is recorded (by this consumer or another)."""
    with _children_lock:
        ended = [pk for pk, child in children.items() if child.poll() is not None]
    if not ended:
        return
    recorded = set(HerdWorker.objects.filter(pk__in=ended).exited().values_list("pk", flat=True))
    with _children_lock:
        for pk in recorded:
            children.pop(pk, None)


def check_worker(
    herd: Herd,
    worker: HerdWorker,
    child: zygote.WorkerProcess | None,
    now: datetime | None = None,
) -> None:
    """`now`: the database's clock (workqueue.clock), read once by the caller's pass."""
    if worker.host != settings.HYPERVISOR_HOST:
        check_remote_worker(worker, now)
        return
    returncode = child.poll() if child is not None else None
    seen = processes.sample(worker.pid, worker.process_started)
    silent_since = worker.heartbeat_at or worker.started_at
    silence = ((now or clock.now()) - silent_since).total_seconds()
    timed_out = silence > settings.HYPERVISOR_LEASE_SECONDS
    if seen.alive and returncode is None:
        if timed_out:
            processes.terminate_trees([(worker.pid, worker.process_started)], cancel_grace())
            code = child.wait(timeout=5) if child is not None else None
            worker.record_exit(code, ExitClass.TIMED_OUT, f"no heartbeat for {silence:.0f} s")
            reap_worker(herd, worker)
            replace_worker(herd, worker)
            return
        record_sample(worker, seen)
        return
    code = child.wait(timeout=5) if child is not None else None
    if code is None:
        # Not our child (the consumer was restarted): use the code the worker reported as it
        # stopped, read now, since it may have been written after this pass loaded the row.
        worker.refresh_from_db(fields=["exit_code"])
        code = worker.exit_code
    if herd.cancel_requested:
        exit_class, detail = ExitClass.CANCELLED, herd.reason or "cancelled"
    else:
        exit_class, detail = worker.classify_exit(code)
        if exit_class == ExitClass.CRASHED and timed_out:
            # Killed for its silence by a pass that has not recorded it yet (it waits out
            # the grace before it does): the SIGKILL's code is not a crash.
            exit_class, detail = ExitClass.TIMED_OUT, f"no heartbeat for {silence:.0f} s"
        if exit_class == ExitClass.CRASHED:
            exit_class, detail = crash_in_log(herd, worker, detail, code)
    if worker.record_exit(code, exit_class, detail):
        said = f"{exit_class}: {detail}" if detail else exit_class
        log.info("herd %s: %s exited (%s)", herd.pk, worker.name, said)
    reap_worker(herd, worker)
    replace_worker(herd, worker)


def check_remote_worker(worker: HerdWorker, now: datetime | None = None) -> None:
    """A worker of another host: its pid means nothing here, only its heartbeat does.

    Its claims are not touched: they end with their lease, and the reaper takes them.
    """
    silent_since = worker.heartbeat_at or worker.started_at
    silence = ((now or clock.now()) - silent_since).total_seconds()
    if silence > settings.HYPERVISOR_LEASE_SECONDS:
        worker.record_exit(
            None, ExitClass.TIMED_OUT, f"no heartbeat from host {worker.host} for {silence:.0f} s"
        )


def crash_in_log(
    herd: Herd, worker: HerdWorker, detail: str, code: int | None = None
) -> tuple[str, str]:
    """What the end of a crashed worker's log says: a quota (the rest of the herd would hit
    it too, so the herd drains), else its last line (a start-up check's refusal, a
    traceback's last line) after `detail`. Not for a worker a signal killed: its last
    line is whatever it was doing, not why it ended."""
    text = log_tail(worker)
    pattern = herd.profile.quota_regex()
    found = pattern.search(text) if pattern is not None else None
    if found:
        detail = f"quota or rate limit reached ({found.group(0)[:200]})"
        herd.drain(f"{detail} in {worker.name}")
        return ExitClass.QUOTA, detail
    if code is not None and code < 0:
        return ExitClass.CRASHED, detail
    last = next((line.strip()[:300] for line in reversed(text.splitlines()) if line.strip()), "")
    return ExitClass.CRASHED, f"{detail}: {last}" if last else detail


def log_tail(worker: HerdWorker, tail_bytes: int = 64 * 1024) -> str:
    if not worker.log_path:
        return ""
    try:
        with open(worker.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def record_sample(worker: HerdWorker, seen: processes.Sample) -> None:
    now = time.time()
    percent = None
    if worker.cpu_seconds is not None and worker.sampled_at and now > worker.sampled_at:
        percent = round(
            100 * (seen.cpu_seconds - worker.cpu_seconds) / (now - worker.sampled_at), 1
        )
    HerdWorker.objects.filter(pk=worker.pk).live().update(
        cpu_seconds=seen.cpu_seconds,
        cpu_percent=max(0.0, percent) if percent is not None else None,
        sampled_at=now,
        rss_bytes=seen.rss_bytes,
        children=seen.children,
    )


def reap_worker(herd: Herd, worker: HerdWorker) -> None:
    """A dead worker's claims go back at once: its pid is gone, no need to wait for the lease.
    Each claim carries its profile's attempt limit, so the reaper applies it in the same write.
    A cancel's kill (its agent outlived the grace) is no fault of the task: not counted, or
    a few cancels would block it as abandoned."""
    if worker.pid:
        release_stale_claims(
            herd.queue,
            actor=f"herd {herd.pk} supervision",
            holder_pid=worker.pid,
            counted=not herd.cancel_requested,
        )


def replace_worker(herd: Herd, dead: HerdWorker) -> HerdWorker | None:
    """Start a worker in place of a dead one, once, when the herd wants it
    (Herd.take_replacement): after reap_worker gave the dead one's claims back. Its index
    is the dead one's plus the herd's size, free since each worker is replaced once."""
    if not herd.take_replacement(dead):
        return None
    worker, _ = start_worker(herd, dead.index + herd.size, replaces=dead)
    log.info(
        "herd %s: %s started in place of %s (%s; replacement %s of %s)",
        herd.pk,
        worker.name,
        dead.name,
        dead.exit_class,
        Herd.objects.filter(pk=herd.pk).values_list("replacements", flat=True)[0],
        herd.restart_budget(),
    )
    return worker


def end_processes(herd: Herd) -> None:
    """Cancel: every live worker's tree on this host gets SIGTERM, a grace period, then
    SIGKILL. Another host's workers are its consumer's to end (their pids mean other
    processes here), in its own pass; they drain meanwhile."""
    live = list(herd.workers.live().filter(host=settings.HYPERVISOR_HOST))
    if not live:
        return
    killed = processes.terminate_trees([(w.pid, w.process_started) for w in live], cancel_grace())
    for worker in live:
        child = child_of(worker)
        code = child.wait(timeout=5) if child is not None else None
        if code is None:
            worker.refresh_from_db(fields=["exit_code"])
            code = worker.exit_code
        detail = herd.reason or "cancelled"
        if worker.pid in killed:
            detail += " (killed after the grace period)"
        worker.record_exit(code, ExitClass.CANCELLED, detail)
        reap_worker(herd, worker)


def supervise_running_herds() -> int:
    """The periodic pass: each running herd once. Returns how many were looked at."""
    count = 0
    for herd in Herd.objects.running().select_related("profile"):
        try:
            supervise(herd)
        except Exception:
            # One herd's trouble (a vanished row, a psutil error) must not starve the rest.
            log.exception("supervision pass over herd %s failed", herd.pk)
        count += 1
    forget_exited_children()
    return count
