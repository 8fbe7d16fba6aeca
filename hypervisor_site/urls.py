from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from hypervisor_site.metrics import metrics
from pull_api.views import mcp_endpoint

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("herds/", include("herds.urls")),
    # Both spellings: a redirect to add the slash would drop a POST's body.
    path("mcp/", mcp_endpoint, name="mcp"),
    path("mcp", mcp_endpoint),
    # For Prometheus (a bearer token) and staff; the text format, not a page.
    path("metrics", metrics, name="metrics"),
    path("", include("pull_api.urls")),
    path("", include("workqueue.urls")),
]

handler400 = "hypervisor_site.errors.bad_request"
handler403 = "hypervisor_site.errors.permission_denied"
handler404 = "hypervisor_site.errors.page_not_found"
handler500 = "hypervisor_site.errors.server_error"
