from django.apps import AppConfig


class WorkqueueConfig(AppConfig):
    # The package is not called `queue`: that would shadow Python's standard module.
    name = "workqueue"
    label = "queue"
    verbose_name = "Queue"
