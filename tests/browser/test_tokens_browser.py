"""API tokens in a real Chromium: created on the page, shown once, used over /mcp/, revoked."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from pull_api.models import ApiToken
from tests.browser.conftest import screenshot
from tests.browser.test_csp_browser import Problems
from tests.conftest import make_tasks
from workqueue.models import Status, Task

CLAIM = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "claim_next_task", "arguments": {}},
}


def post_claim(live_url: str, secret: str) -> int:
    request = urllib.request.Request(  # noqa: S310 - the test's own server
        f"{live_url}/mcp/?queue=q",
        json.dumps(CLAIM).encode(),
        {
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-06-18",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_token_is_made_shown_once_used_and_revoked(logged_in_page, live_url):
    page = logged_in_page
    problems = Problems(page, live_url)
    make_tasks("q", 2)
    page.goto(f"{live_url}/tokens/")
    page.get_by_role("link", name="API tokens").wait_for()
    page.fill("input[name=name]", "laptop-claude")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("code.secret").inner_text()
    assert secret.startswith("hv_")
    screenshot(page, "tokens-created")
    assert post_claim(live_url, secret) == 200
    row = Task.objects.get(status=Status.CLAIMED)
    assert row.holder == "mcp:browser/laptop-claude"

    page.goto(f"{live_url}/tokens/")
    assert page.locator("code.secret").count() == 0  # shown once
    assert secret not in page.content()
    page.get_by_role("button", name="Revoke").click()
    page.get_by_text("revoked").wait_for()
    screenshot(page, "tokens-revoked")
    assert ApiToken.objects.get().revoked_at is not None
    assert post_claim(live_url, secret) == 401
    # What it held went back with the revocation, and nothing was claimed after.
    assert not Task.objects.filter(status=Status.CLAIMED).exists()
    assert Task.objects.get(pk=row.pk).events.filter(message="its token laptop-claude was revoked")
    problems.assert_none()
