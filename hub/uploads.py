"""Upload handler: stream each uploaded file to a temporary file on the blob
volume while hashing it, so a multi-GB file is never held in memory and the
sha256 is known the moment the upload ends (no second read)."""
from __future__ import annotations

import hashlib

from django.core.files.uploadhandler import TemporaryFileUploadHandler


class HashingUploadHandler(TemporaryFileUploadHandler):
    # Large chunks keep the per-chunk Python overhead small at GB/s rates.
    chunk_size = 4 * 2**20

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self._sha256 = hashlib.sha256()

    def receive_data_chunk(self, raw_data, start):
        self._sha256.update(raw_data)
        self.file.write(raw_data)

    def file_complete(self, file_size):
        uploaded = super().file_complete(file_size)
        uploaded.sha256 = self._sha256.hexdigest()
        return uploaded
