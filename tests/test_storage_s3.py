"""Blob storage on S3 through django-storages, against moto's server mode: a real
S3 HTTP API on loopback (no in-process mocking of boto3)."""
from __future__ import annotations

import hashlib

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
def s3_storage(s3_server, settings):
    storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {"bucket_name": "quiver-test", "endpoint_url": s3_server, "access_key": "test",
                    "secret_key": "test", "region_name": "us-east-1", "file_overwrite": True, "default_acl": None},
    }
    with override_settings(STORAGES={**settings.STORAGES, "blobs": storage}):
        yield s3_server


def _s3_object(endpoint: str, sha256: str) -> bytes:
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    return client.get_object(Bucket="quiver-test", Key=blob_key(sha256))["Body"].read()


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
