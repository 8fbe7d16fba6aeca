"""A processor whose worker process dies (exit 9, no clean-up) on the task keyed `t000000`."""

import os

from workqueue.processing import Result


def die_on_first(claim, context) -> Result:
    if claim.key == "t000000":
        os._exit(9)
    return Result()
