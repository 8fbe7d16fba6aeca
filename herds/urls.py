from django.urls import path

from herds import views

app_name = "herds"
urlpatterns = [
    path("", views.herd_list, name="list"),
    path("launch/", views.launch, name="launch"),
    path("<int:pk>/", views.detail, name="detail"),
    path("<int:pk>/live/", views.live, name="live"),
    path("<int:pk>/summary.json", views.summary_json, name="summary_json"),
    path("<int:pk>/drain/", views.drain, name="drain"),
    path("<int:pk>/cancel/", views.cancel, name="cancel"),
]
