from django.apps import AppConfig
from django.db.backends.signals import connection_created


class HubConfig(AppConfig):
    name = "hub"
    verbose_name = "Quiver registry"

    def ready(self):
        from hub.db import configure_connection

        connection_created.connect(configure_connection, dispatch_uid="quiver-configure-connection")
        # Make Quiver's Celery app the current one in every Django process (web, manage.py
        # commands), as Celery's Django guide does: services send tasks through
        # current_app, which would otherwise be Celery's default app and its amqp broker.
        import workers.celery_app  # noqa: F401
