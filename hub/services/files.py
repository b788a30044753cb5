"""Checks shared by every upload: file names, pickles, size limits, hashing."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from hub import formats
from hub import blobs
from hub.blobs import put_blob
from hub.errors import InvalidInput, TooLarge
from hub.models import Blob

SAFE_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@dataclass
class IncomingFile:
    """A file to register: its original name and where its bytes are on disk.

    `disposable` files (an upload's temporary file) are moved into blob
    storage; others (a local file given to a command) are copied.
    """

    name: str
    path: Path
    size: int
    sha256: str
    disposable: bool = False

    @classmethod
    def from_path(cls, path: Path, name: str | None = None, *, disposable: bool = False,
                  sha256: str | None = None) -> "IncomingFile":
        """`sha256`: the digest, where the code that wrote the file computed it (a merge hashes
        its output while writing it); else the file is read and hashed here."""
        if sha256 is None:
            with open(path, "rb") as handle:
                sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        return cls(name=name or path.name, path=path, size=path.stat().st_size, sha256=sha256, disposable=disposable)

    @classmethod
    def from_upload(cls, upload) -> "IncomingFile":
        """From a Django UploadedFile streamed by hub.uploads.HashingUploadHandler."""
        path = Path(upload.temporary_file_path())
        digest = getattr(upload, "sha256", None)
        if digest is None:
            return cls.from_path(path, name=upload.name)
        return cls(name=upload.name, path=path, size=upload.size, sha256=digest, disposable=True)


def incoming_uploads(uploads) -> list[IncomingFile]:
    """The files of a multipart request (API or web form), as streamed by hub.uploads."""
    return [IncomingFile.from_upload(upload) for upload in uploads]


def check_incoming_files(files: list[IncomingFile], *, max_total_bytes: int) -> dict[str, Path]:
    """Name → path, after refusing empty uploads, unsafe names, duplicates and pickles."""
    if not files:
        raise InvalidInput("no_files", "Attach at least one file in the 'files' field.", field="files")
    named: dict[str, Path] = {}
    total = 0
    for incoming in files:
        name = incoming.name or ""
        # No directories, no traversal, no hidden or odd names: the name is used in URLs.
        if not SAFE_FILENAME.match(name) or ".." in name:
            raise InvalidInput(
                "bad_filename",
                f"File name {name!r} is not allowed; use a plain name like adapter_model.safetensors.",
                field="files",
            )
        if name in named:
            raise InvalidInput("duplicate_file", f"File {name!r} was sent twice.", field="files")
        if incoming.size == 0:
            raise InvalidInput("empty_file", f"File {name!r} is empty.", field="files")
        with open(incoming.path, "rb") as handle:
            head = handle.read(8)
        try:
            formats.refuse_pickle(name, head)
        except formats.FormatError as error:
            raise as_invalid_input(error) from None
        total += incoming.size
        named[name] = incoming.path
    if total > max_total_bytes:
        raise TooLarge("upload_too_large", f"The upload is {total} bytes; the limit is {max_total_bytes}.", field="files")
    return named


def store_blobs(files: list[IncomingFile]) -> dict[str, Blob]:
    """Put every file's bytes in blob storage (before any row that names them commits)."""
    return {incoming.name: put_blob(incoming.path, incoming.sha256, incoming.size, move=incoming.disposable) for incoming in files}


def manifest_commit(files: list[IncomingFile]) -> str:
    """A 40-hex id of a set of (filename, sha256): a revision's 'commit'."""
    return blobs.manifest_commit((f.name, f.sha256) for f in files)


def as_invalid_input(error: "formats.FormatError") -> InvalidInput:
    return InvalidInput(error.code, error.message, field="files")
