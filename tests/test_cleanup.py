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


def test_the_scratch_sweep_removes_what_killed_work_left_and_keeps_work_in_flight(settings, tmp_path):
    """Entries of the scratch folder idle for the grace period go (a merge's folder, an upload's
    file); a folder with one file still being written stays, however old the folder itself is."""
    import os
    import time

    from hub.services.cleanup import sweep_stale_scratch

    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
    settings.QUIVER_ORPHAN_GRACE_SECONDS = 3600
    long_ago = time.time() - 2 * 3600

    def aged(path: Path) -> Path:
        os.utime(path, (long_ago, long_ago))
        return path

    killed_merge = tmp_path / "merge-killed"
    (killed_merge / "sub").mkdir(parents=True)
    for file in (killed_merge / ".model.safetensors.abc.partial", killed_merge / "sub" / "config.json"):
        file.write_bytes(b"half")
        aged(file)
    aged(killed_merge / "sub")
    aged(killed_merge)
    killed_upload = tmp_path / "upload-killed.upload"
    killed_upload.write_bytes(b"part")
    aged(killed_upload)
    running_merge = tmp_path / "merge-running"
    running_merge.mkdir()
    (running_merge / "model.safetensors").write_bytes(b"being written")  # modified just now
    aged(running_merge)
    fresh_upload = tmp_path / "upload-fresh.upload"
    fresh_upload.write_bytes(b"streaming")

    assert sweep_stale_scratch() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge-running", "upload-fresh.upload"]
    assert not killed_upload.exists() and not killed_merge.exists()
    assert sweep_stale_scratch(older_than=timedelta(0)) == 2  # everything, once idle for no time at all
