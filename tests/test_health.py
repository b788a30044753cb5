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
