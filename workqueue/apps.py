from django.apps import AppConfig


class WorkqueueConfig(AppConfig):
    # The package is not called `queue`: that would shadow Python's standard module.
    name = "workqueue"
    label = "queue"
    verbose_name = "Queue"

    def ready(self) -> None:
        from workqueue import worktrees  # noqa: F401  (cleans worktrees of released claims)
