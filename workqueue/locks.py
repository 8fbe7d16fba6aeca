"""The filesystem half of a claim: `LOCK_ROOT/<queue>/<key>/owner.json`.

Outside tools see a task as taken when its directory exists; `mkdir` is atomic on every
POSIX filesystem, which is what the hand-made scripts this replaces relied on too.

Other tools and people write in the lock root, so nothing below it is trusted: every
operation goes through directory file descriptors opened with O_NOFOLLOW, a symlink below
the root is refused (LockError), and removal walks by descriptors and unlinks links
instead of following them. Only the root itself may be a symlink (an admin's choice): it
is resolved once, when it is opened.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
import time
import weakref
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote

import psutil
from django.conf import settings

from workqueue.text import ascii_number

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
MAX_NAME = 200
# Keys made only of these characters are their own lock name (the common case).
SAFE_NAME = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,199}\Z")  # 200 = MAX_NAME
# Ends a shortened long name. No other lock name has it: plain names have no `%`, and an
# encoded name has `%` only before two hex digits.
DIGEST_MARK = "%~"
DIGEST_NAME = re.compile(r"(.*)%~[0-9a-f]{16}\Z", re.DOTALL)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Non-blocking, so a FIFO planted as owner.json cannot hang the reader.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LockError(Exception):
    """The lock root cannot take a lock (read-only, full, no permission, a symlink)."""


class SymlinkRefused(LockError):
    """A symlink where a folder, lock directory or owner file of the lock root goes."""

    def __init__(self, path: str | Path):
        super().__init__(f"{path} is a symlink; refusing to follow it")
        self.path = str(path)

    def __reduce__(self):
        return (type(self), (self.path,))


def symlink_refused(path: str | Path) -> SymlinkRefused:
    return SymlinkRefused(path)


# The symlinks a listing of the lock root met and logged, by path: the link's (device,
# inode, change time, target). The reaper lists the root at each pass (every minute, and
# at each supervision pass), and a link planted there stays until a person removes it: it
# is logged once per process, and again only once another link stands at that path.
_refusals_said: dict[str, tuple] = {}
_REFUSALS_KEPT = 10_000
_every_refusal = contextvars.ContextVar("every_refusal", default=False)


@contextmanager
def every_refusal():
    """Within it, each symlink a listing meets is logged, however often it was before:
    for a person who asked (`reap_locks`, the admin's locks page)."""
    token = _every_refusal.set(True)
    try:
        yield
    finally:
        _every_refusal.reset(token)


def _say_refused(refused: SymlinkRefused) -> None:
    """Log a symlink met in the lock root where a folder, lock or owner file goes."""
    try:
        link = os.lstat(refused.path)
        seen = (link.st_dev, link.st_ino, link.st_ctime_ns, os.readlink(refused.path))
    except OSError:  # gone already, or no longer a link
        seen = None
    if seen is not None and not _every_refusal.get() and _refusals_said.get(refused.path) == seen:
        log.debug("%s (logged before)", refused)
        return
    if seen is not None:
        if len(_refusals_said) >= _REFUSALS_KEPT:
            _refusals_said.clear()
        _refusals_said[refused.path] = seen
    log.warning("%s", refused)


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
    """One safe directory name per key: `/`, `..` and other unsafe characters encoded,
    and a name too long shortened with a digest of the whole key."""
    if SAFE_NAME.match(key):
        return key
    if not key:
        raise ValueError("an empty name has no lock directory (it would be the lock root)")
    name = quote(key, safe="-_.~")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        prefix = name[: MAX_NAME - len(DIGEST_MARK) - 16]
        cut = prefix.find("%", len(prefix) - 2)  # not in the middle of a %XX escape
        name = f"{prefix[:cut] if cut >= 0 else prefix}{DIGEST_MARK}{digest}"
    return name


def key_from_lock_name(name: str) -> str:
    """The key a lock name stands for, for display; a shortened one ends in `…`."""
    shortened = DIGEST_NAME.match(name)
    if shortened:
        return unquote(shortened.group(1)) + "…"
    return unquote(name)


def queue_dir(queue: str) -> Path:
    return Path(settings.HYPERVISOR_LOCK_ROOT) / lock_name(queue)


def lock_dir(queue: str, key: str) -> Path:
    return Path(lock_path(queue, key))


def lock_path(queue: str, key: str) -> str:
    # Plain strings, not Path: this runs twice per task on the hot path.
    return f"{settings.HYPERVISOR_LOCK_ROOT}/{lock_name(queue)}/{lock_name(key)}"


def open_root(create: bool = False) -> int:
    """The lock root as a directory fd; the one place a symlink is followed."""
    root = os.path.realpath(settings.HYPERVISOR_LOCK_ROOT)
    if create:
        os.makedirs(root, exist_ok=True)
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(parent: int, name: str, path: str, create: bool = False) -> int:
    """The directory `name` in `parent` as an fd, never through a symlink (LockError)."""
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent, name):
            raise symlink_refused(path) from None
        raise
    with suppress(FileExistsError):
        os.mkdir(name, dir_fd=parent)
    return open_dir(parent, name, path)


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextmanager
def _opened(*names: str):
    """Directory fds from the lock root down through `names`; yields the last one.
    Raises FileNotFoundError when one is missing."""
    fds = [open_root()]
    path = str(settings.HYPERVISOR_LOCK_ROOT)
    try:
        for name in names:
            path = f"{path}/{name}"
            fds.append(open_dir(fds[-1], name, path))
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


