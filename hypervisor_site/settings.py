"""Hypervisor settings. Everything a deployment changes comes from the environment."""

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from hypervisor_site.env import envbool, envint, envpath, envpaths, envurl

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = envbool("DJANGO_DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG and envbool("HYPERVISOR_PRODUCTION", False):
        raise ImproperlyConfigured("SECRET_KEY must be set when HYPERVISOR_PRODUCTION is on")
    # Local, embedded use only: `make run` and the tests. Production sets SECRET_KEY.
    SECRET_KEY = "hypervisor-local-development-key-not-for-production"  # noqa: S105

ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]
CSRF_FAILURE_VIEW = "hypervisor_site.errors.csrf_failure"

HYPERVISOR_DATA_DIR = envpath("HYPERVISOR_DATA_DIR", BASE_DIR / "var")
HYPERVISOR_LOCK_ROOT = envpath("HYPERVISOR_LOCK_ROOT", HYPERVISOR_DATA_DIR / "locks")
# Unset, the copy of the examples that `make run` imports on a first start (in the data
# folder: finishes and edits write task files) is the one root, so that "New task" works
# there out of the box; set, only the folders it names.
HYPERVISOR_IMPORT_ROOTS = (
    envpaths("HYPERVISOR_IMPORT_ROOTS")
    if "HYPERVISOR_IMPORT_ROOTS" in os.environ
    else [(HYPERVISOR_DATA_DIR / "examples").resolve()]
)
# The consumer reads each queue's folder (inside the import roots) again every minute, so
# files written or edited by hand or by other tools reach the board: 0 turns it off.
HYPERVISOR_SYNC_FOLDERS = envbool("HYPERVISOR_SYNC_FOLDERS", True)
HYPERVISOR_MAX_FILE_BYTES = envint("HYPERVISOR_MAX_FILE_BYTES", 1024 * 1024, minimum=1)
# A browser sends a form percent-encoded, up to three bytes for each byte of a file's
# text: the editor must be able to send back any file the import took.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(2_621_440, 3 * HYPERVISOR_MAX_FILE_BYTES + 64 * 1024)
# A triage review sends a decision per proposal: thousands, for an inbox of thousands.
DATA_UPLOAD_MAX_NUMBER_FIELDS = 100_000
HYPERVISOR_LEASE_SECONDS = envint("HYPERVISOR_LEASE_SECONDS", 300, minimum=1)
# A lock whose owner.json is not one of our workers' (no pid or start time, another
# format) is held by its live pid at most this long, then cleaned as abandoned.
HYPERVISOR_FOREIGN_LOCK_MAX_AGE = envint("HYPERVISOR_FOREIGN_LOCK_MAX_AGE", 6 * 3600, minimum=1)
# The host identity written on claims. Workers on different machines must differ here;
# the reaper only judges pids of its own host.
HYPERVISOR_HOST = os.environ.get("HYPERVISOR_HOST") or socket.gethostname()
HYPERVISOR_REAP_INTERVAL = envint("HYPERVISOR_REAP_INTERVAL", 30, minimum=1)
HYPERVISOR_SUPERVISE_INTERVAL = envint("HYPERVISOR_SUPERVISE_INTERVAL", 2, minimum=1)
# Workers a herd may start in place of crashed or timed-out ones over its life; unset:
# as many as the herd has workers. 0: none is ever replaced.
HYPERVISOR_HERD_RESTARTS = envint("HYPERVISOR_HERD_RESTARTS", None, minimum=0)
# Workers of a CPU-bound processor, more of them than cores, take turns on the cores of
# at least this long (workqueue.cpu_slots); 0 passes the turn on after every batch.
HYPERVISOR_CPU_TURN_MS = envint("HYPERVISOR_CPU_TURN_MS", 2000)
# An agent's output is read this long after it exits (a background child may hold its
# pipes open), and its tree gets this long between SIGTERM and SIGKILL.
HYPERVISOR_AGENT_GRACE = envint("HYPERVISOR_AGENT_GRACE", 2, minimum=0)
# Each agent run's output is kept in a log file up to this size; the task keeps a tail.
HYPERVISOR_AGENT_LOG_BYTES = envint("HYPERVISOR_AGENT_LOG_BYTES", 32 * 1024 * 1024, minimum=0)
# A herd that ended on quota with "resume after quota" starts again at the reset time the
# agent CLI gave, or after this many seconds when it gave none.
HYPERVISOR_QUOTA_BACKOFF = envint("HYPERVISOR_QUOTA_BACKOFF", 900, minimum=1)
# When set, every herd's run summary is POSTed here as JSON when the herd ends.
HYPERVISOR_HERD_WEBHOOK = envurl("HYPERVISOR_HERD_WEBHOOK")
HYPERVISOR_HERD_WEBHOOK_TIMEOUT = envint("HYPERVISOR_HERD_WEBHOOK_TIMEOUT", 5, minimum=1)
# Claims taken over HTTP (/mcp/) have no pid anyone can check: they live by this lease,
# renewed by every call the token makes.
HYPERVISOR_MCP_LEASE_SECONDS = envint("HYPERVISOR_MCP_LEASE_SECONDS", 1800, minimum=1)
# Prometheus scrapes /metrics with this bearer token (staff sessions need none). Unset:
# staff only. Long, since a scraper's token is not throttled like a login.
# Stripped: a token kept in a file (a mounted secret) ends in a newline its scraper
# does not send.
HYPERVISOR_METRICS_TOKEN = os.environ.get("HYPERVISOR_METRICS_TOKEN", "").strip()
if HYPERVISOR_METRICS_TOKEN and len(HYPERVISOR_METRICS_TOKEN) < 32:
    raise ImproperlyConfigured("HYPERVISOR_METRICS_TOKEN must be at least 32 characters")

# A worker (`manage.py work`) leaves out the apps that only pages, logins and the admin use:
# it starts often and in herds, and they were a fifth of its start-up (the admin imports
# every app's admin module, axes reads its package metadata). A worker never serves a page,
# logs anyone in or writes an admin log entry.
WEB_ONLY_APPS = [
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "axes",
    "csp",
]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    *WEB_ONLY_APPS,
    # Not "huey.contrib.djhuey": loading it imports Huey's storage, and with it the redis
    # and psycopg drivers, in every `manage.py` process (a quarter of a worker's start-up).
    # Only the consumer and whatever enqueues need Huey; herds provides `run_huey`.
    "workqueue",
    "herds",
    "pull_api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "hypervisor_site.middleware.refuse_nul_in_query",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "hypervisor_site.middleware.admin_list_lookups",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "hypervisor_site.middleware.login_page_for_htmx",
    # Last, as axes asks: it turns a refused login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "hypervisor_site.urls"
WSGI_APPLICATION = "hypervisor_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
    # The board's cards only (workqueue.templatetags.board.cards): a hundred a render.
    {
        "BACKEND": "django.template.backends.jinja2.Jinja2",
        "DIRS": [BASE_DIR / "templates" / "jinja2"],
        "OPTIONS": {"environment": "workqueue.templatetags.board.jinja_environment"},
    },
]

# Two test runs on one machine keep separate test databases: the processes a test starts
# are handed the test database's URL, so the runner's own pid can name it.
_test_tag = os.environ.get("HYPERVISOR_TEST_TAG") or f"pid{os.getpid()}"
_default_db = f"sqlite:///{HYPERVISOR_DATA_DIR / 'hypervisor.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(os.environ.get("DATABASE_URL") or _default_db)}
except Exception as exc:  # dj_database_url raises several kinds for a malformed URL
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from exc
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE: a claim reads then writes; a deferred BEGIN would fail at once with
    # "database is locked" instead of waiting for the writer ahead of it.
    # 16 KiB pages (taken by a new database only): a claim batch touches rows spread over
    # the table, and the write lock is held mostly for writing their pages to the WAL, a
    # write per page; with four times fewer pages it is held about 20% less per task.
    # Our backend: Django's, with every writer queueing on one lock (hypervisor_site.writers).
    DATABASES["default"]["ENGINE"] = "hypervisor_site.sqlite"
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": (
            "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
        ),
    }
    # A file, not memory: the tests start real worker processes that share it.
    DATABASES["default"]["TEST"] = {"NAME": str(HYPERVISOR_DATA_DIR / f"test-{_test_tag}.sqlite3")}
