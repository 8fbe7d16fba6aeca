from django.urls import path

from workqueue import views

urlpatterns = [
    path("", views.board, name="board"),
]
