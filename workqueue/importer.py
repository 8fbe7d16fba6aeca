"""Import markdown task files into a queue: upsert by key, confined to the import roots."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from tqdm import tqdm

from workqueue import taskfile
from workqueue.models import Dependency, EventKind, Queue, Status, Task, TaskBody, TaskEvent
from workqueue.names import validate_queue_name
from workqueue.taskfile import TaskFileError

CHUNK = 500


@dataclass
class ImportReport:
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    closed: int = 0
    deferred: int = 0
    missing: int = 0
    errors: list[dict] = field(default_factory=list)

    def error(self, path, message: str) -> None:
        self.errors.append({"path": str(path), "error": message})

    @property
    def accepted(self) -> int:
        return self.imported + self.updated + self.unchanged + self.deferred

    def as_dict(self) -> dict:
        return {
            "imported": self.imported,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "closed": self.closed,
            "deferred": self.deferred,
            "missing": self.missing,
            "errors": self.errors,
        }


class ImportRefused(Exception):
    """A path given to the importer lies outside every import root."""


@dataclass
class _Source:
    path: Path  # resolved
    base: Path  # the root the key is relative to


class Importer:
    def __init__(self, queue: str, roots: list[Path] | None = None, progress: bool = False):
        validate_queue_name(queue)
        self.queue = queue
        self.configured = [Path(r).resolve() for r in settings.HYPERVISOR_IMPORT_ROOTS]
        self.roots = self.configured + [Path(r).resolve() for r in roots or []]
        self.progress = progress
        self.report = ImportReport()
        self.known: dict[str, tuple] = {}
        self.keys: dict[str, tuple] = {}
        self.seen_keys: dict[str, str] = {}
        self.seen_paths: set[str] = set()
        self.new: list[tuple[Task, list[str], str]] = []

    # Entry points -----------------------------------------------------------

    def run(self, paths: list[str | Path]) -> ImportReport:
        Queue.objects.get_or_create(name=self.queue)
        self._load_known()
        sources, folders = [], []
        for raw in paths:
            path = Path(raw).expanduser()
            try:
                if path.is_dir():
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
        return self.report

    # Finding files ----------------------------------------------------------

    def _walk(self, folder: Path) -> list[_Source]:
        top = folder.resolve()
        base = self._base_for(top) or top
        found, visited = [], set()
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = Path(dirpath).resolve()
            if not self._inside(real):
                self.report.error(dirpath, f"symlink points outside the import roots (to {real})")
                dirnames[:] = []
                continue
            if real in visited:  # a symlink loop
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            folder_base = base if real.is_relative_to(base) else self._base_for(real) or base
            links = []
            # The folder is resolved and confined once; only symlinked files need more.
            for name in sorted(filenames):
                if name.endswith(".md") and not name.startswith("."):
                    if os.path.islink(os.path.join(dirpath, name)):
                        links.append(Path(dirpath) / name)
                    else:
                        found.append(_Source(real / name, folder_base))
            found.extend(self._confine(links, folder_base))
        return found

    def _read_queue_file(self, queue_file: Path) -> list[_Source]:
        try:
            text = taskfile.decode(queue_file.read_bytes())
        except TaskFileError as exc:
            self.report.error(queue_file, str(exc))
            return []
        folder = queue_file.resolve().parent
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
        return self._confine(paths, folder, extra_root=folder)

    def _confine(self, paths: list[Path], fallback_base: Path, extra_root=None) -> list[_Source]:
        sources = []
        for path in paths:
            real = path.resolve()
            if not self._inside(real, extra_root):
                what = "symlink points" if path.is_symlink() else "path is"
                self.report.error(path, f"{what} outside the import roots ({real})")
                continue
            if not real.is_file():
                self.report.error(path, "no such file")
                continue
            base = self._base_for(real, extra_root) or fallback_base.resolve()
            sources.append(_Source(real, base))
        return sources

    def _inside(self, real: Path, extra_root: Path | None = None) -> bool:
        roots = self.roots + ([extra_root] if extra_root else [])
        return any(real == root or real.is_relative_to(root) for root in roots)

    def _base_for(self, real: Path, extra_root: Path | None = None) -> Path | None:
        # The configured root, when there is one, keeps keys stable whichever folder
        # inside it is imported.
        roots = [*self.configured, *([extra_root] if extra_root else []), *self.roots]
        return next((r for r in roots if real == r or real.is_relative_to(r)), None)

    # One file ---------------------------------------------------------------

    def _import_file(self, source: _Source) -> None:
        path = source.path
        spath = str(path)
        self.seen_paths.add(spath)
        try:
            stat = path.stat()
        except OSError as exc:
            self.report.error(path, f"cannot read: {exc.strerror}")
            return
        known = self.known.get(spath)
        if known and known[1] == stat.st_size and known[2] == stat.st_mtime_ns and not known[4]:
            self.report.unchanged += 1
            self.seen_keys.setdefault(known[5], spath)
            return
        if stat.st_size > settings.HYPERVISOR_MAX_FILE_BYTES:
            self.report.error(
                path,
                f"file is {stat.st_size:,} bytes, over the "
                f"{settings.HYPERVISOR_MAX_FILE_BYTES:,}-byte limit",
            )
            return
        try:
            raw = path.read_bytes()
        except OSError as exc:
            self.report.error(path, f"cannot read: {exc.strerror}")
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
            key = self._key(parsed.frontmatter, path, source.base)
            fields = task_fields(parsed, path)
        except TaskFileError as exc:
            self.report.error(path, str(exc))
            return
        if key in self.seen_keys and self.seen_keys[key] != spath:
            self.report.error(path, f"duplicate id {key!r}: also used by {self.seen_keys[key]}")
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
            self._update(existing[0], fields, source_fields)
        else:
            self._create(key, fields, source_fields)

    def _still_claims(self, other: str, key: str) -> bool:
        """Whether the file a task came from still exists and (as far as we know) keeps its id."""
        if not Path(other).exists():
            return False  # the file moved: the task follows it
        return other not in self.seen_paths or self.seen_keys.get(key) == other

    def _key(self, fm: dict, path: Path, base: Path) -> str:
        key = taskfile.text_field(fm, "id", 500)
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

    def _update(self, task_id: int, fields: dict, source_fields: dict) -> None:
        with transaction.atomic():
            task = Task.objects.select_for_update().get(pk=task_id)
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
            closed = apply_fields(task, fields, source_fields)
            task.save()
            TaskEvent.objects.create(
                task=task,
                kind=EventKind.UPDATED,
                actor="import",
                message="file changed",
                data={"path": task.source_path},
            )
        self.report.updated += 1
        self.report.closed += int(closed)

    def _import_bare_id(self, key: str, where: str) -> None:
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
            Task.objects.insert_new([t for t, _, _ in self.new])
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

    def _flag_missing(self, folder: Path) -> None:
        prefix = str(folder) + os.sep
        gone = [
            (pk, path)
            for path, (pk, *_rest) in self.known.items()
            if path.startswith(prefix) and path not in self.seen_paths
        ]
        gone = [(pk, p) for pk, p in gone if not self.known[p][4] and not Path(p).exists()]
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


def task_fields(parsed: taskfile.TaskFile, path: Path | None) -> dict:
    fm = parsed.frontmatter
    fields = {
        "title": taskfile.title(fm, parsed.body, path.stem if path else ""),
        "priority": taskfile.priority(fm),
        "project": taskfile.text_field(fm, "project"),
        "assignee": taskfile.text_field(fm, "assignee"),
        "type": taskfile.text_field(fm, "type", 100),
        "complexity": taskfile.text_field(fm, "complexity", 100),
        "tags": taskfile.list_field(fm, "tags"),
        "depends_on": taskfile.list_field(fm, "depends_on"),
        "frontmatter": fm,
        "body": parsed.body,
    }
    fields["tag_index"] = "|" + "|".join(fields["tags"]) + "|" if fields["tags"] else ""
    fields.update(status_fields(fm, parsed.body))
    return fields


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
            "reason": taskfile.text_field(fm, "blocked_reason", 2000)
            or "blocked in the task file",
        }
    if status in ("in_progress", "in-progress", "claimed"):
        # Held by someone outside Hypervisor; no process of ours can vouch for it.
        holder = taskfile.text_field(fm, "assignee") or "outside holder"
        return {"status": Status.CLAIMED, "holder": holder, "claimed_at": timezone.now()}
    return {"status": Status.QUEUED}


def apply_fields(task: Task, fields: dict, source_fields: dict) -> bool:
    """Update a task from its re-read file. Returns True when the file now closes it."""
    fields = dict(fields)
    deps = fields.pop("depends_on")
    if "body" in fields:
        TaskBody.objects.update_or_create(task=task, defaults={"text": fields.pop("body")})
    file_status = taskfile.text_field(fields["frontmatter"], "status").lower()
    old_status = taskfile.text_field(task.frontmatter, "status").lower()
    closes = "closed_by" in fields and not task.closed_by
    status_keys = (
        "status",
        "closed_by",
        "outcome",
        "finished_at",
        "reason",
        "holder",
        "claimed_at",
    )
    # The file's status only wins when the file's status itself changed (or it now says
    # closed); otherwise a done task would be requeued by every edit of its file.
    if file_status == old_status and not closes:
        fields = {k: v for k, v in fields.items() if k not in status_keys}
    for name, value in {**fields, **source_fields}.items():
        setattr(task, name, value)
    task.change_pending = False
    task.updated_at = timezone.now()
    if deps != task.depends_on:
        task.depends_on = deps
        task.has_dependencies = bool(deps)
        Dependency.objects.filter(task=task).delete()
        Dependency.objects.bulk_create([Dependency(task=task, key=k) for k in deps])
    return closes and task.status == Status.DONE


def refresh_from_source(task: Task) -> None:
    """Apply a change to a task's file that arrived while the task was claimed."""
    path = Path(task.source_path)
    try:
        raw = path.read_bytes()
        stat = path.stat()
        parsed = taskfile.parse(raw)
        fields = task_fields(parsed, path)
    except FileNotFoundError:
        Task.objects.filter(pk=task.pk).update(source_missing=True, change_pending=False)
        TaskEvent.objects.create(
            task=task, kind=EventKind.MISSING, actor="import", message=f"file disappeared: {path}"
        )
        return
    except (OSError, TaskFileError) as exc:
        Task.objects.filter(pk=task.pk).update(change_pending=False)
        TaskEvent.objects.create(
            task=task,
            kind=EventKind.NOTE,
            actor="import",
            message=f"deferred change not applied: {exc}",
        )
        return
    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=task.pk)
        source = {
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            "source_missing": False,
        }
        apply_fields(task, fields, source)
        task.save()
        TaskEvent.objects.create(
            task=task,
            kind=EventKind.UPDATED,
            actor="import",
            message="deferred file change applied after the claim ended",
        )
