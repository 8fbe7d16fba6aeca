"""The web's defences: login throttling, the Content-Security-Policy, remote images as links."""

from __future__ import annotations

from datetime import timedelta
from html import unescape
from html.parser import HTMLParser

import pytest
from axes.models import AccessAttempt
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from herds.models import Herd, HerdStatus, Profile
from tests.conftest import ROOT, make_tasks
from tests.test_access import URLS
from workqueue.rendering import RENDER_LIMIT, is_same_origin, render_body, render_markdown

pytestmark = pytest.mark.django_db

PASSWORD = "the-right-password"
LOCKED_OUT = "Too many failed logins for this account; try again in 15 minutes."
POLICY = {
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "form-action 'self'",
}


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_superuser("alice", "alice@example.invalid", PASSWORD)


def log_in(client: Client, password: str, url: str = "/login/", username: str = "alice"):
    return client.post(url, {"username": username, "password": password})


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def fail(client: Client, times: int, url: str = "/login/", username: str = "alice") -> None:
    for _ in range(times):
        response = log_in(client, "wrong-password", url, username)
        assert not logged_in(client)
        assert response.status_code in {200, 429}


# Login throttling


def test_sixth_login_with_the_right_password_is_refused_with_a_message(client, user):
    fail(client, 5)
    response = log_in(client, PASSWORD)
    assert response.status_code == 429
    assert not logged_in(client)
    html = response.content.decode()
    assert LOCKED_OUT in html
    # The login page itself, ready for the next try, not an error page.
    assert 'name="password"' in html and "Log in to Hypervisor" in html


def test_a_wrong_password_says_so_before_the_limit(client, user):
    response = log_in(client, "wrong-password")
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()


def test_a_good_login_resets_the_count(client, user):
    fail(client, 4)
    assert log_in(client, PASSWORD).status_code == 302
    client.post("/logout/")
    fail(client, 4)
    response = log_in(client, PASSWORD)
    assert response.status_code == 302, response.content.decode()
    assert logged_in(client)


def test_the_lockout_holds_for_one_username_from_one_address(client, user, django_user_model):
    django_user_model.objects.create_user("bob", password=PASSWORD)
    fail(client, 5)
    assert log_in(client, PASSWORD).status_code == 429
    assert log_in(client, PASSWORD, username="bob").status_code == 302
    elsewhere = Client(REMOTE_ADDR="192.0.2.7")
    assert log_in(elsewhere, PASSWORD).status_code == 302


@pytest.mark.parametrize("proxies", [0, 1, 2])
def test_behind_proxies_the_lockout_holds_for_the_address_the_outermost_saw(
    user, settings, proxies
):
    """All logins come from the proxy's address: read from it alone, five failures of one
    client locked the account for everyone. The client's own X-Forwarded-For is no escape."""
    settings.HYPERVISOR_PROXIES = proxies
    ours = ", ".join(["10.0.0.9"] * (proxies - 1))  # what our inner proxies add after it

    def from_address(address: str, written: str = "") -> Client:
        seen = ", ".join(a for a in (written, address, ours) if a)
        return Client(REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=seen)

    for written in ("", "192.0.2.99", "198.51.100.1"):  # the attacker's own header varies
        fail(from_address("203.0.113.5", written), 2)
    assert log_in(from_address("203.0.113.5"), PASSWORD).status_code == 429
    someone_else = log_in(from_address("198.51.100.20"), PASSWORD).status_code
    assert someone_else == (429 if proxies == 0 else 302)


def test_the_lockout_ends_after_the_cool_off(client, user):
    fail(client, 5)
    assert log_in(client, PASSWORD).status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert log_in(client, PASSWORD).status_code == 302
    assert logged_in(client)


def test_the_admin_login_is_throttled_too(client, user):
    url = reverse("admin:login")
    fail(client, 5, url)
    response = log_in(client, PASSWORD, url)
    assert response.status_code == 429
    assert not logged_in(client)
    html = response.content.decode()
    assert LOCKED_OUT in html
    assert 'class="errornote"' in html and 'name="password"' in html
    # The same count: the site's login refuses the pair as well.
    assert log_in(client, PASSWORD).status_code == 429


