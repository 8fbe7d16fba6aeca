"""A stand-in of the Gemini API: `models/…:streamGenerateContent?alt=sse` and
`models/…:generateContent` (the CLI's routing classifier, when no model is named).

In "ok" mode the first turn calls the CLI's `read_file` tool on the task file and the next
ends with `COMPLETED: <key>`. In "quota" mode: HTTP 429 whose details say the per-day
quota is spent, which the CLI does not retry; in "rate_limit" mode, a plain 429, which it
retries for minutes. In "server_error" mode: the stub's
`error_status` (500) with the API's error body, which the CLI retries. In "loop" mode the
final answer says one sentence over and over, which the CLI's loop detection stops. In
"pull" mode it works a queue through the MCP tools the CLI offers (base.pull_step).
"""

from __future__ import annotations

import re

from tests.vendor_stubs.base import (
    Stub,
    prompt_text,
    send_events,
    send_json,
    task_key,
)

TASK_FILE = re.compile(r"Its file is (\S+?)\.?\s*$", re.MULTILINE)
DAILY_QUOTA = {
    "error": {
        "code": 429,
        "message": "You exceeded your current quota. Quota exceeded for metric: "
        "generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 50",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/"
                        "generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                        "quotaDimensions": {"location": "global", "model": "gemini-2.5-pro"},
                        "quotaValue": "50",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "43200s"},
        ],
    }
}

SERVER_STATUS = {500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
SERVER_WORDS = (
    "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)

RATE_LIMIT = {
    "error": {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
    }
}


def read_file_tool(tools: list) -> tuple[str, str] | None:
    for group in tools or []:
        for declaration in group.get("functionDeclarations") or []:
            if declaration.get("name") == "read_file":
                schema = declaration.get("parametersJsonSchema") or declaration.get("parameters")
                required = (schema or {}).get("required") or ["file_path"]
                return "read_file", required[0]
    return None


def function_names(tools: list) -> list[str]:
    return [
        str(declaration.get("name"))
        for group in tools or []
        for declaration in group.get("functionDeclarations") or []
    ]


def function_calls(contents: list) -> list[tuple[str, object]]:
    """Each `functionResponse` of the conversation: the function's name and its answer."""
    return [
        (part["functionResponse"].get("name", ""), part["functionResponse"].get("response"))
        for content in contents
        if isinstance(content, dict)
        for part in content.get("parts") or []
        if isinstance(part, dict) and "functionResponse" in part
    ]


class GeminiStub(Stub):
    def answer_post(self, handler, body: dict) -> None:
        path = handler.path
        if ":countTokens" in path:
            send_json(handler, 200, {"totalTokens": 10})
            return
        if ":generateContent" not in path and ":streamGenerateContent" not in path:
            send_json(handler, 404, {"error": {"code": 404, "message": f"no {path} here"}})
            return
        if self.mode == "quota":
            send_json(handler, 429, DAILY_QUOTA)
            return
        if self.mode == "rate_limit":
            send_json(handler, 429, RATE_LIMIT)
            return
        if self.mode == "server_error":
            status = SERVER_STATUS.get(self.error_status, "INTERNAL")
            error = {"code": self.error_status, "message": SERVER_WORDS, "status": status}
            send_json(handler, self.error_status, {"error": error})
            return
        contents = body.get("contents") or []
        answered = any(
            "functionResponse" in part
            for content in contents
            if isinstance(content, dict)
            for part in content.get("parts") or []
            if isinstance(part, dict)
        )
        task_file = TASK_FILE.search(prompt_text(contents))
        tool = read_file_tool(body.get("tools"))
        step = None
        if self.mode == "pull" and ":streamGenerateContent" in path:
            step = self.pull(function_names(body.get("tools")), function_calls(contents))
        if ":generateContent" in path:
            # The routing classifier (or another side call): a short JSON answer.
            part = {"text": '{"reasoning": "simple", "model_choice": "flash"}'}
        elif isinstance(step, tuple):
            part = {"functionCall": {"name": step[0], "args": step[1]}}
        elif step:
            part = {"text": step}
        elif tool and task_file and not answered:
            part = {"functionCall": {"name": tool[0], "args": {tool[1]: task_file.group(1)}}}
        elif self.mode == "loop":
            part = {"text": "I am still checking the task file once more. " * 40}
        else:
            part = {"text": f"The task is done.\n\nCOMPLETED: {task_key(contents)}"}
        usage = {
            "promptTokenCount": 500 + 25 * len(contents),
            "candidatesTokenCount": 40 + len(contents),
            "cachedContentTokenCount": 100,
            "thoughtsTokenCount": 12,
        }
        usage["totalTokenCount"] = (
            usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
        )
        self.note_usage(path=path.split("?")[0], **usage)
        answer = {
            "candidates": [
                {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": usage,
            "modelVersion": path.split("/models/")[-1].split(":")[0],
        }
        if ":streamGenerateContent" in path:
            send_events(handler, [(None, answer)])
        else:
            send_json(handler, 200, answer)
