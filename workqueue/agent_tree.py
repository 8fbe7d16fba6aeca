"""An agent's whole process tree, tied to the claim it works on.

The agent runs in a process group (and session) of its own, recorded on the claim, and
carries `HYPERVISOR_TASK_CLAIM` in its environment, which every descendant inherits even
after leaving the group with setsid(). The worker ends all of them when the task ends;
whoever releases a dead worker's claim ends them first, and does not requeue the task
while any of them lives. Output is read as it streams, into a log file and a bounded
tail, so the worker's memory does not follow what the agent prints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from django.conf import settings

CLAIM_VARIABLE = "HYPERVISOR_TASK_CLAIM"
START_TIME_SLACK = 1.0  # psutil create_time is rounded to clock ticks
# What an agent may see of the worker's environment; everything else is withheld.
ALLOWED_ENV = frozenset({"PATH", "HOME", "USER", "LANG", "TERM", "TZ", "TMPDIR"})
SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|DSN|_URL$", re.IGNORECASE
)
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
MASK = b"********"
READ_CHUNK = 64 * 1024
LOG_KEPT_WHEN_FULL = 64 * 1024  # of an agent's log that filled its disk (AgentLog)
LINE_LIMIT = 1024 * 1024  # a longer "line" is written out in pieces
# ...but reaches the adapter whole up to this size: a CLI's result line carries its whole
# final message (Claude's json mode with --verbose, every message of the session).
ADAPTER_LINE_LIMIT = 16 * 1024 * 1024
LOOK_INTERVAL = 0.5  # seconds between looks at the agent's descendants


def claim_marker(task_id: int, fence: int) -> str:
    """What an agent's processes carry to say whose they are. Task ids and fences start
    at 1 in every database, so the marker names the installation too (its lock root):
    two installations on one host must never end each other's agents."""
    root = os.path.realpath(settings.HYPERVISOR_LOCK_ROOT)
    return f"{hashlib.sha256(root.encode()).hexdigest()[:12]}:{task_id}.{fence}"


def agent_environment(
    task_values: dict[str, str], extra: dict[str, str], pass_env: Iterable[str]
) -> dict[str, str]:
    """The allow-list of the worker's environment, the names passed through, the
    profile's own variables, then the task's."""
    env = {k: v for k, v in os.environ.items() if k in ALLOWED_ENV or k.startswith("LC_")}
    env.update({name: os.environ[name] for name in pass_env if name in os.environ})
    env.update(extra)
    env.update(task_values)
    return env


def known_secrets(agent_env: dict[str, str], passed: Iterable[str]) -> list[str]:
    """Every secret value the worker knows, longest first, for masking stored output."""
    found = {settings.SECRET_KEY}
    for db in settings.DATABASES.values():
        found.add(db.get("PASSWORD") or "")
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and name not in ALLOWED_ENV:
            found.add(value)
    for name in passed:
        found.add(agent_env.get(name, ""))
    for value in list(found):
        found.update(URL_PASSWORD.findall(value))
    # Short values would mask ordinary words: a secret is at least 6 characters.
    return sorted((s for s in found if len(s) >= 6), key=len, reverse=True)


class Masker:
    """Each secret as given, and as JSON writes it inside a string (`"` and `\\` escaped,
    non-ASCII as `\\u` escapes): the agent CLIs print JSON, and their adapters decode it."""

    def __init__(self, secrets: Iterable[str]):
        forms = set()
        for secret in filter(None, secrets):
            forms.add(secret)
            forms.add(json.dumps(secret)[1:-1])
            forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
        self.secrets = [f.encode() for f in sorted(forms, key=len, reverse=True)]

    def __call__(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, MASK)
        return data

    def text(self, text: str) -> str:
        return self(text.encode()).decode("utf-8", "replace")


