from django.apps import AppConfig


class HerdsConfig(AppConfig):
    name = "herds"
    verbose_name = "Herds"

    def ready(self) -> None:
        from herds import receivers  # noqa: F401  (connects the workqueue signal receivers)
