import json
import os
import sys

from django.core.management.base import CommandError

from hypervisor_site.terminal import PrintableCommand
from workqueue.dependencies import Stuck, report_lines
from workqueue.models import Queue, Task
from workqueue.names import queue_name_argument


class Command(PrintableCommand):
    help = (
        "Counts per status, claims per worker, stale claims, the oldest claim's age, and "
        "tokens and cost per queue."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--queue", type=queue_name_argument, help="one queue (default: every queue)"
        )
        parser.add_argument("--json", action="store_true", help="the figures as one JSON object")

    def handle(self, *args, **options):
        missing = options["queue"] and Queue.objects.missing(options["queue"])
        if missing:  # a typo would read as an empty queue
            raise CommandError(missing)
        stats = Task.objects.stats(options["queue"])
        try:
            self.report(stats, options)
            self.stdout.flush()  # here, not at exit: a closed pipe is heard of below
        except BrokenPipeError:
            # The reader went away (`| head -1`): nothing is wrong but the rest is unread.
            # Python would say so again flushing stdout at exit: it goes nowhere now.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)

    def report(self, stats: dict, options) -> None:
        if options["json"]:
            self.stdout.write(json.dumps(stats))
            return
        for status, count in stats["counts"].items():
            self.stdout.write(f"{status:>8}: {count}")
        for holder, count in stats["claimed_by"].items():
            self.stdout.write(f"  held by {holder}: {count}")
        self.stdout.write(f"stale claims: {stats['stale']}")
        self.stdout.write(f"waiting on dependencies: {stats['waiting']}")
        if stats["stuck"]:
            stuck = [Stuck(**s) for s in stats["stuck"]]
            self.stdout.write(f"cannot become ready: {len(stuck)}")
            for line in report_lines(stuck, options["queue"]):
                self.stdout.write(f"  {line}")
        for queue, usage in stats["usage"].items():
            self.stdout.write(
                f"{queue}: {usage['tokens']} tokens, ${usage['cost_usd']:.4f} (as the agents said)"
            )
        age = stats["oldest_claim_seconds"]
        self.stdout.write(f"oldest claim: {age:.0f} s" if age is not None else "oldest claim: -")
