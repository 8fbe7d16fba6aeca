import os

from django.core.asgi import get_asgi_application

from hypervisor_site.privacy import hide_environment
from hypervisor_site.server import ready_to_serve

hide_environment()  # the agents of its herds must not read its environment
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hypervisor_site.settings")
application = get_asgi_application()
ready_to_serve()
