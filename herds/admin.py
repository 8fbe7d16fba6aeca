from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from herds.models import Herd, HerdWorker, Profile
from workqueue.admin import STORABLE_JSON

PROTECTED_NAMED = 20  # herds a refused delete of their profile names


@admin.register(Profile)
class ProfileAdmin(admin.ModelAdmin):
    # The model validates command, environment, filters and pattern in clean() and save().
    list_display = ["name", "processor", "adapter", "model", "max_workers", "timeout_seconds"]
    list_filter = ["processor", "adapter"]
    search_fields = ["name", "description"]
    formfield_overrides = STORABLE_JSON

    def get_deleted_objects(self, objs, request):
        """A profile a herd ran with is kept (its herds protect it): the delete page names
        a few of them and counts the rest, where Django's listed each (10,000 herds made a
        page of 880 KB that took 1.3 s)."""
        herds = Herd.objects.filter(profile__in=objs).select_related("profile")
        count = herds.count()
        if not count:
            return super().get_deleted_objects(objs, request)
        protected = [f"Herd: {herd}" for herd in herds[:PROTECTED_NAMED]]
        if count > PROTECTED_NAMED:
            protected.append(f"and {count - PROTECTED_NAMED:,} more herds")
        return [], {}, set(), protected


class WorkerInline(admin.TabularInline):
    model = HerdWorker
    extra = 0
    can_delete = False
    fields = [
        "index",
        "host",
        "pid",
        "state",
        "exit_class",
        "exit_code",
        "current_task",
        "done",
        "blocked",
        "tokens",
        "cost_usd",
        "heartbeat_at",
    ]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_operate_permission(self, request) -> bool:
        return request.user.has_perm("herds.add_herd")


# A herd of more workers lists them on the workers' own changelist, a page at a time: as
# rows of its page, 500 workers made a page of 1.2 MB that took 0.4-0.9 s.
WORKERS_INLINE = 50


@admin.register(Herd)
class HerdAdmin(ReadOnlyAdmin):
    list_display = ["id", "queue", "profile", "size", "batch", "status", "draining", "created_at"]
    list_filter = ["status", "draining", "queue", "profile"]
    search_fields = ["queue", "reason"]
    inlines = [WorkerInline]
    actions = ["drain_herds", "cancel_herds"]
    # The summary holds a row per task finished: its JSON download, not megabytes of text.
    exclude = ["summary"]
    readonly_fields = ["run_summary", "worker_list"]

    def get_inlines(self, request, herd):
        if herd is not None and self._worker_count(herd) > WORKERS_INLINE:
            return []
        return super().get_inlines(request, herd)

    @admin.display(description="Workers")
    def worker_list(self, herd: Herd) -> str:
        url = reverse("admin:herds_herdworker_changelist") + f"?herd__id__exact={herd.pk}"
        return format_html('<a href="{}">{} worker(s)</a>', url, self._worker_count(herd))

    @staticmethod
    def _worker_count(herd: Herd) -> int:
        # Asked by the inlines (more than once a page) and by the workers' link: once.
        if not hasattr(herd, "_worker_count"):
            herd._worker_count = herd.workers.count()
        return herd._worker_count

    @admin.display(description="Run summary")
    def run_summary(self, herd: Herd) -> str:
        if not herd.summary:
            return "-"
        return format_html(
            '{} done, {} blocked: <a href="{}">the summary (JSON)</a>',
            herd.summary.get("done", 0),
            herd.summary.get("blocked", 0),
            reverse("herds:summary_json", args=[herd.pk]),
        )

    @admin.action(
        description="Drain: finish current tasks, claim no more", permissions=["operate"]
    )
    def drain_herds(self, request, queryset) -> None:
        drained = sum(
            herd.drain(f"drained by {request.user.get_username()} (admin)")
            for herd in queryset.active()
        )
        self.message_user(request, f"{drained} herd(s) draining.", messages.SUCCESS)

    @admin.action(
        description="Cancel: terminate the processes, tasks go back", permissions=["operate"]
    )
    def cancel_herds(self, request, queryset) -> None:
        cancelled = sum(
            herd.cancel(f"cancelled by {request.user.get_username()} (admin)")
            for herd in queryset.active().select_related("profile")
        )
        self.message_user(request, f"{cancelled} herd(s) cancelled.", messages.SUCCESS)


@admin.register(HerdWorker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ["name", "herd", "host", "pid", "state", "exit_class", "done", "blocked"]
    list_filter = ["state", "exit_class"]
    search_fields = ["name", "host", "current_task"]
    actions = ["drain_herds", "cancel_herds"]

    @admin.action(description="Drain these workers' herds", permissions=["operate"])
    def drain_herds(self, request, queryset) -> None:
        HerdAdmin.drain_herds(self, request, Herd.objects.filter(workers__in=queryset).distinct())

    @admin.action(description="Cancel these workers' herds", permissions=["operate"])
    def cancel_herds(self, request, queryset) -> None:
        HerdAdmin.cancel_herds(self, request, Herd.objects.filter(workers__in=queryset).distinct())
