"""The sha256 of a file computed while other threads write it, in any order.

    digest = TrailingSha256(path, size)   # a thread starts, waiting for bytes
    digest.written(offset, nbytes)        # from any thread, after each write (every byte once)
    digest.hexdigest()                    # waits for the rest; the hex digest
    digest.stop()                         # after a failure: the thread ends, nothing is raised

Why: the hub stores a merged checkpoint as content-addressed blobs, so it needs every file's
sha256. Hashing after the merge reads the whole checkpoint again, one core at SHA-NI speed
(1.14 GB: 0.6-0.8 s, about twice the merge itself). This thread hashes each stretch as soon as
everything before it is written, reading it back from the page cache while the merge goes on, so
the hash ends soon after the last write instead of starting then. SHA-256 is sequential, so it
follows the written prefix: writes that land far ahead wait in `_ranges` until the gap fills.
"""
from __future__ import annotations

import hashlib
import os
import threading

READ_BYTES = 4 * 2**20  # per read-back: large enough that hashlib drops the GIL for most of the time


class TrailingSha256:
    def __init__(self, path, size: int):
        self.size = size
        self._fd = os.open(path, os.O_RDONLY)
        self._hash = hashlib.sha256()
        self._ready = 0  # bytes [0, _ready) are written
        self._ranges: dict[int, int] = {}  # start → end of written stretches past _ready
        self._condition = threading.Condition()
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name=f"sha256 {os.path.basename(path)}", daemon=True)
        self._thread.start()

    def written(self, offset: int, nbytes: int) -> None:
        """Bytes [offset, offset + nbytes) are in the file: each byte is reported once, and
        the reported stretches tile the file."""
        if nbytes <= 0:
            return
        with self._condition:
            self._ranges[offset] = offset + nbytes
            ready = self._ready
            while ready in self._ranges:
                ready = self._ranges.pop(ready)
            if ready != self._ready:
                self._ready = ready
                self._condition.notify()

    def hexdigest(self) -> str:
        """Once every byte was reported: waits for the thread, then the file's sha256."""
        with self._condition:
            unreported = self._ready < self.size and not self._stopped
        if unreported:
            self.stop()
            raise ValueError(f"sha256: bytes {self._ready}… of {self.size} were never reported written")
        self._thread.join()
        self._close()
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise RuntimeError("the digest was stopped before the file was hashed")
        return self._hash.hexdigest()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join()
        self._close()

    def _follow(self) -> None:
        buffer = memoryview(bytearray(min(READ_BYTES, max(self.size, 1))))
        hashed = 0
        try:
            while hashed < self.size:
                with self._condition:
                    self._condition.wait_for(lambda: self._stopped or self._ready > hashed)
                    if self._stopped:
                        return
                    ready = self._ready
                while hashed < ready:
                    view = buffer[: min(len(buffer), ready - hashed)]
                    got = os.preadv(self._fd, [view], hashed)
                    if got <= 0:
                        raise OSError(f"sha256: the file ends at byte {hashed}, before the {self.size} written")
                    self._hash.update(view[:got])
                    hashed += got
        except BaseException as error:  # raised by hexdigest(), in the caller's thread
            self._error = error

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
