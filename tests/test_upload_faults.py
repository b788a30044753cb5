"""Uploads under faults, against a real HTTP server: a client that disconnects mid-upload leaves
nothing; concurrent uploads of the same bytes store one blob."""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from tests.conftest import stored_state

pytestmark = pytest.mark.django_db(transaction=True)


def _upload_request(url: str, token: str, entry: dict, name: str) -> requests.PreparedRequest:
    files = [("files", (Path(p).name, Path(p).read_bytes())) for p in entry["files"]]
    data = {"namespace": "alice", "name": name, "base_model": entry["base_model"]}
    return requests.Request("POST", url + "/api/v1/adapters/", files=files, data=data,
                            headers={"Authorization": f"Token {token}"}).prepare()


def test_a_client_that_disconnects_mid_upload_leaves_nothing(live_server, demo_bases, demo_adapter, make_user):
    from hub.services.accounts import create_api_token

    token = create_api_token(make_user("alice"))
    prepared = _upload_request(live_server.url, token, demo_adapter("ticket-summarizer"), "cut-off")
    before = stored_state()
    address = urlparse(live_server.url)
    head = "".join(f"{key}: {value}\r\n" for key, value in prepared.headers.items())
    with socket.create_connection((address.hostname, address.port)) as conn:
        conn.sendall(f"POST /api/v1/adapters/ HTTP/1.1\r\nHost: {address.netloc}\r\n{head}\r\n".encode())
        conn.sendall(prepared.body[: len(prepared.body) * 2 // 3])  # the weights are cut off mid-file
        time.sleep(0.5)  # the server has started streaming the parts to temporary files
    # The connection is gone; give the server time to notice and to clean up.
    deadline = time.monotonic() + 10
    while stored_state() != before and time.monotonic() < deadline:
        time.sleep(0.2)

    assert stored_state() == before  # no rows, no blobs, no temporary upload files
    assert requests.get(live_server.url + "/api/v1/adapters/alice/cut-off/").status_code == 404


def test_concurrent_uploads_of_the_same_bytes_store_one_blob(live_server, demo_bases, demo_adapter, make_user):
    from django.conf import settings

    from hub.models import Blob, RevisionFile
    from hub.services.accounts import create_api_token

    token = create_api_token(make_user("alice"))
    entry = demo_adapter("ticket-summarizer")
    names = [f"copy-{i}" for i in range(4)]
    barrier = threading.Barrier(len(names))
    responses = {}

    def upload(name):
        prepared = _upload_request(live_server.url, token, entry, name)
        with requests.Session() as session:
            barrier.wait()
            responses[name] = session.send(prepared, timeout=120)

    threads = [threading.Thread(target=upload, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {name: r.status_code for name, r in responses.items()} == {name: 201 for name in names}
    shas = {f["sha256"] for r in responses.values() for f in r.json()["files"]}
    assert len(shas) == len(entry["files"])  # every copy names the same blobs
    for sha in shas:
        assert Blob.objects.filter(sha256=sha).count() == 1
        assert RevisionFile.objects.filter(blob_id=sha).count() == len(names)
        stored = list(Path(settings.BLOB_ROOT).rglob(sha))
        assert len(stored) == 1  # one stored object, whole
        assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == sha
    for name in names:
        download = requests.get(f"{live_server.url}/api/v1/adapters/alice/{name}/files/adapter_model.safetensors")
        assert download.content == Path(entry["files"][1]).read_bytes()
