#!/usr/bin/env python3
"""A stand-in for an agent CLI that pulls its own tasks over MCP, as Claude Code would
with `--mcp-config FILE`: claim, "work", complete, until QUEUE EMPTY.

Usage: pull_agent.py --mcp-config FILE [--sleep SECONDS] [--tokens N] [--block-if WORD]
                     [--hold]
--hold claims one task and then waits for ever (to watch a cancel end it).
"""

import argparse
import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def call(client, tool, **arguments) -> dict:
    result = await client.call_tool(tool, arguments)
    return json.loads(result.content[0].text)


async def work(args) -> int:
    with open(args.mcp_config, encoding="utf-8") as f:
        server = json.load(f)["mcpServers"]["hypervisor"]
    http = httpx2.AsyncClient(headers=server.get("headers", {}), timeout=60)
    async with http, Client(streamable_http_client(server["url"], http_client=http)) as client:
        while True:
            claimed = await call(client, "claim_next_task")
            if not claimed["success"]:
                print(claimed["message"])
                return 0 if claimed["message"].startswith("QUEUE EMPTY") else 1
            task = claimed["task"]
            print(f"working on {task['id']}", flush=True)
            if args.hold:
                await asyncio.sleep(3600)
            await asyncio.sleep(args.sleep)
            if args.block_if and args.block_if.lower() in (task["body"] + task["title"]).lower():
                answer = await call(client, "block_task", id=task["id"], reason="mentions it")
            else:
                answer = await call(
                    client, "complete_task", id=task["id"], summary="done", tokens=args.tokens
                )
            if not answer["success"]:
                print(answer["message"], file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mcp-config", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=0)
    parser.add_argument("--block-if", default="")
    parser.add_argument("--hold", action="store_true")
    return asyncio.run(work(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
