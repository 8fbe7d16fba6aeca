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
RELEASED = ".released"
MAX_NAME = 200


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
    # Plain string joins: this runs twice per task on the hot path.
    return Path(f"{settings.HYPERVISOR_LOCK_ROOT}/{lock_name(queue)}/{lock_name(key)}")


def read_owner(directory: Path) -> dict | None:
    try:
        with open(directory / OWNER_FILE, "rb") as f:
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


class OwnerFile:
    """One owner.json per worker and claim batch, hard-linked into each lock directory.

    A link is one syscall where writing a file per task would be three.
    """

    def __init__(self, identity: Identity):
        self.identity = identity
        self.directory = Path(settings.HYPERVISOR_LOCK_ROOT) / ".owners"
        self.path: Path | None = None
        self.serial = 0

    def refresh(self) -> Path:
        self.discard()
        self.serial += 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = (
                self.directory / f"{self.identity.pid}-{self.identity.started:.3f}-{self.serial}"
            )
            with open(path, "w") as f:
                json.dump(self.identity.owner_record(), f)
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
    directory = lock_dir(queue, key)
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
            try:
                directory.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LockError(_describe(exc, directory.parent)) from exc
            continue
        except OSError as exc:
            raise LockError(_describe(exc, directory)) from exc
        try:
            os.link(owner_file.path or owner_file.refresh(), directory / OWNER_FILE)
        except OSError as exc:
            remove(directory)
            raise LockError(_describe(exc, directory)) from exc
        return None
    return {"unknown": True}


def remove(directory: Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(directory / OWNER_FILE)
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            # Something put files in the lock directory; it is still ours to remove.
            shutil.rmtree(directory, ignore_errors=True)


def release(queue: str, key: str) -> None:
    remove(lock_dir(queue, key))


class LockReleaser:
    """Removes released lock directories off the worker's hot path.

    The directory is renamed out of its queue folder at once, so the lock is gone for
    every observer; deleting it happens on a few threads, because `rmdir` waits on the
    disk where the filesystem discards freed blocks (milliseconds each on such mounts).
    """

    def __init__(self, threads: int = 4):
        self.trash = Path(settings.HYPERVISOR_LOCK_ROOT) / RELEASED
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="lock-release")
        self.serial = itertools.count()

    def release(self, queue: str, key: str) -> None:
        source = lock_dir(queue, key)
        target = self.trash / f"{os.getpid()}-{next(self.serial)}"
        try:
            os.rename(source, target)
        except FileNotFoundError:
            try:
                self.trash.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)
            except OSError:
                remove(source)
                return
        except OSError:
            remove(source)
            return
        self.pool.submit(remove, target)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def empty_trash(older_than: float = 60.0) -> int:
    """Delete released lock directories a worker renamed away but did not get to delete."""
    trash = Path(settings.HYPERVISOR_LOCK_ROOT) / RELEASED
    now, removed = time.time(), 0
    for entry in _subdirs(trash, include_hidden=True):
        with suppress(FileNotFoundError):
            if now - entry.stat().st_mtime > older_than:
                remove(entry)
                removed += 1
    return removed


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


def _subdirs(path: Path, include_hidden: bool = False) -> list[Path]:
    try:
        return [
            Path(e.path)
            for e in os.scandir(path)
            if e.is_dir(follow_symlinks=False) and (include_hidden or not e.name.startswith("."))
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
