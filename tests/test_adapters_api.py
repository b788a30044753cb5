"""Adapter registry through the REST API, on real PEFT / kohya / diffusers files."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.conftest import stored_state, upload_payload

pytestmark = pytest.mark.django_db

FORMAT_CASES = [
    ("ticket-summarizer", "peft", {"rank": 4, "alpha": 8.0}),
    ("contract-plain-language-rslora", "peft", {"use_rslora": True}),
    ("recipe-steps-dora", "peft", {"use_dora": True}),
    ("code-review-comments", "peft", {}),  # rank_pattern
    ("product-search-minilm", "peft", {"target_modules": ["query", "value"]}),
    ("watercolor-style-kohya", "kohya", {}),
    ("pixel-art-diffusers", "diffusers", {}),
]


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.mark.parametrize("name, expected_format, expected", FORMAT_CASES)
def test_upload_round_trip_keeps_bytes_and_reads_metadata(name, expected_format, expected, demo_bases, demo_adapter,
                                                          alice, client_for):
    entry = demo_adapter(name)
    api = client_for(alice)

    response = api.post("/api/v1/adapters/", upload_payload(entry, tags="demo, Test"), format="multipart")

    assert response.status_code == 201, response.json()
    adapter = response.json()
    assert adapter["namespace"] == "alice" and adapter["name"] == name
    assert adapter["format"] == expected_format and adapter["peft_type"] == "LORA"
    assert adapter["base_model"] == entry["base_model"]
    assert adapter["revision"] == 1 and len(adapter["commit"]) == 40
    assert adapter["tags"] == ["demo", "test"]
    for key, value in expected.items():
        assert adapter[key] == value, key
    assert adapter["parameter_count"] > 0 and adapter["target_modules"]
    originals = {Path(p).name: Path(p).read_bytes() for p in entry["files"]}
    assert {f["filename"] for f in adapter["files"]} == set(originals)
    for listed in adapter["files"]:
        assert listed["sha256"] == sha256_of(originals[listed["filename"]])
        assert listed["size"] == len(originals[listed["filename"]])
        download = api.get(f"/api/v1/adapters/alice/{name}/files/{listed['filename']}")
        assert download.status_code == 200
        assert download["ETag"] == f'"{listed["sha256"]}"'
        assert sha256_of(body(download)) == listed["sha256"]


def test_rank_pattern_and_module_shapes_are_reported(demo_bases, demo_adapter, alice, client_for):
    api = client_for(alice)
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("code-review-comments")), format="multipart")
    detail = api.get("/api/v1/adapters/alice/code-review-comments/").json()
    base_shapes = demo_bases["quiver-demo/tiny-llama"].module_shapes
    for module, shape in detail["module_shapes"].items():
        assert base_shapes[module + ".weight"] == shape


def test_range_requests_and_conditional_get(demo_bases, demo_adapter, alice, client_for):
    entry = demo_adapter("ticket-summarizer")
    api = client_for(alice)
    api.post("/api/v1/adapters/", upload_payload(entry), format="multipart")
    content = Path(entry["files"][1]).read_bytes()
    url = "/api/v1/adapters/alice/ticket-summarizer/files/adapter_model.safetensors"

    partial = api.get(url, HTTP_RANGE="bytes=10-109")
    assert partial.status_code == 206
    assert body(partial) == content[10:110]
    assert partial["Content-Range"] == f"bytes 10-109/{len(content)}"
    suffix = api.get(url, HTTP_RANGE="bytes=-16")
    assert body(suffix) == content[-16:]
    assert api.get(url, HTTP_RANGE=f"bytes={len(content)}-").status_code == 416
    etag = api.get(url)["ETag"]
    assert api.get(url, HTTP_IF_NONE_MATCH=etag).status_code == 304
    head = api.head(url)
    assert head.status_code == 200 and int(head["Content-Length"]) == len(content)


def test_new_revision_keeps_old_one_downloadable(demo_bases, demo_adapter, alice, client_for):
    api = client_for(alice)
    first, second = demo_adapter("ticket-summarizer"), demo_adapter("sql-from-questions")
    api.post("/api/v1/adapters/", upload_payload(first, name="my-adapter"), format="multipart")
    response = api.post("/api/v1/adapters/", upload_payload(second, name="my-adapter"), format="multipart")

    assert response.status_code == 201
    assert response.json()["revision"] == 2
    assert response.json()["rank"] == 8
    revisions = api.get("/api/v1/adapters/alice/my-adapter/revisions/").json()
    assert [r["number"] for r in revisions] == [2, 1]
    url = "/api/v1/adapters/alice/my-adapter/files/adapter_model.safetensors"
    assert body(api.get(url + "?revision=1")) == Path(first["files"][1]).read_bytes()
    assert body(api.get(url)) == Path(second["files"][1]).read_bytes()
    assert body(api.get(url + f"?revision={revisions[1]['commit']}")) == Path(first["files"][1]).read_bytes()
    assert api.get(url + "?revision=7").status_code == 404


def test_private_adapter_is_invisible_to_others_and_anonymous(demo_bases, demo_adapter, alice, make_user, client_for):
    owner = client_for(alice)
    owner.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer"), visibility="private"),
               format="multipart")
    bob, anonymous = client_for(make_user("bob")), client_for(None)
    base = "/api/v1/adapters/alice/ticket-summarizer/"

    assert owner.get(base).status_code == 200
    assert owner.get("/api/v1/adapters/").json()["count"] == 1
    for outsider in (bob, anonymous):
        assert outsider.get(base).status_code == 404
        assert outsider.get(base + "files/adapter_model.safetensors").status_code == 404
        assert outsider.get(base + "revisions/").status_code == 404
        listing = outsider.get("/api/v1/adapters/?q=ticket").json()
        assert listing["count"] == 0 and listing["results"] == []
    # "private" reads exactly like "missing": the error does not reveal that it exists.
    hidden, missing = bob.get(base).json()["error"], bob.get("/api/v1/adapters/alice/nope/").json()["error"]
    assert hidden["code"] == missing["code"] == "adapter_not_found"
    assert hidden["message"] == missing["message"].replace("nope", "ticket-summarizer")
    assert bob.patch(base, {"description": "mine"}, format="json").status_code == 404
    assert bob.delete(base).status_code == 404


def test_filters_and_keyword_search(demo_bases, demo_adapter, alice, client_for):
    api = client_for(alice)
    for name in ("ticket-summarizer", "product-search-minilm", "watercolor-style-kohya"):
        entry = demo_adapter(name)
        api.post("/api/v1/adapters/", upload_payload(entry, tags=",".join(entry["tags"]), license=entry["license"]),
                 format="multipart")
    names = lambda response: sorted(a["name"] for a in response.json()["results"])  # noqa: E731

    assert names(api.get("/api/v1/adapters/?base_model=quiver-demo/tiny-llama")) == ["ticket-summarizer"]
    assert names(api.get("/api/v1/adapters/?format=kohya")) == ["watercolor-style-kohya"]
    tag = demo_adapter("product-search-minilm")["tags"][0]
    assert "product-search-minilm" in names(api.get(f"/api/v1/adapters/?tag={tag}"))
    assert names(api.get("/api/v1/adapters/?q=support tickets")) == ["ticket-summarizer"]
    assert names(api.get("/api/v1/adapters/?owner=alice")) == sorted(
        ["ticket-summarizer", "product-search-minilm", "watercolor-style-kohya"])
    page = api.get("/api/v1/adapters/?limit=2").json()
    assert page["count"] == 3 and len(page["results"]) == 2 and page["next"]


def test_patch_and_delete_are_owner_only(demo_bases, demo_adapter, alice, make_user, client_for):
    api = client_for(alice)
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer")), format="multipart")
    url = "/api/v1/adapters/alice/ticket-summarizer/"
    changed = api.patch(url, {"description": "Better words.", "tags": ["a", "b"]}, format="json")
    assert changed.status_code == 200 and changed.json()["description"] == "Better words."
    assert changed.json()["tags"] == ["a", "b"]
    assert api.patch(url, {"visibility": "secret"}, format="json").status_code == 400

    bob = client_for(make_user("bob"))
    assert bob.patch(url, {"description": "x"}, format="json").status_code == 403
    assert bob.delete(url).status_code == 403
    assert api.delete(url).status_code == 204
    assert api.get(url).status_code == 404


def test_writes_need_a_token_and_your_own_namespace(demo_bases, demo_adapter, alice, client_for):
    entry = demo_adapter("ticket-summarizer")
    anonymous = client_for(None).post("/api/v1/adapters/", upload_payload(entry), format="multipart")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"]
    foreign = client_for(alice).post("/api/v1/adapters/", upload_payload(entry, namespace="quiver-demo"),
                                     format="multipart")
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "namespace_forbidden"


# --- bad input: a 4xx with a JSON body naming the problem, and nothing stored --------------------

def _peft_files(entry) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in entry["files"]}


def _with_weights(entry, weights: bytes) -> dict[str, bytes]:
    return {**_peft_files(entry), "adapter_model.safetensors": weights}


def _header(content: bytes) -> tuple[int, bytes, bytes]:
    (length,) = struct.unpack("<Q", content[:8])
    return length, content[8:8 + length], content[8 + length:]


def _overlapping(content: bytes) -> bytes:
    import json

    length, raw, data = _header(content)
    header = json.loads(raw)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    if first["data_offsets"][1] - first["data_offsets"][0] == size:  # same-size tensors: make them share bytes
        second["data_offsets"] = list(first["data_offsets"])
    else:
        second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    encoded = json.dumps(header).encode().ljust(length)
    return struct.pack("<Q", len(encoded)) + encoded + data


def _with_nan(path: Path) -> bytes:
    from safetensors.torch import load_file

    tensors = {k: v.clone() for k, v in load_file(path).items()}
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    out = path.parent / "nan.safetensors.tmp"
    save_file(tensors, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _bad_uploads(entry, other_base_entry):
    weights = Path(entry["files"][1]).read_bytes()
    length, _, _ = _header(weights)
    return {
        "pickle_by_name": ({**_peft_files(entry), "adapter_model.bin": weights}, "pickle_refused"),
        "pickle_by_content": ({"adapter_config.json": _peft_files(entry)["adapter_config.json"],
                               "adapter_model.safetensors": b"\x80\x04\x95" + weights[3:]}, "pickle_refused"),
        "torch_zip": (_with_weights(entry, b"PK\x03\x04" + weights[4:]), "pickle_refused"),
        "truncated": (_with_weights(entry, weights[: len(weights) // 2]), None),
        "header_past_end": (_with_weights(entry, struct.pack("<Q", len(weights) * 4) + weights[8:]),
                            "header_out_of_bounds"),
        "oversized_header": (_with_weights(entry, struct.pack("<Q", 2**40) + weights[8:]), "header_too_large"),
        "overlapping_offsets": (_with_weights(entry, _overlapping(weights)), None),
        "nan": (_with_weights(entry, _with_nan(Path(entry["files"][1]))), "non_finite"),
        "unknown_format": ({"notes.txt": b"hello, I am not an adapter"}, "unknown_format"),
        "empty": (_with_weights(entry, b""), "empty_file"),
        "traversal": ({"..%2fevil.safetensors": weights}, "bad_filename"),
    }


BAD_CASES = ["pickle_by_name", "pickle_by_content", "torch_zip", "truncated", "header_past_end", "oversized_header",
             "overlapping_offsets", "nan", "unknown_format", "empty", "traversal"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_with_json_and_stores_nothing(case, demo_bases, demo_adapter, alice, client_for):
    from django.core.files.uploadedfile import SimpleUploadedFile

    entry = demo_adapter("ticket-summarizer")
    files, expected_code = _bad_uploads(entry, None)[case]
    before = stored_state()

    response = client_for(alice).post(
        "/api/v1/adapters/",
        {"files": [SimpleUploadedFile(n, c) for n, c in files.items()], "namespace": "alice", "name": "bad",
         "base_model": "quiver-demo/tiny-llama"},
        format="multipart",
    )

    assert 400 <= response.status_code < 500, response.content
    error = response.json()["error"]
    assert error["code"] and error["message"]
    if expected_code:
        assert error["code"] == expected_code, error
    assert stored_state() == before


def test_shape_mismatch_against_the_base_is_refused(demo_bases, demo_adapter, alice, client_for):
    before = stored_state()
    # A tiny-llama adapter declared for the MiniLM base: module shapes cannot match.
    response = client_for(alice).post(
        "/api/v1/adapters/",
        upload_payload(demo_adapter("ticket-summarizer"), base_model="quiver-demo/all-MiniLM-L6-v2"),
        format="multipart",
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "shape_mismatch"
    assert stored_state() == before


def test_unknown_base_model_is_a_field_error(demo_bases, demo_adapter, alice, client_for):
    response = client_for(alice).post(
        "/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer"), base_model="nobody/nothing"),
        format="multipart")
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "unknown_base_model", "field": "base_model",
                                        "message": response.json()["error"]["message"]}
