"""Orphan sweep: blob storage and the database never disagree for long.

Blobs are placed before the rows that name them commit, so a failed or
interrupted upload (or a merge whose worker was killed) can leave a blob (and
its Blob row) that nothing references; deleting an adapter leaves its blobs too.
The sweep removes blobs that no row references once their last claim
(hub.blobs.put_blob) is older than a grace period, so an upload in flight, whose
rows are not committed yet, is never touched.

Stored merges are caches (their recipe makes them again on request): retention removes those
unused for QUIVER_MERGE_RETENTION_DAYS, and the least recently used past QUIVER_MERGE_STORAGE_BYTES;
their blobs then go with the orphan sweep.

The scratch sweep does the same for the scratch folder (QUIVER_UPLOAD_TMP): what a killed process
left there, e.g. a half-streamed upload or a half-written merged checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Sum
from django.utils import timezone

from hub.blobs import blob_storage
from hub.models import BaseModelFile, Blob, EncoderArtifact, MergedCheckpoint, MergedFile, RevisionFile

logger = logging.getLogger(__name__)


def unreferenced_blobs(older_than: timedelta):
    referenced = [Exists(model.objects.filter(blob=OuterRef("pk"))) for model in (RevisionFile, BaseModelFile, MergedFile)]
    referenced.append(Exists(EncoderArtifact.objects.filter(weights=OuterRef("pk"))))
    blobs = Blob.objects.filter(claimed_at__lt=timezone.now() - older_than)
    for condition in referenced:
        blobs = blobs.exclude(condition)
    return blobs


def sweep_orphan_blobs(*, grace: timedelta | None = None) -> int:
    """Delete unreferenced blobs unclaimed for `grace`: each under its row lock, the stored bytes
    then the row. A blob that a writer holds (a claim in progress, or an uncommitted row that
    references it, which locks it too) is skipped; the row is re-checked under the lock."""
    grace = grace if grace is not None else timedelta(seconds=settings.QUIVER_ORPHAN_GRACE_SECONDS)
    storage = blob_storage()
    removed = 0
    for sha256 in list(unreferenced_blobs(grace).values_list("pk", flat=True)):
        with transaction.atomic():
            blob = unreferenced_blobs(grace).select_for_update(skip_locked=True).filter(pk=sha256).first()
            if blob is None:  # claimed or referenced meanwhile
                continue
            storage.delete(blob.storage_key)
            blob.delete()
            removed += 1
    if removed:
        logger.info("removed %d orphan blobs", removed)
    return removed


# Neither the retention period nor the storage cap removes a merge used this recently: whoever just
# made it, asked for it or started downloading it gets to finish.
MERGE_RECENT_USE = timedelta(hours=1)


def expire_merged_checkpoints(*, retention: timedelta | None = None, storage_bytes: int | None = None) -> dict:
    """Remove stored merges unused for `retention` (default QUIVER_MERGE_RETENTION_DAYS; 0: none),
    then, while the stored merges' bytes exceed `storage_bytes` (default QUIVER_MERGE_STORAGE_BYTES;
    0: no cap), the least recently used. Each goes under its row lock, its last use read again
    there: a merge used meanwhile (mark_merge_used) stays."""
    if retention is None:
        retention = timedelta(days=settings.QUIVER_MERGE_RETENTION_DAYS)
    storage_bytes = settings.QUIVER_MERGE_STORAGE_BYTES if storage_bytes is None else storage_bytes
    now = timezone.now()
    removed = {"expired": 0, "evicted": 0, "bytes": 0}

    def remove(checkpoint_id: int, last_used_at, reason: str) -> int:
        """The bytes removed: 0 when the merge was used, removed or locked meanwhile."""
        with transaction.atomic():
            checkpoint = MergedCheckpoint.objects.select_for_update(skip_locked=True).filter(
                pk=checkpoint_id, last_used_at=last_used_at).first()
            if checkpoint is None:
                return 0
            checkpoint.delete()
        removed[reason] += 1
        removed["bytes"] += checkpoint.size
        return checkpoint.size

    recent = now - MERGE_RECENT_USE
    if retention > timedelta(0):
        cutoff = min(now - retention, recent)
        for checkpoint_id, last_used_at in MergedCheckpoint.objects.filter(
                last_used_at__lt=cutoff).values_list("pk", "last_used_at"):
            remove(checkpoint_id, last_used_at, "expired")
    if storage_bytes > 0:
        stored = MergedCheckpoint.objects.aggregate(total=Sum("size"))["total"] or 0
        oldest_first = MergedCheckpoint.objects.filter(last_used_at__lt=recent).order_by("last_used_at", "pk")
        for checkpoint_id, last_used_at in oldest_first.values_list("pk", "last_used_at").iterator():
            if stored <= storage_bytes:
                break
            stored -= remove(checkpoint_id, last_used_at, "evicted")
    if removed["expired"] or removed["evicted"]:
        logger.info("removed stored merges: %s", removed)
    return removed


def sweep_stale_scratch(*, older_than: timedelta | None = None) -> int:
    """Remove the entries of the scratch folder (settings.FILE_UPLOAD_TEMP_DIR) in which nothing was
    modified for `older_than` (default: the orphan grace period, longer than the longest job):
    uploads stream there, merges write their checkpoint there (`merge-*`), and a process killed
    midway (web or worker) leaves them behind. A file being written is modified all the time, so
    work in flight, of this machine or of another one sharing the folder, is never touched."""
    older_than = older_than if older_than is not None else timedelta(seconds=settings.QUIVER_ORPHAN_GRACE_SECONDS)
    cutoff = time.time() - older_than.total_seconds()
    removed = 0
    for entry in Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir():
        try:
            if _last_modified(entry) >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:  # finished (renamed into blob storage) or removed meanwhile
            continue
    if removed:
        logger.info("removed %d stale scratch entries", removed)
    return removed


def _last_modified(entry: Path) -> float:
    """The newest mtime of `entry` and, for a folder, of everything in it."""
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for folder, _, names in os.walk(entry):
            for name in names:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest
