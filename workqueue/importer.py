"""Import markdown task files into a queue: upsert by key, confined to the import roots."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.backends.base.operations import BaseDatabaseOperations
from django.utils import timezone
from tqdm import tqdm

from workqueue import taskfile, transitions
from workqueue.models import (
    BOARD_INDEX_FIELDS,
    SOURCE_PATH_BYTES,
    Dependency,
    EventKind,
    Queue,
    Status,
    Task,
    TaskBody,
    TaskEvent,
    board_index_problem,
)
from workqueue.names import validate_queue_name
from workqueue.taskfile import TaskFileError

CHUNK = 500
# What `git mergetool` writes beside a conflicted file while its tool runs (the base, both
# sides, a backup), gone when it ends: `t1_BASE_4242.md` beside `t1.md`.
MERGETOOL_COPY = re.compile(r"(.+)_(?:BASE|LOCAL|REMOTE|BACKUP)_[0-9]+(\.md)")
LEFT_OUT_NAMED = 10
# An import of this many new tasks checks the planner's statistics (Task.keep_statistics).
STATISTICS_AFTER = 100


@dataclass
class ImportReport:
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    closed: int = 0
    requeued: int = 0  # done or blocked tasks whose files say open again
    deferred: int = 0
    missing: int = 0
    errors: list[dict] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # project documents, not tasks
    left_out_names: list[str] = field(default_factory=list)  # the same, from their root

    def error(self, path, message: str) -> None:
        self.errors.append({"path": shown(path), "error": message})

    def leave_out(self, path: Path, name: str) -> None:
        self.left_out.append(shown(path))
        self.left_out_names.append(shown(name))

    @property
    def accepted(self) -> int:
        return self.imported + self.updated + self.unchanged + self.deferred

    def as_dict(self) -> dict:
        return {
            "imported": self.imported,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "closed": self.closed,
            "requeued": self.requeued,
            "deferred": self.deferred,
            "missing": self.missing,
            "errors": self.errors,
            "left_out": self.left_out,
        }

    def summary(self) -> str:
        counts = (
            f"{self.imported} imported, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.closed} closed, {self.deferred} deferred (claimed), {self.missing} missing, "
            f"{len(self.errors)} errors"
        )
        if self.requeued:
            # Worth saying: a checkout of an older revision of the folder does this.
            counts += (
                f"; {self.requeued:,} done or blocked tasks went back to the queue "
                "(their files say open again)"
            )
        if not self.left_out:
            return counts
        n = len(self.left_out)
        files = "1 file that is not a task" if n == 1 else f"{n:,} files that are not tasks"
        names = ", ".join(self.left_out_names[:LEFT_OUT_NAMED])
        if n > LEFT_OUT_NAMED:
            names += f" and {n - LEFT_OUT_NAMED:,} more"
        return f"{counts}; left out {files} (no frontmatter): {names}"

    @property
    def refused(self) -> bool:
        """Whether the import was refused: files named, and none of them taken."""
        return bool(self.errors) and not self.accepted

    @property
    def changed(self) -> bool:
        """Whether the queue changed (a file it refused is named apart: workqueue.tasks)."""
        return bool(self.imported or self.updated or self.closed or self.missing)


def _mergetool_copy(name: str, names: set[str]) -> bool:
    copy = MERGETOOL_COPY.fullmatch(name)
    return copy is not None and copy[1] + copy[2] in names


def shown(path) -> str:
    """A path as text a report (and a database) can hold: bytes of its name that are not
    UTF-8, which Python keeps as lone surrogates, become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


class ImportRefused(Exception):
    """A queue's folder cannot be read again: none recorded, outside every import root,
    or gone."""


@dataclass
class _Source:
    path: Path  # resolved
    base: Path  # the root the key is relative to
    folder: Path | None = None  # the folder whose walk found it (not a file named)


# A project's own documents, which lie in task folders too: without frontmatter they are
# left out of a folder's import (a file of these names with frontmatter is a task).
DOCUMENT_NAMES = frozenset(
    ("readme", "changelog", "changes", "contributing", "license", "licence")
    + ("code_of_conduct", "security", "authors", "notice", "template")
)
TEMPLATE_FOLDERS = frozenset(("templates", "_templates"))


def _name_in_folder(source: _Source) -> str | None:
    """A file found in a folder, named from that folder (the folders above it are not the
    task folder's); None for a file named on the command line or in a queue file."""
    if source.folder is None:
        return None
    folder, path = str(source.folder) + os.sep, str(source.path)
    return path[len(folder) :] if path.startswith(folder) else source.path.name


def project_document(name: str) -> bool:
    """Whether a file's name, from the folder imported, is a project document's:
    README.md, CHANGELOG.md, _anything.md, templates/bug.md (in any case)."""
    *folders, file_name = name.lower().split(os.sep)
    stem = file_name.removesuffix(".md").replace("-", "_")
    return stem in DOCUMENT_NAMES or stem.startswith("_") or bool(TEMPLATE_FOLDERS & set(folders))


