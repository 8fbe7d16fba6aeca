"""A no-op whose worker is SIGKILLed once a finished batch's temporaries are on disk,
before it renames any over its task files: the rows say done, the files do not yet."""

import os
import signal

from workqueue import editing
from workqueue.processors import NoopProcessor as Noop

_sync = editing.sync_files


def _sync_then_die(temporaries):
    _sync(temporaries)
    if temporaries:
        os.kill(os.getpid(), signal.SIGKILL)


editing.sync_files = _sync_then_die

__all__ = ["Noop"]
