from django.urls import path

from workqueue import views

urlpatterns = [
    path("", views.board, name="board"),
    path("board/<str:status>/", views.column, name="board-column"),
    path("filters/", views.board_filters, name="board-filters"),
    path("tasks/new/", views.task_new, name="task-new"),
    path("queues/sync/", views.queue_sync, name="queue-sync"),
    path("tasks/<int:pk>/", views.task_detail, name="task-detail"),
    path("tasks/<int:pk>/action/", views.task_action, name="task-action"),
    path("tasks/<int:pk>/edit/", views.task_edit, name="task-edit"),
    path("tasks/<int:pk>/reload/", views.task_reload, name="task-reload"),
    path("views/", views.saved_view, name="saved-view"),
    path("views/<int:pk>/delete/", views.delete_saved_view, name="saved-view-delete"),
    path("bulk/", views.bulk_start, name="bulk-start"),
    path("bulk/<int:pk>/", views.bulk_status, name="bulk-status"),
    path("bulk/<int:pk>/undo/", views.bulk_undo, name="bulk-undo"),
    path("triage/", views.triage_start, name="triage-start"),
    path("triage/<int:pk>/", views.triage_detail, name="triage-detail"),
    path("triage/<int:pk>/apply/", views.triage_apply, name="triage-apply"),
    path("triage/<int:pk>/undo/", views.triage_undo, name="triage-undo"),
    path("tasks/<int:pk>/transcript/", views.task_transcript, name="task-transcript"),
]