def configured_roots() -> list[Path]:
    """HYPERVISOR_IMPORT_ROOTS, resolved: where imports read and "New task" writes."""
    return [Path(r).resolve() for r in settings.HYPERVISOR_IMPORT_ROOTS]


def inside(real: Path, roots: list[Path]) -> bool:
    """`real` (resolved) is one of `roots` or below one."""
    return any(real.is_relative_to(root) for root in roots)


def named_place(path: str | Path) -> Path:
    """Where a path an operator names is, its last step not followed: the folders above it
    resolved, `..` taken as written. A symlink named (or reached through `..`) is then not
    a root itself, and what it leads to is confined like any symlink a walk meets."""
    named = Path(os.path.abspath(Path(path).expanduser()))
    return named.parent.resolve() / named.name


def named_folder(path: str | Path) -> Path:
    """The folder a file is named in, taken as named_place takes a folder."""
    return named_place(Path(os.path.abspath(Path(path).expanduser())).parent)


def folder_inside_roots(folder: str, purpose: str) -> Path:
    """`folder` resolved, when it is a folder inside a configured import root (no symlink
    leads out of them); ImportRefused saying which it is not, and what adding it is for."""
    real = Path(folder).resolve()
    roots = configured_roots()
    if not inside(real, roots):
        named = ", ".join(str(root) for root in roots) or "none"
        raise ImportRefused(
            f"{folder} is outside the import roots (HYPERVISOR_IMPORT_ROOTS: {named}); "
            f"add it there {purpose}"
        )
    if not real.is_dir():
        raise ImportRefused(f"{folder} is not a folder")
    return real


SYNC_PURPOSE = "to read it again from here (or run manage.py import_tasks)"


def sync_folder(queue: str, folder: str | None = None) -> ImportReport:
    """Import `queue`'s folder (`folder`, else read from its row) again, as `import_tasks`
    would: new files, edits made on disk, moved and deleted files. Only inside the
    configured import roots: a folder first imported from the command line outside them is
    read from the command line only."""
    if folder is None:
        folder = Queue.objects.filter(name=queue).values_list("folder", flat=True).first()
    if not folder:
        raise ImportRefused(
            f"the queue {queue!r} has no folder: its first import of a folder sets it "
            f"(manage.py import_tasks FOLDER --queue {queue})"
        )
    return Importer(queue).run([folder_inside_roots(folder, SYNC_PURPOSE)])


