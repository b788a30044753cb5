"""torch's intra-op thread count for a block of code. Here, beside the file readers that use it,
because kernels/ imports hub/formats and not the other way round."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(count: int):
    """torch's intra-op thread count set to `count` for the block, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
