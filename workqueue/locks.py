"""The filesystem half of a claim: `LOCK_ROOT/<queue>/<key>/owner.json`.

Outside tools see a task as taken when its directory exists; `mkdir` is atomic on every
POSIX filesystem, which is what the hand-made scripts this replaces relied on too.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import psutil
from django.conf import settings

OWNER_FILE = "owner.json"
MAX_NAME = 200
# Keys made only of these characters are their own lock name (the common case).
SAFE_NAME = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,199}\Z")  # 200 = MAX_NAME


class LockError(Exception):
    """The lock root cannot take a lock (read-only, full, no permission)."""


@dataclass(frozen=True)
class Identity:
    """Who holds a claim: enough to tell later whether that process still lives."""

    worker: str
    host: str
    pid: int
    started: float
    herd: int | None = None

    @classmethod
    def current(cls, worker: str | None = None, herd: int | None = None) -> Identity:
        pid = os.getpid()
        host = settings.HYPERVISOR_HOST
        return cls(
            worker=worker or f"{host}:{pid}",
            host=host,
            pid=pid,
            started=psutil.Process(pid).create_time(),
            herd=herd,
        )

    def owner_record(self) -> dict:
        return {
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "worker": self.worker,
            "herd": self.herd,
            "time": time.time(),
        }


def lock_name(key: str) -> str:
    """One safe directory name per key: `/`, `..` and other unsafe characters encoded."""
    if SAFE_NAME.match(key):
        return key
    name = quote(key, safe="-_.~")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        name = f"{name[: MAX_NAME - 17]}~{digest}"
    return name


def key_from_lock_name(name: str) -> str:
    return unquote(name)


def queue_dir(queue: str) -> Path:
    return Path(settings.HYPERVISOR_LOCK_ROOT) / lock_name(queue)


def lock_dir(queue: str, key: str) -> Path:
    return Path(lock_path(queue, key))


def lock_path(queue: str, key: str) -> str:
    # Plain strings, not Path: this runs twice per task on the hot path.
    return f"{settings.HYPERVISOR_LOCK_ROOT}/{lock_name(queue)}/{lock_name(key)}"


def read_owner(directory: Path | str) -> dict | None:
    try:
        with open(os.path.join(directory, OWNER_FILE), "rb") as f:
            owner = json.loads(f.read(64 * 1024))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def owner_is_dead(host: str | None, pid: int | None, started: float | None) -> bool:
    """True only when provably dead: our host, and the pid is gone or is another process."""
    if not pid or host != settings.HYPERVISOR_HOST:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return started is not None and abs(process.create_time() - started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def owner_record_is_dead(owner: dict | None) -> bool:
    if not owner:
        return False
    try:
        return owner_is_dead(owner.get("host"), int(owner.get("pid") or 0), owner.get("started"))
    except (TypeError, ValueError):
        return False


_owner_files = itertools.count(1)  # unique names across every OwnerFile of a process


class OwnerFile:
    """One owner.json per worker and claim batch, hard-linked into each lock directory.

    A link is one syscall where writing a file per task would be three.
    """

    def __init__(self, identity: Identity):
        self.identity = identity
        self.directory = Path(settings.HYPERVISOR_LOCK_ROOT) / ".owners"
        self.path: Path | None = None
        self.inode: int | None = None  # every lock of this batch links to it

    def refresh(self) -> Path:
        self.discard()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = (
                self.directory
                / f"{self.identity.pid}-{self.identity.started:.3f}-{next(_owner_files)}"
            )
            with open(path, "w") as f:
                json.dump(self.identity.owner_record(), f)
                self.inode = os.fstat(f.fileno()).st_ino
        except OSError as exc:
            raise LockError(_describe(exc, self.directory)) from exc
        self.path = path
        return path

    def discard(self) -> None:
        if self.path is not None:
            with suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None


def acquire(queue: str, key: str, owner_file: OwnerFile) -> dict | None:
    """Take the lock directory. Returns None on success, or the live owner's record."""
    directory = lock_path(queue, key)
    for _ in range(2):
        try:
            os.mkdir(directory)
        except FileExistsError:
            owner = read_owner(directory)
            if owner_record_is_dead(owner):
                remove(directory)
                continue
            return owner or {"unknown": True}
        except FileNotFoundError:
            parent = os.path.dirname(directory)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise LockError(_describe(exc, parent)) from exc
            continue
        except OSError as exc:
            raise LockError(_describe(exc, directory)) from exc
        try:
            os.link(owner_file.path or owner_file.refresh(), f"{directory}/{OWNER_FILE}")
        except OSError as exc:
            remove(directory)
            raise LockError(_describe(exc, directory)) from exc
        return None
    return {"unknown": True}


def remove(directory: Path | str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, OWNER_FILE))
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            # Something put files in the lock directory; it is still ours to remove.
            shutil.rmtree(directory, ignore_errors=True)


def release(queue: str, key: str) -> None:
    remove(lock_path(queue, key))


class LockReleaser:
    """Removes the lock directories of finished tasks off the worker's hot path.

    `rmdir` waits on the disk where the filesystem discards freed blocks (milliseconds
    each on such mounts), so a finished batch's directories are removed on a thread
    while the worker claims the next batch. Only finished tasks go this way: nobody
    claims them again unless a person requeues one, and then the thread finds another
    owner file in the directory (another inode than ours) and leaves it alone.
    Tasks going back to the queue are released at once.
    """

    def __init__(self, owner_file: OwnerFile):
        self.owner_file = owner_file
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lock-release")

    def release_all(self, directories: list[str]) -> None:
        """Remove these directories of the current claim batch, where still ours."""
        if directories:
            self.pool.submit(_remove_own, directories, self.owner_file.inode)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _remove_own(directories: list[str], inode: int | None) -> None:
    for directory in directories:
        try:
            if os.stat(f"{directory}/{OWNER_FILE}").st_ino != inode:
                continue
        except FileNotFoundError:
            continue
        remove(directory)


@dataclass
class LockInfo:
    queue_dir: str
    name: str
    path: Path
    owner: dict | None
    age_seconds: float

    @property
    def key(self) -> str:
        return key_from_lock_name(self.name)

    @property
    def owner_alive(self) -> bool | None:
        """True/False on our host; None when the owner is elsewhere or unknown."""
        if not self.owner or self.owner.get("host") != settings.HYPERVISOR_HOST:
            return None
        return not owner_record_is_dead(self.owner)


def list_locks(queue: str | None = None) -> list[LockInfo]:
    root = Path(settings.HYPERVISOR_LOCK_ROOT)
    queues = [queue_dir(queue)] if queue else _subdirs(root)
    now = time.time()
    found = []
    for qdir in queues:
        for entry in _subdirs(qdir):
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            found.append(LockInfo(qdir.name, entry.name, entry, read_owner(entry), age))
    return found


def _subdirs(path: Path) -> list[Path]:
    try:
        return [
            Path(e.path)
            for e in os.scandir(path)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        ]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _describe(exc: OSError, path: Path) -> str:
    reason = {
        errno.EROFS: "the lock root is read-only",
        errno.ENOSPC: "the lock root is full",
        errno.EDQUOT: "the lock root is over quota",
        errno.EACCES: "no permission to write in the lock root",
        errno.EPERM: "no permission to write in the lock root",
    }.get(exc.errno, exc.strerror or str(exc))
    return f"cannot lock {path}: {reason}"
