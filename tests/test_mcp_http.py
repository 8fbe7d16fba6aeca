"""The MCP endpoint at /mcp/: bearer tokens, permissions, and the same tools over HTTP."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from mcp.shared.exceptions import MCPError

from pull_api.models import ApiToken
from tests.conftest import make_tasks
from tests.mcp_client import call, http_session, in_thread, run
from workqueue import locks, reaper
from workqueue.models import EventKind, Status, Task, TaskEvent
from workqueue.pull import describe_holder

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
CLAIM = {
    "jsonrpc": "2.0",
    "id": 2,
    "method": "tools/call",
    "params": {"name": "claim_next_task", "arguments": {}},
}
MCP_HEADERS = {
    "HTTP_ACCEPT": "application/json, text/event-stream",
    "HTTP_MCP_PROTOCOL_VERSION": "2025-06-18",
}


def person(name: str, *perms: str) -> User:
    user = User.objects.create_user(name, password="pw-123456789")
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return User.objects.get(pk=user.pk)  # no cached permissions


def post_json_rpc(client, message: dict, query: str = "?queue=q", name: str = "laptop"):
    """One JSON-RPC message to /mcp with a new token of alice's, as curl would send it."""
    _, secret = ApiToken.issue(person("alice", "view_task", "change_task"), name)
    return client.post(
        f"/mcp/{query}",
        json.dumps(message),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
        **MCP_HEADERS,
    )


def nothing_touched() -> tuple:
    return (
        list(Task.objects.values_list("status", "holder", "fence")),
        TaskEvent.objects.count(),
        locks.list_locks(),
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer hv_not-a-token", "Basic dXNlcjpwYXNz", "Token {secret}"],
)
def test_no_valid_token_is_401_and_touches_nothing(client, authorization):
    make_tasks("q", 2)
    _, secret = ApiToken.issue(person("alice", "view_task", "change_task"), "laptop")
    before = nothing_touched()
    headers = dict(MCP_HEADERS)
    if authorization is not None:
        headers["HTTP_AUTHORIZATION"] = authorization.format(secret=secret)
    for body in (INITIALIZE, CLAIM):
        response = client.post(
            "/mcp/?queue=q", json.dumps(body), content_type="application/json", **headers
        )
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == 'Bearer realm="hypervisor"'
        assert "Bearer hv_" in response.json()["error"]
    assert nothing_touched() == before
    assert ApiToken.objects.get().last_used_at is None


@pytest.mark.django_db
def test_a_logged_in_browser_without_a_token_is_refused_too(client):
    make_tasks("q", 1)
    client.force_login(person("alice", "view_task", "change_task"))
    response = client.post(
        "/mcp/?queue=q", json.dumps(CLAIM), content_type="application/json", **MCP_HEADERS
    )
    assert response.status_code == 401
    assert Task.objects.get().status == Status.QUEUED


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("", "add ?queue=NAME"),
        ("?queue=../etc", "add ?queue=NAME"),
        ("?queue=q&where=x=1", "where:"),
    ],
)
def test_a_bad_queue_or_filter_in_the_url_is_400(client, query, problem):
    response = post_json_rpc(client, INITIALIZE, query)
    assert response.status_code == 400
    assert problem in response.json()["error"]


@pytest.mark.django_db(transaction=True)
def test_one_json_rpc_post_claims_over_plain_http(client):
    """Without any SDK on the caller's side: the stateless JSON-response transport."""
    make_tasks("q", 1)
    response = post_json_rpc(client, CLAIM, name="curl")
    assert response.status_code == 200, response.content
    answer = response.json()["result"]["structuredContent"]
    assert answer["success"] is True and answer["task"]["id"] == "t000000"
    # Nothing watches a remote agent: it is told how long its silence may last.
    assert (
        "the claim lasts 30 minutes from your last call: any call keeps it" in (answer["message"])
    )
    row = Task.objects.get()
    assert (row.status, row.holder, row.holder_host) == (
        Status.CLAIMED,
        "mcp:alice/curl",
        "http:" + row.holder_host.removeprefix("http:"),
    )
    assert row.holder_host.startswith("http:")
    assert locks.read_owner(locks.lock_dir("q", row.key))["worker"] == "mcp:alice/curl"


