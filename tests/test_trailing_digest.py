"""kernels.trailing_digest: the sha256 of a file hashed while threads write it out of order, and
what happens when a writer never reports a stretch, or stops."""
import hashlib
import os
import random
import threading

import pytest

from kernels.trailing_digest import READ_BYTES, TrailingSha256


def write_in_pieces(path, data: bytes, pieces: list[tuple[int, int]], digest: TrailingSha256, threads: int) -> None:
    """Write `pieces` (offset, length) of `data` from `threads` threads, each reported once written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        def work(share):
            for offset, length in share:
                os.pwrite(fd, data[offset: offset + length], offset)
                digest.written(offset, length)

        workers = [threading.Thread(target=work, args=(pieces[i::threads],)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [1, 4097, 3 * READ_BYTES + 12345])
def test_the_digest_of_a_file_written_out_of_order_by_threads_is_its_sha256(tmp_path, size):
    rng = random.Random(size)
    data = rng.randbytes(size)
    cuts = sorted({0, size, *(rng.randrange(size) for _ in range(40))})
    pieces = list(zip(cuts, [b - a for a, b in zip(cuts, cuts[1:])]))
    rng.shuffle(pieces)  # the last bytes often come first: they wait until the gap before them fills
    path = tmp_path / "file.bin"
    path.touch()
    digest = TrailingSha256(path, size)
    write_in_pieces(path, data, pieces, digest, threads=4)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("file_bytes, size, reports, error, message", [
    (100, 100, [(0, 40), (60, 40)], ValueError, "bytes 40… of 100 were never reported"),  # an error, not a wait
    (10, 20, [(0, 20)], OSError, "ends at byte 10"),  # the file is shorter than what was reported
])
def test_a_digest_that_cannot_be_complete_is_an_error(tmp_path, file_bytes, size, reports, error, message):
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(file_bytes))
    digest = TrailingSha256(path, size)
    for offset, nbytes in reports:
        digest.written(offset, nbytes)
    with pytest.raises(error, match=message):
        digest.hexdigest()


def test_stop_ends_the_thread_and_the_digest_is_then_refused(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(100))
    digest = TrailingSha256(path, 100)
    digest.written(0, 50)
    digest.stop()
    assert not digest._thread.is_alive()
    with pytest.raises((RuntimeError, ValueError)):
        digest.hexdigest()
