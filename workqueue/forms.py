from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from urllib.parse import parse_qsl

from django import forms
from django.core.cache import cache
from django.core.exceptions import EmptyResultSet, ValidationError
from django.db import connection
from django.db.models import Count, F, Value
from django.db.models.functions import Coalesce
from django.http import QueryDict
from django.urls import reverse
from django.utils.functional import cached_property

from workqueue import bulk, editing, search_hits
from workqueue.importer import check_json
from workqueue.models import Found, Queue, Status, Task, TaskQuerySet, TaskSearch, stamp
from workqueue.routing import TEXT_FIELDS, Condition, TaskFilter
from workqueue.taskfile import TaskFileError
from workqueue.text import as_id, as_text, list_items, list_text


class StorableJSONField(forms.JSONField):
    """JSON that every database stores: PostgreSQL refuses a NUL character in it, and
    NaN or Infinity, which Python's parser lets through (the admin's JSON fields)."""

    def validate(self, value) -> None:
        super().validate(value)
        try:
            check_json("value", value)
        except TaskFileError as exc:
            raise ValidationError(str(exc).removeprefix("value: ")) from None


FILTER_FIELDS = ("queue", "project", "assignee", "tag", "type", "complexity", "q")
ROUTED_FIELDS = ("project", "assignee", "tag", "type", "complexity")
FACET_LIMIT = 300  # values offered per filter
SEARCH_KEPT_SECONDS = 600