@pytest.mark.slow
def test_the_sdk_client_pulls_and_finishes_over_http(live_server, transactional_db):
    make_tasks("q", 3)
    Task.objects.filter(key="t000002").update(priority=0)
    _, secret = ApiToken.issue(person("alice", "view_task", "change_task"), "laptop")
    url = f"{live_server.url}/mcp/?queue=q"

    async def main():
        async with http_session(url, secret) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"claim_next_task", "complete_task", "update_task"} <= tools
            first = await call(client, "claim_next_task")
            assert first["task"]["id"] == "t000002", first
            done = await call(client, "complete_task", id="t000002", summary="over http")
            assert done["success"], done
            second = await call(client, "update_task", id="t000000", status="in_progress")
            assert second["success"], second
            blocked = await call(client, "block_task", id="t000000", reason="needs a person")
            assert blocked["success"], blocked
            stats = await call(client, "get_index_stats")
            assert (stats["counts"]["done"], stats["counts"]["blocked"]) == (1, 1)

    run(main)
    rows = {t.key: t for t in Task.objects.all()}
    assert (rows["t000002"].status, rows["t000002"].result["summary"]) == (
        Status.DONE,
        "over http",
    )
    assert rows["t000000"].reason == "needs a person"
    assert not locks.list_locks("q")  # each lock released by its owner record
    assert set(
        TaskEvent.objects.filter(kind=EventKind.CLAIMED).values_list("actor", flat=True)
    ) == {"mcp:alice/laptop"}


@pytest.mark.slow
def test_a_view_only_token_lists_but_cannot_claim(live_server, transactional_db):
    make_tasks("q", 2)
    _, secret = ApiToken.issue(person("viewer", "view_task"), "reader")
    url = f"{live_server.url}/mcp/?queue=q"

    async def main():
        async with http_session(url, secret) as client:
            listed = await call(client, "list_tasks", status="active")
            assert listed["success"] and listed["total"] == 2
            for tool, args in [
                ("claim_next_task", {}),
                ("update_task", {"id": "t000000", "status": "in_progress"}),
                ("update_task", {"id": "t000000", "priority": 0}),
                ("create_task", {"title": "x"}),
            ]:
                answer = await call(client, tool, **args)
                assert answer == {
                    "success": False,
                    "message": f"{tool}: permission denied: your account needs queue.change_task",
                }

    run(main)
    assert set(Task.objects.values_list("status", "priority")) == {(Status.QUEUED, 2)}
    assert not TaskEvent.objects.exists()


