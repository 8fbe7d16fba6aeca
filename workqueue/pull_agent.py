"""A herd worker of kind "pull": one agent CLI that claims its own tasks over MCP.

The worker process is the session: it holds the claims (its pid and start time, reaped
like any worker's when it dies), serves the tools on 127.0.0.1 over streamable HTTP with a
random bearer secret, and starts the agent with that server configured. The agent never
sees the database or Hypervisor's settings: only the URL and the secret of its own
session, in generated config files (Claude's `--mcp-config`, Gemini's settings) and in its
environment, beside the usual allow-list. When the agent exits, the worker gives back
whatever it still holds and exits with the agent's code.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import uvicorn
from django.conf import settings
from django.db import connection

from workqueue import agent_tree, locks, reaper, signals
from workqueue.mcp_server import SessionThread, build_server
from workqueue.processors import PLACEHOLDER
from workqueue.pull import Heartbeat, PullSession, local_session
from workqueue.routing import TaskFilter

log = logging.getLogger("workqueue.pull")

PROMPT = Path(settings.BASE_DIR) / "prompts" / "pull-worker.md"
SERVER_NAME = "hypervisor"
TOKEN_VARIABLE = "HYPERVISOR_MCP_TOKEN"  # noqa: S105 - the variable's name
URL_VARIABLE = "HYPERVISOR_MCP_URL"


class BearerOnly:
    """ASGI wrapper: requests without this session's secret get 401 and reach nothing."""

    def __init__(self, app, secret: str):
        self.app = app
        self.expected = f"Bearer {secret}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
        await self.app(scope, receive, send)


