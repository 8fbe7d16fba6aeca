from __future__ import annotations

from django import forms
from django.db.models import Q
from django.http import QueryDict

from workqueue import editing
from workqueue.models import Status, Task, TaskQuerySet
from workqueue.text import as_text

FILTER_FIELDS = ("queue", "project", "assignee", "tag", "type", "complexity", "q")


class BoardFilterForm(forms.Form):
    """The board's filters. They live in the URL so that a view can be bookmarked."""

    queue = forms.CharField(required=False, max_length=100)
    project = forms.CharField(required=False, max_length=200)
    assignee = forms.CharField(required=False, max_length=200)
    tag = forms.CharField(required=False, max_length=200)
    type = forms.CharField(required=False, max_length=100)
    complexity = forms.CharField(required=False, max_length=100)
    q = forms.CharField(required=False, max_length=200, label="Search")

    def apply(self, tasks: TaskQuerySet) -> TaskQuerySet:
        data = self.cleaned_data
        for name in ("queue", "project", "assignee", "type", "complexity"):
            if data.get(name):
                tasks = tasks.filter(**{name: data[name]})
        if data.get("tag"):
            tasks = tasks.filter(tag_index__contains=f"|{data['tag']}|")
        if data.get("q"):
            tasks = tasks.filter(Q(title__icontains=data["q"]) | Q(key__icontains=data["q"]))
        return tasks

    def querystring(self) -> str:
        """The active filters as a query string (no leading '?')."""
        query = QueryDict(mutable=True)
        for name in FILTER_FIELDS:
            if self.cleaned_data.get(name):
                query[name] = self.cleaned_data[name]
        return query.urlencode()

    @property
    def only_indexed(self) -> bool:
        """No filter but the queue: every column is one range of a board index."""
        return not any(self.cleaned_data.get(name) for name in FILTER_FIELDS if name != "queue")

    @property
    def active(self) -> bool:
        return any(self.cleaned_data.get(name) for name in FILTER_FIELDS)


class LoadMoreForm(forms.Form):
    offset = forms.IntegerField(min_value=0, max_value=10_000_000)


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

    def clean(self):
        data = super().clean()
        if data.get("action") == "block" and not (data.get("reason") or "").strip():
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
    tags = forms.CharField(required=False, help_text="Comma separated.")
    parent = forms.CharField(required=False)
    depends_on = forms.CharField(required=False, label="Depends on", help_text="Task ids.")
    body = forms.CharField(required=False, strip=False, widget=forms.Textarea)
    base_sha256 = forms.CharField(required=False, widget=forms.HiddenInput)

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
            "tags": ", ".join(task.tags),
            "parent": as_text(task.frontmatter.get("parent")),
            "depends_on": ", ".join(task.depends_on),
            "body": task.body,
            "base_sha256": task.source_sha256,
        }
        return cls(initial=initial)

    def changes(self) -> dict:
        """Every field the form carries; editing.edit_task writes only what differs."""
        data = self.cleaned_data
        changes = {name: data[name] for name in editing.FIELDS if name in data}
        if not changes.get("status"):
            changes.pop("status", None)  # a claimed task's form has no status to send
        return changes
