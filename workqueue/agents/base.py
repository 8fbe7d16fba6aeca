"""What every agent adapter shares.

An adapter reads one run of its CLI as the output streams, line by line (the worker's
AgentRun calls `feed` for each line), keeps a bounded live transcript in a small JSON
file, and turns what it read into the worker's Result: status, the agent's last words,
tokens and cost, session, quota. Vendors add fields and event types over time: whatever
an adapter does not know is skipped, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

from workqueue.models import Status
from workqueue.processing import MAX_RUN_TOKENS, Result

GIVE_BACK_EXIT = 75  # EX_TEMPFAIL: "not now, give the task to someone else"
# `[^\w\n]`, not `\W`: a `\W*` at each line start ran on over every line below it, and
# lines of punctuation made the search quadratic (2 MB of them: six minutes).
AGENT_LINE = re.compile(r"^[^\w\n]*(COMPLETED|BLOCKED):\s*(\S.*)?$", re.MULTILINE)
REASON_LINE = re.compile(r"^[^\w\n]*Reason:\s*(.+)$", re.MULTILINE)
NEXT_LINE = re.compile(r"^[^\w\n]*Next:\s*(.+)$", re.MULTILINE)
TRANSCRIPT_ENTRIES = 60  # the live transcript keeps the last this many entries
TRANSCRIPT_INTERVAL = 0.5  # seconds between two writes of the transcript file
TEXT_LIMIT = 600  # characters of one transcript entry
FINAL_LIMIT = 64 * 1024  # characters kept of the agent's final message: its last words
LOOSE_LIMIT = 1024 * 1024  # non-JSON output kept to be read whole at the end (Gemini json)
DOCUMENT_TRIES = 50  # lines starting with { or [ tried as the start of a document


@dataclass
class AgentOptions:
    """What a profile says about the CLI's command line and limits."""

    model: str = ""
    extra_args: list[str] = field(default_factory=list)
    max_turns: int | None = None
    max_budget_usd: Decimal | None = None
    quota_pattern: str = ""  # the generic adapter's fallback


@dataclass
class Usage:
    """Tokens as the vendor counts them; `total` is the vendor's own total."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    total: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# The most one run may report (tokens: processing.MAX_RUN_TOKENS): far past any real run,
# and small enough that a herd's sums stay inside their columns (a CLI saying 1e30 made
# the finish fail on its column).
MAX_RUN_COST_USD = Decimal(100_000)


def whole(value) -> int:
    """A token count from untrusted JSON: a non-negative int up to MAX_RUN_TOKENS, or 0."""
    if isinstance(value, bool):
        return 0
    try:
        number = int(value)
    except OverflowError:  # infinity
        return MAX_RUN_TOKENS if value > 0 else 0
    except (TypeError, ValueError):
        return 0
    return min(max(0, number), MAX_RUN_TOKENS)


def money(value) -> Decimal | None:
    """A cost in USD from untrusted JSON, up to MAX_RUN_COST_USD."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        found = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not found.is_finite() or found < 0:
        return None
    return min(found, MAX_RUN_COST_USD)


def short(text, limit: int = TEXT_LIMIT) -> str:
    text = " ".join(str(text).split()) if not isinstance(text, str) else text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_arguments(arguments) -> str:
    """A tool call's arguments in one short line: `file_path=src/util.ts`."""
    if isinstance(arguments, dict):
        parts = [f"{k}={short(v if isinstance(v, str) else json.dumps(v), 80)}" for k, v in
                 arguments.items()]  # fmt: skip
        return short(", ".join(parts), 200)
    return short(arguments, 200) if arguments else ""


