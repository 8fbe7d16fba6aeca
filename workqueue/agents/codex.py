"""Codex CLI: `codex exec --json`, JSONL events.

`thread.started` names the session; `turn.completed` carries the usage (cumulative:
input + output of the last one is the total; `cached_input_tokens` is part of the input).
Codex gives no cost. Quota: "You've hit your usage limit. Try again at 3:28 PM.",
"Quota exceeded…", "exceeded retry limit, last status: 429 Too Many Requests". The
vendor's server failing: "We're currently experiencing high demand…" (a 500), "unexpected
status 503 Service Unavailable: …".
"""

from __future__ import annotations

from workqueue.agents.base import Adapter, Usage, short, short_arguments, whole


class CodexAdapter(Adapter):
    name = "codex"
    program = "codex"
    resume = ("codex", "exec", "resume", "{session}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.warnings: list[str] = []  # `error` events: retries, which may still succeed

    def command(self, prompt: str) -> list[str]:
        options = self.options
        args = [self.program, "exec", "--json"]
        if not self.has_flag("--skip-git-repo-check"):
            args.append("--skip-git-repo-check")
        if not self.has_flag(
            "--sandbox", "-s", "--full-auto", "--dangerously-bypass-approvals-and-sandbox"
        ):
            args += ["--sandbox", "workspace-write"]
        if options.model and not self.has_flag("--model", "-m"):
            args += ["--model", options.model]
        # The prompt after `--`: never taken for an option, whatever the task says.
        return [*args, *options.extra_args, "--", prompt]

    def event(self, event: dict) -> bool | None:
        kind = event.get("type")
        if kind == "thread.started":
            self.session_id = str(event.get("thread_id") or "")
            model = f" with {self.model}" if self.model else ""
            self.transcript.add("note", f"session started{model}")
        elif kind == "turn.started":
            self.turns += 1
        elif kind == "turn.completed":
            self.concluded = True
            usage = event.get("usage") or {}
            self.usage = Usage(
                input=whole(usage.get("input_tokens")),
                output=whole(usage.get("output_tokens")),
                cache_read=whole(usage.get("cached_input_tokens")),
            )
            self.usage.total = self.usage.input + self.usage.output
        elif kind == "turn.failed":
            self.concluded = True
            self.note_error(str((event.get("error") or {}).get("message") or "turn failed"))
        elif kind == "error":
            message = str(event.get("message") or "error")
            self.warnings.append(short(message, 1000))
            self.transcript.add("error", message)
        elif kind in ("item.started", "item.updated", "item.completed"):
            self.item(kind, event.get("item") or {})
        else:
            return False
        return None

    def item(self, kind: str, item: dict) -> None:
        what = item.get("type")
        done = kind == "item.completed"
        if what == "agent_message" and done:
            self.final = str(item.get("text") or "")
            self.transcript.add("assistant", self.final)
        elif what == "reasoning" and done:
            self.transcript.add("reasoning", str(item.get("text") or ""))
        elif what == "command_execution":
            if kind == "item.started":
                self.transcript.add("tool", short(item.get("command") or "", 300), "shell")
            elif done and whole(item.get("exit_code")):
                self.transcript.add("error", f"command exited {item['exit_code']}")
        elif what == "file_change" and done:
            paths = [str(c.get("path")) for c in item.get("changes") or [] if isinstance(c, dict)]
            self.transcript.add("tool", ", ".join(paths), "edit")
        elif what == "mcp_tool_call" and kind == "item.started":
            name = f"{item.get('server', '')}.{item.get('tool', '')}".strip(".")
            self.transcript.add("tool", short_arguments(item.get("arguments")), name)
        elif what == "web_search" and kind == "item.started":
            self.transcript.add("tool", short(item.get("query") or "", 200), "web_search")
        elif what == "error" and done:
            self.transcript.add("error", str(item.get("message") or "error"))

    def look_for_server_error(self, code: int | None) -> None:
        # Read before the quota's words: the retries' last word is the reason.
        if code and not self.errors and self.warnings:
            self.errors.append(self.warnings[-1])
        super().look_for_server_error(code)
