import json
from datetime import timedelta

from django.core.management.base import CommandError
from django.utils import timezone

from hypervisor_site.terminal import PrintableCommand
from workqueue.retention import prune


class Command(PrintableCommand):
    help = (
        "Delete task events, agents' logs and transcripts, and ended herds' worker logs "
        "older than --days: nothing else removes them. Held claims and running herds keep "
        "theirs; the tasks, herds and their summaries stay."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--days", type=int, required=True, help="keep what is younger than this many days"
        )
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument("--json", action="store_true", help="the report as one JSON object")

    def handle(self, *args, **options):
        if options["days"] < 1:
            raise CommandError("--days: at least 1")
        before = timezone.now() - timedelta(days=options["days"])
        report = prune(before, dry_run=options["dry_run"])
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict()))
            return
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(
            f"{verb} {report.events:,} task event(s), {report.claim_files:,} agent log and "
            f"transcript file(s) and {report.herd_folders:,} herd log folder(s) "
            f"({report.bytes / 2**20:.1f} MiB) from before {before:%Y-%m-%d %H:%M} UTC"
        )
