from __future__ import annotations

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as delete_confirmed
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import models
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.text import capfirst

from hypervisor_site.writers import write_transaction
from workqueue import editing, locks, reaper
from workqueue.editing import FIELDS
from workqueue.forms import StorableJSONField, TaskAdminForm
from workqueue.models import Queue, Status, Task, TaskEvent, TaskSearch, field_values

# What the admin's JSON fields accept: what every database can store.
STORABLE_JSON = {models.JSONField: {"form_class": StorableJSONField}}


class CappedCountPaginator(Paginator):
    """Counts no further than CAP rows: a changelist of millions of events (filtered by a
    kind, say) read them all to print their number. Past it, the pages stop at the cap and
    the count says "more than" (templates/admin/pagination.html); a filter or a search
    narrows the list further."""

    CAP = 10_000

    @property
    def count(self) -> int:
        if not hasattr(self, "_capped_count"):
            self._capped_count = self.object_list[: self.CAP + 1].count()
        return min(self._capped_count, self.CAP)

    @property
    def capped(self) -> bool:
        return self.count == self.CAP and self._capped_count > self.CAP


class StaleFilter(admin.SimpleListFilter):
    title = "stale claim"
    parameter_name = "stale"

    def lookups(self, request, model_admin):
        return [("yes", "Stale"), ("no", "Not stale")]

    def queryset(self, request, queryset):
        if self.value() not in ("yes", "no"):
            return queryset
        stale_ids = [s.task.pk for s in reaper.find_stale_claims()]
        if self.value() == "yes":
            return queryset.filter(pk__in=stale_ids)
        return queryset.exclude(pk__in=stale_ids)


class ValueFilter(admin.SimpleListFilter):
    """A field's values, found by field_values (an index probe per value) where Django's
    own filter read every task for them; under Django's own parameter, `<field>__exact`."""

    field = ""

    def lookups(self, request, model_admin):
        return [(value, value) for value in field_values(self.field)]

    def queryset(self, request, queryset):
        return queryset.filter(**{self.field: self.value()}) if self.value() else queryset


def value_filter(field: str) -> type[ValueFilter]:
    attributes = {"field": field, "title": field, "parameter_name": f"{field}__exact"}
    return type(f"{field.title()}Filter", (ValueFilter,), attributes)