class Transcript:
    """The last entries of what the agent said and did, written now and then to a small
    JSON file the board reads while the agent runs: never a database write per line.

    Writes are at most one per TRANSCRIPT_INTERVAL; an entry that arrives sooner is
    written by a timer at the end of the interval, so a quiet agent's last step shows.
    """

    def __init__(self, path: Path | None, limit: int = TRANSCRIPT_ENTRIES):
        self.path = path
        self.entries: deque[dict] = deque(maxlen=limit)
        self.count = 0
        self.written_at = 0.0
        self.dirty = False
        self.closed = False
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def add(self, kind: str, text: str, name: str = "") -> None:
        entry = {"kind": kind, "text": short(text), "at": round(time.time(), 3)}
        if name:
            entry["name"] = short(name, 100)
        with self.lock:
            self.entries.append(entry)
            self.count += 1
            self.dirty = True
        self.write()

    def extend_last(self, kind: str, text: str) -> None:
        """Streamed chunks of one message become one entry."""
        with self.lock:
            last = self.entries[-1] if self.entries else None
            joined = last is not None and last["kind"] == kind and bool(last.get("open"))
            if joined:
                last["text"] = short(last["text"] + text)
                self.dirty = True
        if joined:
            self.write()
            return
        self.add(kind, text)
        with self.lock:
            self.entries[-1]["open"] = True

    def close_open(self) -> None:
        with self.lock:
            if self.entries and self.entries[-1].pop("open", None):
                self.dirty = True

    def write(self, force: bool = False) -> None:
        if self.path is None:
            return
        with self.lock:
            if not self.dirty or (self.closed and not force):
                return
            wait = self.written_at + TRANSCRIPT_INTERVAL - time.monotonic()
            if wait > 0 and not force:
                if self.timer is None:
                    self.timer = threading.Timer(wait, self._flush)
                    self.timer.daemon = True
                    self.timer.start()
                return
            self.written_at = time.monotonic()
            self.dirty = False
            data = {"entries": list(self.entries), "count": self.count, "running": not force}
            # Under the lock: the timer's write and the last one never cross. A temporary
            # as a task file's: a new file of a name no agent can plant a link at first.
            from workqueue.writeback import discard, write_temporary  # loads YAML

            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                text = json.dumps(data).encode()
                temporary = write_temporary(str(self.path), text, 0o644, sync=False)
                try:
                    os.replace(temporary, self.path)
                except OSError:
                    discard(temporary)
                    raise

    def _flush(self) -> None:
        with self.lock:
            self.timer = None
        self.write()

    def close(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        self.close_open()
        with self.lock:
            self.dirty = True
            self.closed = True
        self.write(force=True)


class Loose:
    """Output lines that were not one JSON value each, kept (bounded) to be read whole."""

    def __init__(self, limit: int = LOOSE_LIMIT):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.overflowed = False

    def add(self, line: str) -> None:
        if self.size + len(line) > self.limit:
            self.overflowed = True
            return
        self.parts.append(line)
        self.size += len(line) + 1

    def text(self) -> str:
        return "\n".join(self.parts)


def json_documents(lines: list[str]) -> list:
    """The JSON documents that start at the beginning of a line, among other text: a
    pretty-printed object after warnings and a stack trace (Gemini's stderr)."""
    found, decoder, index, tries = [], json.JSONDecoder(), 0, 0
    while index < len(lines) and tries < DOCUMENT_TRIES:
        if not lines[index].startswith(("{", "[")):
            index += 1
            continue
        tries += 1
        text = "\n".join(lines[index:])
        try:
            document, end = decoder.raw_decode(text)
        except ValueError:
            index += 1
            continue
        found.append(document)
        index += text.count("\n", 0, end) + 1
    return found


# Reset times in the vendors' own words: "Try again at 3:28 PM.", "retry in 17.5s".
CLOCK_TIME = re.compile(r"(?:try again|resets?|available)\s+at\s+(\d{1,2}):(\d{2})\s*([AP]M)?",
                        re.IGNORECASE)  # fmt: skip
DELAY = re.compile(
    r"(?:retry|try again|resets?|wait)\s+(?:in|after)\s+([\d.]+)\s*"
    r"(s|sec|secs|seconds?|m|mins?|minutes?|h|hours?|d|days?)\b",
    re.IGNORECASE,
)
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A vendor's own server failing: the next task would meet it too, and it passes.
SERVER_STATUSES = {500, 502, 503, 504}


MAX_RESET_WAIT = timedelta(days=31)


def reset_time(text: str, now: datetime | None = None) -> datetime | None:
    """When a quota message says the limit lifts, as an aware datetime, if it says."""
    now = now or datetime.now().astimezone()
    found = CLOCK_TIME.search(text)
    if found:
        hour, minute, half = int(found.group(1)), int(found.group(2)), found.group(3)
        if half:
            hour = hour % 12 + (12 if half.upper() == "PM" else 0)
        if hour < 24 and minute < 60:
            at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            return at if at > now else at + timedelta(days=1)
    found = DELAY.search(text)
    if found:
        with contextlib.suppress(ValueError, OverflowError):
            seconds = float(found.group(1)) * UNIT_SECONDS[found.group(2)[0].lower()]
            # "try again in 3000000 days" (a vendor's words, or a task's echoed) overflowed
            # and crashed the worker: a wait past any real limit's is no reset time.
            if seconds <= MAX_RESET_WAIT.total_seconds():
                return now + timedelta(seconds=seconds)
    return None


def from_epoch(value) -> datetime | None:
    with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
        seconds = float(value)
        if seconds > 1e12:  # milliseconds
            seconds /= 1000
        at = datetime.fromtimestamp(seconds).astimezone()
        if at - datetime.now().astimezone() <= MAX_RESET_WAIT:
            return at
    return None


class Adapter:
    """One run of an agent CLI: its command line, and what its output says.

    A subclass sets `program` and implements `command` and `event`, and may refine
    `finish_stream` and `verdict`. The base keeps the transcript and builds the Result.
    """

    name = "generic"
    program = ""
    reports_cost = False  # whether the CLI says what a run cost
    resume: tuple[str, ...] = ()  # the command that resumes a session, "{session}" filled
    # Exit codes and output that mean "out of quota or rate-limited", in the CLI's words.
    quota_words = re.compile(
        r"usage limit|rate.?limit|quota|too many requests|\b429\b|resource.?exhausted",
        re.IGNORECASE,
    )
    quota_statuses = {429}  # HTTP statuses a retrying CLI gives up on as a quota
    # Its last error saying the vendor's server failed (HTTP 500, 502, 503, 504).
    server_error_words = re.compile(
        r"\b(?:status|error|code)\W{0,3}50[0234]\b|internal server error|bad gateway|"
        r"service unavailable|gateway time-?out|high demand",
        re.IGNORECASE,
    )

    def __init__(self, options: AgentOptions | None = None, transcript: Transcript | None = None):
        self.options = options or AgentOptions()
        self.transcript = transcript or Transcript(None)
        self.session_id = ""
        self.model = self.options.model
        self.turns = 0
        self.final = ""
        self.usage = Usage()
        self.cost_usd: Decimal | None = None
        self.duration_ms: int | None = None
        self.quota = ""  # the words that said the quota or rate limit was reached
        self.resets_at: datetime | None = None
        self.server_error = ""  # the words that said the vendor's server failed
        # (HTTP status, the CLI's words) while it retries a vendor's answer, until it goes on
        self.retrying: tuple[int, str] | None = None
        self.errors: list[str] = []
        self.stdout_rest = Loose()
        self.stderr_rest = Loose()
        self.events = 0
        self.skipped = 0
        self.concluded = False  # the CLI's own last word (its result) was read
        self.stream_finished = False

    # The command line.
    def command(self, prompt: str) -> list[str]:
        raise NotImplementedError

    def has_flag(self, *names: str) -> bool:
        """Whether the profile's extra arguments already set one of these options."""
        return any(a == n or a.startswith(n + "=") for a in self.options.extra_args for n in names)

    def missing_reason(self, error: OSError, program: str) -> str:
        if isinstance(error, FileNotFoundError):
            return f"{program} is not installed here (not found on the worker's PATH)"
        return f"cannot start {program}: {error.strerror or error}"

    # Reading the stream.
    def feed(self, stream: str, line: str) -> None:
        text = line.strip()
        if not text:
            return
        parsed = None
        if text[0] in "{[":
            with contextlib.suppress(ValueError):
                parsed = json.loads(text)
        if isinstance(parsed, dict):
            self._event(parsed)
        elif isinstance(parsed, list) and all(isinstance(e, dict) for e in parsed):
            for event in parsed:  # Claude's json mode with --verbose: every message at once
                self._event(event)
        else:
            (self.stdout_rest if stream == "stdout" else self.stderr_rest).add(line)

    def _event(self, event: dict) -> None:
        self.events += 1
        if self.answers(event):
            self.retrying = None  # it went on: the retry, if any, was answered
        try:
            known = self.event(event)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            known = False  # a shape this adapter does not know: skipped
        if known is False:
            self.skipped += 1

    def event(self, event: dict) -> bool | None:
        """Take one JSON event; return False for one this adapter does not know."""
        return False

    def answers(self, event: dict) -> bool:
        """Whether this event shows the vendor answered, ending a retry the CLI reported."""
        return True

    def finish_stream(self) -> None:
        """After the last line: output that was one JSON document over many lines
        (pretty-printed) is read whole, stdout then stderr. Once."""
        if self.stream_finished:
            return
        self.stream_finished = True
        for rest in (self.stdout_rest, self.stderr_rest):
            for document in json_documents(rest.parts):
                for event in document if isinstance(document, list) else [document]:
                    if isinstance(event, dict):
                        self._event(event)
        self.transcript.close_open()

    def note_quota(self, message: str, resets_at: datetime | None = None) -> None:
        if not self.quota:
            self.quota = short(message, 300) or "quota or rate limit reached"
        self.resets_at = resets_at or self.resets_at or reset_time(message)

    def timed_out(self) -> None:
        """Its timeout ended the run: one still retrying a vendor's 429 or 5xx was stopped
        by the vendor, not by its task."""
        retrying = self.retrying  # before the documents read whole at the end
        self.finish_stream()
        if retrying:
            status, words = retrying
            words = f"still retrying when the timeout ended it: {words}"
            if status in self.quota_statuses:
                self.note_quota(words)
            elif status in SERVER_STATUSES:
                self.note_server_error(words)

    def note_server_error(self, message: str) -> None:
        if not self.server_error:
            self.server_error = short(message, 300) or "the vendor's server failed"

    def note_error(self, message: str) -> None:
        message = short(message, 1000)
        if message and message not in self.errors:
            self.errors.append(message)
            self.transcript.add("error", message)

    # The verdict.
    def verdict(self, code: int | None, stderr: str) -> tuple[str, str]:
        """(status, reason) for a run that ended by itself."""
        if code == 0 and not self.errors:
            if not self.concluded:  # a wrapper, a crash that exits 0, a signal heeded
                return Status.BLOCKED, f"{self.name} ended without a result"
            return Status.DONE, ""
        return Status.BLOCKED, self.errors[-1] if self.errors else exit_reason(code, stderr)

    def result(self, code: int | None, stdout: str, stderr: str, key: str) -> Result:
        self.finish_stream()
        status, reason = self.verdict(code, stderr)
        # A run that ended in success is done, whatever limit it met on the way (Claude
        # Code on overage says "rejected" and goes on).
        if status != Status.DONE:
            if not (self.quota or self.server_error):
                # The server's failing first: Gemini's stack traces on a 503 name a
                # "RetryableQuotaError".
                self.look_for_server_error(code)
                if not self.server_error:
                    self.look_for_quota(code, stderr)
            if self.quota or self.server_error:
                return self.quota_result()
        result = Result(status=status, reason=reason)
        if status == Status.DONE:
            read_agent_lines(result, self.final, key)
        self.fill(result)
        return result

    def look_for_quota(self, code: int | None, stderr: str) -> None:
        """The CLI's own words, when no structured field said so (its last error)."""
        for text in [*self.errors[-1:], stderr.strip()[-2000:] if code else ""]:
            found = self.quota_words.search(text or "")
            if found:
                self.note_quota(text)
                return

    def look_for_server_error(self, code: int | None) -> None:
        """Its last error only: what the agent's own tools printed may name a 500."""
        if self.errors and self.server_error_words.search(self.errors[-1]):
            self.note_server_error(self.errors[-1])

    def quota_result(self) -> Result:
        """Not the task's fault: back to the queue, the attempt not counted. The herd stops
        claiming and resumes later, on a quota as on the vendor's server failing."""
        if self.quota:
            reason = f"quota or rate limit reached: {self.quota}"
        else:
            reason = f"vendor server error: {self.server_error}"
        if self.resets_at:
            reason += f" (resets at {self.resets_at.isoformat(timespec='minutes')})"
        result = Result(status=Status.QUEUED, reason=reason)
        self.fill(result)
        result.data["quota"] = True
        if not self.quota:
            result.data["server_error"] = True
        result.data["attempt_counted"] = False
        result.data["resets_at"] = self.resets_at.isoformat() if self.resets_at else None
        return result

    def fill(self, result: Result) -> None:
        result.tokens = self.usage.total
        result.cost_usd = self.cost_usd
        result.data.update(self.report())

    def report(self) -> dict:
        data = {
            "agent": self.name,
            "tokens": self.usage.as_dict(),
            "cost_usd": str(self.cost_usd) if self.cost_usd is not None else None,
            "session_id": self.session_id,
            "turns": self.turns,
            "model": self.model,
            "final_message": short(self.final, 4000),
        }
        if self.duration_ms is not None:
            data["duration_ms"] = self.duration_ms
        if self.session_id and self.resume:
            data["resume"] = " ".join(a.replace("{session}", self.session_id) for a in self.resume)
        if self.skipped:
            data["skipped_events"] = self.skipped
        return data


def exit_reason(code: int | None, stderr: str) -> str:
    tail = stderr.strip()[-500:]
    if code is not None and code < 0:
        try:
            what = signal.Signals(-code).name
        except ValueError:
            what = f"signal {-code}"
        return f"killed by {what}" + (f": {tail}" if tail else "")
    return tail or f"exited with code {code}"


def read_agent_lines(result: Result, text: str, key: str = "") -> bool:
    """`COMPLETED: <key>` or `BLOCKED: <key>` with `Reason:` and `Next:` lines; whether
    the agent said either. A COMPLETED naming another id (one word that is not this
    task's key) finishes nothing: blocked. Words after it are the agent's own."""
    found = list(AGENT_LINE.finditer(text))
    if not found:
        return False
    last = found[-1]
    named = (last.group(2) or "").strip().strip("`*'\".")
    another = key and named and not named.startswith(key) and len(named.split()) == 1
    if last.group(1) == "COMPLETED" and another:
        result.status = Status.BLOCKED
        result.outcome = ""
        result.reason = f"the agent reported another task done ({short(named, 200)}), not {key}"
        return True
    after = text[last.end() :]
    reason = REASON_LINE.search(after)
    following = NEXT_LINE.search(after)
    if last.group(1) == "BLOCKED":
        result.status = Status.BLOCKED
        result.outcome = ""  # not the clean exit's "success"
        result.reason = reason.group(1).strip() if reason else "the agent reported BLOCKED"
    else:
        result.status = Status.DONE
        result.outcome = result.outcome or "success"
        result.reason = ""
    if following:
        result.next_step = following.group(1).strip()
    return True


TRANSCRIPT_READ_LIMIT = 512 * 1024


def read_transcript(path: Path, last: int | None = None) -> dict | None:
    """A transcript file as the board shows it; None when there is none (yet)."""
    from workqueue.taskfile import read_regular_file  # loads YAML: not at a worker's start

    # The agent can replace its transcript: a FIFO held the page that read it until
    # something wrote to it, and a link was read through (TaskFileError is a ValueError).
    try:
        data = json.loads(read_regular_file(path, TRANSCRIPT_READ_LIMIT)[0])
    except (OSError, ValueError):
        return None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [e for e in entries if isinstance(e, dict)]
    return {
        "entries": entries[-last:] if last else entries,
        "count": data.get("count", len(entries)),
        "running": bool(data.get("running")),
    }
