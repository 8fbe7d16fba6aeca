import json

from django.core.management.base import BaseCommand

from workqueue.dependencies import Stuck, report_lines
from workqueue.models import Task


class Command(BaseCommand):
    help = (
        "Counts per status, claims per worker, stale claims, the oldest claim's age, and "
        "tokens and cost per queue."
    )

    def add_arguments(self, parser):
        parser.add_argument("--queue", help="one queue (default: every queue)")
        parser.add_argument("--json", action="store_true", help="the figures as one JSON object")

    def handle(self, *args, **options):
        stats = Task.objects.stats(options["queue"])
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
