"""Requests refused before any view sees them."""

from __future__ import annotations

from django.http import HttpResponseBadRequest


def refuse_nul_in_query(get_response):
    """A NUL character is in no name or value of ours, and PostgreSQL refuses it in text:
    a query string carrying one (an admin list filtered by `?type=%00`) would reach the
    database and end in a server error there, so it is a bad request here, on every
    database alike. Forms refuse it in what they are sent (Django's validators)."""

    def middleware(request):
        for key, values in request.GET.lists():
            if "\x00" in key or any("\x00" in value for value in values):
                return HttpResponseBadRequest(
                    f"Bad request: the query parameter {key!r} holds a NUL character.",
                    content_type="text/plain; charset=utf-8",
                )
        return get_response(request)

    return middleware
