"""The worker loop: claim, process outside any transaction, finish, repeat."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.db import InterfaceError, OperationalError, connection

from hypervisor_site.writers import writer_clock
from workqueue import claims, signals, transitions
from workqueue.locks import Identity, LockError, OwnerFile
from workqueue.models import Status
from workqueue.processing import Claim, Processor, Result, WorkContext

if TYPE_CHECKING:
    from workqueue.cpu_slots import CpuSlot

log = logging.getLogger("workqueue.worker")

EXIT_OK = 0
EXIT_LOCK_ROOT = 3  # the lock root cannot take locks: nothing was claimed


@dataclass
class WorkerStats:
    claimed: int = 0
    done: int = 0
    blocked: int = 0
    released: int = 0
    refused: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    slowest_claim: float = 0.0
    # The process's writer clock at the start: a worker reports only its own time.
    writer_start: tuple[float, float] = field(default_factory=writer_clock.reading)

    def as_dict(self) -> dict:
        runtime = time.monotonic() - self.started
        finished = self.done + self.blocked
        waited_now, held_now = writer_clock.reading()
        waited_before, held_before = self.writer_start
        waited, held = waited_now - waited_before, held_now - held_before
        return {
            "claimed": self.claimed,
            "done": self.done,
            "blocked": self.blocked,
            "released": self.released,
            "refused": self.refused,
            "tokens": self.tokens,
            "runtime_seconds": round(runtime, 3),
            "items_per_second": round(finished / runtime, 1) if runtime else 0.0,
            "slowest_claim_seconds": round(self.slowest_claim, 4),
            "writer_wait_seconds": round(waited, 3),
            "writer_hold_seconds": round(held, 3),
        }


class ParentStops:
    """The stop signals (SIGINT, SIGTERM) the parent of forked workers received, counted
    in memory shared with them. A terminal's Ctrl-C reaches the whole foreground group,
    so each worker gets it from the terminal and again through the parent's forward; a
    signal sent to the parent alone reaches the workers only through it. A worker counts
    the larger of the signals it got itself and the parent's count: one press is one,
    whichever way it came and however late either way arrived."""

    # What the parent sends its workers: told apart from a signal of their own.
    notice = signal.SIGUSR1

    def __init__(self, context):
        self._count = context.RawValue("i", 0)
        self._signum = context.RawValue("i", 0)

    def record(self, signum: int) -> None:
        self._signum.value = signum
        self._count.value += 1

    @property
    def count(self) -> int:
        return self._count.value

    @property
    def signum(self) -> int:
        return self._signum.value


class Worker:
    def __init__(
        self,
        queue: str,
        processor: Processor,
        batch: int = 0,
        prefetch: int = 1,
        lease_seconds: int = 300,
        name: str | None = None,
        herd: int | None = None,
        filters=None,
        dry_run: bool = False,
        max_attempts: int | None = None,
        cpu_slot: CpuSlot | None = None,
    ):
        self.queue = queue
        self.cpu_slot = cpu_slot
        self.processor = processor
        self.batch = batch
        self.prefetch = max(1, prefetch)
        self.lease_seconds = lease_seconds
        self.identity = Identity.current(name, herd)
        self.owner_file = OwnerFile(self.identity)
        self.filters = filters
        self.max_attempts = max_attempts
        self.stats = WorkerStats()
        self.stop_requested = False
        self.database_patience = 120.0  # seconds a worker waits for its database to return
        self.stop_reason = ""
        self.current: Claim | None = None
        self.signals_received = 0  # a second one ends the agent at work now
        self.own_signals = 0  # sent to this process itself, not forwarded by a parent
        self.parent_stops: ParentStops | None = None
        self.context = WorkContext(
            self.identity.worker,
            lambda: self.stop_requested,
            dry_run,
            self._agent_started,
            ending=self._agent_must_end,
            why_ending=lambda: self.why_ending,
        )
        self.why_ending = ""
        # Tasks to pass over: an outside process holds their lock, or this worker gave
        # them back.
        self.busy: dict[int, float] = {}
        # The claims held now, by task id: what the heartbeat renews.
        self.held: dict[int, Claim] = {}
        # When each held claim's lease was last made fresh (monotonic, taken before the
        # write), and the claims the heartbeat found taken from us (by id and fence).
        self.renewed: dict[int, float] = {}
        self.lost: set[tuple[int, int]] = set()
        self.heartbeat_interval = max(0.5, min(self.lease_seconds / 3, 10))
        self._held_lock = threading.Lock()
        self._beating = threading.Event()

    # Signals only set flags: the first stops claiming and lets the task at hand finish,
    # the second ends its agent now (the task goes back to the queue).
    def install_signal_handlers(self, parent_stops: ParentStops | None = None) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if parent_stops is not None:
            self.parent_stops = parent_stops
            signal.signal(parent_stops.notice, self._on_parent_stop)
            if parent_stops.count:  # the parent was stopped while this worker started
                self._on_parent_stop(parent_stops.notice, None)

    def _on_signal(self, signum, frame) -> None:
        self.own_signals += 1
        self._count_stop(signum)

    def _on_parent_stop(self, notice, frame) -> None:
        self._count_stop(self.parent_stops.signum)

    def _count_stop(self, signum: int) -> None:
        presses = max(self.own_signals, self.parent_stops.count if self.parent_stops else 0)
        if presses <= self.signals_received:
            return  # a press already counted, reaching us the other way too
        self.signals_received = presses
        name = signal.Signals(signum).name
        if self.signals_received > 1:
            self.stop(f"received {name} twice")
            return
        self.stop(f"received {name}")
        if self.current is not None and not self.processor.finish_in_batches:
            with contextlib.suppress(OSError):  # print() is not safe in a signal handler
                os.write(
                    2,
                    f"{self.identity.worker}: finishing {self.current.key}, then stopping; "
                    f"{name} again ends its agent now\n".encode(errors="replace"),
                )

    def _agent_must_end(self) -> bool:
        """The agent at work is ended now: a second signal, or its claim is no longer ours
        to keep. Another host's reaper cannot end our agents; it takes back a claim whose
        lease ran out, so the holder ends its agent first: when the heartbeat finds the
        claim taken, or when its lease was last renewed nearly a lease ago (a database
        out of reach, a worker that was paused)."""
        claim = self.current
        if self.signals_received > 1 or claim is None:
            return self.signals_received > 1
        if (claim.id, claim.fence) in self.lost:
            self.why_ending = "its claim was taken back (its lease had run out)"
            return True
        unrenewed = time.monotonic() - self.renewed.get(claim.id, time.monotonic())
        if unrenewed > max(
            self.lease_seconds - self.heartbeat_interval, 2 * self.heartbeat_interval
        ):
            self.why_ending = f"its lease was not renewed for {unrenewed:.0f} s"
            return True
        return False

    def stop(self, reason: str) -> None:
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_reason = reason

    def run(self) -> int:
        signals.worker_started.send(sender=self)
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
        beat.start()
        code = EXIT_OK
        try:
            while not self.stop_requested and self.work_one_batch():
                pass
        except LockError as exc:
            log.error("%s: %s; stopped claiming", self.identity.worker, exc)
            self.stop(str(exc))
            signals.worker_lock_failed.send(sender=self, message=str(exc))
            code = EXIT_LOCK_ROOT
        finally:
            if self.cpu_slot is not None:
                self.cpu_slot.release()  # a turn may have time left: the next worker's now
            self._beating.set()
            beat.join(timeout=5)
            self.owner_file.discard()
        signals.worker_stopped.send(sender=self, exit_code=code)
        return code

    def remaining(self) -> int | None:
        if not self.batch:
            return None
        return self.batch - self.stats.done - self.stats.blocked - self.stats.released

    def work_one_batch(self) -> bool:
        """Claim, process and finish one batch. Returns False when there is no more work."""
        with self.cpu_slot or nullcontext():
            # A stop that came while waiting for the slot: claim nothing.
            return not self.stop_requested and self._work_one_batch()

    def _work_one_batch(self) -> bool:
        left = self.remaining()
        if left is not None and left <= 0:
            return False
        limit = self.prefetch if left is None else min(self.prefetch, left)
        started = time.monotonic()
        batch = self.with_database(
            claims.claim_ready_tasks,
            self.queue,
            self.identity,
            self.owner_file,
            limit,
            self.lease_seconds,
            self.filters,
            self.busy,
            self.max_attempts,
        )
        self.stats.slowest_claim = max(self.stats.slowest_claim, time.monotonic() - started)
        if not batch:
            return False
        self.stats.claimed += len(batch)
        self._hold(batch, started)
        done: list[tuple[Claim, Result]] = []
        for i, claim in enumerate(batch):
            if self.stop_requested:
                self.with_database(
                    claims.release_claims,
                    self.identity,
                    batch[i:],
                    self.owner_file,
                    f"worker stopping: {self.stop_reason}",
                    False,
                )
                self._let_go(batch[i:])
                self.stats.released += len(batch) - i
                break
            self.current, self.why_ending = claim, ""
            if not self.processor.finish_in_batches:
                signals.task_started.send(sender=self, claim=claim)
            result = self.processor.process(claim, self.context).storable()
            self.current = None
            done.append((claim, result))
            if not self.processor.finish_in_batches:
                self.finish(done)
                done = []
        if self.cpu_slot is not None and self.processor.ends_on_disk:
            self.cpu_slot.release()
        self.finish(done)
        return True

    def with_database(self, action, *args):
        """Run a claim or finish, riding out a database restart with backoff.

        Each attempt is one transaction: it either committed or left nothing behind, so
        trying again cannot double anything. A claim whose commit we never heard of is
        released by the reaper when its lease runs out.
        """
        deadline = time.monotonic() + self.database_patience
        delay = 0.1
        while True:
            try:
                return action(*args)
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "%s: database unavailable (%s); retrying in %.1f s",
                    self.identity.worker,
                    str(exc).strip()[:200],
                    delay,
                )
                connection.close()
                time.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    def _agent_started(self, claim: Claim, pgid: int, started: float) -> None:
        self.with_database(transitions.record_agent, self.identity, claim, pgid, started)

    def finish(self, done: list[tuple[Claim, Result]]) -> None:
        if not done:
            return
        signals.tasks_processed.send(sender=self, done=done)
        report = self.with_database(
            claims.finish_claims,
            self.identity,
            done,
            self.owner_file,
            self.processor.writes_status and not self.context.dry_run,
        )
        self._let_go([claim for claim, _ in done])
        refused = set(report.refused)
        for claim, result in done:
            if claim.id in refused:
                self.stats.refused += 1
                log.warning(
                    "%s: finish of %s refused: claim lost", self.identity.worker, claim.key
                )
                continue
            if result.status == Status.DONE:
                self.stats.done += 1
            elif result.status == Status.BLOCKED:
                self.stats.blocked += 1
            else:
                self.stats.released += 1
                claims.pass_over(self.busy, claim.id)
                if result.data.get("quota"):
                    # Every other task would hit the same limit: stop claiming.
                    self.stop(result.reason)
            self.stats.tokens += result.tokens
            if not self.processor.finish_in_batches:
                log.info(
                    "%s %s %s %s", claim.key, result.status, result.outcome, result.reason[:200]
                )
        signals.tasks_finished.send(sender=self, finished=done, refused=report.refused)

    def _hold(self, batch: list[Claim], since: float) -> None:
        with self._held_lock:
            self.held.update((claim.id, claim) for claim in batch)
            self.renewed.update((claim.id, since) for claim in batch)

    def _let_go(self, ended: list[Claim]) -> None:
        with self._held_lock:
            for claim in ended:
                self.held.pop(claim.id, None)
                self.renewed.pop(claim.id, None)
                self.lost.discard((claim.id, claim.fence))

    def _renew(self) -> None:
        with self._held_lock:
            held = list(self.held.values())
        if not held:
            return
        since = time.monotonic()
        kept = {c.id for c in held}
        if transitions.heartbeat(self.identity, held, self.lease_seconds) < len(held):
            kept = transitions.still_held(self.identity, held)
        with self._held_lock:
            for claim in held:
                if claim.id not in self.held:
                    continue  # finished meanwhile
                if claim.id in kept:
                    self.renewed[claim.id] = since
                elif (claim.id, claim.fence) not in self.lost:
                    # Taken back, or finished a moment ago: only an agent at work cares.
                    self.lost.add((claim.id, claim.fence))
                    if self.current is not None and self.current.id == claim.id:
                        log.warning(
                            "%s: claim of %s lost: its agent is ended",
                            self.identity.worker,
                            claim.key,
                        )

    def _heartbeat_loop(self) -> None:
        try:
            while not self._beating.wait(self.heartbeat_interval):
                try:
                    self._renew()
                    signals.worker_heartbeat.send(sender=self)
                except (OperationalError, InterfaceError) as exc:
                    # Out of reach or its disk full: one line a beat, as a claim's retries
                    # say it, not a traceback. The lease covers the gap.
                    log.warning(
                        "%s: heartbeat failed: database unavailable (%s)",
                        self.identity.worker,
                        str(exc).strip()[:200],
                    )
                except Exception:  # a lost heartbeat is retried; the lease covers the gap
                    log.exception("heartbeat failed")
                finally:
                    # Not kept between beats: a herd of N workers would hold 2N of the
                    # database's connections (PostgreSQL's default is 100).
                    connection.close()
        finally:
            connection.close()
