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

    def feed(self, stream: str, line: str) -> None:
        text = line.strip()
        if text:
            self.transcript.add("output" if stream == "stdout" else "stderr", text)

    def result(self, code: int | None, stdout: str, stderr: str, key: str) -> Result:
        result = interpret(code, stdout, stderr, key)
        pattern = self.options.quota_pattern
        if pattern and result.status != Status.DONE:
            found = re.search(pattern, stdout + "\n" + stderr, re.IGNORECASE)
            if found:
                self.note_quota(found.group(0))
                return self.quota_result()
        return result

    def fill(self, result: Result) -> None:
        result.data["agent"] = self.name
        result.data["quota_pattern"] = self.options.quota_pattern


def interpret(code: int | None, stdout: str, stderr: str, key: str) -> Result:
    """Turn an exit code and output into a result, reading the agent's last words."""
    if code == GIVE_BACK_EXIT:
        return Result(status=Status.QUEUED, reason="the command gave the task back (exit 75)")
    result = (
        Result(status=Status.DONE, outcome="success")
        if code == 0
        else Result(status=Status.BLOCKED, reason=exit_reason(code, stderr))
    )
    read_agent_lines(result, stdout)
    read_json_line(result, stdout)
    return result


def read_json_line(result: Result, stdout: str) -> None:
    lines = stdout.strip().splitlines()
    if not lines:
        return
    try:
        data = json.loads(lines[-1])
    except ValueError:
        return
    if not isinstance(data, dict):
        return
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
