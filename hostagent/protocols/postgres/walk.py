"""Runs of one message type walked by their headers: the byte-level loop of bulk
results (DataRow after DataRow, COPY data) that the fast path passes on unread.

`_walk.pyx` is the same loop compiled (built by `make setup`); this module's
`py_skip_frames` is its pure-Python twin, used where the compiled one is absent and
held identical to it by tests/hostagent/protocols/postgres/test_walk.py.
"""
from __future__ import annotations

import struct

_LEN = struct.Struct("!i").unpack_from


def py_skip_frames(data: bytes, pos: int, end: int, cap: int, kind: int) -> tuple[int, int]:
    """From `pos`, past every whole message of type `kind` (a byte value) that follows
    back to back within data[:end]: (where the first other, partial or impossible one
    starts, how many were passed). Lengths outside 4..cap stop the walk: the caller's
    general path refuses them."""
    count = 0
    while pos + 5 <= end and data[pos] == kind:
        length = _LEN(data, pos + 1)[0]
        if length < 4 or length > cap or pos + 1 + length > end:
            break
        pos += 1 + length
        count += 1
    return pos, count


try:
    from hostagent.protocols.postgres._walk import mask_row, mask_rows, skip_frames
    COMPILED = True
except ImportError:   # not built (a source checkout without `make setup`)
    skip_frames = py_skip_frames
    mask_row = mask_rows = None   # masks.py's loop does it
    COMPILED = False
