"""What a locked-out login sees: the login page it came from, with the lockout as its error.

django-axes counts failed logins per username and client address and refuses the next ones
for a cool-off period; this is its AXES_LOCKOUT_CALLABLE, so the refusal is the familiar page
with one clear sentence rather than axes' bare text response.
"""

from __future__ import annotations

import math

from axes.helpers import get_client_username, get_cool_off
from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import REDIRECT_FIELD_NAME
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

# Too Many Requests: the page renders as usual, and scripts and proxies see a refusal.
LOCKED_OUT_STATUS = 429


def client_address(request: HttpRequest) -> str | None:
    """Where a login came from. Behind HYPERVISOR_PROXIES reverse proxies of ours, each
    adding the address it was sent from to X-Forwarded-For, the one the outermost saw: what
    comes before it the client wrote itself. Else (or a header too short to have passed
    them all) REMOTE_ADDR."""
    proxies = settings.HYPERVISOR_PROXIES
    seen = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    if proxies and len(seen) >= proxies and seen[-proxies]:
        return seen[-proxies]
    return request.META.get("REMOTE_ADDR")


def lockout_message(request: HttpRequest) -> str:
    # Every refused attempt restarts the cool-off (AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT),
    # so the whole period is what is left.
    minutes = math.ceil(get_cool_off(request).total_seconds() / 60)
    return (
        "Too many failed logins for this account; "
        f"try again in {minutes} minute{'s' if minutes != 1 else ''}."
    )


def _locked_out_form(form_class: type[AuthenticationForm], request, username: str, message: str):
    """An unbound login form whose only error is the lockout: it never authenticates."""

    class LockedOutForm(form_class):
        def non_field_errors(self):
            return self.error_class([message])

    return LockedOutForm(request, initial={"username": username})


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None, credentials: dict | None
) -> HttpResponse:
    username = get_client_username(request, credentials) or ""
    message = lockout_message(request)
    next_url = request.POST.get(REDIRECT_FIELD_NAME, request.GET.get(REDIRECT_FIELD_NAME, ""))
    if request.path_info.startswith(reverse("admin:index")):
        context = {
            **admin.site.each_context(request),
            "title": "Log in",
            "app_path": request.get_full_path(),
            "form": _locked_out_form(AdminAuthenticationForm, request, username, message),
            REDIRECT_FIELD_NAME: next_url,
        }
        return render(request, "admin/login.html", context, status=LOCKED_OUT_STATUS)
    context = {
        "form": _locked_out_form(AuthenticationForm, request, username, message),
        REDIRECT_FIELD_NAME: next_url,
    }
    return render(request, "registration/login.html", context, status=LOCKED_OUT_STATUS)
