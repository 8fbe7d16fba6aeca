from __future__ import annotations

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from workqueue import claims, locks
from workqueue.models import Queue, Status, Task, TaskBody, TaskEvent


class StaleFilter(admin.SimpleListFilter):
    title = "stale claim"
    parameter_name = "stale"

    def lookups(self, request, model_admin):
        return [("yes", "Stale"), ("no", "Not stale")]

    def queryset(self, request, queryset):
        if self.value() not in ("yes", "no"):
            return queryset
        stale_ids = [s.task.pk for s in claims.find_stale_claims()]
        if self.value() == "yes":
            return queryset.filter(pk__in=stale_ids)
        return queryset.exclude(pk__in=stale_ids)


class TaskBodyInline(admin.StackedInline):
    model = TaskBody
    can_delete = False
    verbose_name = verbose_name_plural = "body"


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = (
        "key", "title", "queue", "status", "priority", "project", "assignee", "holder",
        "lease_expires_at", "attempts", "updated_at",
    )  # fmt: skip
    list_filter = ("status", StaleFilter, "queue", "project", "assignee")
    search_fields = ("key", "title", "holder")
    list_select_related = False
    show_full_result_count = False
    ordering = ("priority", "id")
    readonly_fields = (
        "outside_holder", "fence", "created_at", "updated_at", "claimed_at", "finished_at",
    )  # fmt: skip
    actions = ("requeue_tasks", "block_tasks", "release_stale")
    inlines = (TaskBodyInline,)
    change_list_template = "admin/workqueue/task/change_list.html"

    @admin.display(description="Lock held outside")
    def outside_holder(self, task: Task) -> str:
        return task.outside_holder or "-"

    @admin.action(description="Requeue selected tasks", permissions=["change"])
    def requeue_tasks(self, request: HttpRequest, queryset) -> None:
        actor = f"admin:{request.user.get_username()}"
        done = self._each(
            request,
            queryset.exclude(status=Status.QUEUED),
            lambda task: claims.release_task(task, actor, "requeued from the admin"),
        )
        self.message_user(request, f"Requeued {done} task(s).", messages.SUCCESS)

    @admin.action(description="Block selected tasks", permissions=["change"])
    def block_tasks(self, request: HttpRequest, queryset) -> None:
        actor = f"admin:{request.user.get_username()}"
        done = self._each(
            request,
            queryset.filter(status__in=[Status.QUEUED, Status.CLAIMED]),
            lambda task: claims.set_task_status(
                task, Status.BLOCKED, actor, f"blocked by {actor}"
            ),
        )
        self.message_user(request, f"Blocked {done} task(s).", messages.SUCCESS)

    def _each(self, request: HttpRequest, tasks, change) -> int:
        done = 0
        for task in tasks:
            try:
                done += change(task)
            except claims.AgentStillRunning as exc:
                self.message_user(request, str(exc), messages.ERROR)
        return done

    @admin.action(
        description="Release stale claims in the selected tasks' queues", permissions=["change"]
    )
    def release_stale(self, request: HttpRequest, queryset) -> None:
        actor = f"admin:{request.user.get_username()}"
        queues = sorted(set(queryset.values_list("queue", flat=True)))
        requeued = blocked = 0
        for queue in queues:
            report = claims.release_stale_claims(queue, actor=actor)
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

    def locks_view(self, request: HttpRequest) -> HttpResponse:
        """Filesystem locks, with a dry run of the reaper and a button that runs it."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not self.has_change_permission(request):
                raise PermissionDenied
            report = claims.release_stale_claims(actor=f"admin:{request.user.get_username()}")
            self.message_user(
                request,
                f"Released stale locks: {len(report.requeued)} requeued, "
                f"{len(report.blocked)} blocked, {len(report.orphan_locks)} orphan lock "
                "directories removed.",
                messages.SUCCESS,
            )
            return HttpResponseRedirect(reverse("admin:queue_task_locks"))
        dry_run = claims.release_stale_claims(dry_run=True)
        stale_keys = {(s.task.queue, s.task.key): s for s in [*dry_run.requeued, *dry_run.blocked]}
        orphans = {str(p) for p in dry_run.orphan_locks}
        rows = []
        for lock in sorted(locks.list_locks(), key=lambda lock: (lock.queue_dir, lock.name)):
            queue = locks.key_from_lock_name(lock.queue_dir)
            stale_claim = stale_keys.get((queue, lock.key))
            owner = lock.owner or {}
            rows.append(
                {
                    "path": lock.path,
                    "queue": queue,
                    "key": lock.key,
                    "host": owner.get("host", "?"),
                    "pid": owner.get("pid", "?"),
                    "worker": owner.get("worker", ""),
                    "alive": lock.owner_alive,
                    "age": lock.age_seconds,
                    "stale": bool(stale_claim) or str(lock.path) in orphans,
                    "why": stale_claim.why if stale_claim else "",
                }
            )
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
    search_fields = ("task__key", "actor", "message")
    list_select_related = ("task",)
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Queue)
class QueueAdmin(admin.ModelAdmin):
    list_display = ("name", "max_attempts", "stamp_claims")
