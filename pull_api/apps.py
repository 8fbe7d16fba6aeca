from django.apps import AppConfig


class PullApiConfig(AppConfig):
    name = "pull_api"
    verbose_name = "Pull API (MCP over HTTP)"
    default_auto_field = "django.db.models.BigAutoField"
