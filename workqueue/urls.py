from django.urls import path

from workqueue import views

urlpatterns = [
    path("", views.board, name="board"),
    path("board/<str:status>/", views.column, name="board-column"),
    path("tasks/<int:pk>/", views.task_detail, name="task-detail"),
    path("tasks/<int:pk>/action/", views.task_action, name="task-action"),
    path("tasks/<int:pk>/transcript/", views.task_transcript, name="task-transcript"),
]
