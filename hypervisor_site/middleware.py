"""Requests refused before any view sees them."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.db import DataError
from django.http import HttpResponseBadRequest, HttpResponseRedirect
from django.shortcuts import resolve_url
from django_htmx.http import HttpResponseClientRedirect


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


def admin_list_lookups(get_response):
    """The admin's lists filter by any field of their model from the query string, and a
    value its column cannot hold (an id of 25 digits, an address that is none) fails only
    when the list is read: a server error. Django's admin sends a lookup it cannot use
    back to the bare list with `?e=1`; so does this, for those."""

    def middleware(request):
        return get_response(request)

    def process_exception(request, exception):
        match = request.resolver_match
        if (
            isinstance(exception, OverflowError | ValueError | DataError)
            and match is not None
            and match.namespace == "admin"
            and (match.url_name or "").endswith("_changelist")
            and "e" not in request.GET
        ):
            return HttpResponseRedirect(f"{request.path}?e=1")
        return None

    middleware.process_exception = process_exception
    return middleware


def login_page_for_htmx(get_response):
    """An htmx request whose session has ended (logged out in another tab, expired) is
    sent to the login form as a whole page, naming the page the person is on. Followed
    inside the request, the redirect swapped the login form into the board, and logging in
    there led to the fragment the live refresh had asked for."""

    def middleware(request):
        response = get_response(request)
        if not (request.htmx and response.status_code == 302):
            return response
        login = resolve_url(settings.LOGIN_URL)
        if urlsplit(response["Location"]).path != login:
            return response
        page = request.htmx.current_url_abs_path or "/"
        response = HttpResponseClientRedirect(f"{login}?{urlencode({'next': page})}")
        # Named, so the page can stay where it holds what the person typed (refusals.js).
        response["X-Session-Ended"] = "1"
        return response

    return middleware
