"""File downloads with ETag (= sha256), conditional GET and single-range requests; on S3, a
redirect to a presigned URL once the request is authorised (hub.blobs.blob_download_url)."""
from __future__ import annotations

import re

from django.http import HttpResponse, StreamingHttpResponse

from hub.blobs import blob_download_url, iter_blob_range

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end) for a satisfiable single range, None for no/ignored Range, 'unsatisfiable'."""
    if not header:
        return None
    match = RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None  # multi-range or malformed: RFC 9110 allows answering with the whole file
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(size - int(last), 0), size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end


def blob_download_response(request, *, sha256: str, size: int, filename: str, extra_headers: dict | None = None):
    etag = f'"{sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Quiver-Sha256": sha256,
        **(extra_headers or {}),
    }
    if etag in request.headers.get("If-None-Match", ""):
        return HttpResponse(status=304, headers=headers)
    # The client sends its Range again to the Location. A 302 keeps this response's headers: Hub
    # clients read the file's sha256 and size from X-Linked-Etag / X-Linked-Size on it, as on huggingface.co.
    location = blob_download_url(sha256, filename) if size else None
    if location:
        return HttpResponse(status=302, headers={**headers, "Location": location})
    byte_range = _byte_range(request.headers.get("Range"), size)
    if request.headers.get("If-Range") and request.headers["If-Range"] != etag:
        byte_range = None
    if byte_range == "unsatisfiable":
        return HttpResponse(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = byte_range or (0, size - 1)
    status = 206 if byte_range else 200
    if byte_range:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD" or size == 0:
        response = HttpResponse(status=status, headers=headers, content_type="application/octet-stream")
    else:
        response = StreamingHttpResponse(
            iter_blob_range(sha256, start, end), status=status, headers=headers, content_type="application/octet-stream"
        )
    response["Content-Length"] = str(end - start + 1 if size else 0)
    return response
