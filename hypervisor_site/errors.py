"""Answers to requests refused outside our views' own forms: a form over the upload
limits, a CSRF failure, a task gone meanwhile, a permission missing.

Every page shows the text of an htmx request's refusal to the person as it is (refusals.js),
so an htmx request gets a sentence, not one of Django's pages as raw HTML."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.http import HttpRequest, HttpResponse
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
