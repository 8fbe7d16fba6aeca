"""The MCP adapter: PullSession's tools over the official SDK, on stdio or streamable HTTP.

The tools' logic lives in workqueue.pull; here are only their schemas, the SDK's low-level
server (it hands the raw arguments on, so PullSession judges every bad input itself and
answers `success: false` rather than a validation trace), and the transports. Django's ORM
is synchronous: each tool runs in a thread of its own session, outside the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import anyio
from django.db import connection
from mcp.server import Server
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ListToolsResult, TextContent, Tool, ToolAnnotations

from workqueue.pull import READ_TOOLS, TOOLS, PullSession

log = logging.getLogger("workqueue.mcp")

ID = {"type": "string", "description": "The task's id (its key), as list_tasks shows it."}
TEXT = {"type": "string"}
NUMBER = {"type": "integer"}
TAGS = {"type": "array", "items": {"type": "string"}}
STATUS = {
    "type": "string",
    "description": "queued, ready, claimed, done, blocked; or the old words active "
    "(ready to claim), in_progress (claimed), cancelled.",
}
WHERE = {
    "type": "string",
    "description": "Filters FIELD=VALUE, comma-separated: project, assignee, complexity, type, "
    "tag, priority (also priority<=N, priority>=N, FIELD!=VALUE).",
}


def _schema(required: tuple[str, ...] = (), **properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


SCHEMAS = {
    "claim_next_task": (
        "Claim the highest-priority ready task of this queue (atomically: no other agent gets "
        "it). Returns the task with its body. 'QUEUE EMPTY' in the message means stop.",
        _schema(project=TEXT, where=WHERE),
    ),
    "list_tasks": (
        "List tasks of this queue, highest priority first (lower number = more urgent).",
        _schema(
            project=TEXT,
            status=STATUS,
            type=TEXT,
            priority=NUMBER,
            priority_max=NUMBER,
            assignee=TEXT,
            limit={"type": "integer", "default": 5, "minimum": 1, "maximum": 100},
        ),
    ),
    "get_task": ("One task, with its body and frontmatter.", _schema(("id",), id=ID)),
    "get_index_stats": (
        "Counts of the queue by status, ready, claimed, stale, and per project.",
        _schema(),
    ),
    "update_task": (
        "Change a task. status='in_progress' claims it for this session (refused if anyone "
        "else holds it); 'done' or 'blocked' finishes this session's claim (a blocked body "
        "with **Reason**: / **Evidence**: / **Next step**: fills those). Other fields are "
        "written into the task's markdown file.",
        _schema(
            ("id",),
            id=ID,
            status=STATUS,
            assignee=TEXT,
            priority=NUMBER,
            complexity=TEXT,
            tags=TAGS,
            title=TEXT,
            body=TEXT,
        ),
    ),
    "complete_task": (
        "Finish a task this session holds as done.",
        _schema(("id",), id=ID, summary=TEXT, evidence=TEXT, commit=TEXT, tokens=NUMBER),
    ),
    "block_task": (
        "Finish a task this session holds as blocked, saying why and what would unblock it.",
        _schema(("id", "reason"), id=ID, reason=TEXT, next=TEXT, evidence=TEXT),
    ),
    "release_task": (
        "Give a task this session holds back to the queue untouched, for another agent.",
        _schema(("id",), id=ID),
    ),
    "create_task": (
        "Write a new task file into this queue's folder (decomposing a task into parts).",
        _schema(
            ("title",),
            title=TEXT,
            body=TEXT,
            project=TEXT,
            priority=NUMBER,
            tags=TAGS,
            parent=TEXT,
            depends_on=TAGS,
        ),
    ),
}
assert set(SCHEMAS) == set(TOOLS)

RunTool = Callable[[str, dict | None], Awaitable[dict]]


def tool_list() -> list[Tool]:
    return [
        Tool(
            name=name,
            description=SCHEMAS[name][0],
            input_schema=SCHEMAS[name][1],
            annotations=ToolAnnotations(read_only_hint=name in READ_TOOLS),
        )
        for name in TOOLS
    ]


def build_server(run_tool: RunTool, name: str = "hypervisor") -> Server:
    """The SDK's low-level server with our tools; `run_tool` answers each call."""

    async def list_tools(ctx, params) -> ListToolsResult:
        return ListToolsResult(tools=tool_list())

    async def call_tool(ctx, params) -> CallToolResult:
        result = await run_tool(params.name, params.arguments)
        return CallToolResult(
            content=[TextContent(text=json.dumps(result, default=str))],
            structured_content=result,
        )

    return Server(
        name,
        version="1",
        instructions="Hypervisor's task queue: claim_next_task, do the task, then complete_task "
        "or block_task; repeat until the message says QUEUE EMPTY.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


class SessionThread:
    """One thread for one session's database work: one connection, calls in order."""

    def __init__(self, session: PullSession):
        self.session = session
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcp-session")

    async def run_tool(self, name: str, arguments: dict | None) -> dict:
        return await asyncio.wrap_future(self.executor.submit(self.session.call, name, arguments))

    def run(self, function, *args):
        return self.executor.submit(function, *args).result()

    def close(self) -> None:
        # A function, not `connection.close`: that would be bound here, to this thread's.
        def close_its_connection() -> None:
            connection.close()

        with suppress(Exception):
            self.executor.submit(close_its_connection).result(timeout=10)
        self.executor.shutdown(wait=True)


def serve_stdio(session: PullSession) -> None:
    """Serve one session over this process's stdin and stdout until the client closes it."""
    thread = SessionThread(session)
    server = build_server(thread.run_tool)

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    try:
        anyio.run(main)
    except* BrokenPipeError:
        pass  # its client is gone (killed) with answers still to write: no one to read them
    finally:
        thread.close()


# Streamable HTTP, one request at a time (the web app's /mcp/ view) ------------------


class HTTPAnswer:
    def __init__(self):
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()


def serve_http_request(
    session: PullSession,
    method: str,
    path: str,
    query_string: bytes,
    headers: list[tuple[str, str]],
    body: bytes,
) -> HTTPAnswer:
    """Answer one HTTP request with the SDK's stateless, JSON-response Streamable HTTP
    transport, run on an event loop of its own for this request."""
    thread = SessionThread(session)
    server = build_server(thread.run_tool)
    answer = HTTPAnswer()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query_string,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 0),
    }
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
            ]
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    async def main() -> None:
        manager = StreamableHTTPSessionManager(
            app=server,
            json_response=True,
            stateless=True,
            # Django checks the Host header (ALLOWED_HOSTS); a bearer token is never sent
            # by a browser on its own, so a rebinding page has nothing to ride on.
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        async with manager.run():
            await manager.handle_request(scope, receive, send)

    try:
        run_event_loop(main)
    finally:
        thread.close()
    return answer


def run_event_loop(main) -> None:
    """anyio.run(main), on a thread of its own when this thread runs an event loop already
    (a server that calls sync views from one, a test driving a browser)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        anyio.run(main)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcp-request") as pool:
        pool.submit(anyio.run, main).result()
