from django.apps import AppConfig
from django.db.backends.signals import connection_created


class HubConfig(AppConfig):
    name = "hub"
    verbose_name = "Quiver registry"

    def ready(self):
        from django.db.models.signals import post_delete, post_save

        from hub.db import configure_connection
        from hub.models import Adapter

        connection_created.connect(configure_connection, dispatch_uid="quiver-configure-connection")
        # Cache invalidation is what signals are for here: every write of an adapter, by any
        # service or the admin, makes the cached browse facets (hub.selectors.adapter_facets) stale.
        for signal in (post_save, post_delete):
            signal.connect(_forget_adapter_facets, sender=Adapter, dispatch_uid=f"quiver-facets-{signal is post_save}")
        # Make Quiver's Celery app the current one in every Django process (web, manage.py
        # commands), as Celery's Django guide does: services send tasks through
        # current_app, which would otherwise be Celery's default app and its amqp broker.
        import workers.celery_app  # noqa: F401


# What the facets are counted from (and who may see them): a save of other fields only (a new
# revision's pointer, say) leaves them as they were.
FACET_FIELDS = frozenset({"format", "license", "tags", "visibility", "owner"})


def _forget_adapter_facets(update_fields=None, **_signal) -> None:
    if update_fields is not None and not FACET_FIELDS & set(update_fields):
        return
    # Imported when an adapter is written, not at start: hub.selectors imports torch.
    from django.db import transaction

    from hub.selectors import forget_adapter_facets

    # Once the write is committed: forgotten before, a browse in between would count the facets
    # without it and keep them under the new version; a rolled-back write changes nothing.
    transaction.on_commit(forget_adapter_facets)