@pytest.mark.slow
def test_a_revoked_token_stops_working_at_once(live_server, transactional_db):
    make_tasks("q", 2)
    token, secret = ApiToken.issue(person("alice", "view_task", "change_task"), "laptop")
    url = f"{live_server.url}/mcp/?queue=q"

    async def main():
        async with http_session(url, secret) as client:
            assert (await call(client, "claim_next_task"))["success"]
            await in_thread(token.revoke)
            with pytest.raises(MCPError):
                await call(client, "claim_next_task")

    run(main)
    # The second claim never ran, and the first went back with the revocation: the agent
    # can no longer finish it.
    assert not Task.objects.filter(status=Status.CLAIMED).exists()
    assert (
        TaskEvent.objects.filter(
            kind=EventKind.RELEASED, message="its token laptop was revoked"
        ).count()
        == 1
    )
    # What the client saw as an error is the endpoint's 401, from the first request on.
    request = urllib.request.Request(  # noqa: S310 - the test's own server
        url,
        json.dumps(CLAIM).encode(),
        {"Authorization": f"Bearer {secret}", "Content-Type": "application/json",
         "Accept": "application/json, text/event-stream"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)  # noqa: S310 - the test's own server
    assert refused.value.code == 401
    assert not Task.objects.filter(status=Status.CLAIMED).exists()
    assert not locks.list_locks("q")  # its lock directory went with the claim


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("end", ["deactivated", "deleted"])
def test_an_accounts_claims_go_back_when_it_is_deactivated_or_deleted(client, end):
    """Its tokens stop at once, and its agents can no longer finish what they hold: it
    waited for the leases to run out (30 minutes), where a revoked token's went back."""
    make_tasks("q", 2)
    assert post_json_rpc(client, CLAIM).status_code == 200
    assert Task.objects.filter(status=Status.CLAIMED).count() == 1
    alice = User.objects.get(username="alice")
    if end == "deactivated":
        alice.is_active = False
        alice.save()
    else:
        alice.delete()
    assert set(Task.objects.values_list("status", flat=True)) == {Status.QUEUED}
    released = TaskEvent.objects.get(kind=EventKind.RELEASED)
    assert released.message == f"its account alice was {end}"
    assert not locks.list_locks("q")


@pytest.mark.django_db(transaction=True)
def test_http_claims_live_by_lease_not_by_the_web_process_pid(client):
    make_tasks("q", 1)
    response = post_json_rpc(client, CLAIM)
    assert response.status_code == 200
    row = Task.objects.get()
    # Shown without the web process's pid, which means nothing to whoever reads it.
    assert describe_holder(row) == f"{row.holder} (over HTTP, until its lease runs out)"
    client.force_login(person("watcher", "view_task"))
    for url in ("/", f"/tasks/{row.pk}/"):
        holder = re.search(r"eld by (.*?) (·|since)", client.get(url).content.decode())
        assert holder.group(1) == f"{row.holder} on {row.holder_host}"  # and no pid
    # Its lease is the HTTP one, and a dead pid (the web worker recycled) does not reap it.
    assert (row.lease_expires_at - timezone.now()).total_seconds() > 1700
    Task.objects.update(holder_pid=2**22 + 12345)
    assert not reaper.release_stale_claims("q").requeued
    Task.objects.update(lease_expires_at=timezone.now())
    report = reaper.release_stale_claims("q")
    assert [s.why for s in report.requeued] == ["lease expired"]


@pytest.mark.django_db(transaction=True)
def test_a_refusal_over_http_names_the_session_by_its_token_not_the_web_process_pid(client):
    make_tasks("q", 1)
    alice = person("alice", "view_task", "change_task")
    secrets = {name: ApiToken.issue(alice, name)[1] for name in ("laptop", "desk")}

    def ask(token: str, message: dict) -> dict:
        response = client.post(
            "/mcp/?queue=q",
            json.dumps(message),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {secrets[token]}",
            **MCP_HEADERS,
        )
        return json.loads(response.json()["result"]["content"][0]["text"])

    assert ask("laptop", CLAIM)["success"]
    key = Task.objects.get().key
    complete = {"name": "complete_task", "arguments": {"id": key}}
    refused = ask("desk", {**CLAIM, "params": complete})
    assert refused["message"] == (
        f"{key}: cannot finish it: it is held by mcp:alice/laptop (over HTTP, until its lease "
        "runs out), not by this session (mcp:alice/desk, over HTTP)"
    )


@pytest.mark.django_db(transaction=True)
def test_tokens_of_users_with_the_longest_usernames_claim_each_as_itself(client):
    """`mcp:<user>/<token>` ran to 205 characters, past the holder's column: on PostgreSQL
    every claim was a database error. Cut short, the names of two such users must differ."""
    make_tasks("q", 2)
    tokens = [
        ApiToken.issue(person(letter * 149 + "x", "view_task", "change_task"), "n" * 50)
        for letter in "uv"
    ]
    for _, secret in tokens:
        response = client.post(
            "/mcp/?queue=q",
            json.dumps(CLAIM),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {secret}",
            **MCP_HEADERS,
        )
        answer = json.loads(response.json()["result"]["content"][0]["text"])
        assert answer["success"], answer
    holders = [token.worker_name for token, _ in tokens]
    assert sorted(Task.objects.values_list("holder", flat=True)) == sorted(holders)
    assert len(set(holders)) == 2
    assert all(len(h) <= Task._meta.get_field("holder").max_length for h in holders)
    tokens[0][0].revoke()
    assert Task.objects.get(holder=holders[1]).status == Status.CLAIMED
    assert Task.objects.filter(status=Status.QUEUED).count() == 1


@pytest.mark.django_db
def test_tokens_page_creates_shows_once_and_revokes(client):
    alice = person("alice", "view_task", "change_task")
    client.force_login(alice)
    page = client.get("/tokens/")
    assert page.status_code == 200 and b"No tokens yet" in page.content
    created = client.post("/tokens/", {"name": "laptop-claude"})
    assert created.status_code == 201
    secret = re.search(rb'<code class="secret">(hv_[^<]+)</code>', created.content).group(1)
    token = ApiToken.objects.get()
    assert token.digest != secret.decode() and secret.decode() not in token.digest
    assert ApiToken.authenticate(secret.decode()) == token
    again = client.get("/tokens/")
    assert secret not in again.content and token.hint.encode() in again.content
    duplicate = client.post("/tokens/", {"name": "laptop-claude"})
    assert b"already have a token of that name" in duplicate.content
    bad = client.post("/tokens/", {"name": "../x"})
    assert bad.status_code == 200 and ApiToken.objects.count() == 1
    # Another person cannot revoke it; its owner can.
    client.force_login(person("mallory", "view_task"))
    assert client.post(f"/tokens/{token.pk}/revoke/").status_code == 404
    client.force_login(alice)
    assert client.post(f"/tokens/{token.pk}/revoke/").status_code == 302
    assert ApiToken.authenticate(secret.decode()) is None


@pytest.mark.django_db
def test_tokens_page_shows_a_page_of_tokens_at_a_time(client, django_assert_max_num_queries):
    from pull_api.views import TOKENS_PER_PAGE

    alice = person("alice", "view_task")
    now = timezone.now()
    ApiToken.objects.bulk_create(
        ApiToken(
            user=alice,
            name=f"agent-{i:03d}",
            digest=f"{i:064x}",
            hint="hv_x",
            created_at=now - timezone.timedelta(minutes=i),
            revoked_at=now if i % 2 else None,
        )
        for i in range(TOKENS_PER_PAGE + 3)
    )
    client.force_login(alice)
    with django_assert_max_num_queries(6):
        first = client.get("/tokens/").content.decode()
    assert "agent-000" in first and f"agent-{TOKENS_PER_PAGE - 1:03d}" in first
    assert f"agent-{TOKENS_PER_PAGE:03d}" not in first and '?page=2">Older' in first
    older = client.get("/tokens/?page=2").content.decode()
    assert f"agent-{TOKENS_PER_PAGE + 2:03d}" in older and "agent-000" not in older


@pytest.mark.django_db
def test_a_token_name_taken_while_the_form_was_checked_is_said_on_the_form(client, monkeypatch):
    """Create sent twice at once (a double-click): both requests found the name free, and
    the second ended in the unique constraint, a server error."""
    from pull_api.views import TokenForm

    checked = TokenForm.clean_name

    def first_click_lands_meanwhile(form):
        name = checked(form)
        ApiToken.issue(form.user, name)
        return name

    monkeypatch.setattr(TokenForm, "clean_name", first_click_lands_meanwhile)
    client.force_login(person("alice", "view_task"))
    second = client.post("/tokens/", {"name": "laptop"})
    assert second.status_code == 200
    assert b"already have a token of that name" in second.content
    assert b'class="secret"' not in second.content
    assert list(ApiToken.objects.values_list("name", flat=True)) == ["laptop"]


@pytest.mark.django_db
def test_tokens_page_needs_login_and_csrf(client):
    assert client.get("/tokens/").status_code == 302
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(person("alice", "view_task"))
    assert strict.post("/tokens/", {"name": "x"}).status_code == 403
    assert not ApiToken.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_only_post_is_served_and_a_get_never_waits_for_a_stream(client):
    _, secret = ApiToken.issue(person("alice", "view_task", "change_task"), "laptop")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {secret}", **MCP_HEADERS}
    for method in ("get", "delete", "put"):
        assert getattr(client, method)("/mcp/?queue=q", **headers).status_code == 405
    garbage = client.post("/mcp/?queue=q", "{not json", content_type="application/json", **headers)
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == -32700


@pytest.mark.django_db
def test_a_body_over_the_upload_limit_is_refused_in_json_naming_the_limit(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = post_json_rpc(client, {**INITIALIZE, "padding": "x" * 1000})
    assert response.status_code == 413
    assert response.json() == {"error": "the request body is over the 1,000-byte limit"}


def staff_with(name: str, *codenames: str) -> Client:
    user = User.objects.create_user(name, is_staff=True)
    for codename in codenames:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="pull_api", codename=codename)
        )
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_in_the_admin_a_revoked_token_stays_revoked_and_revoking_takes_change():
    """A staff user with change permission cleared "Revoked at" and a leaked token worked
    again; one with view permission alone revoked every user's tokens, with no word."""
    owner = User.objects.create_user("owner")
    token, secret = ApiToken.issue(owner, "agent1")
    viewer = staff_with("viewer", "view_apitoken")
    response = viewer.post(
        "/admin/pull_api/apitoken/", {"action": "revoke", "_selected_action": [token.pk]}
    )
    assert ApiToken.authenticate(secret) is not None
    editor = staff_with("editor", "view_apitoken", "change_apitoken")
    response = editor.post(
        "/admin/pull_api/apitoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
        follow=True,
    )
    assert [str(m) for m in response.context["messages"]] == ["Revoked 1 token(s)."]
    assert ApiToken.authenticate(secret) is None
    change = reverse("admin:pull_api_apitoken_change", args=[token.pk])
    editor.post(change, {"revoked_at_0": "", "revoked_at_1": ""})
    assert ApiToken.authenticate(secret) is None
    token.refresh_from_db()
    assert token.revoked_at is not None