# The row's columns by what they say; the admin edits what the file says (TaskAdminForm).
SOURCE_FIELDS = (
    "key", "queue", "status", "source_path", "source_sha256", "source_missing",
    "change_pending", "pending_edit", "closed_by", "frontmatter",
)  # fmt: skip
CLAIM_FIELDS = (
    "holder", "holder_host", "holder_pid", "holder_started", "holder_herd", "fence",
    "lease_expires_at", "claimed_at", "attempts", "max_attempts", "agent_pgid",
    "agent_started", "outside_holder",
)  # fmt: skip
RESULT_FIELDS = (
    "outcome", "reason", "evidence", "next_step", "commit", "tokens", "cost_usd",
    "output_tail", "result", "worktree", "branch", "finished_at", "created_at", "updated_at",
)  # fmt: skip


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = (
        "key", "title", "queue", "status", "priority", "project", "assignee", "holder",
        "lease_expires_at", "attempts", "updated_at",
    )  # fmt: skip
    list_filter = (
        "status", StaleFilter, value_filter("queue"), value_filter("project"),
        value_filter("assignee"),
    )  # fmt: skip
    search_fields = ("key", "title", "holder")  # see get_search_results
    search_help_text = "Text in a task's key, title or body, or a claimed task's holder."
    list_select_related = False
    # The page's count stays whole (not CappedCountPaginator): "Select all N tasks" says
    # how many an action changes.
    show_full_result_count = False
    # Each column of the board in turn, in claim order: what the board's indexes hold in
    # this order, filtered or not. By priority alone, a page sorted every task (0.4 s at
    # a million on PostgreSQL).
    ordering = ("status", "priority", "id")
    form = TaskAdminForm
    fieldsets = (
        (
            "The task's file",
            {
                "description": "Saved into the task's file, then its row, as the board's "
                "editor saves. A task a worker holds gets the change in its file when the "
                "claim ends. Its state changes through the actions on the list.",
                "fields": (*(f for f in FIELDS if f != "status"), "base_sha256", "base_values"),
            },
        ),
        ("Source", {"fields": SOURCE_FIELDS}),
        ("Claim", {"fields": CLAIM_FIELDS}),
        ("Result", {"fields": RESULT_FIELDS}),
    )
    # Read-only: state through the actions (the transitions), the rest from the file.
    readonly_fields = SOURCE_FIELDS + CLAIM_FIELDS + RESULT_FIELDS
    actions = (
        "requeue_tasks", "release_claims", "mark_done", "block_tasks", "release_stale",
        "delete_selected",
    )  # fmt: skip
    change_list_template = "admin/workqueue/task/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a new task is a new file: the board's "New task" writes it

    def get_search_results(self, request, queryset, search_term):
        """The board's search (TaskSearch: key, title, body), and the holders of claims:
        a substring of every task's key, title and holder read the whole table (1.5 s at
        a million tasks on PostgreSQL)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        holding = Q(status=Status.CLAIMED, holder__icontains=term)
        return queryset.filter(TaskSearch.matching(term, queryset.db) | holding), False

    def has_delete_permission(self, request: HttpRequest, task: Task | None = None) -> bool:
        # A worker's claim ends through the transitions (its agent first), not by deletion.
        held = task is not None and task.status == Status.CLAIMED
        return not held and super().has_delete_permission(request, task)

    def get_deleted_objects(self, objs, request):
        """The tasks, and how many events go with them: a task's timeline is part of it.
        Django asks each related model's admin, and the events' deletes none on its own,
        so it refused every task with an event (every imported one) for a permission no
        one has; and it listed each event (0.9 s for a task of 10,000)."""
        tasks = list(objs)
        listed = [
            format_html(
                '{}: <a href="{}">{}</a>',
                capfirst(Task._meta.verbose_name),
                reverse("admin:queue_task_change", args=[task.pk]),
                task,
            )
            for task in tasks
        ]
        counts = {Task._meta.verbose_name_plural: len(tasks)}
        chosen = objs.values("pk") if isinstance(objs, models.QuerySet) else tasks
        events = TaskEvent.objects.filter(task__in=chosen).count()
        if events:
            counts[TaskEvent._meta.verbose_name_plural] = events
        needed = set() if self.has_delete_permission(request) else {Task._meta.verbose_name}
        return listed, counts, needed, []

    @admin.action(
        description="Delete selected tasks' rows (their files stay; claimed tasks are left)",
        permissions=["delete"],
    )
    def delete_selected(self, request: HttpRequest, queryset):
        """Django's delete action (its confirmation page posts this name back) without
        the claimed tasks, and a confirmed delete through `delete_tasks`."""
        held = queryset.filter(status=Status.CLAIMED).count()
        if held:
            self.message_user(
                request,
                f"Left {held} claimed task(s): a worker holds them. Release them first.",
                messages.WARNING,
            )
        unheld = queryset.exclude(status=Status.CLAIMED)
        if request.POST.get("post"):  # confirmed
            _, _, perms_needed, protected = self.get_deleted_objects(unheld, request)
            if not (perms_needed or protected):
                wanted = unheld.count()
                deleted = self.delete_tasks(request, unheld)
                self.message_user(request, f"Deleted {deleted} task(s).", messages.SUCCESS)
                if deleted < wanted:
                    missed = self.claimed_meanwhile(wanted - deleted)
                    self.message_user(request, missed, messages.WARNING)
                return None
        return delete_confirmed(self, request, unheld)  # its page, or its refusal

    def delete_tasks(self, request: HttpRequest, tasks) -> int:
        """Read and delete the rows in one write, the claimed left out, so a worker's
        claim cannot land between the rows read and the rows deleted (PostgreSQL: the
        rows are locked, and a claim passes over locked rows). Logs what it deleted."""
        with write_transaction():
            ids = list(
                tasks.exclude(status=Status.CLAIMED)
                .select_for_update(of=("self",))
                .values_list("pk", flat=True)
            )
            super().log_deletions(request, Task.objects.filter(pk__in=ids))
            Task.objects.filter(pk__in=ids).delete()
        return len(ids)

    def claimed_meanwhile(self, count: int) -> str:
        return f"{count} task(s) were claimed by a worker meanwhile and were not deleted."

    def log_deletions(self, request: HttpRequest, queryset) -> None:
        pass  # delete_tasks logs, in its write, what it deleted

    def delete_model(self, request: HttpRequest, task: Task) -> None:
        if not self.delete_tasks(request, Task.objects.filter(pk=task.pk)):
            request.task_not_deleted = self.claimed_meanwhile(1)

    def response_delete(self, request: HttpRequest, obj_display: str, obj_id) -> HttpResponse:
        if hasattr(request, "task_not_deleted"):
            self.message_user(request, request.task_not_deleted, messages.ERROR)
            return HttpResponseRedirect(reverse("admin:queue_task_change", args=[obj_id]))
        return super().response_delete(request, obj_display, obj_id)

    def save_model(self, request: HttpRequest, task: Task, form, change: bool) -> None:
        try:
            result = editing.edit_task(
                task,
                form.changes(task),
                self._actor(request),
                base_sha256=form.cleaned_data["base_sha256"] or None,
            )
        except editing.FileChanged as exc:
            request.task_not_saved = format_html(
                "Not saved: {} {}. Its page on the board shows the difference and reloads it: "
                '<a href="{}">{}</a>.',
                task.source_path,
                exc.why,
                reverse("task-detail", args=[task.pk]),
                task.key,
            )
        except (editing.EditError, editing.Conflict) as exc:
            request.task_not_saved = f"Not saved: {exc}."
        else:
            if result.deferred:
                self.message_user(
                    request,
                    "A worker holds the task: its file gets the change when the claim ends.",
                    messages.WARNING,
                )

    def log_change(self, request: HttpRequest, task: Task, message):
        if not hasattr(request, "task_not_saved"):
            return super().log_change(request, task, message)

    def response_change(self, request: HttpRequest, task: Task) -> HttpResponse:
        if hasattr(request, "task_not_saved"):
            self.message_user(request, request.task_not_saved, messages.ERROR)
            return HttpResponseRedirect(request.path)
        return super().response_change(request, task)

    @admin.display(description="Lock held outside")
    def outside_holder(self, task: Task) -> str:
        return task.outside_holder or "-"

    def _actor(self, request: HttpRequest) -> str:
        return f"admin:{request.user.get_username()}"

    # The board's transitions (editing.edit_tasks): the task's file gets the new status,
    # and an edit that waited for a released claim is written.
    @admin.action(description="Requeue selected done or blocked tasks", permissions=["change"])
    def requeue_tasks(self, request: HttpRequest, queryset) -> None:
        self._act(request, queryset, "requeue", "", "Requeued {} task(s).")

    @admin.action(description="Release selected claims", permissions=["change"])
    def release_claims(self, request: HttpRequest, queryset) -> None:
        self._act(request, queryset, "release", "", "Released {} claim(s).")

    @admin.action(description="Mark selected tasks done", permissions=["change"])
    def mark_done(self, request: HttpRequest, queryset) -> None:
        reason = f"closed by {self._actor(request)}"
        self._act(request, queryset, "close", reason, "Marked {} task(s) done.")

    @admin.action(description="Block selected tasks", permissions=["change"])
    def block_tasks(self, request: HttpRequest, queryset) -> None:
        reason = f"blocked by {self._actor(request)}"
        self._act(request, queryset, "block", reason, "Blocked {} task(s).")

    def _act(self, request: HttpRequest, queryset, action: str, reason: str, done: str) -> None:
        applies_to = editing.STATE_ACTIONS[action][1]
        ids = list(queryset.filter(status__in=applies_to).values_list("pk", flat=True))
        others = queryset.count() - len(ids)
        report = editing.edit_tasks(ids, self._actor(request), action=action, reason=reason)
        self.message_user(request, done.format(report.changed), messages.SUCCESS)
        if others:
            states = " or ".join(sorted(applies_to))
            self.message_user(request, f"{others} selected task(s) not {states}: left alone.")
        for skipped in report.skipped[:20]:
            self.message_user(request, f"{skipped['key']}: {skipped['why']}", messages.ERROR)
        if len(report.skipped) > 20:
            more = len(report.skipped) - 20
            self.message_user(request, f"and {more} more left as they were", messages.ERROR)

    @admin.action(
        description="Release stale claims in the selected tasks' queues", permissions=["change"]
    )
    @locks.every_refusal()  # asked for: each symlink met is logged, as often as asked
    def release_stale(self, request: HttpRequest, queryset) -> None:
        actor = self._actor(request)
        queues = sorted(set(queryset.values_list("queue", flat=True)))
        requeued = blocked = 0
        for queue in queues:
            report = reaper.release_stale_claims(queue, actor=actor)
            requeued += len(report.requeued)
            blocked += len(report.blocked)
        self.message_user(
            request,
            f"Released stale claims in {', '.join(queues) or 'no queue'}: "
            f"{requeued} requeued, {blocked} blocked.",
            messages.SUCCESS,
        )

    def get_urls(self):
        return [
            path(
                "locks/",
                self.admin_site.admin_view(self.locks_view),
                name="queue_task_locks",
            ),
            *super().get_urls(),
        ]

    @locks.every_refusal()  # asked for: each symlink met is logged, as often as asked
    def locks_view(self, request: HttpRequest) -> HttpResponse:
        """Filesystem locks, with a dry run of the reaper and a button that runs it."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not self.has_change_permission(request):
                raise PermissionDenied
            report = reaper.release_stale_claims(actor=self._actor(request))
            if report.requeued or report.blocked or report.orphan_locks:
                said = (
                    f"Released stale locks: {len(report.requeued)} requeued, "
                    f"{len(report.blocked)} blocked, {len(report.orphan_locks)} orphan lock "
                    "directories removed"
                )
                if report.temporaries:
                    said += (
                        f", and {len(report.temporaries)} temporary files dead workers left "
                        "beside task files"
                    )
                said += "."
            else:
                # The periodic reaper often got there between the page and the click.
                said = (
                    "Nothing to release: no claim or lock directory was stale by now (the "
                    "consumer's reaper, every "
                    f"{settings.HYPERVISOR_REAP_INTERVAL:g} s, may have released them first)."
                )
            self.message_user(request, said, messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:queue_task_locks"))
        rows, dry_run = reaper.lock_report()
        context = {
            **self.admin_site.each_context(request),
            "title": "Filesystem locks",
            "opts": self.model._meta,
            "rows": rows,
            "dry_run": dry_run.as_dict(),
            "lock_root": settings.HYPERVISOR_LOCK_ROOT,
            "can_release": self.has_change_permission(request),
        }
        return TemplateResponse(request, "admin/workqueue/locks.html", context)


@admin.register(TaskEvent)
class TaskEventAdmin(admin.ModelAdmin):
    list_display = ("at", "kind", "task", "actor", "fence", "message")
    list_filter = ("kind",)
    search_fields = ("=task__key",)  # see get_search_results
    search_help_text = "A task's key: its events, newest first."
    list_select_related = ("task",)
    show_full_result_count = False
    paginator = CappedCountPaginator
    # Newest first by the primary key, whose index a page reads backwards: the timeline's
    # own order (at) has no index of its own, and sorting millions of events by it for a
    # page took seconds. Events are written as they happen, so ids follow time.
    ordering = ("-id",)
    sortable_by = ()

    def get_search_results(self, request, queryset, search_term):
        """The events of the tasks of that key: the tasks first, then their timelines'
        index. A text search of the messages read every event (13 s at 2 million), and
        so did a join with the tasks (2.4 s on PostgreSQL)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        # Through the board's search index: a key's own lookup read every task.
        tasks = Task.objects.matching_text(term).filter(key__iexact=term)
        return queryset.filter(task_id__in=list(tasks.values_list("pk", flat=True)[:100])), False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Queue)
class QueueAdmin(admin.ModelAdmin):
    formfield_overrides = STORABLE_JSON
    list_display = ("name", "max_attempts", "stamp_claims", "human_assignee", "bot_assignee")
