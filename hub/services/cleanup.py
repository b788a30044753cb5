"""Orphan sweep: blob storage and the database never disagree for long.

Blobs are placed before the rows that name them commit, so a failed or
interrupted upload (or a merge whose worker was killed) can leave a blob (and
its Blob row) that nothing references; deleting an adapter leaves its blobs too.
The sweep removes blobs that no row references once their last claim
(hub.blobs.put_blob) is older than a grace period, so an upload in flight, whose
rows are not committed yet, is never touched.

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
from django.db.models import Exists, OuterRef
from django.utils import timezone

from hub.blobs import blob_storage
from hub.models import BaseModelFile, Blob, EncoderArtifact, MergedFile, RevisionFile

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