class Importer:
    def __init__(self, queue: str, roots: list[Path] | None = None, progress: bool = False):
        validate_queue_name(queue)
        self.queue = queue
        self.configured = configured_roots()
        self.roots = self.configured + [named_place(r) for r in roots or []]
        self.progress = progress
        self.report = ImportReport()
        self.known: dict[str, tuple] = {}
        self.keys: dict[str, tuple] = {}
        self.seen_keys: dict[str, str] = {}
        self.seen_paths: set[str] = set()
        self.new: list[tuple[Task, list[str], str]] = []

    # Entry points -----------------------------------------------------------

    def run(self, paths: list[str | Path]) -> ImportReport:
        self._load_known()
        sources, folders = [], []
        for raw in paths:
            path = Path(raw).expanduser()
            try:
                taken = self._another_queues(path.resolve())
                if taken:
                    self.report.error(path, taken)
                elif path.is_dir():
                    if self._leads_out(path):
                        continue
                    folders.append(path.resolve())
                    sources.extend(self._walk(path))
                elif path.suffix == ".txt":
                    sources.extend(self._read_queue_file(path))
                elif path.exists():
                    sources.extend(self._confine([path], path.parent))
                else:
                    self.report.error(path, "no such file or folder")
            except OSError as exc:
                self.report.error(path, f"cannot read: {exc.strerror}")
        bar = tqdm(sources, unit="file", disable=not self.progress, file=sys.stderr)
        for source in bar:
            self._import_file(source)
            if len(self.new) >= CHUNK:
                self._flush()
        self._flush()
        for folder in folders:
            self._flag_missing(folder)
        if folders:
            self._write_unwritten_finishes()
        # A refused import makes no queue: it would be listed, and a herd sent to it.
        if not self.report.refused:
            Queue.objects.get_or_create(name=self.queue)
        if len(folders) == 1:
            # New tasks of the queue (workqueue.authoring) go where its first folder was.
            Queue.objects.record_folder(self.queue, folders[0])
        if self.report.imported >= STATISTICS_AFTER:
            # The board's plans follow the table's size at once, not at the next check.
            Task.objects.keep_statistics()
        return self.report

    def _leads_out(self, folder: Path) -> bool:
        """Whether a folder named to the import is a symlink (or a `..` after one) leading
        out of the import roots; if so it is named. A folder not under any root is read
        when its caller names it (import_tasks makes it a root)."""
        real = folder.resolve()
        if real == named_place(folder) or self._inside(real):
            return False
        what = "symlink points" if folder.is_symlink() else "path is"
        self.report.error(folder, f"{what} outside the import roots (to {real})")
        return True

    def _another_queues(self, path: Path) -> str:
        """Why `path` is refused when another queue imports it (its folder, or one inside or
        around it): each queue locks its own tasks, so a file in two could be worked twice
        at once."""
        folders = Queue.objects.exclude(name=self.queue).exclude(folder="")
        for name, folder in folders.values_list("name", "folder"):
            other = Path(folder)
            if path.is_relative_to(other) or other.is_relative_to(path):
                return (
                    f"the queue {name!r} imports {folder}: a file is a task of one queue "
                    "(each queue locks its own tasks, so two could work one file at once)"
                )
        return ""

    # Finding files ----------------------------------------------------------

    def _walk(self, folder: Path) -> list[_Source]:
        # Iterative (a tree deeper than Python's recursion limit is still a tree), and every
        # entry that cannot be read is named: a silent skip hides a task.
        top = folder.resolve()
        base = self._base_for(top) or top
        found, visited, pending = [], {top}, [(folder, top)]
        while pending:
            dirpath, real = pending.pop()
            try:
                with os.scandir(dirpath) as scan:
                    entries = sorted(scan, key=lambda e: e.name)
            except OSError as exc:
                self.report.error(dirpath, f"cannot read folder: {exc.strerror}")
                continue
            folder_base = base if real.is_relative_to(base) else self._base_for(real) or base
            files, folders = [], []
            names = {e.name for e in entries}
            for entry in entries:
                if entry.name.startswith(".") or _mergetool_copy(entry.name, names):
                    continue
                path = Path(dirpath) / entry.name
                try:
                    is_link = entry.is_symlink()
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError as exc:
                    self.report.error(path, f"cannot read: {exc.strerror}")
                    continue
                if is_link:
                    target = self._follow(path)
                    if target is None:
                        continue
                    if target.is_dir():
                        if target in visited:
                            self.report.error(path, f"symlink to a folder already read ({target})")
                        else:
                            visited.add(target)
                            folders.append((path, target))
                    elif entry.name.endswith(".md"):
                        for source in self._confine([path], folder_base):
                            source.folder = top
                            files.append(source)
                elif is_dir:
                    visited.add(real / entry.name)
                    folders.append((path, real / entry.name))
                elif entry.name.endswith(".md"):
                    files.append(_Source(real / entry.name, folder_base, top))
            found.extend(files)
            pending.extend(reversed(folders))  # depth first, in name order, like os.walk
        return found

    def _follow(self, link: Path) -> Path | None:
        """Where a symlink inside the walk leads, or None (and the reason reported)."""
        try:
            target = link.resolve(strict=True)
        except RuntimeError:
            self.report.error(link, "symlink loop")
            return None
        except OSError as exc:
            reason = (
                "symlink loop" if exc.errno == errno.ELOOP else f"broken symlink ({exc.strerror})"
            )
            self.report.error(link, reason)
            return None
        if not self._inside(target):
            # Named only when it could lead to tasks: a link to a file that is not markdown
            # (a virtualenv's python, a certificate) is no task, like any other such file.
            if link.name.endswith(".md") or target.is_dir():
                self.report.error(link, f"symlink points outside the import roots (to {target})")
            return None
        return target

    def _read_queue_file(self, queue_file: Path) -> list[_Source]:
        try:
            raw, _ = taskfile.read_regular_file(queue_file, settings.HYPERVISOR_MAX_FILE_BYTES)
            text = taskfile.decode(raw)
        except TaskFileError as exc:
            self.report.error(queue_file, str(exc))
            return []
        folder = queue_file.resolve().parent
        # The folder the queue file is named in, not its symlink's: a link must not make
        # the folder it leads to a root.
        listed_in = named_folder(queue_file)
        paths = []
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if "/" in entry or "\\" in entry or entry.endswith(".md"):
                candidate = Path(entry).expanduser()
                paths.append(candidate if candidate.is_absolute() else folder / candidate)
            else:
                self._import_bare_id(entry, f"{queue_file}:{number}")
        return self._confine(paths, folder, extra_root=listed_in)

    def _confine(self, paths: list[Path], fallback_base: Path, extra_root=None) -> list[_Source]:
        sources = []
        for path in paths:
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
                self.report.error(path, "symlink loop" if loop else "no such file")
                continue
            if not self._inside(real, extra_root):
                what = "symlink points" if path.is_symlink() else "path is"
                self.report.error(path, f"{what} outside the import roots (to {real})")
                continue
            base = self._base_for(real, extra_root) or fallback_base.resolve()
            sources.append(_Source(real, base))
        return sources

    def _inside(self, real: Path, extra_root: Path | None = None) -> bool:
        return inside(real, self.roots + ([extra_root] if extra_root else []))

    def _base_for(self, real: Path, extra_root: Path | None = None) -> Path | None:
        # The configured root, when there is one, keeps keys stable whichever folder
        # inside it is imported.
        roots = [*self.configured, *([extra_root] if extra_root else []), *self.roots]
        return next((r for r in roots if real == r or real.is_relative_to(r)), None)

    # One file ---------------------------------------------------------------

    def _import_file(self, source: _Source) -> None:
        path = source.path
        spath = str(path)
        if spath in self.seen_paths:
            return  # reached a second time through a symlink
        self.seen_paths.add(spath)
        if shown(spath) != spath:
            self.report.error(path, "the file's path is not UTF-8 text: rename it to import it")
            return
        try:
            stat = os.lstat(path)
            taskfile.check_regular(stat, settings.HYPERVISOR_MAX_FILE_BYTES)
        except OSError as exc:
            self.report.error(path, f"cannot read: {exc.strerror}")
            return
        except TaskFileError as exc:
            self.report.error(path, str(exc))
            return
        known = self.known.get(spath)
        name = _name_in_folder(source)
        # A document is read every time: a task made of it before may have to be let go.
        document = name is not None and project_document(name)
        if (
            known
            and not document
            and known[1] == stat.st_size
            and known[2] == stat.st_mtime_ns
            and not known[4]
        ):
            self.report.unchanged += 1
            self.seen_keys.setdefault(known[5], spath)
            return
        try:
            raw, stat = taskfile.read_regular_file(path, settings.HYPERVISOR_MAX_FILE_BYTES)
        except OSError as exc:
            self.report.error(path, f"cannot read: {exc.strerror}")
            return
        except TaskFileError as exc:
            self.report.error(path, str(exc))
            return
        if document and not taskfile.opens_with_frontmatter(raw):
            self._leave_out(path, name, known)
            return
        digest = hashlib.sha256(raw).hexdigest()
        if known and known[3] == digest and not known[4]:
            Task.objects.filter(pk=known[0]).update(
                source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns
            )
            self.report.unchanged += 1
            self.seen_keys.setdefault(known[5], spath)
            return
        try:
            parsed = taskfile.parse(raw)
            fields = task_fields(parsed, path)  # first: it checks the values' shapes
            key = self._key(parsed.frontmatter, path, source.base)
            check_columns({"key": key, "source_path": spath})
        except TaskFileError as exc:
            self.report.error(path, str(exc))
            return
        if key in self.seen_keys and self.seen_keys[key] != spath:
            self.report.error(path, f"duplicate id {key!r}: also used by {self.seen_keys[key]}")
            return
        renamed = known and known[5] != key and key not in self.keys
        if renamed and not self._rename(known, key, path):
            return
        existing = self.keys.get(key)
        other = existing[1] if existing else ""
        if other and other != spath and self._still_claims(other, key):
            self.report.error(path, f"duplicate id {key!r}: also used by {other}")
            return
        self.seen_keys[key] = spath
        source_fields = {
            "source_path": spath,
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "source_sha256": digest,
            "source_missing": False,
        }
        if existing:
            self._update(existing[0], fields, source_fields, stat.st_ino)
            self.keys[key] = (existing[0], spath)  # moved here: its old path is not missing
        else:
            self._create(key, fields, source_fields)

    def _leave_out(self, path: Path, name: str, known: tuple | None) -> None:
        """A project document is no task. One made of it by an earlier import is kept,
        marked missing as if its file had gone: its file is no task any more."""
        self.report.leave_out(path, name)
        if not known:
            return
        with transaction.atomic():
            flagged = Task.objects.filter(pk=known[0], source_missing=False).update(
                source_missing=True, updated_at=timezone.now()
            )
            if flagged:
                TaskEvent.objects.create(
                    task_id=known[0],
                    kind=EventKind.MISSING,
                    actor="import",
                    message=f"left out: {path} is a project document without frontmatter, "
                    "not a task",
                )
        self.report.missing += flagged

    def _rename(self, known: tuple, key: str, path: Path) -> bool:
        """A file now says a new id: its task takes it (else a second task would be made
        from the same file and both worked). Not while a worker holds the task under its
        old id (its lock is named by it): the file is named, and read again later."""
        pk, old = known[0], known[5]
        if self.seen_keys.get(old, str(path)) != str(path):
            return True  # the old id went to another file in this import: a new task
        with transaction.atomic():
            if not Task.objects.filter(pk=pk).exclude(status=Status.CLAIMED).update(key=key):
                self.report.error(
                    path,
                    f"its id changed from {old!r} to {key!r} while {old!r} is claimed: "
                    "an import after the claim ends gives the task its new id",
                )
                return False
            TaskEvent.objects.create(
                task_id=pk,
                kind=EventKind.UPDATED,
                actor="import",
                message=f"id changed from {old}",
            )
        self.keys[key] = self.keys.pop(old)
        self.seen_keys.pop(old, None)
        return True

    def _still_claims(self, other: str, key: str) -> bool:
        """Whether the file a task came from still exists and (as far as we know) keeps its id."""
        if not is_task_file(other):
            return False  # the file moved (a link left in its place too): the task follows it
        if other in self.seen_paths:
            return self.seen_keys.get(key) == other
        return self._keeps_id(other, key)

    def _keeps_id(self, path: str, key: str) -> bool:
        """Whether a file this import has not reached yet still says `key`: unchanged since
        it was recorded, or read now (two files that swapped ids each named the other a
        duplicate, for ever). A file that cannot be read keeps it."""
        known = self.known.get(path)
        try:
            st = os.lstat(path)
            if known and (known[1], known[2]) == (st.st_size, st.st_mtime_ns):
                return True
            raw, _ = taskfile.read_regular_file(path, settings.HYPERVISOR_MAX_FILE_BYTES)
            frontmatter = taskfile.parse(raw).frontmatter
        except (OSError, TaskFileError):
            return True
        return taskfile.text_field(frontmatter, "id", None) == key

    def _key(self, fm: dict, path: Path, base: Path) -> str:
        key = taskfile.text_field(fm, "id", None)
        if key:
            return key
        return path.relative_to(base).as_posix()

    def _create(self, key: str, fields: dict, source_fields: dict) -> None:
        now = timezone.now()
        deps = fields.pop("depends_on")
        body = fields.pop("body", "")
        task = Task(
            queue=self.queue,
            key=key,
            created_at=now,
            updated_at=now,
            depends_on=deps,
            has_dependencies=bool(deps),
            **fields,
            **source_fields,
        )
        self.new.append((task, deps, body))
        self.keys[key] = (None, source_fields["source_path"])
        if task.status == Status.DONE:
            self.report.closed += 1
        self.report.imported += 1

    def _update(self, task_id: int, fields: dict, source_fields: dict, inode: int) -> None:
        with transaction.atomic():
            task = Task.objects.select_for_update().get(pk=task_id)
            if not _still_as_read(source_fields, inode):
                # Written since it was read (a finish, an edit): the text read is older
                # than the file and maybe than the row, and the next import reads it anew.
                self.report.unchanged += 1
                return
            if task.status == Status.CLAIMED and task.holder_pid is not None:
                # A worker holds it now: keep the file's news until the claim ends.
                task.change_pending = True
                task.save(update_fields=["change_pending"])
                TaskEvent.objects.create(
                    task=task,
                    kind=EventKind.CHANGE_DEFERRED,
                    actor="import",
                    message="file changed while claimed; applied when the claim ends",
                )
                self.report.deferred += 1
                return
            pending = task.pending_edit
            was, found_again = task.source_path, task.source_missing
            finished = task.status in (Status.DONE, Status.BLOCKED)
            closed = apply_fields(task, fields, source_fields)
            if finished and Task.objects.filter(pk=task.pk, status=Status.QUEUED).exists():
                self.report.requeued += 1
            moved = bool(was) and was != task.source_path
            TaskEvent.objects.create(
                task=task,
                kind=EventKind.UPDATED,
                actor="import",
                message=f"file moved from {was}" if moved else "file changed",
                data={"path": task.source_path},
            )
        if pending:
            _apply_pending_edit(task)
        if finished and (moved or found_again):
            # Its finish (or the board's close) found no file to write into: it is here now.
            from workqueue.editing import write_finished_status

            write_finished_status([task.pk], "import")
        self.report.updated += 1
        self.report.closed += int(closed)

    def _import_bare_id(self, key: str, where: str) -> None:
        try:
            check_columns({"key": key, "title": key})
        except TaskFileError as exc:
            self.report.error(where, str(exc))
            return
        if key in self.keys:
            self.report.unchanged += 1
            return
        self.seen_keys[key] = where
        fields = {"title": key, "status": Status.QUEUED, "depends_on": []}
        self._create(key, fields, {"source_path": ""})

    def _flush(self) -> None:
        if not self.new:
            return
        with transaction.atomic():
            while True:
                try:
                    with transaction.atomic():
                        Task.objects.insert_new([t for t, _, _ in self.new])
                    break
                except IntegrityError:
                    if not self._drop_taken():
                        raise
            if not self.new:
                return
            now = timezone.now()
            deps, events, bodies = [], [], []
            for task, depends_on, body in self.new:
                self.keys[task.key] = (task.pk, task.source_path)
                deps.extend(Dependency(task=task, key=k) for k in depends_on)
                bodies.append(TaskBody(task=task, text=body))
                message = f"closed on import ({task.closed_by})" if task.closed_by else ""
                events.append(
                    (
                        task.pk,
                        now,
                        EventKind.IMPORTED,
                        "import",
                        None,
                        message,
                        {"path": task.source_path},
                    )
                )
            Dependency.objects.bulk_create(deps)
            TaskBody.objects.bulk_create(bodies)
            TaskEvent.objects.record(events)
        self.new = []

    def _drop_taken(self) -> bool:
        """Leave out the new tasks another import of this queue (the consumer's, the board's,
        a command's, reading the same files) made since this one began: theirs stand.
        Returns whether there were any."""
        keys, taken = [task.key for task, _, _ in self.new], {}
        for start in range(0, len(keys), CHUNK):  # a queue file's bare ids are not chunked
            rows = Task.objects.filter(queue=self.queue, key__in=keys[start : start + CHUNK])
            taken.update(
                (k, (pk, path)) for k, pk, path in rows.values_list("key", "pk", "source_path")
            )
        for task, _, _ in self.new:
            if task.key not in taken:
                continue
            self.keys[task.key] = taken[task.key]
            self.report.imported -= 1
            self.report.closed -= task.status == Status.DONE
            other = taken[task.key][1]
            if other == task.source_path:
                self.report.unchanged += 1
            else:
                self.report.error(
                    task.source_path, f"duplicate id {task.key!r}: also used by {other}"
                )
        self.new = [entry for entry in self.new if entry[0].key not in taken]
        return bool(taken)

    def _flag_missing(self, folder: Path) -> None:
        prefix = str(folder) + os.sep
        gone = [
            (pk, path)
            for path, (pk, *_rest) in self.known.items()
            if path.startswith(prefix) and path not in self.seen_paths
        ]
        gone = [
            (pk, p)
            for pk, p in gone
            if not self.known[p][4]
            and not is_task_file(p)  # gone, or a folder or a link now
            and self.keys.get(self.known[p][5], (None, p))[1] == p  # not moved elsewhere
        ]
        if not gone:
            return
        ids = [pk for pk, _ in gone]
        with transaction.atomic():
            Task.objects.filter(pk__in=ids).update(source_missing=True, updated_at=timezone.now())
            TaskEvent.objects.bulk_create(
                TaskEvent(
                    task_id=pk,
                    kind=EventKind.MISSING,
                    actor="import",
                    message=f"file disappeared: {p}",
                )
                for pk, p in gone
            )
        self.report.missing += len(gone)

    def _write_unwritten_finishes(self) -> None:
        """Finishes whose status could not be written into their files (a full disk, a
        read-only file) are written now: the folder says again what the board says, and
        an import into a new database does not run them again. A file that still cannot
        be written is left quietly: its task's first note says why."""
        from workqueue.editing import write_finished_status

        noted = TaskEvent.objects.filter(
            task__queue=self.queue,
            task__status__in=(Status.DONE, Status.BLOCKED),
            kind=EventKind.NOTE,
            data__file_written=False,
            fence=models.F("task__fence"),
        )
        lagging = status_unwritten(Task.objects.filter(pk__in=noted.values("task_id")))
        if not lagging:
            return
        write_finished_status(lagging, "import", quiet=True)
        written = set(lagging) - set(status_unwritten(Task.objects.filter(pk__in=lagging)))
        now = timezone.now()
        rows = Task.objects.filter(pk__in=written).values_list(
            "pk", "fence", "status", "source_path"
        )
        TaskEvent.objects.record(
            [
                (
                    pk,
                    now,
                    EventKind.NOTE,
                    "import",
                    fence,
                    f"{status}, now written into {path}",
                    {"file_written": True},
                )
                for pk, fence, status, path in rows
            ]
        )

    def _load_known(self) -> None:
        rows = Task.objects.filter(queue=self.queue).values_list(
            "id",
            "source_path",
            "source_size",
            "source_mtime_ns",
            "source_sha256",
            "source_missing",
            "key",
            "change_pending",
        )
        for pk, path, size, mtime, sha, missing, key, pending in rows:
            if path:
                # A missing or pending task is always re-read.
                self.known[path] = (pk, size, mtime, sha, missing or pending, key)
            self.keys[key] = (pk, path)


