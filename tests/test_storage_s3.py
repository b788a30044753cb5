"""Blob storage on S3 through django-storages, against moto's server mode: a real
S3 HTTP API on loopback (no in-process mocking of boto3)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest
from django.test import override_settings

from hub.blobs import blobs_on_disk, iter_blob_range, put_blob
from hub.models import Blob, blob_key


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="quiver-test")
    yield endpoint
    server.stop()


@pytest.fixture
def s3_storage(s3_server, settings, tmp_path):
    settings.QUIVER_BLOB_CACHE_DIR = tmp_path / "blob-cache"
    storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {"bucket_name": "quiver-test", "endpoint_url": s3_server, "access_key": "test",
                    "secret_key": "test", "region_name": "us-east-1", "file_overwrite": True, "default_acl": None},
    }
    with override_settings(STORAGES={**settings.STORAGES, "blobs": storage}):
        yield s3_server


def _s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1")


def _s3_object(endpoint: str, sha256: str) -> bytes:
    return _s3_client(endpoint).get_object(Bucket="quiver-test", Key=blob_key(sha256))["Body"].read()


def _stored(tmp_path, payload: bytes) -> str:
    """`payload` put into blob storage as a blob; its sha256."""
    path = tmp_path / f"payload-{len(payload)}.bin"
    path.write_bytes(payload)
    sha256 = hashlib.sha256(payload).hexdigest()
    put_blob(path, sha256, len(payload))
    return sha256


@pytest.mark.django_db
def test_put_blob_on_s3_is_content_addressed_and_ranged_reads_stream(s3_storage, tmp_path):
    payload = bytes(range(256)) * 4096 + b"tail"
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    sha256 = hashlib.sha256(payload).hexdigest()

    blob = put_blob(path, sha256, len(payload), move=True)
    again = put_blob(path, sha256, len(payload))  # same bytes: one object, one row

    assert blob.sha256 == again.sha256 == sha256
    assert Blob.objects.filter(sha256=sha256).count() == 1
    assert _s3_object(s3_storage, sha256) == payload
    assert b"".join(iter_blob_range(sha256, 1000, 1999)) == payload[1000:2000]
    assert b"".join(iter_blob_range(sha256, len(payload) - 4, len(payload) - 1)) == b"tail"
    with blobs_on_disk({"payload.bin": sha256}) as paths:
        assert paths["payload.bin"].read_bytes() == payload


@pytest.mark.django_db
def test_adapter_upload_and_ranged_download_through_the_api_on_s3(s3_storage, demo_bases, demo_adapter, make_user,
                                                                   client_for):
    from pathlib import Path

    from tests.conftest import upload_payload

    entry = demo_adapter("ticket-summarizer")
    api = client_for(make_user("alice"))
    response = api.post("/api/v1/adapters/", upload_payload(entry), format="multipart")
    assert response.status_code == 201, response.json()
    weights = Path(entry["files"][1]).read_bytes()
    listed = {f["filename"]: f for f in response.json()["files"]}["adapter_model.safetensors"]

    assert _s3_object(s3_storage, listed["sha256"]) == weights  # the bytes live in the bucket
    url = "/api/v1/adapters/alice/ticket-summarizer/files/adapter_model.safetensors"
    whole = b"".join(api.get(url).streaming_content)
    part = api.get(url, HTTP_RANGE="bytes=100-4195")
    assert whole == weights
    assert part.status_code == 206 and b"".join(part.streaming_content) == weights[100:4196]


@pytest.mark.django_db
def test_remote_blobs_are_read_from_the_machine_cache_once_downloaded(s3_storage, settings, tmp_path):
    """The second read of a blob does not go to S3: with its object gone from the bucket, the
    cached copy still serves it; with the cache off it is downloaded each time."""
    payload = bytes(range(256)) * 1000
    sha256 = _stored(tmp_path, payload)
    with blobs_on_disk({"weights.safetensors": sha256}) as paths:
        assert paths["weights.safetensors"] == settings.QUIVER_BLOB_CACHE_DIR / sha256
        assert paths["weights.safetensors"].read_bytes() == payload
    _s3_client(s3_storage).delete_object(Bucket="quiver-test", Key=blob_key(sha256))
    with blobs_on_disk({"weights.safetensors": sha256}) as paths:
        assert paths["weights.safetensors"].read_bytes() == payload

    settings.QUIVER_BLOB_CACHE_BYTES = 0  # off: straight from storage, where the object is gone now
    with pytest.raises(FileNotFoundError, match=sha256), blobs_on_disk({"weights.safetensors": sha256}):
        pass
    assert not list(Path(settings.FILE_UPLOAD_TEMP_DIR).glob("blobs-*"))  # its scratch folder went with it


@pytest.mark.django_db
def test_the_cache_evicts_the_least_recently_used_blob_that_no_reader_holds(s3_storage, settings, tmp_path):
    blobs = [_stored(tmp_path, bytes([i]) * 10_000) for i in range(4)]
    settings.QUIVER_BLOB_CACHE_BYTES = 25_000  # two blobs and a half
    cache = settings.QUIVER_BLOB_CACHE_DIR
    with blobs_on_disk({"held": blobs[0]}) as held:  # the oldest, but in use throughout
        with blobs_on_disk({"b": blobs[1]}):
            pass
        with blobs_on_disk({"c": blobs[2]}):  # over the limit: b goes, the held one stays
            pass
        assert sorted(p.name for p in cache.glob("[0-9a-f]*")) == sorted([blobs[0], blobs[2]])
        assert held["held"].read_bytes() == bytes([0]) * 10_000
    with blobs_on_disk({"d": blobs[3]}):  # the held one is free now and least recently used
        pass
    assert sorted(p.name for p in cache.glob("[0-9a-f]*")) == sorted([blobs[2], blobs[3]])
    with blobs_on_disk({"big": _stored(tmp_path, bytes(30_000))}) as paths:  # larger than the cache: not cached
        assert paths["big"].parent != cache and paths["big"].read_bytes() == bytes(30_000)


@pytest.mark.django_db
def test_a_blob_whose_bytes_do_not_match_its_name_is_refused_and_not_cached(s3_storage, settings, tmp_path):
    sha256 = _stored(tmp_path, b"the real bytes")
    _s3_client(s3_storage).put_object(Bucket="quiver-test", Key=blob_key(sha256), Body=b"other bytes")
    with pytest.raises(OSError, match="read back from storage with sha256"), blobs_on_disk({"f": sha256}):
        pass
    assert [p.name for p in settings.QUIVER_BLOB_CACHE_DIR.iterdir()] == [".locks"]  # no file, no partial


@pytest.mark.django_db(transaction=True)  # the threads' own connections see the blob's row
def test_jobs_that_need_one_uncached_blob_at_once_download_it_once(s3_storage, settings, tmp_path, monkeypatch):
    import threading

    from django.db import connection

    from hub import blobs

    payload = b"base model shard " * 50_000
    sha256 = _stored(tmp_path, payload)
    downloads = []
    real_download = blobs._download
    monkeypatch.setattr(blobs, "_download", lambda *args: downloads.append(args) or real_download(*args))
    read, start = [], threading.Barrier(4)

    def job():
        try:
            start.wait()
            with blobs_on_disk({"model.safetensors": sha256}) as paths:
                read.append(paths["model.safetensors"].read_bytes() == payload)
        finally:
            connection.close()

    threads = [threading.Thread(target=job) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert read == [True] * 4
    assert len(downloads) == 1  # the others waited on its stripe lock, then found it cached
