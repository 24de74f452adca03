# cython: language_level=3, boundscheck=False, wraparound=False
"""prefilter.py's py_might_match, compiled: see there. Other compiled loops (masking
rows in hostagent/protocols/postgres/_walk.pyx) read a Prefilter into a Spec once and
ask c_might_match per value."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr


cdef class Spec:
    def __init__(self, p):
        self.always = p.always
        self.at = p.at
        self.digits = p.digits
        self.bearer = p.bearer
        self.literals = tuple(p.literals)


cdef bint c_might_match(bytes value, Spec p) except -1:
    # (a pointer, not a typed memoryview: acquiring a buffer costs more than the scan)
    cdef const unsigned char *v = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(value)
    cdef int run = 0, gap = 0, c, need = p.digits
    if p.always:
        return True
    for i in range(n):
        if v[i] >= 128:
            return True
    if p.at and memchr(v, 64, n) != NULL:   # @
        return True
    for lit in p.literals:
        if lit in value:
            return True
    if p.bearer and b"bearer" in value.lower():
        return True
    if need:
        for i in range(n):
            c = v[i]
            if 48 <= c <= 57:
                run += 1
                gap = 0
                if run >= need:
                    return True
            elif (c == 32 or c == 45 or c == 46 or c == 40 or c == 41 or c == 43) \
                    and run and gap < 2:
                gap += 1
            else:
                run = 0
                gap = 0
    return False


def might_match(bytes value, p):
    return c_might_match(value, p if isinstance(p, Spec) else Spec(p))
