"""Answers to requests Django refuses before any view of ours runs."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.views import csrf, defaults


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """A form over the upload limit would otherwise get Django's page saying only
    "Bad Request (400)", which the board shows as its raw HTML: say what the limit is
    (the board's error handler shows this text as it is)."""
    if isinstance(exception, RequestDataTooBig):
        return HttpResponse(
            f"The form sent is over the {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,}-byte limit of "
            "what this server reads: nothing was saved. A task file may be up to "
            f"{settings.HYPERVISOR_MAX_FILE_BYTES:,} bytes (HYPERVISOR_MAX_FILE_BYTES).",
            status=413,
            content_type="text/plain; charset=utf-8",
        )
    return defaults.bad_request(request, exception)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """A board opened before a login elsewhere (which renews the CSRF secret) sends the
    old token; the board shows an htmx refusal's text to the person, so it gets a
    sentence saying what to do, not Django's page as raw HTML."""
    if request.headers.get("HX-Request") == "true":
        return HttpResponse(
            "Refused (CSRF check failed): this page is older than your last login. Reload "
            "the page and try again.",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    return csrf.csrf_failure(request, reason)