def test_failures_on_both_logins_count_together(client, user):
    fail(client, 3)
    fail(client, 2, reverse("admin:login"))
    assert log_in(client, PASSWORD).status_code == 429


# Content-Security-Policy


def directives(response) -> set[str]:
    return {part.strip() for part in response["Content-Security-Policy"].split(";")}


@pytest.fixture
def herd() -> Herd:
    profile = Profile.objects.update_or_create(
        name="noop", defaults={"processor": "noop", "max_workers": 8}
    )[0]
    return Herd.objects.create(queue="q", profile=profile, size=2, status=HerdStatus.RUNNING)


def admin_urls(herd: Herd) -> list[str]:
    urls = [reverse("admin:index"), reverse("admin:queue_task_locks")]
    for model in admin.site._registry:
        info = (model._meta.app_label, model._meta.model_name)
        urls.append(reverse("admin:{}_{}_changelist".format(*info)))
        urls.append(reverse("admin:{}_{}_add".format(*info)))
    return urls


def test_every_page_sends_the_policy(client, user, herd):
    (task,) = make_tasks("q", 1, body="# Plan")
    client.force_login(user)
    pages = [url for _, url in URLS] + [
        f"/tasks/{task.pk}/",
        f"/herds/{herd.pk}/",
        f"/herds/{herd.pk}/live/",
        *admin_urls(herd),
    ]
    for url in pages:
        response = client.get(url)
        assert response.status_code < 500, url
        assert directives(response) == POLICY, url
    client.logout()
    for url in ["/login/", reverse("admin:login"), "/no-such-page/"]:
        assert directives(client.get(url)) == POLICY, url


def test_our_pages_and_the_admins_name_their_icon(client, user):
    # Without it every page view asked for /favicon.ico, a 404 logged as a warning.
    icon = '<link rel="icon" href="/static/img/favicon.svg" type="image/svg+xml">'
    client.force_login(user)
    for url in ["/", "/herds/", "/admin/", "/admin/queue/task/"]:
        assert icon in client.get(url).content.decode(), url
    client.logout()
    assert icon in client.get("/login/").content.decode()
    svg = (ROOT / "static" / "img" / "favicon.svg").read_text()
    assert svg.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in svg


