app_name = "herds"
urlpatterns: list = []
