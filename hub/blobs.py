"""Content-addressed blob storage through Django's storage API.

Local files by default, S3 (django-storages) when QUIVER_S3_* is set. A blob's
key is derived from its sha256, so storing the same bytes twice is idempotent
and a half-written file is never visible under a real key: local storage
renames a completed temporary file into place; S3 makes an object visible
only once its upload completes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import transaction
from django.utils import timezone

from hub.models import Blob, blob_key

READ_CHUNK = 1 * 2**20


def blob_storage():
    return storages["blobs"]


def put_blob(path: Path, sha256: str, size: int, *, move: bool = False) -> Blob:
    """Claim the Blob row, then make sure its bytes are in storage; rows that reference the blob
    commit after this returns, so they never name missing bytes.

    The claim (row locked, claimed_at = now) and the orphan sweep's delete (same row, locked) exclude
    each other: either the sweep finished first and the bytes are written again here, or the claim
    is recent and the sweep leaves the blob alone. Concurrent writers of the same bytes share one
    row and one stored object.

    `move`: the file is a disposable temporary file that local storage may
    rename into place (no second write of a multi-GB upload)."""
    with transaction.atomic():
        blob, created = Blob.objects.select_for_update().get_or_create(sha256=sha256, defaults={"size": size})
        if not created:
            Blob.objects.filter(pk=sha256).update(claimed_at=timezone.now())
    storage = blob_storage()
    key = blob_key(sha256)
    if not storage.exists(key):
        with _renamable_copy(path, move, storage) as (source, disposable):
            with open(source, "rb") as handle:
                content = _TemporaryFile(handle, source) if disposable else File(handle, name=source.name)
                stored_key = storage.save(key, content)
        if stored_key != key:  # a storage that renames would break content addressing
            raise RuntimeError(f"storage stored {key} as {stored_key}")
    return blob


@contextmanager
def _renamable_copy(path: Path, move: bool, storage):
    """Local storage writes a non-temporary file in place under its final name, where a reader (or a
    second writer of the same bytes) could see it half-written: copy it to a temporary file on the
    same volume first, so it is renamed into place whole."""
    if move or not hasattr(storage, "location"):
        yield path, move
        return
    with tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="blob-", delete=False) as copy:
        with open(path, "rb") as source:
            shutil.copyfileobj(source, copy, READ_CHUNK)
    try:
        yield Path(copy.name), True
    finally:
        Path(copy.name).unlink(missing_ok=True)  # gone already when it was renamed into place


class _TemporaryFile(File):
    """Lets FileSystemStorage move the file into place instead of copying it."""

    def __init__(self, handle, path: Path):
        super().__init__(handle, name=path.name)
        self._path = str(path)

    def temporary_file_path(self) -> str:
        return self._path


def manifest_commit(files: Iterable[tuple[str, str]]) -> str:
    """A git-like 40-hex id of a set of (filename, sha256): what Hub-style clients call the commit
    of an adapter revision, a base model or a merged checkpoint."""
    manifest = json.dumps(sorted(files), separators=(",", ":")).encode()
    return hashlib.sha1(manifest, usedforsecurity=False).hexdigest()


def open_blob(sha256: str):
    return blob_storage().open(blob_key(sha256), "rb")


def iter_blob_range(sha256: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes start..end (inclusive) of a blob, streamed in chunks."""
    storage = blob_storage()
    bucket = getattr(storage, "bucket", None)
    if bucket is not None:
        # S3: a ranged GET streams only the asked bytes instead of spooling the object.
        body = bucket.Object(storage._normalize_name(blob_key(sha256))).get(Range=f"bytes={start}-{end}")["Body"]
        yield from body.iter_chunks(READ_CHUNK)
        return
    with storage.open(blob_key(sha256), "rb") as handle:
        handle.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = handle.read(min(READ_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def local_blob_path(sha256: str) -> Path | None:
    """A filesystem path for a blob when storage is local (workers read tensors with mmap)."""
    storage = blob_storage()
    try:
        return Path(storage.path(blob_key(sha256)))
    except NotImplementedError:
        return None


@contextmanager
def blobs_on_disk(files: dict[str, str]) -> Iterator[dict[str, Path]]:
    """filename → a local path holding that blob's bytes (sha256 given), for
    readers that need a real file (safetensors mmap). Local storage is used in
    place; remote blobs are downloaded to a temporary folder removed afterwards."""
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="quiver-blobs-") as scratch:
        for filename, sha256 in files.items():
            local = local_blob_path(sha256)
            if local is None:
                local = Path(scratch) / sha256
                with open_blob(sha256) as source, open(local, "wb") as target:
                    shutil.copyfileobj(source, target, READ_CHUNK)
            paths[filename] = local
        yield paths
