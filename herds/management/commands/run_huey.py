"""`manage.py run_huey`: Huey's Django consumer command, served from this app.

huey.contrib.djhuey is left out of INSTALLED_APPS so that workers and other commands do
not import Huey at start-up; its consumer command is used unchanged from here. It
imports each app's `tasks` module (herds.tasks) before consuming.
"""

from huey.contrib.djhuey.management.commands.run_huey import Command  # noqa: F401
