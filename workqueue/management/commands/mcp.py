"""`manage.py mcp --queue NAME`: this queue's claim engine as an MCP server over stdio."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from workqueue import signals
from workqueue.mcp_server import serve_stdio
from workqueue.models import Queue
from workqueue.names import queue_name_argument
from workqueue.pull import Heartbeat, local_session
from workqueue.routing import FilterError, TaskFilter


class Command(BaseCommand):
    help = "Serve the queue's tools (claim_next_task, complete_task, ...) to an agent over MCP."
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--queue", required=True, type=queue_name_argument)
        parser.add_argument(
            "--where",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="claim only matching tasks (repeatable), as `work --where`",
        )
        parser.add_argument("--name", default="", help="session name; the holder is mcp:NAME")
        parser.add_argument("--lease", type=int, default=settings.HYPERVISOR_LEASE_SECONDS)

    def handle(self, *args, **options):
        try:
            filters = TaskFilter.parse(options["where"])
        except FilterError as exc:
            raise CommandError(str(exc)) from None
        if options["lease"] < 1:
            raise CommandError("--lease must be >= 1")
        if len(options["name"]) > 100 or not options["name"].isprintable():
            raise CommandError("--name: at most 100 printable characters")
        # stdout is the protocol's: the SDK points fd 1 at stderr while it serves, and
        # logging goes to stderr anyway.
        missing = Queue.objects.missing(options["queue"])
        if missing:  # the agent would be told there is no work, for ever
            self.stderr.write(f"warning: {missing}")
        session = local_session(options["queue"], options["name"], filters, options["lease"])
        beat = Heartbeat(session)
        beat.start()
        try:
            serve_stdio(session)
        finally:
            beat.stop()
            released = session.release_all("MCP session ended")
            if released:
                self.stderr.write(f"{session.identity.worker}: gave back {released} task(s)")
            session.owner_file.discard()
            signals.worker_stopped.send(sender=session, exit_code=0)
            connection.close()