def _still_as_read(source_fields: dict, inode: int) -> bool:
    try:
        now = os.lstat(source_fields["source_path"])
    except OSError:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (
        inode,
        source_fields["source_size"],
        source_fields["source_mtime_ns"],
    )


def is_task_file(path: str) -> bool:
    """Whether a task's recorded path is still a regular file of its own: a symlink there
    now is another file's name (the moved file's, or another task's), never written through."""
    try:
        return S_ISREG(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True  # there, but not ours to look at (a folder made unreadable): not gone


def task_fields(parsed: taskfile.TaskFile, path: Path | None) -> dict:
    """A file's column values, checked against the columns (TaskFileError names the field)."""
    fm = parsed.frontmatter
    taskfile.check_shapes(fm)
    title_limit = Task._meta.get_field("title").max_length
    fields = {
        "title": taskfile.title(fm, parsed.body, path.stem if path else "", title_limit),
        "priority": taskfile.priority(fm),
        "project": taskfile.text_field(fm, "project", None),
        "assignee": taskfile.text_field(fm, "assignee", None),
        "type": taskfile.text_field(fm, "type", None),
        "complexity": taskfile.text_field(fm, "complexity", None),
        "tags": taskfile.list_field(fm, "tags"),
        "depends_on": taskfile.list_field(fm, "depends_on"),
        "frontmatter": fm,
        "body": parsed.body,
    }
    fields["tag_index"] = "|" + "|".join(fields["tags"]) + "|" if fields["tags"] else ""
    fields.update(status_fields(fm, parsed.body))
    check_columns(fields)
    return fields


def check_columns(values: dict) -> None:
    """Refuse a value its column cannot hold, by the same rule on every database.

    PostgreSQL refuses NUL in text and JSON, longer varchars and integers past 32 bits;
    SQLite refuses integers past 64 bits and non-finite numbers in JSON; PostgreSQL's
    indexes refuse entries over a size in bytes (models.BOARD_INDEX_BYTES). One bad value
    must cost its own file, never the whole import.
    """
    for name, value in values.items():
        if name == "frontmatter":
            for key, item in value.items():
                _check_text(f"frontmatter {key!r}", key)
                check_json(key, item)
            continue
        check_json(name, value)
        if name == "depends_on":
            limit = Dependency._meta.get_field("key").max_length
            for dep in value:
                if len(dep) > limit:
                    raise TaskFileError(
                        f"depends_on: an id of {len(dep):,} characters, over {limit:,}"
                    )
            continue
        field = None if name == "body" else Task._meta.get_field(name)
        if isinstance(field, models.CharField) and len(value) > field.max_length:
            raise TaskFileError(
                f"{name}: {len(value):,} characters, over the column's {field.max_length:,}"
            )
        if isinstance(field, models.IntegerField) and isinstance(value, int):
            # The portable range of the column's type (SQLite alone would take 64 bits).
            low, high = BaseDatabaseOperations.integer_field_ranges[field.get_internal_type()]
            if not low <= value <= high:
                raise TaskFileError(
                    f"{name}: {value} is outside the column's range ({low} to {high})"
                )
    # Then the values PostgreSQL's indexes hold together, or alone (the file's path).
    if BOARD_INDEX_FIELDS.keys() <= values.keys():
        problem = board_index_problem(values)
        if problem:
            raise TaskFileError(problem)
    path_bytes = len((values.get("source_path") or "").encode())
    if path_bytes > SOURCE_PATH_BYTES:
        raise TaskFileError(
            f"the file's path: {path_bytes:,} bytes in UTF-8, over the {SOURCE_PATH_BYTES:,} "
            "its index holds"
        )


def check_json(name: str, value) -> None:
    if isinstance(value, str):
        _check_text(name, value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise TaskFileError(f"{name}: {value!r} is not a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(name, key)
            check_json(name, item)
    elif isinstance(value, list):
        for item in value:
            check_json(name, item)


def _check_text(name: str, text: str) -> None:
    if "\x00" in text:
        raise TaskFileError(f"{name}: contains a NUL character")


def status_fields(fm: dict, body: str) -> dict:
    closed = taskfile.close_rule(fm, body)
    if closed:
        return {
            "status": Status.DONE,
            "closed_by": closed[0],
            "outcome": closed[1],
            "finished_at": timezone.now(),
        }
    status = taskfile.text_field(fm, "status").lower()
    if status == "blocked":
        return {
            "status": Status.BLOCKED,
            "reason": taskfile.text_field(fm, "blocked_reason", None)
            or "blocked in the task file",
        }
    if status in taskfile.CLAIMED_WORDS:
        # Held by someone outside Hypervisor; no process of ours can vouch for it.
        holder = taskfile.text_field(fm, "assignee") or "outside holder"
        return {"status": Status.CLAIMED, "holder": holder, "claimed_at": timezone.now()}
    return {"status": Status.QUEUED}


def status_unwritten(tasks: models.QuerySet) -> list[int]:
    """Those of these tasks finished (done or blocked) whose rows keep their files as last
    read or written without that state: files their finish could not write."""
    finished = tasks.filter(status__in=(Status.DONE, Status.BLOCKED)).exclude(source_path="")
    return [
        pk
        for pk, status, frontmatter in finished.values_list(
            "pk", "status", "frontmatter"
        ).iterator()
        if status_fields(frontmatter, "")["status"] != status
    ]


STATUS_KEYS = ("status", "closed_by", "outcome", "finished_at", "reason", "holder", "claimed_at")


def apply_fields(
    task: Task, fields: dict, source_fields: dict, follow_status: bool = True
) -> bool:
    """Update a task from its re-read file (in the caller's transaction, the row locked).
    Returns True when the file now closes it.

    The file's status is followed only when the file's status itself changed (or it now
    says closed); otherwise a done task would be requeued by every edit of its file. The
    status changes through its transition, like any other. With follow_status False (a
    finish taking in its agent's edit) the finish's status stands and the file follows.
    """
    fields = dict(fields)
    deps = fields.pop("depends_on")
    if "body" in fields:
        TaskBody.objects.update_or_create(task=task, defaults={"text": fields.pop("body")})
    wanted = {k: fields.pop(k) for k in STATUS_KEYS if k in fields}
    file_status = taskfile.text_field(fields["frontmatter"], "status").lower()
    old_status = taskfile.text_field(task.frontmatter, "status").lower()
    closes = follow_status and "closed_by" in wanted and not task.closed_by
    if closes:
        fields["closed_by"] = wanted["closed_by"]
    for name, value in {**fields, **source_fields}.items():
        setattr(task, name, value)
    task.change_pending = False
    task.updated_at = timezone.now()
    if deps != task.depends_on:
        task.depends_on = deps
        task.has_dependencies = bool(deps)
        Dependency.objects.filter(task=task).delete()
        Dependency.objects.bulk_create([Dependency(task=task, key=k) for k in deps])
    task.save(update_fields=Task.file_fields())
    if not follow_status:
        return False
    if not closes and not _says_another_state(old_status, file_status, task.status):
        return False
    return follow_file_status(task, wanted) and wanted["status"] == Status.DONE


def _says_another_state(old: str, new: str, status: str) -> bool:
    """Whether a file's new status word moves its task. Not when it means what the old
    one did (`open` to `todo` across a folder requeued every finished task), not when no
    one knows what it means (an agent's `completed` before it was a word, `review`), and
    not an `in_progress` on a task already finished: its agent wrote it during our claim,
    and the claim's outcome stands."""
    meaning = taskfile.status_meaning(new)
    if old == new or not meaning or meaning == taskfile.status_meaning(old):
        return False
    return not (meaning == "claimed" and status in (Status.DONE, Status.BLOCKED))


def follow_file_status(task: Task, wanted: dict) -> bool:
    """Move a task to the status its file now gives, through the transition that does."""
    target = wanted["status"]
    if target == task.status:
        return False
    actor = "import"
    if target == Status.DONE:
        reason = f"closed in its file ({wanted['closed_by']})"
        return bool(transitions.mark_done([task], actor, reason, wanted["outcome"]))
    if target == Status.BLOCKED:
        return bool(transitions.block([task], actor, wanted["reason"]))
    if target == Status.CLAIMED:
        return bool(transitions.hold_for_outside([task], wanted["holder"], actor))
    if task.status == Status.CLAIMED:
        return bool(transitions.release_by_person([task], actor, "released in its file"))
    return bool(transitions.requeue([task], actor, "requeued in its file"))


def refresh_from_source(task: Task, follow_status: bool = True) -> None:
    """Apply a change to a task's file that arrived while the task was claimed, then the
    edits a person made meanwhile (workqueue.editing). follow_status: apply_fields."""
    path = Path(task.source_path)
    try:
        raw, stat = taskfile.read_regular_file(path, settings.HYPERVISOR_MAX_FILE_BYTES)
        parsed = taskfile.parse(raw)
        fields = task_fields(parsed, path)
    except FileNotFoundError:
        Task.objects.filter(pk=task.pk).update(source_missing=True, change_pending=False)
        TaskEvent.objects.create(
            task=task, kind=EventKind.MISSING, actor="import", message=f"file disappeared: {path}"
        )
        _apply_pending_edit(task)
        return
    except (OSError, TaskFileError) as exc:
        Task.objects.filter(pk=task.pk).update(change_pending=False)
        TaskEvent.objects.create(
            task=task,
            kind=EventKind.NOTE,
            actor="import",
            message=f"deferred change not applied: {exc}",
        )
        _apply_pending_edit(task)
        return
    digest = hashlib.sha256(raw).hexdigest()
    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=task.pk)
        changed = digest != task.source_sha256
        source = {
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "source_sha256": digest,
            "source_missing": False,
        }
        # Also when the file is the same: the row then drops the edits it showed while
        # they waited, and the pending edit below writes them into the file.
        apply_fields(task, fields, source, follow_status)
        if changed:
            TaskEvent.objects.create(
                task=task,
                kind=EventKind.UPDATED,
                actor="import",
                message="deferred file change applied after the claim ended",
            )
    _apply_pending_edit(task)
    # A new id in the file is an import's to give (Importer._rename): the change stays
    # pending until then, or the import finds the file as recorded here and skips it.
    new_id = taskfile.text_field(parsed.frontmatter, "id", None)
    if new_id and new_id != task.key:
        Task.objects.filter(pk=task.pk).update(change_pending=True)


def _apply_pending_edit(task: Task) -> None:
    if task.pending_edit:
        from workqueue.editing import apply_pending_edit

        apply_pending_edit(task)