class BoardFilterForm(forms.Form):
    """The board's filters. They live in the URL so that a view can be bookmarked.

    The field filters are routing conditions (workqueue.routing), so the board shows
    exactly what a worker or a herd `--where FIELD=VALUE` would take.
    """

    queue = forms.CharField(required=False, max_length=100)
    project = forms.CharField(required=False, max_length=200)
    assignee = forms.CharField(required=False, max_length=200)
    tag = forms.CharField(required=False, max_length=200)
    type = forms.CharField(required=False, max_length=100)
    complexity = forms.CharField(required=False, max_length=100)
    q = forms.CharField(required=False, max_length=200, label="Search")

    version = ""  # the board's (views.board_version), when the view has read it

    def clean_tag(self) -> str:
        tag = self.cleaned_data["tag"]
        if "|" in tag:
            raise forms.ValidationError("a tag is a word without '|'")
        return tag

    def routing(self, leave_out: str = "") -> TaskFilter:
        """The field filters as routing conditions (all but `leave_out`)."""
        conditions = tuple(
            Condition(name, "=", self.cleaned_data[name])
            for name in ROUTED_FIELDS
            if name != leave_out and self.cleaned_data.get(name)
        )
        return TaskFilter(conditions)

    def apply(
        self, tasks: TaskQuerySet, leave_out: str = "", page: tuple[int, int] | None = None
    ) -> TaskQuerySet:
        """The tasks the filters (all but `leave_out`) leave; for a `page` of a column in
        board order, (how far it reaches, the column's count): see Found.filter."""
        data = self.cleaned_data
        if data.get("queue"):
            tasks = tasks.filter(queue=data["queue"])
        tasks = self.routing(leave_out).apply(tasks)
        if data.get("q") and leave_out != "q":
            tasks = self.found.filter(tasks, page)
        return tasks

    @cached_property
    def found(self) -> Found:
        """The text search, once per request: the counts, pages, version and facets all
        apply it. A search that ends in a list of ids, or one PostgreSQL keeps in the
        database (TaskSearch.search), is kept for the requests that follow: until the
        searched text of any task changes where the database tells
        (TaskSearch.generation), else until the board's version given to the form does.
        Read before the search, either is at worst older than what was found."""
        text = self.cleaned_data["q"]
        generation = TaskSearch.generation()
        since = generation or self.version
        key = "board-search:" + hashlib.sha256(f"{text}|{since}".encode()).hexdigest()
        found = cache.get(key) if since else None
        if found is None:
            kept = {"keep_as": key, "generation": generation} if generation else {}
            found = TaskSearch.search(text, **kept)
            if since and not found.table:  # the request's, or kept by the database
                cache.set(key, found, SEARCH_KEPT_SECONDS)
        return found

    def counts_and_stamp(self) -> tuple[dict[str, int], str]:
        """TaskQuerySet.counts_and_stamp of the view. A text found in all but a few tasks,
        and no field filter, is counted as the board without it less those few: index
        ranges and lookups, where counting what it found reads every task."""
        tasks = self.apply(Task.objects.all())
        data = self.cleaned_data
        missing = self.found.missing if data.get("q") else None
        if missing is None or self.routing().conditions:
            # A kept search alone: its ids and the narrow index of statuses, both by id.
            alone = data.get("q") and self.found.table and not self.active_besides("q")
            counted = self.found.counts_and_stamp() if alone else None
            if counted:
                return counted
            with search_hits.counted_in_id_order(connection) if alone else nullcontext():
                return tasks.counts_and_stamp()
        board = self.apply(Task.objects.all(), leave_out="q")
        counts = board.counts_by_index()
        for status, n in board.filter(id__in=missing).counts().items():
            counts[status] -= n
        newest = tasks.order_by("-updated_at").values_list("updated_at", flat=True).first()
        return counts, stamp(sum(counts.values()), newest)

    def facets(self, names: list[str]) -> dict[str, list[tuple[str, int]]]:
        """`facet` for each of `names`. On PostgreSQL the fields no filter is set on are
        counted together, in one read of the tasks the filters leave (GROUPING SETS):
        each count is a whole read of those tasks, 20-25 ms at 100,000."""
        together = [name for name in names if not self.cleaned_data.get(name)]
        found = {}
        if connection.vendor == "postgresql" and len(together) > 1:
            found = self._counted_together(together)
        for name in names:
            if name not in found:
                found[name] = self.facet(name)
        return found

    def facet(self, name: str) -> list[tuple[str, int]]:
        """The values of field `name` that exist, and how many tasks have each, among the
        tasks every other filter leaves."""
        tasks = self.apply(Task.objects.all(), leave_out=name).order_by()
        # The tags are counted per combination (few, however many tasks share them);
        # reading every task's tags into Python took 0.5 s at 300,000 tasks.
        column, alias = ("tag_index", "combination") if name == "tag" else (name, "value")
        # SQLite walks the field's own index whole to have its groups in order. When
        # another filter narrows the tasks to a range of an index, grouping by an
        # expression no index is ordered by makes it read that range and sort it instead:
        # 2.5 ms instead of 15 at 300,000 tasks. A field's own index holds the queue and
        # the other fields (a queue or text filter is checked in it as it walks); the tags'
        # index (SQLite's task_tags) holds nothing else, so under any other filter its walk
        # would read every task's row (1.4 s at 1,000,000).
        narrowing = FILTER_FIELDS if name == "tag" else TEXT_FIELDS
        narrowed = any(self.cleaned_data.get(f) for f in narrowing if f != name)
        value = Coalesce(column, Value("")) if narrowed else F(column)
        # Tasks with a value: for a field, in the words of its partial index (field_is).
        rows = tasks.exclude(**{column: ""}).annotate(**{alias: value}).values_list(alias)
        rows = rows.annotate(n=Count("id"))
        return _offered(_tag_counts(rows) if name == "tag" else dict(rows))

    def _counted_together(self, names: list[str]) -> dict[str, list[tuple[str, int]]]:
        # Fields without a filter of their own: every other filter is all of the filters.
        columns = ["tag_index" if name == "tag" else name for name in names]
        tasks = self.apply(Task.objects.all()).order_by().values(*columns)
        try:
            inner, params = tasks.query.sql_with_params()
        except EmptyResultSet:  # a filter no task can match (a search that found nothing)
            return {name: [] for name in names}
        quoted = [connection.ops.quote_name(column) for column in columns]
        sql = (
            # Our own column names only; filter values stay parameters of the inner query.
            f"SELECT {', '.join(f'GROUPING({c})' for c in quoted)}, {', '.join(quoted)}, "  # noqa: S608
            f"COUNT(*) FROM ({inner}) AS filtered "
            f"GROUP BY GROUPING SETS ({', '.join(f'({c})' for c in quoted)})"
        )
        counts: dict[str, dict[str, int]] = {name: {} for name in names}
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            for row in cursor.fetchall():
                # GROUPING(c) is 0 in the rows grouped by c, 1 in the others.
                grouped_by = row[: len(names)].index(0)
                value, n = row[len(names) + grouped_by], row[-1]
                if value:
                    counts[names[grouped_by]][value] = n
        if "tag" in counts:
            counts["tag"] = _tag_counts(counts["tag"].items())
        return {name: _offered(counts[name]) for name in names}

    def querystring(self, leave_out: str = "") -> str:
        """The active filters (all but `leave_out`) as a query string (no leading '?')."""
        query = QueryDict(mutable=True)
        for name in FILTER_FIELDS:
            if name != leave_out and self.cleaned_data.get(name):
                query[name] = self.cleaned_data[name]
        return query.urlencode()

    @property
    def active(self) -> bool:
        return self.active_besides("")

    @property
    def not_filters(self) -> list[str]:
        """The address's keys that are none of the board's own: a misspelt filter
        (`assigne=`) or another page's word (`status=`) is said, not silently left out."""
        own = {*FILTER_FIELDS, "since", *(f"shown_{status}" for status in Status.values)}
        return sorted(set(self.data) - own)

    def active_besides(self, name: str) -> bool:
        return any(self.cleaned_data.get(other) for other in FILTER_FIELDS if other != name)