class Tail:
    """The last `limit` bytes of a stream, cut at a line start where it can be."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()
        self.cut = False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        over = len(self.data) - self.limit
        if over <= 0:
            return
        newline = self.data.find(b"\n", over, over + 4096)
        del self.data[: newline + 1 if newline >= 0 else over]
        self.cut = True

    def text(self) -> str:
        self._trim()
        return bytes(self.data).decode("utf-8", "replace")


@dataclass
class Stream:
    """One of the agent's pipes: complete lines are masked, logged, kept in the tail."""

    name: str
    tail: Tail
    mask: Masker
    log: AgentLog
    on_line: Callable[[str, str], None] | None = None
    pending: bytearray = field(default_factory=bytearray)
    long_line: bytearray = field(default_factory=bytearray)  # its pieces, for on_line

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        end = self.pending.rfind(b"\n") + 1
        if not end and len(self.pending) >= LINE_LIMIT:
            end = len(self.pending)
        if end:
            self._emit(bytes(self.pending[:end]))
            del self.pending[:end]

    def close(self) -> None:
        # A line cut off mid-way (the agent died) is kept as it is.
        if self.pending:
            self._emit(bytes(self.pending))
            self.pending.clear()
        if self.long_line:
            self._pass_on(b"")

    def _emit(self, block: bytes) -> None:
        block = self.mask(block)
        self.tail.add(block)
        self.log.write(block)
        if self.on_line is None:
            return
        if not block.endswith(b"\n") and len(self.long_line) + len(block) < ADAPTER_LINE_LIMIT:
            self.long_line += block  # a piece of a long line: the rest is to come
            return
        self._pass_on(block)

    def _pass_on(self, block: bytes) -> None:
        if self.long_line:
            block = bytes(self.long_line) + block
            self.long_line.clear()
        for line in block.decode("utf-8", "replace").splitlines():
            self.on_line(self.name, line)


class AgentLog:
    """The agent's whole output in a file, up to a size; the rest is counted, not kept."""

    def __init__(self, path: Path | None, limit: int):
        self.path = path
        self.limit = limit
        self.written = 0
        self.dropped = 0
        self.file = None
        self.error = ""  # why the log is missing or stops short (a full disk), or ""
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Unbuffered (blocks come a read at a time): a write the disk refuses
                # leaves nothing behind to fail again at close.
                self.file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
            except OSError as exc:
                self.error = f"cannot write the agent's log {path}: {exc.strerror or exc}"

    def write(self, block: bytes) -> None:
        if self.file is None:
            return
        room = self.limit - self.written
        if room <= 0:
            self.dropped += len(block)
            return
        try:
            self.file.write(block[:room])
        except OSError as exc:
            # A full disk ends the log, not the agent's run: the tail still has its end.
            self._give_up(exc)
            return
        self.written += min(room, len(block))
        self.dropped += max(0, len(block) - room)

    def close(self) -> None:
        if self.file is None:
            return
        try:
            if self.dropped:
                self.file.write(f"\n[{self.dropped} more bytes not kept]\n".encode())
            self.file.close()
        except OSError as exc:
            self._give_up(exc)
        self.file = None

    def _give_up(self, exc: OSError) -> None:
        self.error = f"the agent's log {self.path} stops short: {exc.strerror or exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Cut back to its opening: the space it took goes back to what must still be
            # written (the finish's row, the task's file, often on the same disk), and
            # the task keeps the output's tail.
            with contextlib.suppress(OSError):
                os.ftruncate(self.file.fileno(), min(self.written, LOG_KEPT_WHEN_FULL))
                self.error += f"; cut to its first {LOG_KEPT_WHEN_FULL // 1024} KiB"
        with contextlib.suppress(OSError):
            self.file.close()
        self.file = None


@dataclass
class AgentExit:
    code: int | None  # None: it never exited by itself (timed out, or stopped)
    timed_out: bool = False
    stopped: bool = False
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    survivors: list[int] = field(default_factory=list)  # pids that could not be ended
    log_path: str = ""
    log_error: str = ""  # why its log is missing or incomplete


