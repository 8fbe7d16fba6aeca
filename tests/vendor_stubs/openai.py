"""A stand-in of OpenAI's Responses API (POST /v1/responses, server-sent events).

In "ok" mode the first turn runs the task file through Codex's shell tool, and the next
ends with a message `COMPLETED: <key>`. In "quota" mode: HTTP 429 `insufficient_quota`; in
"server_error" mode, the stub's `error_status` (500) with the API's `server_error` body.
In "pull" mode it works a queue through the MCP tools the CLI offers (base.pull_step), as
function calls or, when Codex offers only its code-mode `exec` tool, from JavaScript.
"""

from __future__ import annotations

import itertools
import json
import re

from tests.vendor_stubs.base import (
    Stub,
    prompt_text,
    send_events,
    send_json,
    task_key,
)

TASK_FILE = re.compile(r"Its file is (\S+?)\.?\s*$", re.MULTILINE)
ids = itertools.count(1)


def shell_tool(tools: list) -> dict | None:
    for tool in tools or []:
        name = str(tool.get("name") or "")
        if tool.get("type") == "function" and ("shell" in name or "exec" in name):
            return tool
    return None


def function_names(body: dict) -> list[str]:
    """The function tools offered, those of a namespace (Codex puts an MCP server's tools
    in one, `mcp__<server>`) as `<namespace>__<name>`."""
    names = []
    for tool in body.get("tools") or []:
        if tool.get("type") == "function":
            names.append(str(tool.get("name")))
        elif tool.get("type") == "namespace":
            names += [f"{tool['name']}__{t.get('name')}" for t in tool.get("tools") or []]
    return names


def qualified(item: dict) -> str:
    namespace = item.get("namespace")
    return f"{namespace}__{item.get('name')}" if namespace else str(item.get("name"))


def function_calls(items: list) -> list[tuple[str, object]]:
    """Each `function_call_output` of the input, by the name of the call it answers."""
    names, calls = {}, []
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            names[item.get("call_id")] = qualified(item)
        elif item.get("type") == "function_call_output":
            calls.append((names.get(item.get("call_id"), ""), item.get("output")))
    return calls


LIST_TOOLS = "text(JSON.stringify(ALL_TOOLS.map((tool) => tool.name)))"
CALLED = re.compile(r"await tools\.(\w+)\(")


def code_mode(items: list) -> bool:
    """Codex's newer models get one `exec` tool that runs JavaScript calling every other
    tool (`await tools.<name>(…)`), listed in an `additional_tools` input item."""
    return any(
        isinstance(item, dict)
        and item.get("type") == "additional_tools"
        and "'name': 'exec'" in str(item.get("tools"))
        for item in items
    )


def code_step(items: list, pull) -> dict | str:
    """The pull script in code mode: list the tools (ALL_TOOLS), then call ours from
    JavaScript, one call per `exec`. Returns the `custom_tool_call` item, or final words."""
    inputs, listed, calls = {}, None, []
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "custom_tool_call":
            inputs[item.get("call_id")] = str(item.get("input"))
        elif item.get("type") == "custom_tool_call_output":
            code, output = inputs.get(item.get("call_id"), ""), item.get("output")
            if code == LIST_TOOLS:
                listed = decoded_list(output)
            elif called := CALLED.search(code):
                calls.append((called.group(1), output))
    if listed is None:
        code = LIST_TOOLS
    else:
        step = pull(listed, calls)
        if isinstance(step, str):
            return step
        code = f"text(await tools.{step[0]}({json.dumps(step[1])}))"
    return {
        "type": "custom_tool_call",
        "id": f"ctc_{next(ids)}",
        "call_id": f"call_{next(ids)}",
        "name": "exec",
        "input": code,
        "status": "completed",
    }


def decoded_list(output) -> list[str]:
    """The tool names `exec` printed, however the output wraps them."""
    found = re.search(r'\[\s*"[^\]]*\]', prompt_text(output) or str(output))
    return json.loads(found.group(0)) if found else []


class OpenAIStub(Stub):
    def answer_get(self, handler) -> None:
        if handler.path.rstrip("/").endswith("/models"):
            send_json(handler, 200, {"object": "list", "data": [], "models": []})
            return
        super().answer_get(handler)

    def answer_post(self, handler, body: dict) -> None:
        if not handler.path.startswith("/v1/responses"):
            send_json(handler, 404, {"error": {"message": f"no {handler.path} here"}})
            return
        if self.mode == "quota":
            send_json(
                handler,
                429,
                {
                    "error": {
                        "message": "You exceeded your current quota, please check your plan.",
                        "type": "insufficient_quota",
                        "code": "insufficient_quota",
                    }
                },
            )
            return
        if self.mode == "server_error":
            error = {
                "message": "The server had an error while processing your request. Sorry "
                "about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            send_json(handler, self.error_status, {"error": error})
            return
        items = body.get("input") or []
        ran_tool = any(
            isinstance(i, dict)
            and i.get("type") in ("function_call_output", "custom_tool_call_output")
            for i in items
        )
        path = TASK_FILE.search(prompt_text(items) + "\n" + str(body.get("instructions") or ""))
        tool = shell_tool(body.get("tools"))
        response_id = f"resp_{next(ids)}"
        step = None
        if self.mode == "pull" and code_mode(items):
            step = code_step(items, self.pull)
        elif self.mode == "pull":
            step = self.pull(function_names(body), function_calls(items))
        if isinstance(step, dict):
            item = step
        elif isinstance(step, tuple):
            namespace, _, name = step[0].rpartition("__")
            item = {
                "type": "function_call",
                "id": f"fc_{next(ids)}",
                "call_id": f"call_{next(ids)}",
                **({"namespace": namespace, "name": name} if namespace else {"name": name}),
                "arguments": json.dumps(step[1]),
                "status": "completed",
            }
        elif tool and path and not ran_tool and step is None:
            # The shell tool's own schema: `cmd` (a string) in recent versions, `command`
            # (an argument list) in older ones.
            properties = (tool.get("parameters") or {}).get("properties") or {}
            field = "cmd" if "cmd" in properties else "command"
            command = f"cat {path.group(1)}"
            if (properties.get(field) or {}).get("type") == "array":
                command = ["bash", "-lc", command]
            item = {
                "type": "function_call",
                "id": f"fc_{next(ids)}",
                "call_id": f"call_{next(ids)}",
                "name": tool["name"],
                "arguments": json.dumps({field: command}),
                "status": "completed",
            }
        else:
            text = step or f"The task is done.\n\nCOMPLETED: {task_key(items)}"
            item = {
                "type": "message",
                "id": f"msg_{next(ids)}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        cached = 64
        usage = {
            "input_tokens": 300 + 20 * len(items),
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": 30 + len(items),
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        self.note_usage(**usage)
        response = {"id": response_id, "object": "response", "status": "in_progress", "output": []}
        events = [
            ("response.created", {"type": "response.created", "response": response}),
            (
                "response.output_item.added",
                {"type": "response.output_item.added", "output_index": 0, "item": item},
            ),
        ]
        if item["type"] == "message":
            events.append(
                (
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": item["content"][0]["text"],
                    },
                )
            )
        events += [
            (
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": 0, "item": item},
            ),
            (
                "response.completed",
                {
                    "type": "response.completed",
                    "response": {
                        **response,
                        "status": "completed",
                        "output": [item],
                        "usage": usage,
                    },
                },
            ),
        ]
        send_events(handler, events)
