"""`python -m tests.paced_merge_worker <celery arguments>`: a real celery worker whose merge
writes are paced to PACE_BYTES_PER_S, so that a test can kill it in the middle of a merge
however fast the machine merges. Only the pace changes: the merge code is the product's."""
from __future__ import annotations

import time

from kernels import merge_cpu
from kernels.streaming_merge import SafetensorsStreamWriter

PACE_BYTES_PER_S = 100e6  # the 400 MB test checkpoint streams for ~4 s


def _paced(method, size_of):
    def paced(self, *args, **kwargs):
        time.sleep(size_of(*args, **kwargs) / PACE_BYTES_PER_S)
        return method(self, *args, **kwargs)
    return paced


SafetensorsStreamWriter.write_at = _paced(SafetensorsStreamWriter.write_at,
                                          lambda offset, data: memoryview(data).nbytes)
SafetensorsStreamWriter.copy_at = _paced(SafetensorsStreamWriter.copy_at,
                                         lambda target, source_fd, offset, nbytes: nbytes)


def _paced_merge_to_file(weight, *args, merge=merge_cpu.merge_rows_to_file):
    """bf16 and float16 merges where the fused kernel runs write from C, a whole piece per call: paced by its bytes."""
    time.sleep(weight.numel() * 2 / PACE_BYTES_PER_S)
    return merge(weight, *args)


merge_cpu.merge_rows_to_file = _paced_merge_to_file

if __name__ == "__main__":
    from celery.__main__ import main

    main()
