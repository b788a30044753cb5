"""The health endpoint checks the real database and the real broker."""
import pytest


@pytest.mark.django_db
def test_health_reports_database_and_broker(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


@pytest.mark.django_db
def test_health_is_503_when_the_broker_is_unreachable(client, free_port):
    from workers import app

    original = app.conf.broker_url
    app.conf.broker_url = f"redis://127.0.0.1:{free_port}/0"  # nothing listens there
    try:  # the health check opens a fresh broker connection each time (no pool to reset)
        response = client.get("/api/v1/health")
    finally:
        app.conf.broker_url = original
    assert response.status_code == 503
    assert response.json()["broker"].startswith("error")
    assert response.json()["database"] == "ok"


def test_openapi_schema_lists_the_v1_endpoints(client, db):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    for path in ("/api/v1/adapters/", "/api/v1/adapters/{namespace}/{name}/", "/api/v1/base-models/",
                 "/api/v1/jobs/{job_id}/", "/api/v1/health",
                 "/api/v1/adapters/{namespace}/{name}/files/{filename}"):
        assert path in schema["paths"], path


def test_openapi_schema_builds_without_warnings(tmp_path, db):
    """Every view and serializer is described without drf-spectacular guessing (a guess is a
    warning: an unnamed type, a clashing enum name), so generated clients get precise types."""
    from django.core.management import call_command

    call_command("spectacular", "--fail-on-warn", "--validate", "--file", str(tmp_path / "schema.yml"))
    assert (tmp_path / "schema.yml").stat().st_size > 10_000


@pytest.mark.django_db(transaction=True)
def test_database_connections_outlive_quiet_periods(client, monkeypatch):
    """A web worker keeps its PostgreSQL connection however long it waits between requests: the
    request boundaries (close_old_connections, what Django runs around every request) close only a
    connection that is broken or left mid-transaction, so a request after an idle hour does not pay
    for a new connection and a cold backend."""
    import time

    from django.db import close_old_connections, connection
    from django.db.backends.base import base

    def backend_pid() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

    assert client.get("/api/v1/health").status_code == 200
    first = backend_pid()
    later = time.monotonic() + 3600
    monkeypatch.setattr(base.time, "monotonic", lambda: later)
    close_old_connections()  # request finished, an hour passes, the next request starts
    close_old_connections()
    assert client.get("/api/v1/health").status_code == 200
    assert backend_pid() == first
