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
                    "secret_key": "test", "region_name": "us-east-1", "file_overwrite": True, "default_acl": None,
                    "signature_version": "s3v4"},
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


def _redirected(response, endpoint: str) -> str:
    """The presigned URL a download answered with: the file's object in the bucket at `endpoint`."""
    assert response.status_code == 302, getattr(response, "content", b"")[:300]
    location = response.headers["Location"]  # a Django test response or a requests one
    assert location.startswith(f"{endpoint}/quiver-test/sha256/") and "X-Amz-Signature=" in location, location
    return location


@pytest.mark.django_db
def test_downloads_on_s3_redirect_to_a_presigned_url_once_authorised(s3_storage, settings, demo_bases, demo_adapter,
                                                                    make_user, client_for):
    """With redirects on, the hub authorises a download and answers 302 to a short-lived URL of the
    object, so the bytes never pass through a web worker: Range goes to S3, the file keeps its name,
    outsiders get the same 404 as before, the URL is signed for the endpoint clients use, with its lifetime."""
    from urllib.parse import parse_qs, urlsplit

    import requests

    from tests.conftest import upload_payload

    settings.QUIVER_S3_DOWNLOAD_REDIRECTS = True
    entry = demo_adapter("ticket-summarizer")
    api = client_for(make_user("alice"))
    response = api.post("/api/v1/adapters/", upload_payload(entry, visibility="private"), format="multipart")
    assert response.status_code == 201, response.json()
    sha256 = {f["filename"]: f for f in response.json()["files"]}["adapter_model.safetensors"]["sha256"]
    weights = Path(entry["files"][1]).read_bytes()
    url = "/api/v1/adapters/alice/ticket-summarizer/files/adapter_model.safetensors"

    answer = api.get(url)
    fetched = requests.get(_redirected(answer, s3_storage), timeout=30)
    assert answer["ETag"] == f'"{sha256}"'  # the hub's answer still names the content
    assert fetched.status_code == 200 and fetched.content == weights
    assert 'filename="adapter_model.safetensors"' in fetched.headers["Content-Disposition"]
    ranged = api.get(url, HTTP_RANGE="bytes=100-4195")
    part = requests.get(_redirected(ranged, s3_storage), headers={"Range": "bytes=100-4195"}, timeout=30)
    assert part.status_code == 206 and part.content == weights[100:4196]
    assert api.get(url, HTTP_IF_NONE_MATCH=f'"{sha256}"').status_code == 304  # answered by the hub
    for outsider in (client_for(None), client_for(make_user("bob"))):
        refused = outsider.get(url)
        assert refused.status_code == 404 and not refused.has_header("Location")

    public = s3_storage.replace("127.0.0.1", "localhost")  # the endpoint as clients reach it
    settings.QUIVER_S3_PUBLIC_ENDPOINT_URL = public
    assert requests.get(_redirected(api.get(url), public), timeout=30).content == weights
    # moto checks neither signatures nor expiry (S3 does): the lifetime is checked where it is set.
    settings.QUIVER_S3_REDIRECT_SECONDS = 60
    signed = parse_qs(urlsplit(_redirected(api.get(url), public)).query)
    assert signed["X-Amz-Expires"] == ["60"] and signed["X-Amz-SignedHeaders"] == ["host"]

    settings.QUIVER_S3_DOWNLOAD_REDIRECTS = False  # streamed through the hub, as with local storage
    assert b"".join(api.get(url).streaming_content) == weights


@pytest.mark.django_db(transaction=True)
def test_hub_clients_follow_the_redirect_with_the_linked_etag_and_size(s3_storage, settings, live_hub, tmp_path):
    """huggingface_hub, in its own process, reads X-Linked-Etag / X-Linked-Size from the 302 (as from
    huggingface.co's redirect to its CDN), then fetches the bytes from S3 without the hub."""
    import requests

    from tests.test_hf_compat import run_hf_client

    settings.QUIVER_S3_DOWNLOAD_REDIRECTS = True
    api = requests.get(f"{live_hub}/api/v1/adapters/quiver-demo/ticket-summarizer/", timeout=30).json()
    listed = {f["filename"]: f for f in api["files"]}["adapter_model.safetensors"]
    head = requests.head(f"{live_hub}/quiver-demo/ticket-summarizer/resolve/main/adapter_model.safetensors",
                         timeout=30)
    _redirected(head, s3_storage)
    assert head.headers["X-Linked-Etag"] == f'"{listed["sha256"]}"'
    assert int(head.headers["X-Linked-Size"]) == listed["size"] and head.headers["X-Repo-Commit"]

    out = run_hf_client("""
        from huggingface_hub import hf_hub_download, snapshot_download
        path = hf_hub_download("quiver-demo/ticket-summarizer", "adapter_model.safetensors", cache_dir=args["cache"])
        folder = snapshot_download("quiver-demo/ticket-summarizer", cache_dir=args["cache"] + "/snapshot")
        digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
        print(json.dumps({"file": digest(path), "snapshot": sorted(p.name for p in Path(folder).iterdir())}))
    """, live_hub, tmp_path, {"cache": str(tmp_path / "cache")})
    assert out["file"] == listed["sha256"]
    assert out["snapshot"] == sorted(f["filename"] for f in api["files"])
