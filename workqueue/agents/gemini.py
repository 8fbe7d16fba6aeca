"""Gemini CLI: `gemini --prompt=…` with stream-json (NDJSON) or json output.

In json mode the answer is one pretty-printed document on stdout, and a failure is an
error object on stderr: both are read whole at the end. Tokens: `total` summed over
`stats.models` (json) or `result.stats.total_tokens` (stream-json); `prompt` includes
`cached`. Gemini gives no cost.
"""

from __future__ import annotations

import re

from workqueue.agents.base import (
    AGENT_LINE,
    FINAL_LIMIT,
    SERVER_STATUSES,
    Adapter,
    Usage,
    short,
    short_arguments,
    whole,
)
from workqueue.models import Status

QUOTA_EXIT = 173  # HTTP 429 modulo 256: the daily quota is spent
# After its retries it exits with the HTTP status modulo 256 (500: 244), which its last
# error does not always name ("[API Error: An internal error has occurred…]" for a 503).
SERVER_EXITS = {status % 256 for status in SERVER_STATUSES}
EXIT_REASONS = {
    41: "authentication failed (exit 41): set GEMINI_API_KEY or choose an auth type in "
    "the CLI's settings",
    42: "the CLI refused its input (exit 42)",
    44: "sandbox error (exit 44)",
    52: "configuration error (exit 52)",
    53: "reached the session's turn limit (exit 53)",
    54: "a tool failed fatally (exit 54)",
    55: "untrusted folder (exit 55): the profile needs --skip-trust, or "
    "GEMINI_CLI_TRUST_WORKSPACE=true in its env",
    130: "cancelled (exit 130)",
}
# On stderr while it retries a 429 or a 5xx (a plain 429 for minutes, by default).
RETRY_LINE = re.compile(r"^Attempt \d+ failed with status (\d{3})\b")
# Its loop detection stops the run, which it still reports as a success.
LOOP_DETECTED = "Loop detected"


