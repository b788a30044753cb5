"""The part of the Hugging Face Hub's HTTP API that huggingface_hub, transformers, PEFT, vLLM and
LoRAX use to read models, so that with `HF_ENDPOINT=<quiver>` they load adapters, base models and
merged checkpoints (`merges/<merge_id>`) unchanged; `HF_TOKEN` is a Quiver API token.

Every file is presented as a Git LFS file (sha256 and size known, a git object id of its pointer),
which is how the Hub presents weights: clients then use the sha256 as the cache key (ETag). Views
are thin: every read goes through hub.selectors.get_hub_repo. Uploads through this protocol are
answered with 501 and a pointer to Quiver's own upload API.
"""
from __future__ import annotations

import hashlib
from datetime import timezone

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from api.downloads import blob_download_response
from api.exceptions import error_body, json_exception_handler
from hub import selectors
from hub.errors import NotFound
from hub.services import compositions

# hub.errors codes → the X-Error-Code values huggingface_hub maps to its exceptions
# (RevisionNotFoundError, EntryNotFoundError); every other NotFound is RepoNotFound.
HUB_ERROR_CODES = {"revision_not_found": "RevisionNotFound", "file_not_found": "EntryNotFound"}
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # the Hub's words, which the client reads


def _header_text(text: str) -> str:
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode()


def hub_exception_handler(exc, context):
    """Quiver's JSON error body, plus the headers Hub clients turn into their exception types."""
    response = json_exception_handler(exc, context)
    if response is None:
        return None
    request = context["request"]
    if isinstance(exc, exceptions.AuthenticationFailed):
        response["X-Error-Message"] = INVALID_CREDENTIALS
    elif isinstance(exc, NotFound):
        code = HUB_ERROR_CODES.get(exc.code, "RepoNotFound")
        response["X-Error-Code"] = code
        response["X-Error-Message"] = _header_text(exc.message)
        if code == "RepoNotFound" and not request.user.is_authenticated:
            # The Hub answers anonymous requests for private and missing repos alike with 401.
            response.status_code = 401
        commit = getattr(context.get("view"), "commit", None)
        if commit:  # lets the client cache "this file does not exist at this commit"
            response["X-Repo-Commit"] = commit
    else:
        response["X-Error-Message"] = _header_text(response.data["error"]["message"])
    return response


class HubView(APIView):
    permission_classes = [AllowAny]  # visibility is applied by the selectors, as everywhere else
    commit: str | None = None

    def get_exception_handler(self):
        return hub_exception_handler


def _hub_datetime(value) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def lfs_entry(stored) -> dict:
    """A file as an LFS object: its git oid is that of the LFS pointer, as on the Hub."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{stored.sha256}\nsize {stored.size}\n".encode()
    oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer, usedforsecurity=False).hexdigest()
    return {"oid": oid, "lfs": {"oid": stored.sha256, "sha256": stored.sha256, "size": stored.size,
                                "pointerSize": len(pointer)}}


def model_info(repo: selectors.HubRepo) -> dict:
    siblings = []
    for stored in repo.files:
        entry = lfs_entry(stored)
        siblings.append({"rfilename": stored.filename, "size": stored.size, "blobId": entry["oid"], "lfs": entry["lfs"]})
    return {
        "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.author, "sha": repo.commit,
        "lastModified": _hub_datetime(repo.last_modified), "createdAt": _hub_datetime(repo.created_at),
        "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
        "library_name": repo.library_name, "tags": repo.tags,
        "cardData": {key: value for key, value in repo.card.items() if value not in (None, [], {})},
        "siblings": siblings, "usedStorage": sum(stored.size for stored in repo.files),
        "quiver": {"kind": repo.kind},
    }


class ModelInfoView(HubView):
    """`GET /api/models/{repo_id}` and `.../revision/{revision}`: files (siblings) and the commit (sha)."""

    @extend_schema(exclude=True)
    def get(self, request, repo_id, revision=None):
        return Response(model_info(selectors.get_hub_repo(request.user, repo_id, revision)))


class TreeView(HubView):
    """`GET /api/models/{repo_id}/tree/{revision}[/{path}]`: what snapshot_download lists (one page; repos are flat)."""

    @extend_schema(exclude=True)
    def get(self, request, repo_id, revision, path=""):
        repo = selectors.get_hub_repo(request.user, repo_id, revision)
        self.commit = repo.commit
        path = path.strip("/")
        if path and not any(stored.filename.startswith(path + "/") for stored in repo.files):
            raise NotFound("file_not_found", f"{repo.repo_id} has no folder {path!r}.")
        files = [stored for stored in repo.files if not path or stored.filename.startswith(path + "/")]
        return Response([{"type": "file", "path": stored.filename, "size": stored.size, **lfs_entry(stored)}
                         for stored in files], headers={"X-Repo-Commit": repo.commit})


class ResolveView(HubView):
    """`HEAD/GET /{repo_id}/resolve/{revision}/{filename}`: the bytes, with the commit, the sha256 ETag,
    the linked size and Range support."""

    @extend_schema(exclude=True)
    def get(self, request, repo_id, revision, filename):
        repo = selectors.get_hub_repo(request.user, repo_id, revision)
        self.commit = repo.commit
        stored = repo.file(filename)
        if repo.kind == "merge":
            merge_id = repo.repo_id.removeprefix(f"{selectors.MERGES_NAMESPACE}/")
            compositions.mark_merge_downloaded(merge_id)
        return blob_download_response(request, sha256=stored.sha256, size=stored.size, filename=filename, extra_headers={
            "X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})


class WhoAmIView(HubView):
    """`GET /api/whoami-v2`: lets `hf auth whoami` check that HF_TOKEN is a valid Quiver token."""

    @extend_schema(exclude=True)
    def get(self, request):
        if not request.user.is_authenticated:
            raise exceptions.NotAuthenticated("Pass a Quiver API token (HF_TOKEN or Authorization: Bearer <token>).")
        return Response({"type": "user", "id": str(request.user.id), "name": request.user.username,
                         "fullname": request.user.get_full_name() or request.user.username,
                         "isPro": False, "orgs": [], "auth": {"type": "access_token"}})


UPLOAD_NOT_SUPPORTED = (
    "Quiver does not accept uploads through the Hugging Face Hub protocol (create_repo, upload_file, "
    "upload_folder): every upload is validated as a whole adapter before it is stored. Upload with "
    "`quiver upload` or POST /api/v1/adapters/ (multipart)."
)


class UploadNotSupportedView(HubView):
    """create_repo, preupload, commit and LFS batch calls: a clear refusal instead of a 404."""

    @extend_schema(exclude=True)
    def post(self, request, **kwargs):
        return Response(error_body("hub_upload_not_supported", UPLOAD_NOT_SUPPORTED), status=501,
                        headers={"X-Error-Message": UPLOAD_NOT_SUPPORTED})
