"""Answers to requests refused outside our views' own forms: a form over the upload
limits, a CSRF failure, a task gone meanwhile, a permission missing, the database out of
reach.

Every page shows the text of an htmx request's refusal to the person as it is (refusals.js),
so an htmx request gets a sentence, not one of Django's pages as raw HTML."""

from __future__ import annotations

import sys

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import csrf, defaults


def _said(text: str, status: int) -> HttpResponse:
    return HttpResponse(text, status=status, content_type="text/plain; charset=utf-8")


def _to_htmx(request: HttpRequest, text: str, status: int, page) -> HttpResponse:
    """`text` for an htmx request, else Django's own `page()`."""
    if request.headers.get("HX-Request") == "true":
        return _said(text, status)
    return page()


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if isinstance(exception, RequestDataTooBig):  # Django's page says only "Bad Request"
        return _said(
            f"The form sent is over the {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,}-byte limit of "
            "what this server reads: nothing was saved. A task file may be up to "
            f"{settings.HYPERVISOR_MAX_FILE_BYTES:,} bytes (HYPERVISOR_MAX_FILE_BYTES).",
            413,
        )
    if isinstance(exception, TooManyFieldsSent):
        return _said(
            f"The form sent has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS:,} fields, "
            "the most this server reads: nothing was saved.",
            413,
        )
    return defaults.bad_request(request, exception)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """A board opened before a login elsewhere (which renews the CSRF secret) sends the
    old token."""
    text = (
        "Refused (CSRF check failed): this page is older than your last login. Reload the "
        "page and try again."
    )
    return _to_htmx(request, text, 403, lambda: csrf.csrf_failure(request, reason))


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    text = "Refused: your account does not have the permission this needs (an admin can give it)."
    return _to_htmx(request, text, 403, lambda: defaults.permission_denied(request, exception))


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """A card on a board not yet refreshed whose task was deleted meanwhile."""
    text = f"Not found: {request.path} (deleted meanwhile?). Reload the page."
    return _to_htmx(request, text, 404, lambda: defaults.page_not_found(request, exception))


def server_error(request: HttpRequest) -> HttpResponse:
    """The database stopped or cut off is no fault of the page: 503 saying so (to an agent
    on /mcp/ in JSON, as its other refusals), not a bare "Server Error (500)". Plain text:
    a page would need the database to render."""
    error = sys.exc_info()[1]
    if not isinstance(error, OperationalError):
        return defaults.server_error(request)
    text = "The database did not answer (out of reach or busy): try again in a minute."
    if disk_full(error):
        text = (
            "The database's disk is full: nothing was saved. Free space where the database "
            "lives, then try again."
        )
    headers = {"Retry-After": "60"}
    if request.path_info.startswith("/mcp"):
        return JsonResponse({"error": text}, status=503, headers=headers)
    return HttpResponse(
        text, status=503, content_type="text/plain; charset=utf-8", headers=headers
    )


# SQLite's words for a full disk: its file cannot grow, or (a "disk I/O error") the
# shared-memory file every connection in WAL mode needs cannot be made.
SQLITE_FULL_NAMES = ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")


def disk_full(error: OperationalError) -> bool:
    """The database's disk is full (SQLite's, or PostgreSQL's disk_full): waiting a minute
    will not help, freeing space will."""
    cause = error.__cause__
    return (
        getattr(cause, "sqlite_errorname", None) in SQLITE_FULL_NAMES
        or getattr(cause, "sqlstate", None) == "53100"
    )
