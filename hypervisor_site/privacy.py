"""What a process of ours keeps from the agents it starts, through the kernel.

An agent runs as our user, and any process of that user may read `/proc/<pid>/environ` of
the others: the worker's, the consumer's and the web server's SECRET_KEY, DATABASE_URL
and the rest. A process that is not "dumpable" has its /proc files owned by root, so the
agent cannot (its own environment, an allow-list, is its again after exec). And a worker
that is a "child subreaper" is given the orphans of its agent's tree, so a grandchild that
left the tree with setsid and a double fork is still found and ended with the agent.
"""

from __future__ import annotations

import ctypes

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def hide_environment() -> bool:
    """This process's /proc files (its environment among them) readable by root only."""
    return _prctl(PR_SET_DUMPABLE, 0)


def adopt_orphans() -> bool:
    """Orphans of this process's descendants become its children, not init's."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)
