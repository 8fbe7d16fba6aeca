"""Triage whose worker is SIGKILLed once its batch's temporaries are on disk, before it
renames any of them over its task files: the window a crash leaves temporaries in."""

import os
import signal

from workqueue import triage
from workqueue.triage import TriageProcessor as Triage

_sync = triage.sync_files


def _sync_then_die(temporaries):
    _sync(temporaries)
    os.kill(os.getpid(), signal.SIGKILL)


triage.sync_files = _sync_then_die

__all__ = ["Triage"]
