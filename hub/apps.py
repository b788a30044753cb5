from django.apps import AppConfig
from django.db.backends.signals import connection_created


class HubConfig(AppConfig):
    name = "hub"
    verbose_name = "Quiver registry"

    def ready(self):
        from hub.db import configure_connection

        connection_created.connect(configure_connection, dispatch_uid="quiver-configure-connection")
