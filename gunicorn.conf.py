"""gunicorn reads this file from the working directory (the repository's root, where the
README's deployment runs it) in its master process. The master never imports the
application, so the hide_environment() of hypervisor_site/wsgi.py covers only its workers:
an agent, run as our user, could read the master's SECRET_KEY and DATABASE_URL in
/proc/<pid>/environ."""

from hypervisor_site.privacy import hide_environment

hide_environment()
