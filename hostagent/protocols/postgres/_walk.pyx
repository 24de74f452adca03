# cython: language_level=3, boundscheck=False, wraparound=False
"""walk.py's py_skip_frames, compiled: see there. Lengths are big-endian int32."""


def skip_frames(const unsigned char[:] data, Py_ssize_t pos, Py_ssize_t end,
                long long cap, int kind):
    cdef Py_ssize_t count = 0
    cdef long long length
    if end > data.shape[0]:
        end = data.shape[0]
    if pos < 0:
        return py_fallback(data, pos, end, cap, kind)
    while pos + 5 <= end and data[pos] == kind:
        length = <int>((<unsigned int>data[pos + 1] << 24) | (<unsigned int>data[pos + 2] << 16)
                       | (<unsigned int>data[pos + 3] << 8) | <unsigned int>data[pos + 4])
        if length < 4 or length > cap or pos + 1 + length > end:
            break
        pos += 1 + length
        count += 1
    return pos, count


def py_fallback(data, pos, end, cap, kind):
    from hostagent.protocols.postgres.walk import py_skip_frames
    return py_skip_frames(bytes(data), pos, end, cap, kind)


from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy

from hostagent.protocols.api import ProtocolError


cdef inline long long _i32(const unsigned char[:] b, Py_ssize_t at):
    return <int>((<unsigned int>b[at] << 24) | (<unsigned int>b[at + 1] << 16)
                 | (<unsigned int>b[at + 2] << 8) | <unsigned int>b[at + 3])


def parse_data_row(bytes body):
    """messages.py's py_parse_data_row, compiled: the same values and errors."""
    cdef const unsigned char[:] b = body
    cdef Py_ssize_t end = b.shape[0], pos = 2, i
    cdef long long n
    cdef int count
    if end < 2:
        raise ProtocolError("DataRow: truncated")
    count = <short>((b[0] << 8) | b[1])
    values = []
    for i in range(count if count > 0 else 0):
        if pos + 4 > end:
            raise ProtocolError("DataRow: truncated")
        n = _i32(b, pos)
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
