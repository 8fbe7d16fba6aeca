#!/usr/bin/env python3
"""Fake `claude`, `gemini` and `codex` for the tests: each prints what its real CLI prints
(the formats of tests/fixtures/agent_formats), with numbers of its own per task.

What a run does is read from the task file's frontmatter, `fake: SCENARIO`:
  (none)    a normal run, with an unknown event type and a line of noise in it
  quota     the CLI's own quota or rate-limit output
  hang      starts a child and a grandchild in a session of its own, then never ends
  truncate  prints part of the stream, half a line, and kills itself
  slow      a tool call, then waits until the file `<task file>.release` appears
  blocked   the final message says BLOCKED with Reason and Next
  max_turns, auth, untrusted, json_error   the CLI's own failure for each

Every run appends one JSON line to $FAKE_AGENT_LEDGER (set in the profile's env): the
numbers it printed, its pid and group, and the names of the variables it could see.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from decimal import Decimal

CLI = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]


def out(value) -> None:
    sys.stdout.write((value if isinstance(value, str) else json.dumps(value)) + "\n")
    sys.stdout.flush()


def option(name: str, default: str = "") -> str:
    for i, arg in enumerate(ARGS):
        if arg == name and i + 1 < len(ARGS):
            return ARGS[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def task_scenario() -> str:
    path = os.environ.get("HYPERVISOR_TASK_PATH", "")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(20000)
    except OSError:
        return ""
    found = re.search(r"^fake:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else ""


KEY = os.environ.get("HYPERVISOR_TASK_KEY", "no-key")
SCENARIO = task_scenario()
DIGEST = int(hashlib.sha256(f"{CLI}:{KEY}".encode()).hexdigest(), 16)
NUMBERS = {
    "input": 100 + DIGEST % 900,
    "output": 10 + (DIGEST >> 10) % 90,
    "cache_read": (DIGEST >> 20) % 5000,
    "cache_write": (DIGEST >> 33) % 300,
}
COST = (
    Decimal(NUMBERS["input"]) * 3
    + Decimal(NUMBERS["output"]) * 15
    + Decimal(NUMBERS["cache_read"]) * Decimal("0.3")
    + Decimal(NUMBERS["cache_write"]) * Decimal("3.75")
) / Decimal(1_000_000)
SESSION = str(uuid.UUID(int=DIGEST >> 128))
# A slow run reads a file whose name is markup: the board must show it as text.
TOOL_FILE = "<img src=x onerror=alert(1)>.py" if SCENARIO == "slow" else "a.py"


def ledger(**values) -> None:
    path = os.environ.get("FAKE_AGENT_LEDGER")
    if not path:
        return
    record = {
        "cli": CLI,
        "key": KEY,
        "scenario": SCENARIO,
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "env": sorted(os.environ),
        "env_values": list(os.environ.values()),
        "args": ARGS,
        **values,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def hang() -> None:
    # A child, and a grandchild that leaves the group with setsid(): all must be ended.
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleeper)
    grandchild = subprocess.Popen(sleeper, start_new_session=True)
    ledger(children=[child.pid, grandchild.pid])
    while True:
        time.sleep(1)


def wait_for_release() -> None:
    release = os.environ.get("HYPERVISOR_TASK_PATH", "") + ".release"
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)


def cut_and_die(line: str) -> None:
    sys.stdout.write(line[: len(line) // 2])
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# Claude Code.
def claude() -> int:
    total = sum(NUMBERS.values())
    usage = {
        "input_tokens": NUMBERS["input"],
        "cache_creation_input_tokens": NUMBERS["cache_write"],
        "cache_read_input_tokens": NUMBERS["cache_read"],
        "output_tokens": NUMBERS["output"],
    }
    init = {"type": "system", "subtype": "init", "session_id": SESSION, "model": "claude-fake"}
    tool = {
        "type": "assistant",
        "message": {
            "id": "msg_1",
            "model": "claude-fake",
            "content": [
                {"type": "tool_use", "id": "t1", "name": "Read", "input": {"file_path": TOOL_FILE}}
            ],
            "usage": usage,
        },
        "session_id": SESSION,
    }
    final = f"Done.\n\nCOMPLETED: {KEY}"
    subtype, is_error, extra = "success", False, {}
    if SCENARIO == "blocked":
        final = f"Cannot do it.\n\nBLOCKED: {KEY}\nReason: needs a decision\nNext: ask the owner"
    elif SCENARIO == "max_turns":
        subtype, is_error, final = "error_max_turns", True, ""
        extra = {"errors": ["Reached maximum number of turns (3)"]}
    elif SCENARIO == "quota":
        ledger(tokens=0, cost_usd="0", session_id=SESSION)
        out(init)
        out(
            {
                "type": "rate_limit_event",
                "rate_limit_info": {"status": "rejected", "resetsAt": int(time.time()) + 3600},
            }
        )
        out(
            {
                "type": "result",
                "subtype": "success",
                "is_error": True,
                "result": "API Error: Rate limit reached",
                "session_id": SESSION,
                "total_cost_usd": 0,
                "api_error_status": 429,
                "modelUsage": {},
            }
        )
        return 1
    result = {
        "type": "result",
        "subtype": subtype,
        "is_error": is_error,
        "duration_ms": 1234,
        "num_turns": 2,
        "result": final,
        "session_id": SESSION,
        "total_cost_usd": float(COST),
        "usage": usage,
        "modelUsage": {
            "claude-fake": {
                "inputTokens": NUMBERS["input"],
                "outputTokens": NUMBERS["output"],
                "cacheReadInputTokens": NUMBERS["cache_read"],
                "cacheCreationInputTokens": NUMBERS["cache_write"],
                "costUSD": float(COST),
            }
        },
        **extra,
    }
    ledger(tokens=total, cost_usd=str(COST), session_id=SESSION)
    if option("--output-format") == "json":
        if "--verbose" in ARGS:
            out([init, tool, result])  # every message, as one array
        else:
            out(result)
        return 1 if is_error else 0
    out(init)
    out(tool)
    if SCENARIO == "hang":
        hang()
    if SCENARIO == "slow":
        wait_for_release()
    if SCENARIO == "truncate":
        cut_and_die(json.dumps(result) + "\n")
    out({"type": "future_event_type", "payload": {"nested": [1, 2]}, "session_id": SESSION})
    out("some progress text that is not JSON")
    out(
        {
            "type": "assistant",
            "message": {"id": "msg_2", "content": [{"type": "text", "text": final}]},
        }
    )
    out(result)
    return 1 if is_error else 0


# Gemini CLI.
def gemini() -> int:
    total = NUMBERS["input"] + NUMBERS["output"] + NUMBERS["cache_write"]  # thoughts, say
    prompt = NUMBERS["input"] + NUMBERS["cache_read"]
    if SCENARIO == "auth":
        print("Invalid auth method selected.", file=sys.stderr)
        return 41
    if SCENARIO == "untrusted":
        print("This folder is not trusted.", file=sys.stderr)
        return 55
    stream = option("--output-format", option("-o")) != "json"
    if SCENARIO == "quota":
        ledger(tokens=0, session_id=SESSION)
        message = "You have exhausted your daily quota on this model."
        if stream:
            out({"type": "init", "session_id": SESSION, "model": "gemini-fake"})
            out({"type": "result", "status": "error", "error": {"message": message}, "stats": {}})
        else:
            error = {
                "session_id": SESSION,
                "error": {"type": "Error", "message": message, "code": 429},
            }
            print(json.dumps(error, indent=2), file=sys.stderr)
        return 1
    ledger(tokens=total, session_id=SESSION)
    final = f"Done.\n\nCOMPLETED: {KEY}"
    if not stream:
        document = {
            "session_id": SESSION,
            "response": final,
            "stats": {
                "models": {
                    "gemini-fake": {
                        "tokens": {
                            "input": NUMBERS["input"],
                            "prompt": prompt,
                            "candidates": NUMBERS["output"],
                            "total": total,
                            "cached": NUMBERS["cache_read"],
                            "thoughts": NUMBERS["cache_write"],
                            "tool": 0,
                        }
                    }
                },
                "tools": {"totalCalls": 1},
            },
        }
        out(json.dumps(document, indent=2))  # pretty-printed, over many lines
        return 0
    out({"type": "init", "session_id": SESSION, "model": "gemini-fake"})
    out("Loaded cached credentials.")
    out(
        {
            "type": "tool_use",
            "tool_name": "read_file",
            "tool_id": "r1",
            "parameters": {"file_path": "a.py"},
        }
    )
    if SCENARIO == "hang":
        hang()
    if SCENARIO == "slow":
        wait_for_release()
    out({"type": "tool_result", "tool_id": "r1", "status": "success", "output": ""})
    out({"type": "brand_new_event", "whatever": True})
    for chunk in (final[:3], final[3:]):
        out({"type": "message", "role": "assistant", "content": chunk, "delta": True})
    result = {
        "type": "result",
        "status": "success",
        "stats": {
            "total_tokens": total,
            "input_tokens": prompt,
            "output_tokens": NUMBERS["output"],
            "cached": NUMBERS["cache_read"],
            "input": NUMBERS["input"],
            "duration_ms": 800,
            "tool_calls": 1,
        },
    }
    if SCENARIO == "truncate":
        cut_and_die(json.dumps(result) + "\n")
    out(result)
    return 0


# Codex CLI.
def codex() -> int:
    out({"type": "thread.started", "thread_id": SESSION})
    out({"type": "turn.started"})
    if SCENARIO == "quota":
        ledger(tokens=0, session_id=SESSION)
        message = "You've hit your usage limit. Try again at 3:28 PM."
        out({"type": "error", "message": message})
        out({"type": "turn.failed", "error": {"message": message}})
        return 1
    total = NUMBERS["input"] + NUMBERS["cache_read"] + NUMBERS["output"]
    ledger(tokens=total, session_id=SESSION)
    command = {"id": "i1", "type": "command_execution", "command": "bash -lc 'cat a.py'"}
    out({"type": "item.started", "item": {**command, "status": "in_progress"}})
    if SCENARIO == "hang":
        hang()
    if SCENARIO == "slow":
        wait_for_release()
    out({"type": "item.completed", "item": {**command, "exit_code": 0, "status": "completed"}})
    out({"type": "item.completed", "item": {"id": "i2", "type": "novel_item", "x": 1}})
    out({"type": "something.else"})
    final = f"Done.\n\nCOMPLETED: {KEY}"
    out({"type": "item.completed", "item": {"id": "i3", "type": "agent_message", "text": final}})
    usage = {
        "input_tokens": NUMBERS["input"] + NUMBERS["cache_read"],
        "cached_input_tokens": NUMBERS["cache_read"],
        "output_tokens": NUMBERS["output"],
    }
    if SCENARIO == "truncate":
        cut_and_die(json.dumps({"type": "turn.completed", "usage": usage}) + "\n")
    out({"type": "turn.completed", "usage": usage})
    return 0


if __name__ == "__main__":
    if "--version" in ARGS:
        out(f"{CLI} fake 1.0")
        sys.exit(0)
    sys.exit({"claude": claude, "gemini": gemini, "codex": codex}[CLI]())