class AgentRun:
    """Start one agent, stream its output, and end its whole tree when the task ends.

    `timeout` bounds the agent's life; once it exits, its output is read for `grace`
    seconds more (a background child may hold the pipes open for ever), then whatever is
    left of its tree is ended. So a task never outlives its timeout plus the grace.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: str | None,
        timeout: float | None,
        mask: Masker,
        ending: Callable[[], bool],
        log_path: Path | None = None,
        on_line: Callable[[str, str], None] | None = None,
        grace: float | None = None,
    ):
        self.args = args
        self.env = env
        self.cwd = cwd
        self.timeout = timeout
        self.mask = mask
        self.ending = ending
        self.grace = settings.HYPERVISOR_AGENT_GRACE if grace is None else grace
        self.log = AgentLog(log_path, settings.HYPERVISOR_AGENT_LOG_BYTES)
        self.on_line = on_line
        self.child: subprocess.Popen | None = None
        self.started_at = 0.0  # the agent's create time, as psutil reports it
        self.known: dict[int, psutil.Process] = {}

    def start(self) -> None:
        """Raises OSError when the program cannot be started."""
        self.child = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # its own session and process group: pgid == pid
        )
        try:
            self.started_at = psutil.Process(self.child.pid).create_time()
        except psutil.Error:  # it exited already; its group is empty
            self.started_at = time.time()

    @property
    def pgid(self) -> int:
        return self.child.pid

    def wait(self) -> AgentExit:
        child = self.child
        begun = time.monotonic()
        deadline = begun + self.timeout if self.timeout else None
        out = Stream("stdout", Tail(64 * 1024), self.mask, self.log, self.on_line)
        err = Stream("stderr", Tail(16 * 1024), self.mask, self.log, self.on_line)
        streams = {child.stdout.fileno(): out, child.stderr.fileno(): err}
        selector = selectors.DefaultSelector()
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        result = AgentExit(code=None, log_path=str(self.log.path or ""))
        read_until = None  # set once the agent has exited: read a grace period more
        next_look = 0.0
        try:
            while selector.get_map():
                now = time.monotonic()
                if read_until is None and child.poll() is not None:
                    read_until = now + self.grace
                if read_until is not None and now >= read_until:
                    break
                if child.returncode is None:
                    if deadline is not None and now >= deadline:
                        result.timed_out = True
                        break
                    if self.ending():
                        result.stopped = True
                        break
                if now >= next_look:
                    self._look_at_descendants()
                    next_look = now + LOOK_INTERVAL
                wait = min(
                    [LOOK_INTERVAL] + [max(0.0, t - now) for t in (deadline, read_until) if t]
                )
                for key, _ in selector.select(wait):
                    try:
                        chunk = os.read(key.fd, READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if chunk:
                        streams[key.fd].feed(chunk)
                    else:
                        selector.unregister(key.fd)
            if read_until is None and not (result.timed_out or result.stopped):
                self._wait_for_exit(deadline, result)
        finally:
            selector.close()
            result.survivors = self.end()
            for stream in streams.values():
                stream.close()
            child.stdout.close()
            child.stderr.close()
            self.log.close()
        if not (result.timed_out or result.stopped):
            result.code = child.returncode
        result.stdout, result.stderr = out.tail.text(), err.tail.text()
        result.log_error = self.log.error
        result.seconds = round(time.monotonic() - begun, 3)
        return result

    def _wait_for_exit(self, deadline: float | None, result: AgentExit) -> None:
        """Both pipes closed but the agent has not exited yet: a program that closes its
        output in its exit handlers (coreutils, node) is still running for a moment, and
        ending it now would turn its own exit into "killed by SIGTERM". It gets its
        timeout, as any agent does."""
        while self.child.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                result.timed_out = True
                return
            if self.ending():
                result.stopped = True
                return
            self._look_at_descendants()
            wait = LOOK_INTERVAL
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=wait)

    def _look_at_descendants(self) -> None:
        # setsid() takes a process out of the group, not out of the tree: remember the
        # tree while its parents live, so that an escaped grandchild is still found. A
        # worker that adopts orphans (hypervisor_site.privacy) is given those whose
        # parent died before a look: any process under us started since the agent is its.
        since = self.started_at - START_TIME_SLACK
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if process.pid != self.child.pid and process.create_time() >= since:
                        self.known.setdefault(process.pid, process)

    def end(self) -> list[int]:
        """End the agent and everything it started; return the pids still alive."""
        child = self.child
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
        self._look_at_descendants()
        agent = AgentRef(self.env.get(CLAIM_VARIABLE, ""), child.pid, self.started_at)

        def rest() -> dict[AgentRef, list[psutil.Process]]:
            # Our own child is waited for through Popen, which keeps its exit code.
            found = find_agent_processes([agent], self.known.values())
            return {agent: [p for p in found[agent] if p.pid != child.pid]}

        survivors = terminate(rest, self.grace).get(agent, [])
        for process in self.known.values():  # adopted ones that ended by themselves
            with contextlib.suppress(psutil.Error):
                process.wait(timeout=0)
        try:
            child.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                survivors.append(child.pid)
        return survivors


@dataclass(frozen=True)
class AgentRef:
    """What a claim records of its agent: enough to find every process it left."""

    marker: str
    pgid: int | None = None
    started: float | None = None


def find_agent_processes(
    agents: Iterable[AgentRef], known: Iterable[psutil.Process] = ()
) -> dict[AgentRef, list[psutil.Process]]:
    """Every live process of each agent, in one look at the process table: its group,
    the tree seen while it ran, and anything carrying its claim in its environment."""
    agents = list(agents)
    found: dict[AgentRef, dict[int, psutil.Process]] = {a: {} for a in agents}
    by_marker = {a.marker: a for a in agents if a.marker}
    by_group = {a.pgid: a for a in agents if a.pgid and _group_is_ours(a.pgid, a.started)}
    for process in known:
        if agents and _alive(process):
            found[agents[0]][process.pid] = process
    me = os.getpid()
    # A process older than every agent cannot be one of theirs: its environment (a read
    # of /proc per process) is not worth reading.
    starts = [a.started for a in agents]
    oldest = None if None in starts or not starts else min(starts) - START_TIME_SLACK
    for process in psutil.process_iter(["create_time"]):
        if process.pid == me:
            continue
        try:
            agent = by_group.get(os.getpgid(process.pid))
            young = agent is not None and (
                agent.started is None
                or process.info["create_time"] >= agent.started - START_TIME_SLACK
            )
            if not young:
                created = process.info["create_time"]
                if oldest is not None and created is not None and created < oldest:
                    continue
                agent = by_marker.get(process.environ().get(CLAIM_VARIABLE, ""))
        except (psutil.Error, OSError):
            continue
        if agent is not None and _alive(process):
            found[agent][process.pid] = process
    return {a: list(procs.values()) for a, procs in found.items()}


def _group_is_ours(pgid: int, started: float | None) -> bool:
    """A group id names the agent's group unless its leader's pid was reused since: a
    pid cannot be handed out while a group of that id has members."""
    try:
        leader = psutil.Process(pgid)
        return started is None or abs(leader.create_time() - started) <= START_TIME_SLACK
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate(
    find: Callable[[], dict[AgentRef, list[psutil.Process]]], grace: float
) -> dict[AgentRef, list[int]]:
    """SIGTERM what `find` returns, wait `grace`, look again (a child forked meanwhile is
    caught), SIGKILL what is left; return, per agent, the pids that still live."""
    first = [p for procs in find().values() for p in procs]
    if not first:
        return {}
    for process in first:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    psutil.wait_procs(first, timeout=grace)
    left = find()
    rest = [p for procs in left.values() for p in procs]
    for process in rest:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    if rest:
        psutil.wait_procs(rest, timeout=5)
    survivors = {a: [p.pid for p in procs if _alive(p)] for a, procs in left.items()}
    return {a: pids for a, pids in survivors.items() if pids}


def agent_of(task) -> AgentRef:
    return AgentRef(claim_marker(task.pk, task.fence), task.agent_pgid, task.agent_started)


def end_agents_of(tasks: Iterable, grace: float | None = None) -> dict[int, list[int]]:
    """End what is left of the agents that (dead) workers ran for these claimed tasks on
    this host. Returns, per task id, the pids that could not be ended: while there are
    any, that task must not be given to another worker.

    A claim of another host name is looked for by its marker alone (its process group
    means nothing here): none is found for a host that is another machine, but this one's
    agents are, left by a worker that ran under an older HYPERVISOR_HOST."""
    here = {}
    for task in tasks:
        agent = agent_of(task)
        if task.holder_host and task.holder_host != settings.HYPERVISOR_HOST:
            agent = AgentRef(agent.marker, None, agent.started)
        here[agent] = task.pk
    if not here:
        return {}
    grace = settings.HYPERVISOR_AGENT_GRACE if grace is None else grace
    survivors = terminate(lambda: find_agent_processes(here), grace)
    return {here[a]: pids for a, pids in survivors.items()}
