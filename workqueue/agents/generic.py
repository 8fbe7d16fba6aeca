"""Any command: exit code, last-line JSON, `COMPLETED:`/`BLOCKED:` lines.

The profile's command is the whole command line. A profile's quota pattern, when set, is
read here, before the finish: a match gives the task back instead of blocking it.
"""

from __future__ import annotations

import json
import re

from workqueue.agents.base import (
    GIVE_BACK_EXIT,
    Adapter,
    exit_reason,
    read_agent_lines,
    whole,
)
from workqueue.models import Status
from workqueue.processing import Result


class GenericAdapter(Adapter):
    name = "generic"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.concluded = True  # a command's exit code is its word

    def feed(self, stream: str, line: str) -> None:
        text = line.strip()
        if text:
            self.transcript.add("output" if stream == "stdout" else "stderr", text)

    def result(self, code: int | None, stdout: str, stderr: str, key: str) -> Result:
        result, said = interpret(code, stdout, stderr, key)
        pattern = self.options.quota_pattern
        # Not over a verdict the agent gave: a task about rate limits may be blocked on one.
        if pattern and result.status != Status.DONE and not said:
            found = re.search(pattern, stdout + "\n" + stderr, re.IGNORECASE)
            if found:
                self.note_quota(found.group(0))
                return self.quota_result()
        return result

    def fill(self, result: Result) -> None:
        result.data["agent"] = self.name
        result.data["quota_pattern"] = self.options.quota_pattern


def interpret(code: int | None, stdout: str, stderr: str, key: str) -> tuple[Result, bool]:
    """Turn an exit code and output into a result, reading the agent's last words; and
    whether the agent gave a verdict of its own."""
    if code == GIVE_BACK_EXIT:
        back = Result(status=Status.QUEUED, reason="the command gave the task back (exit 75)")
        return back, True
    result = (
        Result(status=Status.DONE, outcome="success")
        if code == 0
        else Result(status=Status.BLOCKED, reason=exit_reason(code, stderr))
    )
    said = read_agent_lines(result, stdout, key)
    said = read_json_line(result, stdout) or said
    return result, said


def read_json_line(result: Result, stdout: str) -> bool:
    """The last line's JSON object, if it is one; whether it gave a status."""
    lines = stdout.strip().splitlines()
    if not lines:
        return False
    try:
        data = json.loads(lines[-1])
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    status = data.get("status")
    if status in (Status.DONE, "success", "completed"):
        result.status = Status.DONE
        result.reason = ""
    elif status == Status.BLOCKED:
        result.status = Status.BLOCKED
        result.outcome = ""  # not the clean exit's "success", unless the line gives one
    for name, attr in (
        ("outcome", "outcome"),
        ("reason", "reason"),
        ("evidence", "evidence"),
        ("next", "next_step"),
        ("commit", "commit"),
    ):
        if data.get(name) is not None:
            setattr(result, attr, str(data[name]))
    result.tokens = whole(data.get("tokens"))
    if result.status == Status.DONE and not result.outcome:
        result.outcome = "success"
    return status in (Status.DONE, "success", "completed", Status.BLOCKED)
