"""Claude Code: `claude -p` with stream-json (NDJSON) or json output.

Tokens are summed over `modelUsage` (input + output + cache read + cache creation), the
cost is `total_cost_usd`. Quota: `api_error_status` 429 or 529 in the result, a
`rate_limit_event` whose status is `rejected` (with `resetsAt`), or an assistant message
marked `"error": "rate_limit"`. The vendor's server failing: `api_error_status` 500, 502, 503
or 504.
"""

from __future__ import annotations

from workqueue.agents.base import (
    SERVER_STATUSES,
    Adapter,
    Usage,
    from_epoch,
    money,
    short,
    short_arguments,
    whole,
)
from workqueue.models import Status

QUOTA_STATUSES = {429, 529}
AUTH_STATUSES = {401, 403}
ROOT_REFUSAL = "cannot be used with root/sudo privileges"


class ClaudeAdapter(Adapter):
    name = "claude"
    program = "claude"
    quota_statuses = QUOTA_STATUSES
    reports_cost = True  # `total_cost_usd`
    resume = ("claude", "--resume", "{session}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcome: dict | None = None  # the `result` event
        # Usage until the result: an API call's usage rides on each of its messages, so
        # the last call's is kept aside and the earlier ones summed (one sum a call).
        self.earlier = Usage()
        self.last_call: tuple[str, Usage] | None = None
        self.calls = 0

    def command(self, prompt: str) -> list[str]:
        options = self.options
        args = [self.program, "-p"]
        if not self.has_flag("--output-format"):
            args += ["--output-format", "stream-json", "--verbose"]  # stream-json needs it
        if not self.has_flag("--permission-mode", "--dangerously-skip-permissions"):
            args += ["--permission-mode", "bypassPermissions"]
        if options.model and not self.has_flag("--model"):
            args += ["--model", options.model]
        if options.max_turns:
            args += ["--max-turns", str(options.max_turns)]
        if options.max_budget_usd:
            args += ["--max-budget-usd", str(options.max_budget_usd)]
        # The prompt after `--`: never taken for an option, whatever the task says.
        return [*args, *options.extra_args, "--", prompt]

    def event(self, event: dict) -> bool | None:
        kind = event.get("type")
        if event.get("session_id"):
            self.session_id = str(event["session_id"])
        if kind == "system":
            if event.get("subtype") == "init":
                self.model = str(event.get("model") or self.model)
                self.transcript.add("note", f"session started with {self.model}")
            elif event.get("subtype") == "api_retry":
                status = whole(event.get("error_status"))
                what = f"API error {status} ({event.get('error') or 'error'})"
                self.retrying = (status, f"retry {event.get('attempt')}: {what}")
                self.transcript.add("error", f"retrying after {what}")
            return None
        if kind == "assistant":
            return self.assistant(event)
        if kind == "user":
            for block in _content(event):
                if block.get("type") == "tool_result" and block.get("is_error"):
                    self.transcript.add("error", short(_text_of(block.get("content")), 300))
            return None
        if kind == "rate_limit_event":
            info = event.get("rate_limit_info") or {}
            # On overage Claude Code says "rejected" and goes on: no stop.
            if info.get("status") == "rejected" and not info.get("isUsingOverage"):
                what = info.get("rateLimitType") or "rate limit"
                self.note_quota(f"rate limit rejected ({what})", from_epoch(info.get("resetsAt")))
            return None
        if kind == "result":
            return self.take_result(event)
        return kind == "stream_event" or False

    def assistant(self, event: dict) -> None:
        message = event.get("message") or {}
        self.model = str(message.get("model") or self.model)
        if event.get("error") == "rate_limit" or message.get("error") == "rate_limit":
            self.note_quota(_text_of(message.get("content")) or "rate limit")
        usage = message.get("usage")
        if isinstance(usage, dict):
            self.count_call(str(message.get("id") or ""), _usage(usage))
        for block in _content(event):
            if block.get("type") == "text" and block.get("text"):
                self.final = str(block["text"])
                self.transcript.add("assistant", self.final)
            elif block.get("type") == "tool_use":
                name = str(block.get("name") or "tool")
                self.transcript.add("tool", short_arguments(block.get("input")), name)

    def count_call(self, message_id: str, usage: Usage) -> None:
        # A message without an id is a call of its own.
        if not self.last_call or not message_id or self.last_call[0] != message_id:
            if self.last_call:
                self.earlier = _summed([self.earlier, self.last_call[1]])
            self.calls += 1
        self.last_call = (message_id, usage)
        if not self.outcome:
            self.usage = _summed([self.earlier, usage])
            self.turns = self.calls

    def take_result(self, event: dict) -> None:
        self.outcome = event
        self.concluded = True
        if isinstance(event.get("result"), str):
            self.final = event["result"]
        self.turns = whole(event.get("num_turns")) or self.turns
        self.duration_ms = whole(event.get("duration_ms")) or None
        self.cost_usd = money(event.get("total_cost_usd"))
        models = event.get("modelUsage")
        if isinstance(models, dict) and models:
            self.usage = _summed(
                Usage(
                    input=whole(m.get("inputTokens")),
                    output=whole(m.get("outputTokens")),
                    cache_read=whole(m.get("cacheReadInputTokens")),
                    cache_write=whole(m.get("cacheCreationInputTokens")),
                )
                for m in models.values()
                if isinstance(m, dict)
            )
            if len(models) == 1:
                self.model = str(next(iter(models)))
        elif isinstance(event.get("usage"), dict):
            self.usage = _summed([_usage(event["usage"])])
        status = event.get("api_error_status")
        if status in QUOTA_STATUSES:
            self.note_quota(self.final or f"API error {status}")
        elif status in SERVER_STATUSES:
            self.note_server_error(self.final or f"API error {status}")
        elif event.get("is_error"):
            errors = event.get("errors")
            text = "; ".join(map(str, errors)) if isinstance(errors, list) and errors else ""
            self.note_error(text or self.final or str(event.get("subtype") or "error"))
        self.transcript.add("result", f"{event.get('subtype', '')}: {short(self.final, 300)}")

    def verdict(self, code: int | None, stderr: str) -> tuple[str, str]:
        outcome = self.outcome
        if outcome is None:
            if ROOT_REFUSAL in stderr:
                return Status.BLOCKED, (
                    "Claude Code refuses bypassPermissions as root: run the worker as "
                    "another user, or set IS_SANDBOX=1 in the profile's env inside a container"
                )
            if code == 0:
                return Status.BLOCKED, "claude ended without a result"
            return super().verdict(code, stderr)
        subtype = str(outcome.get("subtype") or "")
        if subtype == "error_max_turns":
            return Status.BLOCKED, f"reached the maximum number of turns ({self.turns})"
        if subtype == "error_max_budget_usd":
            return Status.BLOCKED, f"reached the task's budget of ${self.options.max_budget_usd}"
        if outcome.get("api_error_status") in AUTH_STATUSES:
            return Status.BLOCKED, f"authentication failed: {short(self.final, 300)}"
        if outcome.get("is_error") or subtype.startswith("error"):
            return Status.BLOCKED, self.errors[-1] if self.errors else subtype
        if code:
            return super().verdict(code, stderr)
        return Status.DONE, ""


def _content(event: dict) -> list[dict]:
    content = (event.get("message") or {}).get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _text_of(content) -> str:
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return str(content or "")


def _usage(usage: dict) -> Usage:
    return Usage(
        input=whole(usage.get("input_tokens")),
        output=whole(usage.get("output_tokens")),
        cache_read=whole(usage.get("cache_read_input_tokens")),
        cache_write=whole(usage.get("cache_creation_input_tokens")),
    )


def _summed(parts) -> Usage:
    total = Usage()
    for part in parts:
        total.input += part.input
        total.output += part.output
        total.cache_read += part.cache_read
        total.cache_write += part.cache_write
    total.total = total.input + total.output + total.cache_read + total.cache_write
    return total
