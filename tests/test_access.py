"""Every view needs a login and a permission; every POST needs a CSRF token.

The URL configuration is walked, so a view added later cannot skip these checks.
"""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RoutePattern

from tests.conftest import make_tasks

# Served by Django itself with its own rules: the login page, logout and the admin.
PUBLIC = {"login", "logout"}
# Authenticated by an API token in a header, never by the session: 401 without one.
TOKEN_ONLY = {"mcp", "pull_api.views.mcp_endpoint"}
# Read by Prometheus with a bearer token, or by staff: a scraper gets 401, not a login page.
SCRAPED = {"metrics"}
SAMPLE = {"int": "1", "str": "queued", "slug": "x", "uuid": "00000000-0000-0000-0000-000000000000"}


def walk(patterns=None, prefix: str = "", namespace: str = ""):
    if patterns is None:
        patterns = get_resolver().url_patterns
    for entry in patterns:
        route = _route(entry.pattern)
        if isinstance(entry, URLResolver):
            if entry.app_name == "admin":
                continue
            inner = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            yield from walk(entry.url_patterns, prefix + route, inner)
        elif isinstance(entry, URLPattern):
            name = f"{namespace}{entry.name}" if entry.name else entry.lookup_str
            if entry.name in PUBLIC and not namespace:
                continue
            yield name, "/" + prefix + route


def _route(pattern) -> str:
    if isinstance(pattern, RoutePattern):
        route = str(pattern)

        def sample(match):
            return SAMPLE.get(match.group(1) or "str", "x")

        return re.sub(r"<(?:(\w+):)?\w+>", sample, route)
    # A regex pattern: drop anchors and fill groups with a plain value.
    regex = pattern.regex.pattern.lstrip("^").rstrip("$").replace("\\Z", "")
    return re.sub(r"\(\?P<\w+>[^)]*\)|\([^)]*\)", "1", regex).replace("\\", "")


URLS = sorted((name, url) for name, url in set(walk()) if name not in TOKEN_ONLY)
TOKEN_URLS = sorted((name, url) for name, url in set(walk()) if name in TOKEN_ONLY)


def test_walk_finds_the_board_views():
    names = {name for name, _ in URLS}
    assert {"board", "board-column", "task-detail", "task-action"} <= names


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url"), URLS)
@pytest.mark.parametrize("method", ["get", "post"])
def test_anonymous_is_sent_to_login(client, name, url, method):
    if name in SCRAPED:
        response = getattr(client, method)(url)
        assert response.status_code == 401, f"{name} {url} answered {response.status_code}"
        return
    response = getattr(client, method)(url)
    assert response.status_code == 302, f"{name} {url} answered {response.status_code}"
    assert response["Location"].startswith("/login/")


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url"), [(n, u) for n, u in URLS if n not in SCRAPED])
@pytest.mark.parametrize("method", ["get", "post"])
def test_an_htmx_request_without_a_session_takes_the_whole_page_to_login(
    client, name, url, method
):
    """The live refresh or a drawer's save after the session ended: the page the person is
    on goes to the login form and comes back there, not to the fragment asked for."""
    htmx = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://testserver/?queue=a&q=b"}
    response = getattr(client, method)(url, **htmx)
    assert response.status_code == 200, f"{name} {url} answered {response.status_code}"
    assert response["HX-Redirect"] == "/login/?next=%2F%3Fqueue%3Da%26q%3Db"
    elsewhere = {**htmx, "HTTP_HX_CURRENT_URL": "https://evil.example/steal"}
    assert getattr(client, method)(url, **elsewhere)["HX-Redirect"] == "/login/?next=%2F"


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url"), URLS)
@pytest.mark.parametrize("method", ["get", "post"])
def test_login_without_permission_is_forbidden(client, django_user_model, name, url, method):
    user = django_user_model.objects.create_user("nobody", password="pw-nobody-123")
    client.force_login(user)
    response = getattr(client, method)(url)
    assert response.status_code == 403, f"{name} {url} answered {response.status_code}"


@pytest.mark.django_db
def test_admin_requires_staff_login(client, django_user_model):
    assert client.get("/admin/").status_code == 302
    assert client.get("/admin/queue/task/locks/")["Location"].startswith("/admin/login/")
    client.force_login(django_user_model.objects.create_user("plain", password="pw-plain-123"))
    assert client.get("/admin/queue/task/locks/")["Location"].startswith("/admin/login/")


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url"), URLS)
def test_post_without_csrf_token_is_refused(django_user_model, name, url):
    user = django_user_model.objects.create_superuser("root", "", "pw-root-123")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(url, {"action": "done"})
    assert response.status_code == 403, f"{name} {url} answered {response.status_code}"
    assert b"CSRF" in response.content


