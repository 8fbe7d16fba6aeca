"""A small threaded HTTP server on the loopback that records what a CLI asked for."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY_IN_PROMPT = re.compile(r"task (\S+) in queue")


class Stub:
    """One vendor API. `mode` is "ok" (answer with a tool call, then a final message),
    "pull" (a scripted pull agent: see `pull_step`), "quota" (HTTP 429), "server_error"
    (HTTP `error_status`, 500 unless set: the vendor's own server failing), or "hang"
    (never answer). Every request (with its headers) and the usage each answer reported
    are kept."""

    def __init__(self):
        self.mode = "ok"
        self.error_status = 500
        self.requests: list[dict] = []
        self.usage: list[dict] = []  # what each answer told the CLI it used
        self.ended_with: str | None = None  # the pull script's final words
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def handler_class(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                stub.record(self, None)
                stub.answer_get(self)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"raw": raw[:1000].decode("utf-8", "replace")}
                stub.record(self, body)
                if stub.mode == "hang":
                    stub.closing.wait(120)  # the CLI waits; only its timeout ends it
                    return
                stub.answer_post(self, body)

        return Handler

    def record(self, handler, body) -> None:
        with self.lock:
            self.requests.append(
                {
                    "method": handler.command,
                    "path": handler.path,
                    "headers": dict(handler.headers.items()),
                    "body": body,
                }
            )

    def answer_get(self, handler) -> None:
        send_json(handler, 404, {"error": {"message": "not here"}})

    def answer_post(self, handler, body: dict) -> None:
        raise NotImplementedError

    def pull(self, tool_names: list[str], calls: list[tuple[str, object]]):
        """The pull script's next step (see `pull_step`), its final words kept."""
        step = pull_step(tool_names, calls)
        if isinstance(step, str):
            self.ended_with = step
        return step

    def note_usage(self, **usage) -> None:
        with self.lock:
            self.usage.append(usage)


def send_json(handler, status: int, data: dict, headers: dict | None = None) -> None:
    payload = json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(payload)


def send_events(handler, events: list[tuple[str | None, dict]]) -> None:
    """Server-sent events, then the connection closes."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")
    handler.end_headers()
    for name, data in events:
        chunk = (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"
        handler.wfile.write(chunk.encode())
        handler.wfile.flush()
    handler.close_connection = True


def prompt_text(value) -> str:
    """Every string inside a request body, joined: enough to find the task key."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "\n".join(prompt_text(v) for v in value.values())
    if isinstance(value, list):
        return "\n".join(prompt_text(v) for v in value)
    return ""


def task_key(body) -> str:
    found = KEY_IN_PROMPT.search(prompt_text(body))
    return found.group(1) if found else "unknown"


CLAIM = "claim_next_task"
PULL_SUMMARY = "stand-in finished {key}"


def decoded(value):
    """A tool's result as the CLI echoed it back, with every string that holds JSON (the
    MCP answer's text, wrapped once more by some CLIs, or after a heading such as Codex's
    "Wall time: …\nOutput:\n") parsed in place."""
    if isinstance(value, str) and "{" in value:
        try:
            found, _ = json.JSONDecoder().raw_decode(value[value.index("{") :])
        except ValueError:
            return value
        return decoded(found)
    if isinstance(value, dict):
        return {k: decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decoded(v) for v in value]
    return value


def answer_of(value) -> dict | None:
    """The first object with a `success` field inside a decoded tool result: our tool's."""
    value = decoded(value)
    if isinstance(value, dict):
        if "success" in value:
            return value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            if (found := answer_of(item)) is not None:
                return found
    return None


def pull_step(tool_names: list[str], calls: list[tuple[str, object]]) -> tuple[str, dict] | str:
    """What a pull agent does next: a tool call (name and arguments) or its final words.

    `tool_names` are the tools the CLI offered, under its own prefixes; `calls` the
    conversation's tool calls so far, each its name and the result the CLI sent back.
    Claim; complete what was claimed, with a summary; claim again; stop at QUEUE EMPTY."""
    claim = next((n for n in tool_names if n.endswith(CLAIM)), None)
    if claim is None:
        return "No claim_next_task tool was offered."
    # Only our server's tools count (a CLI's own, such as a tool search, do not).
    calls = [(name, result) for name, result in calls if name.startswith(claim[: -len(CLAIM)])]
    if not calls:
        return claim, {}
    name, result = calls[-1]
    answer = answer_of(result) or {}
    if name == claim and "QUEUE EMPTY" in str(answer.get("message")):
        return "QUEUE EMPTY"
    if name == claim and answer.get("success"):
        key = answer["task"]["id"]
        return claim.removesuffix(CLAIM) + "complete_task", {
            "id": key,
            "summary": PULL_SUMMARY.format(key=key),
        }
    if name != claim and answer.get("success"):
        return claim, {}
    return f"Stopped: {name} answered {result!r}"
