#!/usr/bin/env python
import gc
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hypervisor_site.settings")
    from hypervisor_site.privacy import hide_environment

    hide_environment()  # agents run as our user: /proc/<pid>/environ must not be theirs
    if sys.argv[1:2] == ["work"]:
        # Loading Django makes a few hundred thousand objects that live as long as the
        # worker, and the cyclic collector would walk them again and again as they are made
        # (a tenth of a worker's start-up). The work command freezes them and turns it on.
        gc.disable()
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line
    from django.db import OperationalError

    try:
        execute_from_command_line(sys.argv)
    except (ImproperlyConfigured, OperationalError) as exc:
        # A setting the environment got wrong, or a database out of reach, is the
        # operator's to mend: one line saying which, not a traceback (--traceback shows it).
        if "--traceback" in sys.argv:
            raise
        what = "database" if isinstance(exc, OperationalError) else "settings"
        said = " ".join(str(exc).split())
        if isinstance(exc, OperationalError):
            from hypervisor_site.errors import disk_full

            if disk_full(exc):
                said += " (its disk is full: free space there, then run this again)"
        sys.exit(f"manage.py {' '.join(sys.argv[1:2])}: {what}: {said}")
