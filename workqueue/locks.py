"""The filesystem half of a claim: `LOCK_ROOT/<queue>/<key>/owner.json`.

Outside tools see a task as taken when its directory exists; `mkdir` is atomic on every
POSIX filesystem, which is what the hand-made scripts this replaces relied on too.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
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
        """owner.json without its `time`, which OwnerFile stamps per claim batch."""
        return {
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "worker": self.worker,
            "herd": self.herd,
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
    return _read_owner_file(os.path.join(directory, OWNER_FILE))


def _read_owner_file(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
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


def abandoned(owner: dict | None, age_seconds: float) -> bool:
    """A lock-root entry to clean: its owner is dead here, or it never got an owner.

    A live owner may be an outside tool, or one of ours between finish and release.
    """
    return owner_record_is_dead(owner) or (owner is None and age_seconds > 60)


def owner_record_is_dead(owner: dict | None) -> bool:
    if not owner:
        return False
    try:
        return owner_is_dead(owner.get("host"), int(owner.get("pid") or 0), owner.get("started"))
    except (TypeError, ValueError):
        return False


_owner_files = itertools.count(1)  # unique names across every OwnerFile of a process
SPARES = ".spares"  # hidden beside the queue folders, so on the same filesystem
OWNERS = ".owners"
RENAME_NOREPLACE = 1
AT_FDCWD = -100  # paths relative to the working directory, as rename(2) takes them
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+; absent elsewhere


def rename_noreplace(source: str, target: str) -> None:
    """rename(2) that fails with EEXIST when `target` exists: as atomic as `mkdir`."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(AT_FDCWD, source.encode(), AT_FDCWD, target.encode(), RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


class OwnerFile:
    """A worker's lock-taking state: its owner.json, and spare lock directories carrying it.

    A new directory costs a block allocation and an `rmdir` frees it again, each
    hundreds of microseconds on a disk that discards freed blocks. So a lock is taken by
    renaming a spare directory, its owner.json already linked in, onto the lock's name
    (refused if the name exists, like `mkdir`), and a finished lock is renamed back into
    the spares: a few dentry changes per task, and the lock never appears without its
    owner. Where rename-without-replace is missing, locks are made with `mkdir` and `link`.

    Every lock of the worker links to one owner file, whose `time` is rewritten in place
    at each claim batch (fixed width, so a reader sees the old or the new time, or digits
    of both, never broken JSON).
    """

    def __init__(self, identity: Identity):
        self.identity = identity
        self.root = Path(settings.HYPERVISOR_LOCK_ROOT)
        self.directory = self.root / OWNERS
        self.path: Path | None = None
        self.inode: int | None = None  # every lock of this worker links to it
        self.fd: int | None = None
        self.spares: list[str] = []
        self.renames = _renameat2 is not None
        self.stem = f"{lock_name(identity.host)}-{identity.pid}-{identity.started:.3f}"

    def record(self) -> bytes:
        fields = json.dumps(self.identity.owner_record())
        return f'{fields[:-1]}, "time": {time.time():.3f}}}'.encode()

    def refresh(self) -> Path:
        """Stamp the time of this claim batch into the owner file (made on first use)."""
        try:
            if self.fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / f"{self.stem}-{next(_owner_files)}"
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.path, self.inode = path, os.fstat(self.fd).st_ino
            os.pwrite(self.fd, self.record(), 0)
        except OSError as exc:
            raise LockError(_describe(exc, self.directory)) from exc
        return self.path

    def place(self, directory: str) -> None:
        """Make the lock `directory` appear with our owner.json in it, or raise
        FileExistsError when it is there already."""
        if self.path is None:
            self.refresh()
        if self.renames:
            spare = self._spare()
            try:
                rename_noreplace(spare, directory)
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT and not os.path.isdir(spare):
                    return self.place(directory)  # the spare was removed under us
                self.spares.append(spare)
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP):
                    raise
                self.renames = False  # this filesystem cannot: mkdir from now on
        os.mkdir(directory)
        try:
            os.link(self.path, f"{directory}/{OWNER_FILE}")
        except OSError:
            remove(directory)
            raise

    def _spare(self) -> str:
        if self.spares:
            return self.spares.pop()
        spare = self._spare_name()
        try:
            os.mkdir(spare)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(spare), exist_ok=True)
            os.mkdir(spare)
        try:
            os.link(self.path, f"{spare}/{OWNER_FILE}")
        except OSError:
            os.rmdir(spare)
            raise
        return spare

    def _spare_name(self) -> str:
        return f"{self.root}/{SPARES}/{self.stem}-{next(_owner_files)}"

    def release_own(self, directories: list[str]) -> None:
        """Release these lock directories where they are still ours: a person may have
        requeued a finished task and another worker locked it since. (Done before this
        worker claims again, so a lock linked to our owner file is one we are done with.)"""
        for directory in directories:
            try:
                if os.stat(f"{directory}/{OWNER_FILE}").st_ino != self.inode:
                    continue
            except FileNotFoundError:
                continue
            if not self.renames:
                remove(directory)
                continue
            spare = self._spare_name()
            try:
                os.rename(directory, spare)
            except FileNotFoundError:
                continue
            except OSError:
                remove(directory)
                continue
            self.spares.append(spare)

    def discard(self) -> None:
        """The worker stops: its owner file and spare directories go."""
        for spare in self.spares:
            remove(spare)
        self.spares = []
        if self.fd is not None:
            os.close(self.fd)
            with suppress(FileNotFoundError):
                self.path.unlink()
            self.fd = self.path = None


def acquire(queue: str, key: str, owner_file: OwnerFile) -> dict | None:
    """Take the lock directory. Returns None on success, or the live owner's record."""
    directory = lock_path(queue, key)
    for _ in range(2):
        try:
            owner_file.place(directory)
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


def leftovers() -> list[Path]:
    """Spare lock directories and owner files of workers gone without discarding them."""
    root = Path(settings.HYPERVISOR_LOCK_ROOT)
    now = time.time()
    found = []
    for folder, read in ((root / SPARES, read_owner), (root / OWNERS, _read_owner_file)):
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            owner = read(entry.path)
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if abandoned(owner, age):
                found.append(Path(entry.path))
    return found


def remove_leftover(path: Path) -> None:
    if path.is_dir():
        remove(path)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


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
