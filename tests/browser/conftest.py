"""Real-browser fixtures: Playwright for Python driving Debian's Chromium.

Never a downloaded browser. Without /usr/bin/chromium the browser tests skip, unless
HYPERVISOR_REQUIRE_BROWSER=1 (CI), where they fail.

The live server (pytest-django's `live_server`) runs in this process on the file-based test
database, so worker subprocesses started with `process_env` share its data. Tests that use
it get `transactional_db`: every table is emptied after each test.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Playwright's sync API keeps an event loop running in this thread; the ORM calls the
# tests make between browser steps are still plain synchronous code.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
PASSWORD = "browser-test-password"


def pytest_collection_modifyitems(items):
    # Every test in this folder is a browser test: `-m "not browser"` leaves them out.
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("HYPERVISOR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and HYPERVISOR_REQUIRE_BROWSER=1 (make browser)")
        pytest.skip(f"{CHROMIUM} is missing; `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def live_url(live_server) -> str:
    """The live server's base URL, without a trailing slash."""
    return live_server.url.rstrip("/")


@pytest.fixture
def page(browser, request) -> Iterator:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    # The last state of every browser test is kept as an artefact.
    screenshot(page, f"{request.node.name}-last")
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot as test-artifacts/<name>.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
    # A closed page must not hide the test's own failure.
    with contextlib.suppress(Exception):
        page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def browser_user(transactional_db, django_user_model):
    """A superuser (every permission, admin access) the browser logs in as."""
    return django_user_model.objects.create_superuser(
        "browser", "browser@example.invalid", PASSWORD
    )


@pytest.fixture
def login(live_url) -> Callable:
    """login(page, username, password) through the real login form."""

    def do_login(page, username: str, password: str = PASSWORD) -> None:
        page.goto(f"{live_url}/login/")
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", password)
        page.click("button[type=submit], input[type=submit]")
        page.wait_for_url(lambda url: "/login/" not in url)

    return do_login


@pytest.fixture
def logged_in_page(page, login, browser_user, live_url):
    """A page logged in as `browser_user`, showing the board."""
    login(page, browser_user.username)
    return page


def wait_until(condition: Callable[[], object], timeout: float = 60, message: str = ""):
    """Poll `condition` until it is truthy or the deadline passes; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def triage_profile(transactional_db):
    """The `triage` profile a migration installs; a transactional test's flush removes it."""
    from herds.models import Profile

    return Profile.objects.get_or_create(
        name="triage", defaults={"processor": "triage", "prefetch": 50, "max_workers": 8}
    )[0]
