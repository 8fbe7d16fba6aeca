"""`manage.py lock_path QUEUE KEY`: the lock directory a task's claim takes, for outside
tools that lock tasks the way workers do (`mkdir` of that path, `owner.json` inside)."""

from hypervisor_site.terminal import PrintableCommand
from workqueue import locks
from workqueue.names import queue_name_argument


class Command(PrintableCommand):
    help = "Print the lock directory of a task (a key that is a path is percent-encoded)."
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("queue", type=queue_name_argument)
        parser.add_argument("key", nargs="+", help="task keys (the frontmatter id, else the path)")

    def handle(self, *args, **options):
        for key in options["key"]:
            self.stdout.write(locks.lock_path(options["queue"], key))
