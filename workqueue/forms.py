from __future__ import annotations

from django import forms
from django.db.models import Q
from django.http import QueryDict

from workqueue.models import Status, TaskQuerySet

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
