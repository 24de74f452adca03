# cython: language_level=3, boundscheck=False, wraparound=False
"""prefilter.py's py_might_match, compiled: see there."""


def might_match(bytes value, p):
    cdef const unsigned char[:] v = value
    cdef Py_ssize_t i, n = len(value)
    cdef int run = 0, gap = 0, c, need
    if p.always:
        return True
    for i in range(n):
        if v[i] >= 128:
            return True
    if p.at and b"@" in value:
        return True
    for lit in p.literals:
        if lit in value:
            return True
    if p.bearer and b"bearer" in value.lower():
        return True
    need = p.digits
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
