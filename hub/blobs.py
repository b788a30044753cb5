"""Content-addressed blob storage through Django's storage API.

Local files by default, S3 (django-storages) when QUIVER_S3_* is set. A blob's
key is derived from its sha256, so storing the same bytes twice is idempotent
and a half-written file is never visible under a real key: local storage
renames a completed temporary file into place; S3 makes an object visible
only once its upload completes.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import transaction
from django.utils import timezone
from storages.backends.s3 import S3Storage

from hub.models import Blob, blob_key

READ_CHUNK = 1 * 2**20


def blob_storage():
    return storages["blobs"]


def blob_download_url(sha256: str, filename: str) -> str | None:
    """A presigned URL from which a client fetches the blob's bytes straight from S3 (valid for
    QUIVER_S3_REDIRECT_SECONDS, signed for QUIVER_S3_PUBLIC_ENDPOINT_URL when set; the response
    names the file), or None where downloads stream through the hub (local storage, redirects off)."""
    storage = blob_storage()
    if not settings.QUIVER_S3_DOWNLOAD_REDIRECTS or not isinstance(storage, S3Storage):
        return None
    if settings.QUIVER_S3_PUBLIC_ENDPOINT_URL:
        storage = _signing_storage(settings.QUIVER_S3_PUBLIC_ENDPOINT_URL,
                                   json.dumps(settings.STORAGES["blobs"]["OPTIONS"], sort_keys=True))
    return storage.url(blob_key(sha256), expire=settings.QUIVER_S3_REDIRECT_SECONDS,
                       parameters={"ResponseContentDisposition": f'attachment; filename="{filename}"'})


@functools.lru_cache(maxsize=4)
def _signing_storage(public_endpoint: str, options: str) -> S3Storage:
    """The blob storage as clients address it: a signature covers the endpoint's host. Kept, as its
    boto3 client costs milliseconds to make, and signing is local (no request to S3)."""
    return S3Storage(**{**json.loads(options), "endpoint_url": public_endpoint})


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
    place; remote blobs come from this machine's blob cache (`_cached_blob`),
    filled on a miss, or, where the cache is off or the blob larger than it, are
    downloaded to a scratch folder removed afterwards."""
    paths: dict[str, Path] = {}
    with ExitStack() as stack:
        scratch: Path | None = None
        for filename, sha256 in files.items():
            local = local_blob_path(sha256) or stack.enter_context(_cached_blob(sha256))
            if local is None:
                if scratch is None:
                    scratch = Path(stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="blobs-", dir=settings.FILE_UPLOAD_TEMP_DIR)))
                local = scratch / sha256
                _download(sha256, local)
            paths[filename] = local
        yield paths


# A worker-local cache of remote blobs (settings.QUIVER_BLOB_CACHE_DIR, at most
# QUIVER_BLOB_CACHE_BYTES). Why: a merge reads the whole base model, and on S3 that was a
# download per job (14 GB for a 7B base, about 70 s at 200 MB/s: half of a 7B merge's time in
# docs/scaling.md), although most merges use one of a few popular bases. Blobs are named by their
# sha256, so a cached copy never goes stale; it is checked against that sha256 as it is downloaded.
#
# Processes on one machine share the cache through flock(2): a blob is filled under the lock of
# its stripe (so two jobs needing one base download it once), and a reader holds a shared lock on
# the cached file while it uses the path; eviction (least recently used first, by mtime, which each
# use renews) takes the stripe lock and then an exclusive lock without waiting, so a file in use is
# never removed.
_CACHE_LOCK_STRIPES = 64
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")  # a cached blob; other names: .locks/, .partial-* downloads


@contextmanager
def _cached_blob(sha256: str) -> Iterator[Path | None]:
    """The cached copy of remote blob `sha256`, held against eviction while the context lasts;
    None where the cache is off or the blob is larger than it."""
    limit = settings.QUIVER_BLOB_CACHE_BYTES
    size = Blob.objects.filter(pk=sha256).values_list("size", flat=True).first()
    if limit <= 0 or size is None or size > limit:
        yield None
        return
    cache = Path(settings.QUIVER_BLOB_CACHE_DIR)
    path = cache / sha256
    with _stripe_lock(cache, sha256):
        if not path.exists():
            _download(sha256, path)
        handle = open(path, "rb")  # its shared lock keeps eviction away until the context ends
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
            os.utime(path)  # recently used: evicted last
        except BaseException:
            handle.close()
            raise
    try:
        _evict(cache, limit)
        yield path
    finally:
        handle.close()


@contextmanager
def _stripe_lock(cache: Path, sha256: str, *, wait: bool = True) -> Iterator[bool]:
    """The lock of `sha256`'s stripe, held for the context; yields False (not held) where `wait`
    is False and another process or thread holds it."""
    locks = cache / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    # A fixed set of lock files, never removed: a removed lock file and a new one of the same name
    # would be two locks.
    with open(locks / f"{int(sha256[:8], 16) % _CACHE_LOCK_STRIPES:02d}", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _download(sha256: str, target: Path) -> None:
    """Blob `sha256` from storage to `target`, whole or not at all (a temporary file beside it,
    renamed), refused if its bytes do not hash to its name."""
    partial = target.with_name(f".partial-{target.name}-{os.getpid()}")
    hasher = hashlib.sha256()
    try:
        with open_blob(sha256) as source, open(partial, "wb") as out:
            for chunk in iter(lambda: source.read(READ_CHUNK), b""):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != sha256:
            raise OSError(f"blob {sha256} read back from storage with sha256 {hasher.hexdigest()}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _evict(cache: Path, limit: int) -> None:
    """Remove the least recently used cached blobs not in use until the cache holds at most
    `limit` bytes; and partial downloads a killed process left (older than the orphan grace)."""
    entries = []
    stale_before = time.time() - settings.QUIVER_ORPHAN_GRACE_SECONDS
    for entry in cache.iterdir():
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        if _SHA256_NAME.fullmatch(entry.name):
            entries.append((stat.st_mtime, stat.st_size, entry))
        elif entry.name.startswith(".partial-") and stat.st_mtime < stale_before:
            entry.unlink(missing_ok=True)
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries):
        if total <= limit:
            return
        # Never waits: a stripe held by a download, or a file held by a reader, is skipped.
        with _stripe_lock(cache, entry.name, wait=False) as held:
            if held and _unlink_unless_in_use(entry):
                total -= size


def _unlink_unless_in_use(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            return True
    except (BlockingIOError, FileNotFoundError):  # a reader holds it; removed meanwhile
        return False
