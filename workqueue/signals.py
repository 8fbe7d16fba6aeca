"""Hooks for whoever supervises workers (the herds app) without the engine knowing it.

Receivers get the Worker as `sender`; they may set `sender.stop_requested` to drain it.
"""

from django.dispatch import Signal

worker_started = Signal()
worker_heartbeat = Signal()
# kwargs: claim. Sent as a processor that takes a task at a time (a command, an agent)
# starts one; a batch processor's tasks last microseconds and are not announced.
task_started = Signal()
tasks_processed = Signal()  # kwargs: done=[(Claim, Result)], before they are finished
tasks_finished = Signal()  # kwargs: finished=[(Claim, Result)], refused=[task ids]
worker_lock_failed = Signal()  # kwargs: message
worker_stopped = Signal()  # kwargs: exit_code
# A claim ended by someone other than its worker (reaper, a person): kwargs task (as it was
# before, holder and all), actor. Worktrees clean up on it.
claim_released = Signal()
