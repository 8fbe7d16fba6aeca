"""`manage.py run_huey`: Huey's Django consumer command, served from this app.

huey.contrib.djhuey is left out of INSTALLED_APPS so that workers and other commands do
not import Huey at start-up; its consumer command is used from here, with the consumer of
herds.consumer (Huey's, saying a lost queue in a few lines rather than a traceback a
second). It imports each app's `tasks` module (herds.tasks) before consuming.
"""

from functools import partial

from django.core.management.base import CommandError
from django.db import connection
from huey.contrib.djhuey.management.commands.run_huey import Command as HueyCommand


class Command(HueyCommand):
    def handle(self, *args, **options):
        # A consumer that cannot reach the database would still take launches and bulk
        # actions off the shared queue, only to fail them; one that cannot reach the queue
        # as it starts is more likely misconfigured than waiting on a Redis that restarts
        # (which, once running, it says in a line and waits for). Either is said once, here.
        connection.ensure_connection()  # manage.py names the database's refusal
        connection.close()
        from huey.contrib.djhuey import HUEY

        try:
            HUEY.pending_count()
        except Exception as exc:
            raise CommandError(f"cannot reach Huey's queue: {' '.join(str(exc).split())}") from exc
        # Huey's command makes its consumer with HUEY.create_consumer(**options), which is
        # Consumer(HUEY, **options): here, in this process only, it is ours.
        from herds.consumer import Consumer

        HUEY.create_consumer = partial(Consumer, HUEY)
        super().handle(*args, **options)
