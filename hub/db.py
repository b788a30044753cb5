"""Per-connection PostgreSQL settings (connected in HubConfig.ready)."""
from django.conf import settings


def configure_connection(sender, connection, **kwargs):
    """pgvector ≥ 0.8 iterative scans: with a WHERE clause (visibility, base model,
    filters) an HNSW scan continues until it has enough visible rows instead of
    returning fewer; ef_search trades recall for latency."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET hnsw.iterative_scan = relaxed_order")
            cursor.execute("SET hnsw.ef_search = %s", [int(settings.QUIVER_HNSW_EF_SEARCH)])