@pytest.mark.django_db
def test_htmx_refusals_are_sentences_the_board_can_show(client, django_user_model):
    """board.js shows a refused htmx request's text as it is: Django's pages were raw HTML."""
    user = django_user_model.objects.create_user("viewer", password="pw-viewer-123")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(user)
    htmx = {"HTTP_HX_REQUEST": "true"}
    gone = client.get("/tasks/999999/", **htmx)
    assert (gone.status_code, gone["Content-Type"]) == (404, "text/plain; charset=utf-8")
    assert (
        gone.content.decode() == "Not found: /tasks/999999/ (deleted meanwhile?). Reload the page."
    )
    denied = client.post("/bulk/", {"action": "close", "ids": "1"}, **htmx)
    assert (denied.status_code, denied["Content-Type"]) == (403, "text/plain; charset=utf-8")
    assert "does not have the permission" in denied.content.decode()
    # Without htmx, pages that say what happened (Django's said only "403 Forbidden").
    gone_page = client.get("/tasks/999999/")
    assert gone_page.status_code == 404
    assert "Nothing is at <code>/tasks/999999/</code>" in gone_page.content.decode()
    denied_page = client.post("/bulk/", {"action": "close", "ids": "1"})
    assert denied_page.status_code == 403
    assert "Your account <strong>viewer</strong> does not have the permission" in (
        denied_page.content.decode()
    )


@pytest.mark.django_db
def test_an_account_without_the_boards_permission_is_told_which_it_needs(
    client, django_user_model
):
    client.force_login(django_user_model.objects.create_user("newcomer", password="pw-new-123"))
    page = client.get("/")
    assert page.status_code == 403
    assert "the board needs <em>queue | task | Can view task</em>" in page.content.decode()
    assert 'action="/logout/"' in page.content.decode()  # a way out, to log in as another


@pytest.mark.django_db
def test_an_htmx_post_from_a_page_older_than_the_login_says_to_reload(django_user_model):
    """A login (in another tab) renews the CSRF secret: a board opened before it sends the
    old token. htmx shows a refusal's text to the person: a sentence, not Django's page."""
    user = django_user_model.objects.create_superuser("root", "", "pw-root-123")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/")
    stale = {"HTTP_HX_REQUEST": "true", "HTTP_X_CSRFTOKEN": "x" * 64}
    response = client.post("/bulk/", {"action": "close", "ids": "1"}, **stale)
    assert response.status_code == 403
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response.content.decode() == (
        "Refused (CSRF check failed): this page is older than your last login. Reload "
        "the page and try again."
    )
    assert b"<html" in client.post("/bulk/", {"action": "close", "ids": "1"}).content


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", ["/logout/", "/admin/queue/task/locks/", "/admin/queue/task/", "/login/"]
)
def test_django_and_admin_posts_without_csrf_token_are_refused(django_user_model, url):
    user = django_user_model.objects.create_superuser("root", "", "pw-root-123")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(url, {})
    assert response.status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url"), TOKEN_URLS)
def test_token_endpoints_refuse_everyone_without_a_token(django_user_model, name, url):
    assert {name for name, _ in TOKEN_URLS} == TOKEN_ONLY
    anonymous = Client()
    assert anonymous.post(url).status_code == 401, f"{name} {url}"
    assert anonymous.get(url).status_code == 405, f"{name} {url}"  # POST only
    # A logged-in superuser's session, with or without a CSRF token, is not a token.
    user = django_user_model.objects.create_superuser("root", "", "pw-root-123")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    assert browser.post(url, {"action": "done"}).status_code == 401, f"{name} {url}"


@pytest.mark.django_db
def test_the_database_out_of_reach_is_a_503_saying_so_not_a_bare_server_error(
    django_user_model, monkeypatch
):
    from django.db import OperationalError

    from pull_api.models import ApiToken
    from workqueue import views

    def refused(*args, **kwargs):
        raise OperationalError('connection to server at "db-host", port 5432 failed')

    user = django_user_model.objects.create_user("viewer", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_task"))
    client = Client(raise_request_exception=False)
    client.force_login(user)
    monkeypatch.setattr(views, "_board_context", refused)
    page = client.get("/")
    assert page.status_code == 503
    assert page["Retry-After"] == "60"
    said = "The database did not answer (out of reach or busy): try again in a minute."
    assert page.content.decode() == said
    # An agent on another machine reads JSON, as from every other refusal of /mcp/.
    monkeypatch.setattr(ApiToken, "authenticate", refused)
    answer = Client(raise_request_exception=False).post(
        "/mcp/?queue=q", "{}", content_type="application/json", HTTP_AUTHORIZATION="Bearer hv_x"
    )
    assert answer.status_code == 503
    assert answer.json() == {"error": said}
    # Any other error stays Django's own 500.
    monkeypatch.setattr(views, "_board_context", lambda *a, **k: 1 / 0)
    assert client.get("/").status_code == 500


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["get", "post"])
def test_acting_on_cards_takes_seeing_them_too(client, django_user_model, method):
    """Each action answers with the card, the drawer or the board, and the editor shows the
    task's file: an account with queue.change_task but not queue.view_task read any task in
    its editor, though the board and the task's page refused it (as herds take seeing them
    to be operated)."""
    (task,) = make_tasks("q", 1, body="what only viewers may read")
    user = django_user_model.objects.create_user("changer", password="pw-changer-123")
    for codename in ("change_task", "add_task", "add_herd", "view_herd"):
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client.force_login(user)
    acting = [f"/tasks/{task.pk}/{part}" for part in ("edit/", "action/", "reload/")]
    acting += ["/bulk/", "/bulk/1/", "/bulk/1/undo/", "/queues/sync/"]
    acting += ["/triage/", "/triage/1/", "/triage/1/apply/", "/triage/1/undo/"]
    for url in acting:
        response = getattr(client, method)(url)
        assert response.status_code == 403, f"{url} answered {response.status_code}"
        assert "what only viewers may read" not in response.content.decode()
