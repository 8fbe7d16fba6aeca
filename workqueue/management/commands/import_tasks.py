import json
import sys
from pathlib import Path

from django.core.management.base import CommandError

from hypervisor_site.terminal import PrintableCommand
from workqueue.dependencies import report_lines, stuck
from workqueue.importer import Importer, named_folder
from workqueue.names import queue_name_argument


class Command(PrintableCommand):
    help = "Import markdown task files (folders, .md files or .txt queue files) into a queue."

    def add_arguments(self, parser):
        parser.add_argument(
            "paths",
            nargs="+",
            metavar="PATH",
            help="a folder of task files (read recursively), a .md file, or a queue file "
            "listing task files one per line; a folder named here is an import root for this run",
        )
        parser.add_argument(
            "--queue",
            default="default",
            type=queue_name_argument,
            help="the queue the tasks go into (default: %(default)s)",
        )
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    def handle(self, *args, **options):
        paths = [Path(p) for p in options["paths"]]
        # What the command line names is allowed for this run: a folder is an import root,
        # and so is the folder of a named .md file (only that file is read from it). Paths
        # listed in a queue file stay confined to the roots and the queue file's folder.
        # A root is the place named, not a symlink's target (workqueue.importer.named_place).
        roots = [p for p in paths if p.is_dir()]
        roots += [named_folder(p) for p in paths if p.suffix == ".md" and p.exists()]
        progress = sys.stderr.isatty() and not options["json"]
        report = Importer(options["queue"], roots, progress=progress).run(paths)
        # Tasks that wait for ever say nothing on their own: say it now (not an error: the
        # task they need may be imported next).
        cannot = stuck(options["queue"])
        if options["json"]:
            summary = {**report.as_dict(), "stuck": [s.as_dict() for s in cannot]}
            self.stdout.write(json.dumps(summary))
        else:
            for error in report.errors:
                self.stderr.write(f"{error['path']}: {error['error']}")
            self.stdout.write(report.summary())
            for line in report_lines(cannot, options["queue"]):
                self.stderr.write(f"warning: {line}")
        # A refused file fails the command even when the rest went in, so a script or a
        # cron job that checks the exit code hears of it; the rest stay imported.
        if report.refused:
            raise CommandError("nothing could be imported")
        if report.errors:
            refused = len(report.errors)
            raise CommandError(
                f"{refused:,} file{'s' if refused != 1 else ''} could not be imported "
                "(each named with its path); the others were"
            )
