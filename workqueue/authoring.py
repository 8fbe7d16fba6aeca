"""New tasks: a markdown file written into the queue's folder, then imported.

The file follows the queue's conventions: an `id` continuing the queue's series (`ex-007`
is followed by `ex-008`), `title`, the `status` word its open tasks use, the fields given,
and a `# Title` heading over the body. It is written beside its final name, synced, and
linked into place, so it never replaces a file and never appears half-written. The folder
must lie inside a configured import root (HYPERVISOR_IMPORT_ROOTS).

Public API:
    create_task_file(queue, title, body="", fields=None, actor="") -> Task
    queue_folder(queue) -> Path
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

from django.db.models import Count
from django.utils.text import slugify

from workqueue.editing import EditError, validate
from workqueue.importer import Importer, ImportRefused, folder_inside_roots
from workqueue.models import EventKind, Queue, Status, Task, TaskEvent
from workqueue.names import validate_queue_name
from workqueue.writeback import discard, write_temporary, yaml_value

# Fields a new task may carry besides its title and body, in the order they are written.
NEW_TASK_FIELDS = (
    "priority", "project", "assignee", "tags", "type", "complexity", "parent", "depends_on",
)  # fmt: skip
NUMBERED = re.compile(r"\A(.*?)(\d+)\Z")
NAME_LIMIT = 80  # characters of the title in the file name
ATTEMPTS = 50


class AuthoringError(ValueError):
    """The task cannot be written: no folder, outside the import roots, a bad value.

    `errors` maps each field (or "queue", "folder") to what is wrong with it.
    """

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in errors.items()))


def create_task_file(
    queue: str,
    title: str,
    body: str = "",
    fields: dict | None = None,
    actor: str = "",
) -> Task:
    """Write a new task file into `queue`'s folder and import it; returns the task.

    Raises AuthoringError (naming the field) for a bad queue, title or field, a queue
    without a folder, or a folder outside the import roots. Nothing is left behind when
    the import refuses the file.
    """
    try:
        validate_queue_name(queue)
    except Exception as exc:
        raise AuthoringError({"queue": "; ".join(getattr(exc, "messages", [str(exc)]))}) from None
    fields = dict(fields or {})
    unknown = [name for name in fields if name not in NEW_TASK_FIELDS]
    if unknown:
        raise AuthoringError(
            {name: f"not a field of a new task ({', '.join(NEW_TASK_FIELDS)})" for name in unknown}
        )
    try:
        values = validate({"title": title, "body": body, **fields})
    except EditError as exc:
        raise AuthoringError(exc.errors) from None
    folder = queue_folder(queue)
    task_id = _unused_id(queue, folder)
    text = _render(task_id, values, _open_status_word(queue))
    try:
        path = _write_new(folder, values["title"], text.encode("utf-8"))
    except OSError as exc:  # a full disk, no inodes left, a read-only folder
        problem = f"cannot write a new task file into {folder}: {exc.strerror or exc}"
        raise AuthoringError({"folder": problem}) from None
    report = Importer(queue).run([path])
    task = Task.objects.filter(queue=queue, key=task_id, source_path=str(path)).first()
    if task is None:
        discard(str(path))
        problems = "; ".join(e["error"] for e in report.errors) or "not imported"
        raise AuthoringError({"file": f"{path.name}: {problems}"})
    TaskEvent.objects.create(
        task=task,
        kind=EventKind.CREATED,
        actor=actor,
        message=f"created {path.name}",
        data={"path": str(path)},
    )
    return task


def queue_folder(queue: str) -> Path:
    """Where `queue`'s new tasks go: its configured folder, else where most of its files are.

    Always inside a configured import root, resolved (no symlink leads out of it).
    """
    configured = Queue.objects.filter(name=queue).values_list("folder", flat=True).first()
    folder = configured or _usual_folder(queue)
    if not folder:
        raise AuthoringError(
            {"queue": f"{queue!r} has no folder yet: import a folder into it, or set one"}
        )
    try:
        return folder_inside_roots(folder, "to write new tasks into it")
    except ImportRefused as exc:
        raise AuthoringError({"folder": str(exc)}) from None


def _usual_folder(queue: str) -> str:
    parents = collections.Counter(
        os.path.dirname(path)
        for path in Task.objects.filter(queue=queue)
        .exclude(source_path="")
        .values_list("source_path", flat=True)[:5000]
    )
    if not parents:
        return ""
    # The most files; on a tie, the shortest path (the top of the queue's tree).
    return min(parents, key=lambda p: (-parents[p], len(p), p))


def _unused_id(queue: str, folder: Path) -> str:
    """The next id of the queue's series: the commonest prefix, one past its highest number."""
    keys = Task.objects.filter(queue=queue).values_list("key", flat=True)
    series: dict[str, tuple[int, int]] = {}
    counts: collections.Counter = collections.Counter()
    for key in keys.iterator():
        found = NUMBERED.match(key)
        if found and "/" not in key:
            prefix, digits = found.groups()
            counts[prefix] += 1
            top, width = series.get(prefix, (0, 0))
            series[prefix] = (max(top, int(digits)), max(width, len(digits)))
    if counts:
        prefix = min(counts, key=lambda p: (-counts[p], p))
        top, width = series[prefix]
    else:
        prefix, top, width = f"{queue}-", 0, 3
    taken = set(keys)
    for number in range(top + 1, top + 1 + ATTEMPTS):
        candidate = f"{prefix}{number:0{width}d}"
        if candidate not in taken:
            return candidate
    raise AuthoringError({"id": f"no free id after {prefix}{top}"})


def _open_status_word(queue: str) -> str:
    """The `status` the queue's open task files say (`inbox` in the examples)."""
    words = (
        Task.objects.filter(queue=queue, status=Status.QUEUED, frontmatter__has_key="status")
        .values("frontmatter__status")
        .annotate(n=Count("id"))
        .order_by("-n")[:1]
    )
    word = next((str(row["frontmatter__status"]) for row in words), "")
    return word if word and word.lower() not in ("done", "closed", "blocked") else "inbox"


def _render(task_id: str, values: dict, status: str) -> str:
    lines = [
        "---",
        f"id: {yaml_value(task_id)}",
        f"title: {yaml_value(values['title'])}",
        f"status: {yaml_value(status)}",
    ]
    for name in NEW_TASK_FIELDS:
        value = values.get(name)
        if value or (name == "priority" and value is not None):
            lines.append(f"{name}: {yaml_value(value)}")
    lines += ["---", f"# {values['title']}", ""]
    body = values.get("body", "").strip("\n")
    return "\n".join(lines) + ("\n" + body + "\n" if body else "")


def _write_new(folder: Path, title: str, data: bytes) -> Path:
    """A new file named after the title; never replaces one (link fails on an existing name)."""
    stem = slugify(title)[:NAME_LIMIT].strip("-") or "task"
    temporary = write_temporary(str(folder / f"{stem}.md"), data, mode=0o644)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            path = folder / (f"{stem}.md" if attempt == 1 else f"{stem}-{attempt}.md")
            try:
                os.link(temporary, path)
            except FileExistsError:
                continue
            _sync_folder(folder)
            return path
    finally:
        discard(temporary)
    raise AuthoringError({"title": f"{ATTEMPTS} files named {stem}*.md already exist"})


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
