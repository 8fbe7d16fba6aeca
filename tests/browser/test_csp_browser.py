"""The Content-Security-Policy in a real Chromium: every page we serve runs without a violation.

A `securitypolicyviolation` listener is installed in every document before its own scripts
run, and reports to Python through an exposed function, so nothing is lost across
navigations; console errors and uncaught page errors are collected beside it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from herds.models import Herd, HerdStatus, Profile
from tests.browser.conftest import PASSWORD, screenshot, wait_until
from tests.conftest import make_tasks
from workqueue.models import Task

REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__reportViolation({
    page: document.location.pathname,
    directive: event.violatedDirective,
    blocked: event.blockedURI,
    sample: event.sample,
  });
});
"""
BODY = (
    "# Plan\n\n"
    "![pixel](https://tracker.example/p.gif)\n\n"
    "![diagram](/static/no-such-diagram.png)\n\n"
    "`code` and a [link](https://example.com/)\n"
)


class Problems:
    """What the browser complained about, and every host it tried to reach."""

    def __init__(self, page, live_url: str):
        self.page = page
        self.violations: list[dict] = []
        self.errors: list[str] = []
        self.hosts: set[str] = set()
        self.live_host = urlsplit(live_url).netloc
        page.expose_function("__reportViolation", self._violation)
        page.add_init_script(REPORT_VIOLATIONS)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("request", lambda request: self.hosts.add(urlsplit(request.url).netloc))

    def _violation(self, report: dict) -> None:
        self.violations.append(report)

    def _console(self, message) -> None:
        # A missing image on our own site is a 404, not a policy problem.
        if message.type == "error" and "404 (Not Found)" not in message.text:
            self.errors.append(f"{message.location.get('url')}: {message.text}")

    def settle(self) -> None:
        # Reports reach Python only while it waits inside Playwright, never in time.sleep.
        self.page.wait_for_timeout(300)

    def assert_none(self) -> None:
        self.settle()
        assert self.violations == [], self.violations
        assert self.errors == [], self.errors
        assert self.hosts <= {self.live_host}, self.hosts


@pytest.fixture
def problems(page, live_url) -> Problems:
    return Problems(page, live_url)


@pytest.fixture
def herds(transactional_db) -> tuple[Herd, Herd]:
    profile = Profile.objects.update_or_create(
        name="noop", defaults={"processor": "noop", "max_workers": 8}
    )[0]
    running = Herd.objects.create(queue="q", profile=profile, size=2, status=HerdStatus.RUNNING)
    finished = Herd.objects.create(queue="q", profile=profile, size=2, status=HerdStatus.FINISHED)
    return running, finished


def visit(page, url: str) -> None:
    response = page.goto(url)
    assert response is not None and response.status < 400, (url, response and response.status)
    page.wait_for_load_state("load")
    page.wait_for_timeout(200)  # what a page's scripts do right after loading counts too


def test_every_page_runs_under_the_policy(
    page, problems, login, browser_user, live_url, herds, django_user_model
):
    visit(page, f"{live_url}/login/")
    login(page, browser_user.username)
    tasks = make_tasks("q", 3, body=BODY)

    # The board, its poll (htmx without eval), a task drawer and an action through htmx.
    visit(page, f"{live_url}/?queue=q")
    with page.expect_request(lambda request: "since=" in request.url, timeout=10_000):
        pass
    page.locator(f'article[data-id="{tasks[0].pk}"] a.title').click()
    drawer = page.locator("aside#drawer .markdown")
    drawer.wait_for()
    pixel = drawer.get_by_role("link", name="pixel")
    assert pixel.get_attribute("href") == "https://tracker.example/p.gif"
    assert drawer.locator("img").count() == 1  # the diagram on this site
    page.locator("aside#drawer").get_by_role("button", name="Mark done").click()
    wait_until(lambda: Task.objects.get(pk=tasks[0].pk).status == "done", 15)
    screenshot(page, "csp-board-drawer")

    running, finished = herds
    pages = [
        f"/tasks/{tasks[1].pk}/",
        "/herds/",
        "/herds/launch/",
        f"/herds/{running.pk}/",
        f"/herds/{finished.pk}/",
        "/admin/",
        "/admin/queue/task/",
        f"/admin/queue/task/{tasks[1].pk}/change/",
        "/admin/queue/task/locks/",
        "/admin/herds/herd/",
        "/admin/herds/profile/add/",
        "/admin/auth/user/",
        f"/admin/auth/user/{browser_user.pk}/change/",
        "/admin/axes/accessattempt/",
    ]
    for path in pages:
        visit(page, f"{live_url}{path}")
    # The running herd's page polls its live partial: let it swap once.
    visit(page, f"{live_url}/herds/{running.pk}/")
    with page.expect_response(lambda r: r.url.endswith(f"/herds/{running.pk}/live/")):
        pass
    screenshot(page, "csp-herd-detail")
    problems.assert_none()


def test_a_locked_out_login_shows_why(page, problems, login, browser_user, live_url):
    for _ in range(5):
        page.goto(f"{live_url}/login/")
        page.fill("input[name=username]", browser_user.username)
        page.fill("input[name=password]", "not-the-password")
        page.click("button[type=submit]")
    visit(page, f"{live_url}/login/")
    page.fill("input[name=username]", browser_user.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert alert.inner_text() == (
        "Too many failed logins for this account; try again in 15 minutes."
    )
    assert "/login/" in page.url
    screenshot(page, "login-locked-out")
    # Chromium reports the refusal's status itself; that is the lockout, not a fault.
    problems.errors = [e for e in problems.errors if "status of 429" not in e]
    problems.assert_none()


def test_a_violation_would_be_seen(page, problems, live_url):
    visit(page, f"{live_url}/login/")
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')")
    problems.settle()
    assert problems.violations[0]["directive"].startswith("style-src")