def _names(path: Path | str) -> list[str]:
    """The names below the lock root of a path made from it (lock_dir, LockInfo.path)."""
    root = str(settings.HYPERVISOR_LOCK_ROOT).rstrip("/") + "/"
    path = str(path)
    names = path[len(root) :].split("/") if path.startswith(root) else []
    if not names or any(name in ("", ".", "..") for name in names):
        raise LockError(f"{path} is not below the lock root {root}")
    return names


def read_owner(directory: Path | str) -> dict | None:
    try:
        with _opened(*_names(directory)) as fd:
            return _read_owner_at(fd, OWNER_FILE, f"{directory}/{OWNER_FILE}")
    except (OSError, LockError):
        return None


def read_owner_outside(directory: str) -> dict | None:
    """The owner record of a folder outside the lock root (a pull worker's session
    folder), the folder itself not followed through a link."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _read_owner_at(fd, OWNER_FILE, f"{directory}/{OWNER_FILE}")
    except (OSError, LockError):
        return None
    finally:
        os.close(fd)


def _read_owner_at(directory: int, name: str, path: str) -> dict | None:
    """A regular file's JSON object, or None: nothing there, a FIFO, garbage. A symlink
    is refused (LockError): whatever it names is not the lock's owner."""
    try:
        fd = os.open(name, _FILE, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_refused(path) from None
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        owner = json.loads(os.read(fd, 64 * 1024))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return owner if isinstance(owner, dict) else None


def _read_lock(parent: int, name: str, path: str) -> tuple[dict | None, float]:
    """A lock directory's owner and its modification time."""
    fd = open_dir(parent, name, path)
    try:
        return _read_owner_at(fd, OWNER_FILE, f"{path}/{OWNER_FILE}"), os.fstat(fd).st_mtime
    finally:
        os.close(fd)


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
    except (psutil.AccessDenied, OverflowError, ValueError):
        return False


def abandoned(owner: dict | None, age_seconds: float, spare: bool = False) -> bool:
    """A lock-root entry to clean: its owner is dead here, a spare of ours never got an
    owner, or its owner is not one of ours and older than HYPERVISOR_FOREIGN_LOCK_MAX_AGE.

    A live owner of ours may be between finish and release; a foreign one (no start time,
    no pid, another format) is judged by its pid and age, never trusted for ever. A lock
    directory with no owner record of ours is an outside tool's (`mkdir` alone, a note in
    its own words): ours appear with their owner, but for the instant between `mkdir` and
    `link` where renameat2 is missing.
    """
    if owner is None:
        return age_seconds > (60 if spare else settings.HYPERVISOR_FOREIGN_LOCK_MAX_AGE)
    if owner_record_is_dead(owner):
        return True
    return is_foreign(owner) and age_seconds > settings.HYPERVISOR_FOREIGN_LOCK_MAX_AGE


def owner_record_is_dead(owner: dict | None) -> bool:
    pid = _pid(owner.get("pid")) if owner else None
    if pid is None:
        return False
    started = owner.get("started")
    return owner_is_dead(owner.get("host"), pid, started if _is_number(started) else None)


def is_foreign(owner: dict) -> bool:
    """Not written by one of our workers: ours always carry a pid and its start time."""
    return _pid(owner.get("pid")) is None or not _is_number(owner.get("started"))


def _pid(value) -> int | None:
    if isinstance(value, str):  # an owner file is anyone's to write
        value = ascii_number(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31:
        return value
    return None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe_holder(owner: dict | None, since: float | None = None) -> str:
    """How the board and the admin name a lock's holder that is not one of our workers.
    `since` (a timestamp) stands in when the owner record carries no time."""
    owner = owner or {}
    if owner.get("refused"):  # no lock directory there: a symlink, a file (_held)
        return f"not a lock directory: {owner['refused']}"
    when = next((t for t in (owner.get("time"), owner.get("since"), since) if t), None)
    if _is_number(when):
        with suppress(OverflowError, OSError, ValueError):
            when = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"held by an outside process: host {_shown(owner.get('host'))}, "
        f"pid {_shown(owner.get('pid'))}, since {_shown(when)}"
    )


def _shown(value) -> str:
    return "?" if value in (None, "") else str(value)[:64]


_owner_files = itertools.count(1)  # unique names across every OwnerFile of a process
SPARES = ".spares"  # hidden beside the queue folders, so on the same filesystem
OWNERS = ".owners"
RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+; absent elsewhere
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    _renameat2.argtypes += [ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def rename_noreplace(source_dir: int, source: str, target_dir: int, target: str) -> None:
    """renameat2(2) that fails with EEXIST when `target` exists: as atomic as `mkdir`.
    Names are relative to the directory fds, and neither is followed if it is a link."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(source_dir, source.encode(), target_dir, target.encode(), RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        with suppress(OSError):
            os.close(fd)
    fds.clear()


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
    of both, never broken JSON). The directory fds of the root, its queue folders, the
    spares and the owner files are opened once (O_NOFOLLOW) and kept for the hot path.
    """

    def __init__(self, identity: Identity):
        self.identity = identity
        self.root = str(settings.HYPERVISOR_LOCK_ROOT)
        self.path: Path | None = None
        self.name: str | None = None  # of the owner file, in OWNERS
        self.inode: int | None = None  # every lock of this worker links to it
        self.fd: int | None = None
        self.spare_names: list[str] = []
        self.renames = _renameat2 is not None
        self.stem = f"{lock_name(identity.host)}-{identity.pid}-{identity.started:.3f}"
        # Directory fds by name below the root ("" for the root), closed with the object.
        self.dirs: dict[str, int] = {}
        weakref.finalize(self, _close_all, self.dirs)

    @property
    def spares(self) -> list[str]:
        return [f"{self.root}/{SPARES}/{name}" for name in self.spare_names]

    def record(self) -> bytes:
        fields = json.dumps(self.identity.owner_record())
        return f'{fields[:-1]}, "time": {time.time():.3f}}}'.encode()

    def refresh(self) -> Path:
        """Stamp the time of this claim batch into the owner file (made on first use)."""
        try:
            if self.fd is None:
                owners = self.dir(OWNERS)
                name = f"{self.stem}-{next(_owner_files)}"
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                self.fd = os.open(name, flags, 0o644, dir_fd=owners)
                self.name, self.path = name, Path(self.root, OWNERS, name)
                self.inode = os.fstat(self.fd).st_ino
            os.pwrite(self.fd, self.record(), 0)
        except OSError as exc:
            raise LockError(_describe(exc, f"{self.root}/{OWNERS}")) from exc
        return self.path

    def dir(self, name: str) -> int:
        """The fd of a folder in the lock root (made if missing), kept for next time."""
        fd = self.dirs.get(name)
        if fd is None:
            if "" not in self.dirs:
                self.dirs[""] = open_root(create=True)
            fd = self.dirs[name] = open_dir(self.dirs[""], name, f"{self.root}/{name}", True)
        return fd

    def forget(self, name: str) -> None:
        """Someone removed this folder under us: open (or make) it again next time."""
        with suppress(KeyError, OSError):
            os.close(self.dirs.pop(name))
        if name == SPARES:
            self.spare_names = []

    def place(self, queue: str, key: str) -> None:
        """Make the lock directory `key` (a lock name) appear in the queue folder `queue`
        with our owner.json in it, or raise FileExistsError when it is there already."""
        if self.fd is None:
            self.refresh()
        for _ in range(3):  # a folder or spare removed under us is made again
            folder = self.dir(queue)
            try:
                if self.renames and self._rename_spare(folder, key):
                    return
                return self._make(folder, key, f"{self.root}/{queue}/{key}")
            except FileNotFoundError:
                self.forget(queue)
        raise LockError(f"cannot lock {self.root}/{queue}/{key}: its folder keeps vanishing")

    def _rename_spare(self, folder: int, key: str) -> bool:
        """Rename a spare onto the lock; False when this filesystem cannot."""
        spare = self._spare()
        spares = self.dir(SPARES)
        try:
            rename_noreplace(spares, spare, folder, key)
            return True
        except FileNotFoundError:
            if _exists(spares, spare):
                self.spare_names.append(spare)
            else:
                self.forget(SPARES)  # the spares were removed under us
            raise
        except OSError as exc:
            self.spare_names.append(spare)
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP):
                raise
        self.renames = False  # this filesystem cannot: mkdir from now on
        return False

    def _make(self, folder: int, name: str, path: str) -> None:
        os.mkdir(name, dir_fd=folder)
        fd = open_dir(folder, name, path)
        try:
            os.link(
                self.name,
                OWNER_FILE,
                src_dir_fd=self.dir(OWNERS),
                dst_dir_fd=fd,
                follow_symlinks=False,
            )
        except OSError:
            with suppress(OSError):
                os.rmdir(name, dir_fd=folder)
            raise
        finally:
            os.close(fd)

    def _spare(self) -> str:
        if self.spare_names:
            return self.spare_names.pop()
        name = f"{self.stem}-{next(_owner_files)}"
        try:
            self._make(self.dir(SPARES), name, f"{self.root}/{SPARES}/{name}")
        except FileNotFoundError:
            self.forget(SPARES)
            self._make(self.dir(SPARES), name, f"{self.root}/{SPARES}/{name}")
        return name

    def release_own(self, directories: list[str]) -> None:
        """Release these lock directories (lock_path strings) where they are still ours:
        a person may have requeued a finished task and another worker locked it since.
        (Done before this worker claims again, so a lock linked to our owner file is one
        we are done with.) A symlink in a lock's place is never ours and stays."""
        prefix = f"{self.root}/"
        for directory in directories:
            if not directory.startswith(prefix):
                continue
            queue, _, key = directory[len(prefix) :].partition("/")
            try:
                folder = self.dir(queue)
                if not self._ours(folder, key):
                    if _is_symlink(folder, key):
                        log.warning("%s", symlink_refused(directory))
                    continue
            except (OSError, LockError):
                continue
            try:
                if self.renames:
                    spare = f"{self.stem}-{next(_owner_files)}"
                    os.rename(key, spare, src_dir_fd=folder, dst_dir_fd=self.dir(SPARES))
                    self.spare_names.append(spare)
                    continue
            except OSError:
                pass  # the spares are gone, or this filesystem cannot: remove it instead
            except LockError as exc:
                log.warning("%s", exc)
            try:
                remove_at(folder, key, directory)
            except (OSError, LockError) as exc:
                log.warning("cannot release %s: %s", directory, exc)

    def _ours(self, folder: int, key: str) -> bool:
        owner = os.stat(f"{key}/{OWNER_FILE}", dir_fd=folder, follow_symlinks=False)
        if owner.st_ino != self.inode:
            return False
        # Linked to our owner file, and a directory: not a link to one elsewhere.
        return stat.S_ISDIR(os.stat(key, dir_fd=folder, follow_symlinks=False).st_mode)

    def discard(self) -> None:
        """The worker stops: its owner file and spare directories go."""
        for name in self.spare_names:
            try:
                remove_at(self.dir(SPARES), name, f"{self.root}/{SPARES}/{name}")
            except LockError as exc:
                log.warning("%s", exc)
        self.spare_names = []
        if self.fd is not None:
            os.close(self.fd)
            with suppress(FileNotFoundError, LockError):
                os.unlink(self.name, dir_fd=self.dir(OWNERS))
            self.fd = self.path = self.name = None
        _close_all(self.dirs)


def _exists(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def acquire(queue: str, key: str, owner_file: OwnerFile) -> dict | None:
    """Take the lock directory. Returns None on success, or the live owner's record
    (with `since`, when it was made, if the record has no time of its own)."""
    queue, key = lock_name(queue), lock_name(key)
    for _ in range(2):
        try:
            owner_file.place(queue, key)
            return None
        except FileExistsError:
            held = _held(owner_file.dir(queue), key, f"{owner_file.root}/{queue}/{key}")
            if held is not None:
                return held
        except OSError as exc:
            raise LockError(_describe(exc, f"{owner_file.root}/{queue}/{key}")) from exc
    return {"unknown": True}


def _held(folder: int, name: str, path: str) -> dict | None:
    """The record of whoever holds an existing lock, or None once an abandoned one is
    removed (or it went meanwhile) and the lock may be taken."""
    try:
        owner, mtime = _read_lock(folder, name, path)
        if abandoned(owner, time.time() - mtime):
            remove_at(folder, name, path)
            return None
    except FileNotFoundError:
        return None
    except LockError as exc:  # a symlink where the lock goes: busy, and say why
        return {"unknown": True, "refused": str(exc)}
    except OSError as exc:  # a file, say, where the lock goes
        return {"unknown": True, "refused": f"{path}: {exc.strerror}"}
    if not owner:
        return {"unknown": True, "since": mtime}
    return owner if owner.get("time") else {**owner, "since": mtime}


def remove(directory: Path | str) -> None:
    """Remove a lock directory (or spare) below the lock root and everything in it."""
    *parents, name = _names(directory)
    try:
        with _opened(*parents) as parent:
            remove_at(parent, name, str(directory))
    except FileNotFoundError:
        pass


def remove_at(parent: int, name: str, path: str) -> None:
    """Remove the directory `name` in `parent` and what is in it, by directory fds:
    links inside are unlinked, never followed; `name` itself a symlink is refused."""
    try:
        fd = open_dir(parent, name, path)
    except FileNotFoundError:
        return
    try:
        with suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(OWNER_FILE, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:  # swapped for a link since it was opened
            raise symlink_refused(path) from None
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        # Something put files in the lock directory; it is still ours to remove. This
        # rmtree walks by fds and refuses to follow a link (avoids_symlink_attacks).
        try:
            shutil.rmtree(name, dir_fd=parent)
        except RecursionError:
            raise LockError(f"cannot remove {path}: nested too deeply") from None


def release(queue: str, key: str) -> None:
    """Remove a task's lock directory. Raises LockError when a symlink stands in the way."""
    queue, key = lock_name(queue), lock_name(key)
    try:
        with _opened(queue) as folder:
            remove_at(folder, key, f"{settings.HYPERVISOR_LOCK_ROOT}/{queue}/{key}")
    except FileNotFoundError:
        pass


def try_release(queue: str, key: str) -> str | None:
    """release() for callers that must go on (after a commit, in the reaper's loop):
    returns why the lock could not be removed, to record, or None when it is gone."""
    try:
        release(queue, key)
    except (LockError, OSError) as exc:
        log.warning("%s", exc)
        return str(exc)
    return None


def release_held_by(
    queue: str, key: str, host: str, pid: int | None, started: float | None
) -> str | None:
    """Remove a task's lock directory only while its owner is still this holder.

    For claims ended by someone other than their worker (the reaper, a person): by the
    time the row is released a new worker may have claimed the task and put its own lock
    in place. The directory is judged by its owner file, moved aside, and removed only if
    what was moved is the directory judged; anything else is put back. Returns why it
    could not be removed (to log), or None.
    """
    queue, name = lock_name(queue), lock_name(key)
    root = str(settings.HYPERVISOR_LOCK_ROOT)
    path = f"{root}/{queue}/{name}"
    fds: dict[str, int] = {}
    try:
        fds["root"] = open_root()
        fds["folder"] = folder = open_dir(fds["root"], queue, f"{root}/{queue}")
        fds["lock"] = open_dir(folder, name, path)
        owner = _read_owner_at(fds["lock"], OWNER_FILE, f"{path}/{OWNER_FILE}")
        judged = os.fstat(fds["lock"]).st_ino
        if not _is_holder(owner, host, pid, started):
            return None  # someone else's now: theirs to let go
        # Aside into the spares: if we die before removing it, it is a leftover to clean.
        fds["spares"] = spares = open_dir(fds["root"], SPARES, f"{root}/{SPARES}", True)
        aside = f"released-{os.getpid()}-{next(_owner_files)}"
        os.rename(name, aside, src_dir_fd=folder, dst_dir_fd=spares)
        if os.stat(aside, dir_fd=spares, follow_symlinks=False).st_ino != judged:
            rename_noreplace(spares, aside, folder, name)  # replaced meanwhile: put back
            return None
        remove_at(spares, aside, f"{root}/{SPARES}/{aside}")
    except FileNotFoundError:
        return None
    except (LockError, OSError) as exc:
        log.warning("cannot release %s: %s", path, exc)
        return str(exc)
    finally:
        _close_all(fds)
    return None


def _is_holder(owner: dict | None, host: str, pid: int | None, started: float | None) -> bool:
    if not owner or pid is None or _pid(owner.get("pid")) != pid or owner.get("host") != host:
        return False
    recorded = owner.get("started")
    return started is None or (_is_number(recorded) and abs(recorded - started) <= 1.0)


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

    @property
    def holder(self) -> str:
        return describe_holder(self.owner, time.time() - self.age_seconds)


def list_locks(queue: str | None = None) -> list[LockInfo]:
    """The lock directories below the root. Symlinks are not locks: skipped, and logged."""
    root = str(settings.HYPERVISOR_LOCK_ROOT)
    now = time.time()
    found = []
    try:
        root_fd = open_root()
    except OSError:
        return []
    try:
        names = [lock_name(queue)] if queue else [n for n, _ in _subdirs(root_fd, root)]
        for name in names:
            with _listing(root_fd, name, f"{root}/{name}") as folder:
                for key, st in _subdirs(folder, f"{root}/{name}"):
                    owner = _read_lock_owner(folder, key, f"{root}/{name}/{key}")
                    found.append(
                        LockInfo(name, key, Path(root, name, key), owner, now - st.st_mtime)
                    )
    finally:
        os.close(root_fd)
    return found


def dead_owners(records: list[tuple[Path, dict | None]]) -> set[tuple[str, str, int, float]]:
    """(worker, host, pid, start) of our workers dead on this host among leftover_records
    (their spares and owner files carry the same record). An owner record is anyone's to
    write: only its fields' shapes are taken, and only when the pid it names is provably
    not that worker."""
    found = set()
    for _, owner in records:
        if owner and not is_foreign(owner) and owner_record_is_dead(owner):
            worker, host = owner.get("worker"), owner.get("host")
            found.add(
                (
                    worker if isinstance(worker, str) else "",
                    host if isinstance(host, str) else "",
                    _pid(owner["pid"]),
                    float(owner["started"]),
                )
            )
    return found


def leftover_records() -> list[tuple[Path, dict | None]]:
    """Spare lock directories and owner files of workers gone without discarding them,
    with the owner record each carries."""
    root = str(settings.HYPERVISOR_LOCK_ROOT)
    now = time.time()
    found = []
    try:
        root_fd = open_root()
    except OSError:
        return []
    try:
        for name in (SPARES, OWNERS):
            with _listing(root_fd, name, f"{root}/{name}") as folder:
                for entry, st in _entries(folder, f"{root}/{name}"):
                    path = f"{root}/{name}/{entry}"
                    if stat.S_ISDIR(st.st_mode):
                        owner = _read_lock_owner(folder, entry, path)
                    else:
                        owner = _read_owner_at(folder, entry, path)
                    if abandoned(owner, now - st.st_mtime, spare=True):
                        found.append((Path(root, name, entry), owner))
    finally:
        os.close(root_fd)
    return found


def remove_leftover(path: Path) -> None:
    *parents, name = _names(path)
    try:
        with _opened(*parents) as parent:
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise symlink_refused(path)
            if stat.S_ISDIR(mode):
                remove_at(parent, name, str(path))
            else:
                os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


@contextmanager
def _listing(parent: int, name: str, path: str):
    """A folder's fd to list, or None (nothing to list) when it is missing or a link."""
    try:
        fd = open_dir(parent, name, path)
    except SymlinkRefused as exc:
        _say_refused(exc)
        fd = None
    except LockError as exc:
        log.warning("%s", exc)
        fd = None
    except OSError:
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _entries(folder: int | None, path: str):
    """(name, lstat) of what is in a folder, links left out (and logged)."""
    if folder is None:
        return
    for entry in list(os.scandir(folder)):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            _say_refused(symlink_refused(f"{path}/{entry.name}"))
            continue
        yield entry.name, st


def _subdirs(folder: int | None, path: str):
    for name, st in _entries(folder, path):
        if stat.S_ISDIR(st.st_mode) and not name.startswith("."):
            yield name, st


def _read_lock_owner(folder: int, name: str, path: str) -> dict | None:
    try:
        return _read_lock(folder, name, path)[0]
    except SymlinkRefused as exc:
        _say_refused(exc)
    except LockError as exc:
        log.warning("%s", exc)
    except OSError:
        pass
    return None


def _describe(exc: OSError, path: Path | str) -> str:
    reason = {
        errno.EROFS: "the lock root is read-only",
        errno.ENOSPC: "the lock root is full",
        errno.EDQUOT: "the lock root is over quota",
        errno.EACCES: "no permission to write in the lock root",
        errno.EPERM: "no permission to write in the lock root",
    }.get(exc.errno, exc.strerror or str(exc))
    return f"cannot lock {path}: {reason}"