class LocalServer:
    """The session's tools on 127.0.0.1:<free port>/mcp, in a thread of this process."""

    def __init__(self, session: PullSession):
        self.secret = secrets.token_urlsafe(32)
        self.thread_pool = SessionThread(session)
        server = build_server(self.thread_pool.run_tool)
        app = server.streamable_http_app(json_response=True, stateless_http=True)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            BearerOnly(app, self.secret), log_level="warning", lifespan="on", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 10) -> None:
        self.thread.start()
        waited = threading.Event()
        while not self.server.started and self.thread.is_alive() and timeout > 0:
            waited.wait(0.05)
            timeout -= 0.05
        if not self.server.started:
            raise RuntimeError("the local MCP server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.thread_pool.close()
        self.socket.close()


def write_configs(
    folder: Path, url: str, secret: str, gemini_dir: Path | None = None
) -> dict[str, str]:
    """The agent CLIs' config files for this session, readable by this user only.

    Gemini CLI reads MCP servers from settings files alone, and skips a system settings
    file (GEMINI_CLI_SYSTEM_SETTINGS_PATH) unless root owns it and every folder above it:
    so it gets a Gemini home of its own (`gemini_home`, for GEMINI_CLI_HOME) whose
    settings are the user's (from `gemini_dir`, their ~/.gemini) with this session's
    server added, and whose other files (credentials, trusted folders) are links to the
    user's."""
    headers = {"Authorization": f"Bearer {secret}"}
    gemini = folder / "gemini" / ".gemini"
    gemini.mkdir(mode=0o700, parents=True)
    files = {
        # Claude Code: `claude --mcp-config FILE`.
        folder / "mcp_config.json": {
            "mcpServers": {SERVER_NAME: {"type": "http", "url": url, "headers": headers}}
        },
        gemini / "settings.json": gemini_settings(
            gemini_dir, {"httpUrl": url, "headers": headers}
        ),
    }
    for path, content in files.items():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
    if gemini_dir is not None and gemini_dir.is_dir():
        for entry in gemini_dir.iterdir():
            if entry.name != "settings.json":
                (gemini / entry.name).symlink_to(entry)
    return {
        "mcp_config": str(folder / "mcp_config.json"),
        "gemini_settings": str(gemini / "settings.json"),
        "gemini_home": str(gemini.parent),
    }


def gemini_settings(gemini_dir: Path | None, server: dict) -> dict:
    """The user's Gemini settings with this session's server in them."""
    settings = {}
    if gemini_dir is not None:
        try:
            settings = json.loads((gemini_dir / "settings.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # Gemini also takes comments; we do not
            log.warning("the agent's Gemini settings are not used: %s", exc)
    if not isinstance(settings, dict):
        settings = {}
    servers = settings.get("mcpServers")
    settings["mcpServers"] = {
        **(servers if isinstance(servers, dict) else {}),
        SERVER_NAME: server,
    }
    return settings


def config_root() -> Path:
    """Where a session's config files go: a folder of the data folder only this user may
    enter, not the temporary folder others can list."""
    root = reaper.session_folders()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def pull_prompt(queue: str) -> str:
    return PROMPT.read_text(encoding="utf-8").replace("{queue}", queue)


def fill(argv: list[str], values: dict[str, str]) -> list[str]:
    """Placeholders filled in one pass, as the command processor does."""

    def one(found) -> str:
        name = found.group(1)
        return values[name] if name in values else found.group(0)

    return [PLACEHOLDER.sub(one, arg) for arg in argv]


def run_pull_worker(
    queue: str,
    argv: list[str],
    name: str | None = None,
    herd: int | None = None,
    filters: TaskFilter | None = None,
    lease_seconds: int | None = None,
    timeout: float | None = None,
    pass_env: list[str] | None = None,
    max_attempts: int | None = None,
    batch: int = 0,
    env: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """Serve one session and run one agent on it until it exits. Returns the exit code
    and the worker's summary."""
    if not argv:
        raise ValueError("a pull worker needs the agent's command after --")
    session = local_session(queue, name or "", filters, lease_seconds, herd, max_attempts, batch)
    beat = Heartbeat(session)
    server = LocalServer(session)
    code = 1
    try:
        beat.start()
        server.start()
        with tempfile.TemporaryDirectory(prefix="pull-", dir=config_root()) as folder:
            # Whose it is: the reaper removes it once this worker is dead (a SIGKILL).
            owner = json.dumps(session.identity.owner_record())
            Path(folder, locks.OWNER_FILE).write_text(owner, encoding="utf-8")
            agent_env = agent_tree.agent_environment(
                {
                    URL_VARIABLE: server.url,
                    TOKEN_VARIABLE: server.secret,
                    "HYPERVISOR_TASK_QUEUE": queue,
                    "HYPERVISOR_TASK_WORKER": session.identity.worker,
                },
                env or {},
                pass_env or [],
            )
            home = agent_env.get("GEMINI_CLI_HOME") or agent_env.get("HOME")
            configs = write_configs(
                Path(folder), server.url, server.secret, Path(home, ".gemini") if home else None
            )
            agent_env["GEMINI_CLI_HOME"] = configs.pop("gemini_home")
            values = {
                "python": sys.executable,
                "base_dir": str(settings.BASE_DIR),
                "queue": queue,
                "mcp_url": server.url,
                "prompt": pull_prompt(queue),
                **configs,
            }
            passed = [*(pass_env or []), *(env or {})]  # their values are masked in output
            code = run_agent(session, fill(argv, values), agent_env, timeout, passed)
    finally:
        server.stop()
        beat.stop()
        session.release_all(f"agent of {session.identity.worker} exited")
        session.owner_file.discard()
        signals.worker_stopped.send(sender=session, exit_code=code)
        connection.close()
    summary = {
        "worker": session.identity.worker,
        "queue": queue,
        "exit_code": code,
        "stop_reason": session.stop_reason,
        "claimed": session.claimed,
        "done": session.done,
        "blocked": session.blocked,
        "released": session.released,
    }
    return code, summary


def run_agent(
    session: PullSession, args: list[str], env: dict, timeout: float | None, passed: list[str]
) -> int:
    mask = agent_tree.Masker(
        [env[TOKEN_VARIABLE], *agent_tree.known_secrets(env, [*passed, TOKEN_VARIABLE])]
    )
    log_path = Path(
        settings.HYPERVISOR_DATA_DIR,
        "logs",
        "agents",
        f"pull-{session.identity.host}-{session.identity.pid}.log",
    )
    run = agent_tree.AgentRun(
        args,
        env,
        None,
        timeout,
        mask,
        lambda: signalled.is_set() or (session.stop_requested and not session.held),
        log_path=log_path,
    )
    # SIGTERM (a `kill`, systemd) or Ctrl-C ends the agent and gives back what it holds,
    # as a push worker's second signal does: an agent left running would work on beside
    # whoever takes its task next.
    signalled = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda number, frame: signalled.set())
    try:
        run.start()
    except OSError as exc:
        print(f"cannot start {args[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    session.agent = (run.pgid, run.started_at)
    ended = run.wait()
    # The worker's log gets the agent's last words: supervision reads it for quota errors.
    sys.stdout.write(ended.stdout[-4000:])
    sys.stderr.write(ended.stderr[-4000:])
    if ended.log_error:  # a disk full under the agent's log: said, as a push worker says it
        print(ended.log_error, file=sys.stderr)
    if ended.timed_out:
        print(f"the agent timed out after {timeout:g} s", file=sys.stderr)
        return 124
    if ended.stopped:
        return 0  # drained or cancelled: not the agent's fault
    if ended.survivors:
        print(f"the agent's processes could not be ended: {ended.survivors}", file=sys.stderr)
        return 1
    return ended.code if ended.code is not None and ended.code >= 0 else 1
