"""Drive `manage.py mcp` with the SDK's own client over stdio, from tests and the bench."""

from __future__ import annotations

import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from mcp import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(ROOT / "manage.py")


def server_parameters(queue: str, env: dict[str, str], *args: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=[MANAGE, "mcp", "--queue", queue, *args],
        env=env,
        cwd=str(ROOT),
    )


@asynccontextmanager
async def stdio_session(queue: str, env: dict[str, str], *args: str):
    """An MCP client connected to a fresh `manage.py mcp` process."""
    async with Client(server_parameters(queue, env, *args), read_timeout_seconds=60) as client:
        yield client


async def call(client: Client, tool: str, **arguments) -> dict:
    """One tool call; the JSON object every tool answers with."""
    result = await client.call_tool(tool, arguments)
    text = result.content[0].text
    answer = json.loads(text)
    assert answer == result.structured_content
    return answer


@asynccontextmanager
async def http_session(url: str, token: str | None):
    """An MCP client over streamable HTTP, with a bearer token."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=60)
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


async def in_thread(function, *args):
    """Run ORM code from inside an event loop: in a thread, its connection closed after."""
    import anyio
    from django.db import connection

    def run():
        try:
            return function(*args)
        finally:
            connection.close()

    return await anyio.to_thread.run_sync(run)


def run(main, *args):
    """anyio.run, on a thread of its own when this one runs an event loop already (the
    browser tests' Playwright keeps one in the main thread for the whole session)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import anyio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(main, *args)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(anyio.run, main, *args).result()
