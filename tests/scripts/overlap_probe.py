"""A CPU-bound processor that records when each worker was inside `process`, to a file
named by $OVERLAP_PROBE_FILE: one line "pid start end" per task."""

import os
import time

from workqueue.processing import Processor, Result


class Probe(Processor):
    name = "probe"
    cpu_bound = True
    ends_on_disk = False  # its tasks have no files: a turn is kept through the finish

    def process(self, claim, context) -> Result:
        started = time.monotonic()
        deadline = started + 0.005
        while time.monotonic() < deadline:  # a little CPU, as a built-in would spend
            pass
        line = f"{os.getpid()} {started} {time.monotonic()}\n"
        with open(os.environ["OVERLAP_PROBE_FILE"], "a") as probe:
            probe.write(line)
        return Result(outcome="probed")
