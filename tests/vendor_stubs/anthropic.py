"""A stand-in of Anthropic's Messages API (POST /v1/messages, server-sent events).

In "ok" mode a request that offers tools gets a `Read` tool call on the task file first,
then, once the tool's result comes back, a final message ending `COMPLETED: <key>`.
In "quota" mode every request gets HTTP 429 with a long retry-after; in "server_error"
mode, the stub's `error_status` (500) with the API's own error body. In "long" mode the
final message is a report of some 1.6 MB before its last line. In "pull" mode it works a
queue through the MCP tools the CLI offers (base.pull_step).
"""

from __future__ import annotations

import itertools
import re

from tests.vendor_stubs.base import (
    Stub,
    prompt_text,
    send_events,
    send_json,
    task_key,
)

TASK_FILE = re.compile(r"Its file is (\S+?)\.?\s*$", re.MULTILINE)
DEFERRED_CLAIM = re.compile(r"\b(\w+__)claim_next_task\b")
ids = itertools.count(1)


class AnthropicStub(Stub):
    def answer_post(self, handler, body: dict) -> None:
        if not handler.path.startswith("/v1/messages") or "count_tokens" in handler.path:
            send_json(handler, 200, {"input_tokens": 10})
            return
        if self.mode == "quota":
            send_json(
                handler,
                429,
                {
                    "type": "error",
                    "error": {"type": "rate_limit_error", "message": "Rate limit reached"},
                },
                {"retry-after": "3600", "anthropic-ratelimit-unified-status": "rejected"},
            )
            return
        if self.mode == "server_error":
            error = {"type": "api_error", "message": "Internal server error"}
            send_json(handler, self.error_status, {"type": "error", "error": error})
            return
        messages = body.get("messages") or []
        model = str(body.get("model") or "claude-sonnet-stub")
        usage = {
            "input_tokens": 100 + 10 * len(messages),
            "cache_creation_input_tokens": 50,
            "cache_read_input_tokens": 200,
        }
        output = 20 + len(messages)
        answered_tool = any(
            isinstance(m.get("content"), list)
            and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in m["content"])
            for m in messages
            if isinstance(m, dict)
        )
        path = TASK_FILE.search(prompt_text(messages))
        step = None
        if self.mode == "pull":
            step = deferred_search(body, messages) or self.pull(
                tool_names(body), tool_calls(messages)
            )
        if isinstance(step, tuple):
            block = {"type": "tool_use", "id": f"toolu_{next(ids)}", "name": step[0], "input": {}}
            arguments, stop = step[1], "tool_use"
        elif body.get("tools") and path and not answered_tool and step is None:
            block = {"type": "tool_use", "id": f"toolu_{next(ids)}", "name": "Read", "input": {}}
            arguments = {"file_path": path.group(1)}
            stop = "tool_use"
        else:
            block = {"type": "text", "text": ""}
            arguments = None
            stop = "end_turn"
            text = step or f"The task is done.\n\nCOMPLETED: {task_key(messages)}"
            if self.mode == "long":
                text = "A line of the report.\n" * 75_000 + text
        self.note_usage(model=model, output=output, **usage)
        message_id = f"msg_{next(ids)}"
        if not body.get("stream"):
            content = [
                {**block, "input": arguments} if arguments is not None else {**block, "text": text}
            ]
            send_json(
                handler,
                200,
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {**usage, "output_tokens": output},
                },
            )
            return
        if arguments is not None:
            import json

            delta = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
        else:
            delta = {"type": "text_delta", "text": text}
        start = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        send_events(
            handler,
            [
                ("message_start", {"type": "message_start", "message": start}),
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                ),
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop, "stop_sequence": None},
                        "usage": {"output_tokens": output},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ],
        )


def tool_names(body: dict) -> list[str]:
    return [str(tool.get("name")) for tool in body.get("tools") or [] if isinstance(tool, dict)]


def tool_calls(messages: list) -> list[tuple[str, object]]:
    """Each `tool_use` of the conversation, by name, with the `tool_result` sent back."""
    names, calls = {}, []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                names[block.get("id")] = block.get("name")
            elif block.get("type") == "tool_result":
                calls.append((names.get(block.get("tool_use_id"), ""), block.get("content")))
    return calls


def deferred_search(body: dict, messages: list) -> tuple[str, dict] | None:
    """Claude Code offers MCP tools by name only ("deferred"), to be loaded with its
    ToolSearch tool: do as a model does, once, when ours are not loaded yet."""
    names = tool_names(body)
    if any(n.endswith("claim_next_task") for n in names) or "ToolSearch" not in names:
        return None
    if any(name == "ToolSearch" for name, _ in tool_calls(messages)):
        return None  # searched already, and still not loaded: pull_step says so
    found = DEFERRED_CLAIM.search(prompt_text(body.get("system")) + prompt_text(messages))
    if not found:
        return None
    prefix = found.group(1)
    return "ToolSearch", {"query": f"select:{prefix}claim_next_task,{prefix}complete_task"}
