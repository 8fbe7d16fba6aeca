"""Triage whose worker is SIGKILLed once its batch's files are renamed over the task
files, before it records them: the retry finds each file changed since its import."""

import os
import signal

from workqueue import triage
from workqueue.triage import TriageProcessor as Triage


def _die(written):
    if written:
        os.kill(os.getpid(), signal.SIGKILL)


triage._record_rows = _die

__all__ = ["Triage"]