class GeminiAdapter(Adapter):
    name = "gemini"
    program = "gemini"
    stopped_by = ""  # the CLI's own words when it stopped the agent (its loop detection)

    def command(self, prompt: str) -> list[str]:
        options = self.options
        args = [self.program]
        if not self.has_flag("--output-format", "-o"):
            args += ["--output-format", "stream-json"]
        if not self.has_flag("--approval-mode", "--yolo", "-y"):
            args.append("--approval-mode=yolo")
        if not self.has_flag("--skip-trust"):
            args.append("--skip-trust")  # an untrusted folder silently drops yolo
        if options.model and not self.has_flag("--model", "-m"):
            args += ["--model", options.model]
        # One argument `--prompt=…`: the prompt is never taken for an option.
        return [*args, *options.extra_args, f"--prompt={prompt}"]

    def feed(self, stream: str, line: str) -> None:
        retry = RETRY_LINE.match(line)
        if retry:
            self.retrying = (int(retry.group(1)), short(line, 300))
        super().feed(stream, line)

    def answers(self, event: dict) -> bool:
        # The session's start and the prompt's echo come before any request; on stdout,
        # they may be read after the retry line printed on stderr just after them.
        kind = event.get("type")
        return not (kind == "init" or (kind == "message" and event.get("role") == "user"))

    def event(self, event: dict) -> bool | None:
        kind = event.get("type")
        if event.get("session_id"):
            self.session_id = str(event["session_id"])
        if kind is None:
            return self.document(event)
        if kind == "init":
            self.model = str(event.get("model") or self.model)
            self.transcript.add("note", f"session started with {self.model}")
        elif kind == "message":
            if event.get("role") == "assistant":
                text = str(event.get("content") or "")
                if event.get("delta"):
                    # A message streamed in pieces: only its end is kept, however long.
                    joined = self.final + text if self.transcript_open() else text
                    self.final = joined[-FINAL_LIMIT:]
                    self.transcript.extend_last("assistant", text)
                else:
                    self.final = text
                    self.transcript.add("assistant", text)
        elif kind == "tool_use":
            self.transcript.close_open()
            self.turns += 1
            name = str(event.get("tool_name") or "tool")
            self.transcript.add("tool", short_arguments(event.get("parameters")), name)
        elif kind == "tool_result":
            if event.get("status") == "error":
                error = event.get("error") or {}
                self.transcript.add("error", short(error.get("message") or "tool failed", 300))
        elif kind == "error":
            message = short(event.get("message") or "error", 300)
            self.transcript.add("error", message)
            self.note_stop(message)
        elif kind == "result":
            self.concluded = True
            self.transcript.close_open()
            self.take_stats(event.get("stats") or {})
            if event.get("status") != "success":
                error = event.get("error") or {}
                self.note_error(str(error.get("message") or event.get("status") or "error"))
        else:
            return False
        return None

    def transcript_open(self) -> bool:
        entries = self.transcript.entries
        return bool(entries and entries[-1].get("open") and entries[-1]["kind"] == "assistant")

    def document(self, event: dict) -> bool | None:
        """The json mode's one document (stdout), or its error object (stderr)."""
        if "response" in event or "stats" in event:
            self.concluded = True
            self.final = str(event.get("response") or "")
            if self.final:
                self.transcript.add("assistant", self.final)
            self.take_stats(event.get("stats") or {})
            for warning in event.get("warnings") or []:
                self.note_stop(str(warning))
        if isinstance(event.get("error"), dict):
            error = event["error"]
            message = str(error.get("message") or error.get("type") or "error")
            if error.get("code") == 429:
                self.note_quota(message)
            elif error.get("code") in SERVER_STATUSES:
                self.note_server_error(message)
            self.note_error(message)
        elif "response" not in event and "stats" not in event:
            return False
        return None

    def note_stop(self, message: str) -> None:
        if message.startswith(LOOP_DETECTED):
            self.stopped_by = message

    def take_stats(self, stats: dict) -> None:
        models = stats.get("models")
        if "total_tokens" in stats:  # stream-json's result
            self.usage = Usage(
                input=whole(stats.get("input_tokens")),
                output=whole(stats.get("output_tokens")),
                cache_read=whole(stats.get("cached")),
                total=whole(stats.get("total_tokens")),
            )
            self.duration_ms = whole(stats.get("duration_ms")) or self.duration_ms
            self.turns = whole(stats.get("tool_calls")) or self.turns
        elif isinstance(models, dict):  # json mode
            usage = Usage()
            for model in models.values():
                tokens = model.get("tokens") if isinstance(model, dict) else None
                if isinstance(tokens, dict):
                    usage.input += whole(tokens.get("prompt"))
                    usage.output += whole(tokens.get("candidates"))
                    usage.cache_read += whole(tokens.get("cached"))
                    usage.total += whole(tokens.get("total"))
            self.usage = usage
            tools = stats.get("tools")
            if isinstance(tools, dict):
                self.turns = whole(tools.get("totalCalls")) or self.turns
        if isinstance(models, dict) and len(models) == 1:
            self.model = str(next(iter(models)))

    def look_for_quota(self, code: int | None, stderr: str) -> None:
        if code == QUOTA_EXIT:
            self.note_quota(self.errors[-1] if self.errors else "quota exhausted (exit 173)")
            return
        super().look_for_quota(code, stderr)

    def look_for_server_error(self, code: int | None) -> None:
        if code in SERVER_EXITS:
            self.note_server_error(self.errors[-1] if self.errors else f"exit {code}")
            return
        super().look_for_server_error(code)

    def verdict(self, code: int | None, stderr: str) -> tuple[str, str]:
        if code == 0 and self.stopped_by and not AGENT_LINE.search(self.final):
            # Stopped before its last word: "success" here is not the task done.
            return Status.BLOCKED, f"the CLI stopped the agent: {self.stopped_by}"
        if code in EXIT_REASONS:
            detail = f": {self.errors[-1]}" if self.errors else ""
            return Status.BLOCKED, EXIT_REASONS[code] + detail
        return super().verdict(code, stderr)