class PostedFilterForm(BoardFilterForm):
    """The board's filters posted back as its query string (select all matching, triage
    this view). Only the board's own keys, well formed: anything else parsed leniently
    would be no filter at all, which is every task of every queue."""

    def __init__(self, query: str):
        super().__init__(QueryDict(query))
        self.query = query

    def clean(self):
        data = super().clean()
        try:
            pairs = parse_qsl(self.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise forms.ValidationError("not a query string of the board's filters") from None
        unknown = sorted({key for key, _value in pairs} - set(FILTER_FIELDS))
        if unknown:
            raise forms.ValidationError(f"not filters of the board: {', '.join(unknown)}")
        return data


def _tag_counts(combinations) -> dict[str, int]:
    """Counts per tag from counts per combination of tags (`|a|b|`, n)."""
    counts: dict[str, int] = {}
    for index, n in combinations:
        for tag in index.strip("|").split("|"):
            counts[tag] = counts.get(tag, 0) + n
    return counts


def _offered(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: item[0].lower())[:FACET_LIMIT]


class LoadMoreForm(forms.Form):
    offset = forms.IntegerField(min_value=0, max_value=10_000_000)
    # The column's last card shown: the next cards are those after it in board order,
    # wherever the cards above it went meanwhile (from an offset alone, a herd moving
    # cards out of the column made "Load more" skip as many, and one moving in repeat).
    after_priority = forms.IntegerField(required=False, min_value=-(2**31), max_value=2**31 - 1)
    after_id = forms.IntegerField(required=False, min_value=1, max_value=2**63 - 1)

    def clean(self):
        data = super().clean()
        names = ("after_priority", "after_id")
        given = [n for n in names if data.get(n) is not None]
        if len(given) == 1 and not self.errors:
            missing = next(n for n in names if n not in given)
            self.add_error(missing, f"Give it with {given[0]}: the last card shown.")
        return data

    @property
    def after(self) -> tuple[int, int] | None:
        data = self.cleaned_data
        return None if data["after_id"] is None else (data["after_priority"], data["after_id"])


MAX_SHOWN = 5000  # cards per column a refresh keeps: a hundred "Load more"s


class ShownForm(forms.Form):
    """How many cards each column shows now ("Load more" adds to them), so that a live
    refresh renders as many and the cards a person loaded stay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for status in Status.values:
            self.fields[f"shown_{status}"] = forms.IntegerField(
                required=False, min_value=0, max_value=MAX_SHOWN
            )

    def per_column(self, page: int) -> dict[str, int]:
        """Cards to render per column: at least a page, else what is shown."""
        data = self.cleaned_data if self.is_valid() else {}
        return {s: max(page, data.get(f"shown_{s}") or 0) for s in Status.values}


ACTIONS = {
    # action: (label, statuses it applies to)
    "requeue": ("Requeue", {Status.DONE, Status.BLOCKED}),
    "release": ("Release claim", {Status.CLAIMED}),
    "done": ("Mark done", {Status.QUEUED, Status.CLAIMED, Status.BLOCKED}),
    "block": ("Block", {Status.QUEUED, Status.CLAIMED}),
}


class TaskActionForm(forms.Form):
    action = forms.ChoiceField(choices=[(a, label) for a, (label, _) in ACTIONS.items()])
    reason = forms.CharField(required=False, max_length=2000)
    # Task.seen_as as the page showed it; without it (a script), the task as it is now.
    seen = forms.CharField(required=False, max_length=40)

    def clean(self):
        data = super().clean()
        given = "reason" in self.errors or (data.get("reason") or "").strip()  # too long
        if data.get("action") == "block" and not given:
            self.add_error("reason", "Say why the task is blocked.")
        return data


class TaskEditForm(forms.Form):
    """The drawer's edit mode. Values go to workqueue.editing, which validates them
    against the columns and names the field of each problem."""

    title = forms.CharField(required=False, strip=False)
    status = forms.ChoiceField(
        required=False, choices=[("", "—")] + [(s, s) for s in editing.SETTABLE_STATUSES]
    )
    reason = forms.CharField(required=False, max_length=2000, label="Reason (done or blocked)")
    priority = forms.CharField(required=False)
    project = forms.CharField(required=False)
    assignee = forms.CharField(required=False)
    complexity = forms.CharField(required=False)
    type = forms.CharField(required=False)
    tags = forms.CharField(
        required=False, help_text='Comma separated; "in quotes" for one with a space or comma.'
    )
    parent = forms.CharField(required=False)
    depends_on = forms.CharField(required=False, label="Depends on", help_text="Task ids.")
    body = forms.CharField(required=False, strip=False, widget=forms.Textarea)
    base_sha256 = forms.CharField(required=False, widget=forms.HiddenInput)
    # Each field as the form showed it, fingerprinted: what the person did not change is
    # not sent back, and what someone else changed since is not overwritten.
    base_values = forms.CharField(required=False, widget=forms.HiddenInput)

    @classmethod
    def for_task(cls, task: Task) -> TaskEditForm:
        initial = {
            "title": task.title,
            "status": task.status if task.status in editing.SETTABLE_STATUSES else "",
            "priority": task.priority,
            "project": task.project,
            "assignee": task.assignee,
            "complexity": task.complexity,
            "type": task.type,
            "tags": list_text(task.tags),
            "parent": as_text(task.frontmatter.get("parent")),
            "depends_on": list_text(task.depends_on),
            "body": task.body,
            "base_sha256": task.source_sha256,
        }
        initial["base_values"] = json.dumps(
            {name: fingerprint(initial[name]) for name in editing.FIELDS}
        )
        return cls(initial=initial)

    def clean_tags(self) -> list[str]:
        return cleaned_list(self, "tags")

    def clean_depends_on(self) -> list[str]:
        return cleaned_list(self, "depends_on")

    def clean_base_values(self) -> dict[str, str] | None:
        try:
            base = json.loads(self.cleaned_data["base_values"] or "null")
        except ValueError:
            base = False
        if base is None:
            return None  # a form of an older page, or a script: every field is sent
        if not isinstance(base, dict) or not all(isinstance(v, str) for v in base.values()):
            raise forms.ValidationError("base_values: not the form's own; reload the task")
        return base

    def typed(self, task: Task) -> dict[str, str]:
        """What the person changed from the task as shown (the row), as they typed it:
        kept across a reload from disk after a refused save."""
        shown = self.for_task(task).initial
        return {
            name: str(self.data[name])
            for name in shown
            if name not in ("base_sha256", "base_values")
            and name in self.data
            and str(self.data[name]).replace("\r\n", "\n") != str(shown[name])
        }

    def changes(self, task: Task | None = None) -> dict:
        """The fields the person changed from what the form showed (every field the form
        carries, for a form without its base); editing.edit_task writes what differs.

        With `task` (as it is now), raises editing.FileChanged when a field the person
        changed was changed by someone else since the form was shown: a save of a claimed
        task is written to the row only, so the file's hash cannot tell.
        """
        data = self.cleaned_data
        base = data.get("base_values")
        # A field the form did not send (a script's POST) is left as it is, not emptied.
        changes = {
            name: data[name]
            for name in editing.FIELDS
            if name in data
            and (
                base is None
                or (name in self.data and base.get(name) != fingerprint(self.data[name]))
            )
        }
        if not changes.get("status"):
            changes.pop("status", None)  # a claimed task's form has no status to send
        if task is not None and base is not None:
            now = self.for_task(task).initial
            moved = [name for name in changes if base.get(name) != fingerprint(now[name])]
            if moved:
                raise editing.FileChanged(
                    task,
                    "changed since you opened it",
                    "\n".join(f"{name} is now: {_now_words(task, now, name)}" for name in moved),
                )
        return changes


def _now_words(task: Task, now: dict, name: str) -> str:
    """A field's value now, as a conflict names it: a claimed task's form has no status
    (a person does not set it), so its state is said instead."""
    if name == "status" and task.status == Status.CLAIMED:
        return f"claimed (held by {task.holder or '?'})"
    return str(now[name])


def cleaned_list(form: forms.Form, name: str) -> list[str]:
    """A list field's text as items (`a, "two words"`), or a ValidationError naming it."""
    try:
        return list_items(form.cleaned_data[name])
    except ValueError as exc:
        raise forms.ValidationError(f"{name}: {exc}") from None


def fingerprint(value) -> str:
    """A form value as shown or sent (a textarea sends CRLF), in a few bytes."""
    text = str(value).replace("\r\n", "\n")
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class TaskAdminForm(forms.ModelForm, TaskEditForm):
    """The admin's task form: the board editor's fields, saved the board editor's way
    (TaskAdmin.save_model: the file first, then only the columns that changed). The
    model's own fields stay out of it: a whole-row save would write back every column as
    the form found it, a worker's claim or finish meanwhile included."""

    status = None  # a task's state changes through the list's actions (the transitions)
    reason = None

    class Meta:
        model = Task
        # The declared fields stand in for these columns: none is set on the instance.
        exclude = [f.name for f in Task._meta.concrete_fields if f.name in editing.FIELDS]  # noqa: DJ006

    def __init__(self, *args, instance: Task | None = None, initial=None, **kwargs):
        if instance is not None and instance.pk:
            initial = {**TaskEditForm.for_task(instance).initial, **(initial or {})}
        super().__init__(*args, instance=instance, initial=initial, **kwargs)

    def clean(self):
        data = super().clean()
        try:
            editing.validate(self.changes(), self.instance)
        except editing.EditError as exc:
            for name, problem in exc.errors.items():
                self.add_error(name if name in self.fields else None, f"{name}: {problem}")
        return data


class BulkForm(forms.Form):
    """A bulk action from the board: the selected ids, or every task of a filter."""

    action = forms.ChoiceField(choices=[(a, a) for a in bulk.ACTIONS])
    value = forms.CharField(required=False, max_length=2000, strip=False)
    ids = forms.CharField(required=False, max_length=2_000_000)
    all = forms.BooleanField(required=False)
    filters = forms.CharField(required=False, max_length=4000)
    # `id=Task.seen_as` of the selected cards, for the actions that may end a claim.
    seen = forms.CharField(required=False, max_length=2_000_000)

    def clean_seen(self) -> dict[int, str]:
        seen = {}
        for item in self.cleaned_data["seen"].split(","):
            pk, _, state = item.strip().partition("=")
            if as_id(pk) is not None and state:
                seen[as_id(pk)] = state
        return seen

    def clean_ids(self) -> list[int]:
        ids = [as_id(p) for p in self.cleaned_data["ids"].split(",") if p.strip()]
        if None in ids:
            raise forms.ValidationError("ids are task numbers separated by commas")
        return ids

    def clean(self):
        data = super().clean()
        if not self.errors and not data.get("all") and not data.get("ids"):
            raise forms.ValidationError("Select at least one task.")
        return data

    def task_ids(self) -> list[int]:
        """The selected ids, or every task matching the board's filters right now."""
        if not self.cleaned_data["all"]:
            return self.cleaned_data["ids"]
        board = PostedFilterForm(self.cleaned_data["filters"])
        if not board.is_valid():
            raise forms.ValidationError("The board's filters are not valid.")
        tasks = board.apply(Task.objects.all()).order_by("priority", "id")
        return list(tasks.values_list("pk", flat=True))


class SavedViewForm(forms.Form):
    name = forms.CharField(max_length=100)
    query = forms.CharField(required=False, max_length=2000)

    def clean_query(self) -> str:
        """Only the board's own filters, valid ones, in their canonical order."""
        board = BoardFilterForm(QueryDict(self.cleaned_data["query"]))
        if not board.is_valid():
            raise forms.ValidationError("not a valid board filter")
        return board.querystring()

    def board_url(self) -> str:
        """The board the form was sent from, with its filters: saved or not, the person
        goes back to the view they were looking at."""
        query = self.cleaned_data.get("query")
        return f"{reverse('board')}?{query}" if query else reverse("board")


class NewTaskForm(forms.Form):
    """A new task file (workqueue.authoring validates the values and names the field)."""

    queue = forms.ChoiceField()
    title = forms.CharField(strip=False)
    priority = forms.CharField(required=False)
    project = forms.CharField(required=False)
    assignee = forms.CharField(required=False)
    tags = forms.CharField(
        required=False, help_text='Comma separated; "in quotes" for one with a space or comma.'
    )
    body = forms.CharField(required=False, strip=False, widget=forms.Textarea)

    def __init__(self, *args, **kwargs):
        # Its own ids: the board holds this form and the drawer's edit form at once.
        super().__init__(*args, auto_id="new_%s", **kwargs)
        names = Queue.objects.order_by("name").values_list("name", flat=True)
        self.fields["queue"].choices = [(name, name) for name in names]

    def clean_tags(self) -> list[str]:
        # As the editor reads them: "needs review" in quotes is one tag, not two.
        return cleaned_list(self, "tags")

    def fields_given(self) -> dict:
        data = self.cleaned_data
        return {n: data[n] for n in ("priority", "project", "assignee", "tags") if data[n]}
