"""Settings of the django-tasks baseline: its database backend and nothing else."""

import os

import dj_database_url

SECRET_KEY = "bench-only"  # noqa: S105 (a throwaway database, no sessions)
USE_TZ = True
INSTALLED_APPS = ["django_tasks", "django_tasks_db"]
DATABASES = {"default": dj_database_url.parse(os.environ["BENCH_PEER_DATABASE_URL"])}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # What django-tasks-db asks of SQLite: WAL and IMMEDIATE transactions for its claims.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
LOGGING = {"version": 1, "disable_existing_loggers": False}
