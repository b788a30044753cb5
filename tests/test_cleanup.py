"""The orphan sweep removes unreferenced blobs after the grace period, and nothing else."""
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import upload_payload

pytestmark = pytest.mark.django_db


def test_sweep_removes_blobs_of_deleted_adapters_but_keeps_referenced_ones(demo_bases, demo_adapter, make_user,
                                                                          client_for, settings):
    from hub.blobs import blob_storage
    from hub.models import Blob
    from hub.services.cleanup import sweep_orphan_blobs

    api = client_for(make_user("alice"))
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer")), format="multipart")
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("sql-from-questions")), format="multipart")
    doomed = {f["sha256"] for f in api.get("/api/v1/adapters/alice/sql-from-questions/").json()["files"]}
    kept = {f["sha256"] for f in api.get("/api/v1/adapters/alice/ticket-summarizer/").json()["files"]}
    assert api.delete("/api/v1/adapters/alice/sql-from-questions/").status_code == 204
    doomed -= kept  # a config shared byte-for-byte stays referenced

    assert sweep_orphan_blobs() == 0  # younger than the grace period: untouched
    removed = sweep_orphan_blobs(grace=timedelta(0))

    assert removed == len(doomed) > 0
    storage = blob_storage()
    for sha in doomed:
        assert not Blob.objects.filter(sha256=sha).exists()
        assert not storage.exists(Blob(sha256=sha, size=0).storage_key)
    for sha in kept:
        assert Blob.objects.filter(sha256=sha).exists() and storage.exists(Blob(sha256=sha, size=0).storage_key)
    assert api.get("/api/v1/adapters/alice/ticket-summarizer/files/adapter_model.safetensors").status_code == 200
    assert all(b.sha256 in kept or Path(storage.path(b.storage_key)).exists() for b in Blob.objects.all())


def test_a_claim_of_orphan_bytes_keeps_them_from_the_sweep(demo_bases, demo_adapter, make_user, client_for):
    """An upload claims its blobs before the rows that reference them commit: a sweep running in
    between must leave the bytes alone, even when they were an old orphan."""
    from django.utils import timezone

    from hub.blobs import blob_storage, put_blob
    from hub.models import Blob
    from hub.services.cleanup import sweep_orphan_blobs

    entry = demo_adapter("ticket-summarizer")
    api = client_for(make_user("alice"))
    api.post("/api/v1/adapters/", upload_payload(entry), format="multipart")
    weights = api.get("/api/v1/adapters/alice/ticket-summarizer/").json()["files"]
    weights = next(f for f in weights if f["filename"] == "adapter_model.safetensors")
    assert api.delete("/api/v1/adapters/alice/ticket-summarizer/").status_code == 204
    two_hours_ago = timezone.now() - timedelta(hours=2)
    Blob.objects.update(created_at=two_hours_ago, claimed_at=two_hours_ago)  # orphans for two hours

    path = Path(entry["files"][1])
    put_blob(path, weights["sha256"], path.stat().st_size)  # a new upload of the same bytes claims them
    removed = sweep_orphan_blobs(grace=timedelta(hours=1))  # ...and the sweep runs before its rows commit

    assert removed >= 1  # the other orphans went
    assert Blob.objects.filter(sha256=weights["sha256"]).exists()
    assert blob_storage().exists(Blob(sha256=weights["sha256"], size=0).storage_key)
