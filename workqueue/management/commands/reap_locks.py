import json

from django.core.management.base import CommandError

from hypervisor_site.terminal import PrintableCommand
from workqueue.locks import every_refusal
from workqueue.models import Queue
from workqueue.names import queue_name_argument
from workqueue.reaper import release_stale_claims


class Command(PrintableCommand):
    help = "Release claims whose holder died or whose lease ran out, and orphan lock folders."

    def add_arguments(self, parser):
        parser.add_argument(
            "--queue",
            type=queue_name_argument,
            help="only this queue's claims (default: every queue)",
        )
        parser.add_argument("--dry-run", action="store_true", help="list, change nothing")
        parser.add_argument("--json", action="store_true", help="the report as one JSON object")

    @every_refusal()  # a person asked: each symlink met in the lock root is logged
    def handle(self, *args, **options):
        missing = options["queue"] and Queue.objects.missing(options["queue"])
        if missing:  # a typo would read as "nothing stale"
            raise CommandError(missing)
        report = release_stale_claims(options["queue"], dry_run=options["dry_run"])
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict()))
            return
        verb = "would release" if options["dry_run"] else "released"
        data = report.as_dict()
        for row in data["requeued"]:
            self.stdout.write(f"{verb} {row['queue']}/{row['key']} to queued: {row['why']}")
        for row in data["blocked"]:
            self.stdout.write(f"{verb} {row['queue']}/{row['key']} to blocked: {row['why']}")
        for path in data["orphan_locks"]:
            self.stdout.write(f"{verb} orphan lock {path}")
        for path in data["temporaries"]:
            self.stdout.write(f"removed {path}, a temporary file its dead worker left")
        requeued, blocked, orphans = (
            len(data[k]) for k in ("requeued", "blocked", "orphan_locks")
        )
        if options["dry_run"]:
            self.stdout.write(
                f"dry run, nothing changed: {requeued} to requeue, {blocked} to block, "
                f"{orphans} orphan lock(s) to remove"
            )
        else:
            temporaries = len(data["temporaries"])
            self.stdout.write(
                f"{requeued} requeued, {blocked} blocked, {orphans} orphan locks"
                + (f", {temporaries} temporary files" if temporaries else "")
            )