class _InlineCode(HTMLParser):
    """What the policy refuses: inline scripts, style blocks and attributes, event handlers."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self._script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._script = tag == "script" and not attrs.get("src")
        if tag == "style":
            self.found.append("<style>")
        for name in attrs:
            if name == "style" or name.startswith(("on", "hx-on", "data-hx-on")):
                self.found.append(f"<{tag} {name}>")
        if "js:" in (attrs.get("hx-vals") or "") or "[" in (attrs.get("hx-trigger") or ""):
            self.found.append(f"<{tag}> with an htmx expression (eval)")

    def handle_data(self, data):
        if self._script and data.strip():
            self.found.append(f"<script>{data.strip()[:40]}")

    def handle_endtag(self, tag):
        self._script = False


def test_our_pages_carry_no_inline_code(client, user, herd):
    (task,) = make_tasks("q", 1, body="# Plan")
    client.force_login(user)
    pages = ["/", f"/tasks/{task.pk}/", "/herds/", "/herds/launch/", f"/herds/{herd.pk}/"]
    for url in [*pages, "/filters/"]:
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        parser = _InlineCode()
        parser.feed(html)
        assert parser.found == [], url
        if url in pages:  # whole pages; the dropdowns are a fragment of the board
            assert '"allowEval": false, "includeIndicatorStyles": false' in html, url


# Remote images in task bodies


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict]]:
    parser = _Elements()
    parser.feed(html)
    return parser.elements


def test_an_image_from_another_host_becomes_a_link():
    html = render_markdown("![x](https://tracker.example/p.gif)")
    assert "<img" not in html
    assert elements(html) == [
        ("p", {}),
        (
            "a",
            {"href": "https://tracker.example/p.gif", "rel": "noopener noreferrer nofollow"},
        ),
    ]
    assert ">x</a>" in html


@pytest.mark.parametrize(
    "src",
    [
        "//tracker.example/p.gif",
        "<//tracker.example/p.gif>",
        "http://tracker.example/p.gif",
        "HTTPS://tracker.example/p.gif",
        "ftp://tracker.example/p.gif",
    ],
)
def test_no_spelling_of_another_host_loads_an_image(src):
    html = render_markdown(f"![]({src})")
    assert "<img" not in html
    (_, (tag, attrs)) = elements(html)
    assert tag == "a" and attrs["rel"] == "noopener noreferrer nofollow"
    # No alt text: the URL itself is the link text, so a person sees where it goes.
    assert "tracker.example/p.gif</a>" in html


@pytest.mark.parametrize(
    "url", ["/\\tracker.example/p.gif", "\\\\tracker.example", "/\t/tracker.example", " //x"]
)
def test_urls_a_browser_reads_as_another_host_are_not_same_origin(url):
    # markdown-it percent-encodes these; the check holds for the nh3 wall behind it too.
    assert not is_same_origin(url)


def test_an_image_on_this_site_stays_an_image():
    html = render_markdown('![diagram](/static/diagram.png "The plan") ![b](img/b.png)')
    assert ("img", {"src": "/static/diagram.png", "alt": "diagram", "title": "The plan"}) in (
        elements(html)
    )
    assert ("img", {"src": "img/b.png", "alt": "b"}) in elements(html)


def test_image_urls_that_carry_code_stay_neutralised():
    html = render_markdown(
        "![pic](javascript:alert(1)) ![svg](data:image/svg+xml;base64,PHN2Zz4=) "
        "![png](data:image/png;base64,iVBORw0KGgo=)"
    )
    assert "<img" not in html
    for _, attrs in elements(html):
        assert not {"href", "src"} & attrs.keys(), attrs


def test_checklists_are_disabled_checkboxes_in_labels():
    html = render_markdown(
        "- [ ] honour next\n- [x] reproduce\n- [X]\tcase\n- plain\n1. [ ] one\n"
    )
    assert elements(html).count(("ul", {"class": "contains-task-list"})) == 1
    assert elements(html).count(("li", {"class": "task-list-item"})) == 4
    boxes = [attrs for tag, attrs in elements(html) if tag == "input"]
    assert [("checked" in box, box["disabled"], box["type"]) for box in boxes] == [
        (False, "disabled", "checkbox"),
        (True, "disabled", "checkbox"),
        (True, "disabled", "checkbox"),  # a tab after the box is whitespace too (GFM)
        (False, "disabled", "checkbox"),
    ]
    assert "<label><input" in html and "> honour next</label>" in html
    assert "<li>plain</li>" in html


@pytest.mark.timeout(60)  # mdit-py-plugins' tasklists took 164 s for these 400 kB
def test_a_body_of_fifty_thousand_checklist_lines_renders_in_linear_time():
    html = render_markdown("- [ ] step\n" * 50_000)
    assert html.count('<input class="task-list-item-checkbox"') == 50_000


def test_a_body_past_the_render_limit_goes_on_as_written_after_its_formatted_start(
    admin_client,
):
    """markdown-it takes up to 14 µs a character: a crafted megabyte held the drawer 14 s."""
    body = "# Start\n" + "![x\n" * 250_000 + "<script>alert(1)</script>\n"
    cut = body.rfind("\n", 0, RENDER_LIMIT) + 1
    html = str(render_body(body))
    formatted, rest = html.split('<pre class="rest">')
    assert formatted.startswith("<h1>Start</h1>")
    assert f"The body goes on for {len(body) - cut:,} more characters" in formatted
    assert "<script>" not in html
    assert unescape(rest.removesuffix("</pre>")) == body[cut:]
    assert render_body("# Short\n") == render_markdown("# Short\n")
    task = make_tasks("q", 1, body=body)[0]
    drawer = admin_client.get(f"/tasks/{task.pk}/").content.decode()
    assert '<pre class="rest">' in drawer and "&lt;script&gt;alert(1)" in drawer


def test_a_long_body_is_rendered_once_and_kept_by_its_hash(monkeypatch):
    from django.core.cache import cache

    from workqueue import rendering

    cache.clear()
    rendered = []
    real = rendering.render_markdown
    monkeypatch.setattr(rendering, "render_markdown", lambda t: rendered.append(t) or real(t))
    body = "# Long\n\n" + "- [y](javascript:alert(1)) <b>z</b> ![x\n" * 500
    assert rendering.KEPT_FROM < len(body) < rendering.RENDER_LIMIT
    first = rendering.render_body(body)
    assert rendering.render_body(body) == first and len(rendered) == 1
    assert first.count("<li>") == 500  # kept as sanitised
    assert 'href="javascript' not in first and "<b>" not in first
    assert rendering.render_body(body + "more") != first and len(rendered) == 2
    short = "# Short\n"  # not kept: it would crowd the board's counts out of the cache
    rendering.render_body(short), rendering.render_body(short)
    assert rendered[2:] == [short, short]


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/admin/queue/task/?type=%00", "'type'"),  # PostgreSQL: a server error before
        ("/admin/queue/task/?project=a%00b", "'project'"),
        ("/?q=%00", "'q'"),
        ("/filters/?tag=ok&tag=%00", "'tag'"),
        ("/herds/?x%00=1", "'x\\x00'"),
    ],
)
def test_a_nul_character_in_the_query_string_is_a_bad_request(admin_client, url, name):
    make_tasks("q", 1)
    response = admin_client.get(url)
    assert response.status_code == 400
    assert response.content.decode() == (
        f"Bad request: the query parameter {name} holds a NUL character."
    )
    assert admin_client.get(url.replace("%00", "")).status_code == 200


# Every page against hostile query parameters ---------------------------------------------

HOSTILE_VALUES = ["a" * 5000, "%_\\'\"", "\U0001f600\u00b2", "-1", "9" * 25, "1e309", "NaN", "a|b"]
PARAMETERS = [
    "q", "tag", "assignee", "project", "complexity", "type", "queue", "status",
    "since", "offset", "after_priority", "after_id", "shown", "view", "next", "tail",
]  # fmt: skip


def test_no_page_answers_a_server_error_to_hostile_query_parameters(
    transactional_db, admin_client
):
    """Every GET view the URL configuration has (tests/test_access.py walks it), its ids
    those of real objects, with each parameter a page reads set to each hostile value; and
    every admin list filtered by each field (a database error must not end the test's
    transaction, hence transactional_db)."""
    from herds.models import Herd, Profile
    from tests.test_access import URLS
    from workqueue.models import BulkAction

    (task,) = make_tasks("q", 1)
    profile = Profile.objects.create(name="probe", processor="noop")
    herd = Herd.objects.create(queue="q", profile=profile, size=1, dry_run=True)
    bulk = BulkAction.objects.create(actor="user:admin", action="assign", task_ids=[task.pk])
    ids = {"task": task.pk, "herds:": herd.pk, "triage": herd.pk, "bulk": bulk.pk}
    tried = set()
    for name, url in URLS:
        pk = next((pk for prefix, pk in ids.items() if name.startswith(prefix)), None)
        url = url.replace("/1/", f"/{pk}/") if pk else url
        if admin_client.get(url).status_code == 405:  # POST only
            continue
        tried.add(name)
        for parameter in PARAMETERS:
            for value in HOSTILE_VALUES:
                response = admin_client.get(url, {parameter: value})
                assert response.status_code < 500, (url, parameter, value)
    assert {"board", "board-column", "task-detail", "herds:detail", "bulk-status"} <= tried
    # The admin's lists filter by any field of their model from the query string.
    for model in admin.site._registry:
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        assert admin_client.get(url, {"id": "\x00"}).status_code == 400
        for field in model._meta.concrete_fields:
            # An id of 25 digits: a server error at the list's read before the guard.
            response = admin_client.get(url, {field.name: "9" * 25})
            assert response.status_code < 500, (url, field.name)
