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