else:
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{_test_tag}"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# Login throttling (django-axes): after HYPERVISOR_LOGIN_FAILURE_LIMIT failures for one
# username from one address, that pair is refused, even with the right password, until the
# cool-off has passed since its last attempt. The site's login and the admin's both go through
# the backend. Behind HYPERVISOR_PROXIES reverse proxies of ours, the address is the one the
# outermost of them saw (login_throttle.client_address); else REMOTE_ADDR, which behind an
# unannounced proxy every client shares, so that anyone could lock any account out.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = envint("HYPERVISOR_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=envint("HYPERVISOR_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "hypervisor_site.login_throttle.lockout_response"
AXES_CLIENT_IP_CALLABLE = "hypervisor_site.login_throttle.client_address"
HYPERVISOR_PROXIES = envint("HYPERVISOR_PROXIES", 0)

# A worker, and the command that launches a herd (a launch is timed from it), start often
# and serve no page: they load without the web-only apps.
HYPERVISOR_WORKER_PROCESS = Path(sys.argv[0]).name == "manage.py" and sys.argv[1:2] in (
    ["work"],
    ["herd"],
)
if HYPERVISOR_WORKER_PROCESS:
    INSTALLED_APPS = [app for app in INSTALLED_APPS if app not in WEB_ONLY_APPS]
    # Axes' backend cannot even be imported without its app: a permission check would fail.
    AUTHENTICATION_BACKENDS = [b for b in AUTHENTICATION_BACKENDS if not b.startswith("axes.")]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "board"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = HYPERVISOR_DATA_DIR / "static"

SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp): scripts and styles only from our own static files, so
# text that slips into a page cannot run or restyle it. htmx comes from django-htmx's static
# file, with eval off and its injected indicator style off (base.html's htmx-config meta).
# Django 5.2's admin passes it too: its scripts are files, and its one inline <style> renders
# only for a changelist with both actions_on_top and actions_on_bottom off, which no admin
# here sets (tests/browser/test_csp_browser.py opens the admin pages and counts violations).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "object-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    }
}
if envbool("HYPERVISOR_PRODUCTION", False):
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Huey: SQLite storage under the data folder by default, Redis when HUEY_REDIS_URL is set.
# `immediate` is set explicitly: huey's default follows DEBUG.
_consumer = {
    "workers": envint("HUEY_WORKERS", 4, minimum=1),
    "worker_type": "thread",
    # An idle consumer polls SQLite; a short max_delay keeps launch pickup well under 1 s.
    "initial_delay": 0.05,
    "backoff": 1.15,
    "max_delay": 0.25,
    "periodic": True,
    "check_worker_health": True,
    # Warnings and errors only: periodic supervision runs every few seconds.
    "verbose": False,
}
if os.environ.get("HUEY_REDIS_URL"):
    HUEY = {
        "huey_class": "huey.RedisHuey",
        "name": os.environ.get("HUEY_NAME", "hypervisor"),
        "url": os.environ["HUEY_REDIS_URL"],
        "immediate": envbool("HUEY_IMMEDIATE", False),
        "blocking": True,
        # A blocking read waits for work itself: a thread sleeps only after a failed read,
        # twice as long each time, so a Redis that is down is read every 10 s per thread,
        # not four times a second (and said in a line, then a reminder each 10 s:
        # herds.consumer).
        "consumer": {**_consumer, "backoff": 2, "max_delay": 10},
    }
else:
    HUEY = {
        "huey_class": "huey.SqliteHuey",
        "name": os.environ.get("HUEY_NAME", "hypervisor"),
        "filename": str(HYPERVISOR_DATA_DIR / "huey.sqlite3"),
        "immediate": envbool("HUEY_IMMEDIATE", False),
        "consumer": _consumer,
    }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {  # control characters from task files and agents written as escapes
            "()": "hypervisor_site.terminal.PrintableFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # run_huey gives huey's logger a handler of its own; no second copy through the root.
    "loggers": {
        "huey": {"level": os.environ.get("HUEY_LOG_LEVEL", "WARNING"), "propagate": False},
        # Not a version line from every worker's start; lockouts still log as warnings.
        "axes.apps": {"level": "WARNING"},
        # The MCP SDK logs every HTTP request's session start and end at INFO.
        "mcp": {"level": "WARNING"},
    },
}

try:
    HYPERVISOR_DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:  # a folder the service's user may not make: said in one line
    raise ImproperlyConfigured(
        f"HYPERVISOR_DATA_DIR: cannot make {HYPERVISOR_DATA_DIR}: {exc.strerror}"
    ) from exc
