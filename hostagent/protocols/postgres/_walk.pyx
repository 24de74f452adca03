# cython: language_level=3, boundscheck=False, wraparound=False
"""The fast path's byte-level loops, compiled: walk.py's py_skip_frames, messages.py's
py_parse_data_row and py_data_row, masks.py's row loop. Lengths are big-endian int32;
bytes are read through pointers (acquiring a typed memoryview costs more than a row)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from hostagent.masking._prefilter cimport Spec, c_might_match
from hostagent.protocols.api import ProtocolError


cdef inline long long _i32p(const unsigned char *b, Py_ssize_t at):
    return <int>((<unsigned int>b[at] << 24) | (<unsigned int>b[at + 1] << 16)
                 | (<unsigned int>b[at + 2] << 8) | <unsigned int>b[at + 3])


def skip_frames(bytes data, Py_ssize_t pos, Py_ssize_t end, long long cap, int kind):
    cdef const unsigned char *b = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t count = 0
    cdef long long length
    if end > PyBytes_GET_SIZE(data):
        end = PyBytes_GET_SIZE(data)
    if pos < 0:   # (Python's indexing from the end: the twin's, never the fast path's)
        from hostagent.protocols.postgres.walk import py_skip_frames
        return py_skip_frames(data, pos, end, cap, kind)
    while pos + 5 <= end and b[pos] == kind:
        length = _i32p(b, pos + 1)
        if length < 4 or length > cap or pos + 1 + length > end:
            break
        pos += 1 + length
        count += 1
    return pos, count


def parse_data_row(bytes body):
    """messages.py's py_parse_data_row, compiled: the same values and errors."""
    cdef const unsigned char *b = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(body), pos = 2, i
    cdef long long n
    cdef int count
    if end < 2:
        raise ProtocolError("DataRow: truncated")
    count = <short>((b[0] << 8) | b[1])
    values = []
    for i in range(count if count > 0 else 0):
        if pos + 4 > end:
            raise ProtocolError("DataRow: truncated")
        n = _i32p(b, pos)
        pos += 4
        if n == -1:
            values.append(None)
            continue
        if n < 0 or pos + n > end:
            raise ProtocolError(f"DataRow: bad value length {n}")
        values.append(body[pos:pos + n])
        pos += n
    if pos != end:
        raise ProtocolError("DataRow: trailing bytes")
    return values


def data_row(list values):
    """messages.py's py_data_row, compiled: a whole DataRow frame."""
    cdef Py_ssize_t size = 6, n, at
    cdef Py_ssize_t count = len(values)
    cdef bytes v, out
    cdef char *p
    for value in values:
        size += 4 if value is None else 4 + len(<bytes>value)
    out = PyBytes_FromStringAndSize(NULL, size + 1)
    p = PyBytes_AS_STRING(out)
    p[0] = b'D'
    _put32(p + 1, size)
    p[5] = <char>((count >> 8) & 0xff)
    p[6] = <char>(count & 0xff)
    at = 7
    for value in values:
        if value is None:
            _put32(p + at, -1)
            at += 4
            continue
        v = <bytes>value
        n = len(v)
        _put32(p + at, n)
        memcpy(p + at + 4, PyBytes_AS_STRING(v), n)
        at += 4 + n
    return out


cdef inline void _put32(char *p, long long v):
    cdef unsigned int u = <unsigned int>v
    p[0] = <char>((u >> 24) & 0xff)
    p[1] = <char>((u >> 16) & 0xff)
    p[2] = <char>((u >> 8) & 0xff)
    p[3] = <char>(u & 0xff)


def mask_row(bytes body, bytes actions, tuple keys, object prefilter, object scan,
             dict counts, bytes mask):
    """masks.py's _mask_row for a row whose shape is known, compiled: its values, with
    each column's action applied (0 pass, 1 mask: `mask` and counts[keys[i]] += 1, 2
    scan: scan(value) if the prefilter says a detector might match). None when the row
    has not len(actions) columns (the caller's general path masks it whole)."""
    cdef Py_ssize_t i, n = len(actions)
    cdef const unsigned char[:] a = actions
    cdef Spec spec = prefilter if isinstance(prefilter, Spec) else Spec(prefilter)
    values = parse_data_row(body)
    if len(values) != n:
        return None
    for i in range(n):
        value = values[i]
        if value is None or a[i] == 0:
            continue
        if a[i] == 1:
            values[i] = mask
            key = keys[i]
            counts[key] = counts.get(key, 0) + 1
        elif c_might_match(<bytes>value, spec):
            values[i] = scan(value)
    return values


def mask_rows(bytes data, Py_ssize_t pos, Py_ssize_t end, long long cap, bytes actions,
              tuple keys, object prefilter, object scan, dict counts, bytes mask):
    """mask_row over the run of whole DataRows from `pos`: (where the run stopped, how
    many rows, the rows rewritten). It stops at another message, a partial one, an
    impossible length, or a row of another width (all left to the caller)."""
    cdef const unsigned char *b = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t count = 0, nxt
    cdef long long length
    cdef Spec spec = prefilter if isinstance(prefilter, Spec) else Spec(prefilter)
    parts = []
    if end > PyBytes_GET_SIZE(data):
        end = PyBytes_GET_SIZE(data)
    while pos >= 0 and pos + 5 <= end and b[pos] == 68:
        length = _i32p(b, pos + 1)
        if length < 4 or length > cap or pos + 1 + length > end:
            break
        nxt = pos + 1 + length
        values = mask_row(data[pos + 5:nxt], actions, keys, spec, scan, counts, mask)
        if values is None:
            break
        parts.append(data_row(values))
        pos = nxt
        count += 1
    return pos, count, b"".join(parts)
