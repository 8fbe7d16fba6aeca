"""`manage.py mcp --queue NAME`: this queue's claim engine as an MCP server over stdio."""

import functools
import os
import signal
import sys
import threading

from django.conf import settings
from django.core.management.base import CommandError
from django.db import DatabaseError, connection

from hypervisor_site.terminal import PrintableCommand
from workqueue import signals
from workqueue.mcp_server import serve_stdio
from workqueue.models import Queue
from workqueue.names import queue_name_argument
from workqueue.pull import Heartbeat, local_session
from workqueue.routing import FilterError, TaskFilter

# Clients end their stdio servers with signals (Claude Code: SIGINT, then SIGTERM 0.1 s
# later), often with stdin still open, where the server's reader thread would keep the
# process alive: the first signal ends the session and the process, the rest are ignored
# so that none cuts short the giving back of what the session holds.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Command(PrintableCommand):
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
        try:
            missing = Queue.objects.missing(options["queue"])
        except DatabaseError as exc:
            # Most likely a client that did not pass DATABASE_URL on (Gemini CLI, Codex):
            # the default database was opened, and it was never migrated.
            raise CommandError(
                f"cannot read the {connection.vendor} database {connection.settings_dict['NAME']}"
                f" ({str(exc).strip()}): give DATABASE_URL and HYPERVISOR_DATA_DIR in the "
                "agent's MCP config (its env)"
            ) from None
        if missing:  # the agent would be told there is no work, for ever
            self.stderr.write(f"warning: {missing}")
        session = local_session(options["queue"], options["name"], filters, options["lease"])
        beat = Heartbeat(session)
        beat.start()
        end = functools.partial(self.end_session, session, beat)
        for number in ENDING_SIGNALS:
            signal.signal(number, functools.partial(end_on_signal, end))
        try:
            serve_stdio(session)
        finally:
            ignore_ending_signals()
            end()

    def end_session(self, session, beat: Heartbeat) -> None:
        beat.stop()
        released = session.release_all("MCP session ended")
        if released:
            self.stderr.write(f"{session.identity.worker}: gave back {released} task(s)")
        session.owner_file.discard()
        signals.worker_stopped.send(sender=session, exit_code=0)
        connection.close()


def ignore_ending_signals() -> None:
    for number in ENDING_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def end_on_signal(end, number, frame) -> None:
    # The handler runs inside the server's event loop, where Django refuses the database:
    # the ending runs in a thread of its own, then the process exits.
    ignore_ending_signals()
    ending = threading.Thread(target=end)
    ending.start()
    ending.join()
    sys.stderr.flush()
    os._exit(128 + number)
