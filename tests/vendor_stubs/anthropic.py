"""A stand-in of Anthropic's Messages API (POST /v1/messages, server-sent events).

In "ok" mode a request that offers tools gets a `Read` tool call on the task file first,
then, once the tool's result comes back, a final message ending `COMPLETED: <key>`.
In "quota" mode every request gets HTTP 429 with a long retry-after; in "server_error"
mode, the stub's `error_status` (500) with the API's own error body. In "long" mode the
final message is a report of some 1.6 MB before its last line.
"""

from __future__ import annotations

import itertools
import re

from tests.vendor_stubs.base import Stub, prompt_text, send_events, send_json, task_key

TASK_FILE = re.compile(r"Its file is (\S+?)\.?\s*$", re.MULTILINE)
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
        if body.get("tools") and path and not answered_tool:
            block = {"type": "tool_use", "id": f"toolu_{next(ids)}", "name": "Read", "input": {}}
            arguments = {"file_path": path.group(1)}
            stop = "tool_use"
        else:
            block = {"type": "text", "text": ""}
            arguments = None
            stop = "end_turn"
            text = f"The task is done.\n\nCOMPLETED: {task_key(messages)}"
            if self.mode == "long":
                text = "A line of the report.\n" * 75_000 + text
        self.note_usage(model=model, output=output, **usage)
        message_id = f"msg_{next(ids)}"
        if not body.get("stream"):
            content = [{**block, "input": arguments} if arguments else {**block, "text": text}]
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
