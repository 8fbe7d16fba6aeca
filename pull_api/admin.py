from django.contrib import admin, messages

from pull_api.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "name", "hint", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("user__username", "name", "hint")
    # Every field: a revocation is for good (a leaked token cleared of it would work
    # again); the action below is the one change the admin makes.
    readonly_fields = list_display + ("digest",)
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False  # a token is made by its user, whose page shows the secret once

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        revoked = sum(token.revoke(by=request.user.get_username()) for token in queryset)
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)
