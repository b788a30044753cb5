"""Orphan sweep: blob storage and the database never disagree for long.

Blobs are placed before the rows that name them commit, so a failed or
interrupted upload can leave a blob (and its Blob row) that nothing references;
deleting an adapter leaves its blobs too. The sweep removes blobs that no row
references once they are older than a grace period (so an upload in flight,
whose rows are not committed yet, is never touched).
"""
from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from hub.blobs import blob_storage
from hub.models import BaseModelFile, Blob, EncoderArtifact, MergedFile, RevisionFile

logger = logging.getLogger(__name__)


def unreferenced_blobs(older_than: timedelta):
    referenced = [Exists(model.objects.filter(blob=OuterRef("pk"))) for model in (RevisionFile, BaseModelFile, MergedFile)]
    referenced.append(Exists(EncoderArtifact.objects.filter(weights=OuterRef("pk"))))
    blobs = Blob.objects.filter(created_at__lt=timezone.now() - older_than)
    for condition in referenced:
        blobs = blobs.exclude(condition)
    return blobs


def sweep_orphan_blobs(*, grace: timedelta | None = None) -> int:
    """Delete unreferenced blobs older than `grace`: the stored bytes first, then the row."""
    grace = grace if grace is not None else timedelta(seconds=settings.QUIVER_ORPHAN_GRACE_SECONDS)
    storage = blob_storage()
    removed = 0
    for blob in unreferenced_blobs(grace).iterator():
        storage.delete(blob.storage_key)
        # The row goes only if still unreferenced: an upload of the same bytes may have claimed it meanwhile.
        removed += unreferenced_blobs(grace).filter(pk=blob.pk).delete()[0]
    if removed:
        logger.info("removed %d orphan blobs", removed)
    return removed
