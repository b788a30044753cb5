"""Orphan sweep: blob storage and the database never disagree for long.

Blobs are placed before the rows that name them commit, so a failed or
interrupted upload (or a merge whose worker was killed) can leave a blob (and
its Blob row) that nothing references; deleting an adapter leaves its blobs too.
The sweep removes blobs that no row references once their last claim
(hub.blobs.put_blob) is older than a grace period, so an upload in flight, whose
rows are not committed yet, is never touched.
"""
from __future__ import annotations

import logging
from datetime import timedelta

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
