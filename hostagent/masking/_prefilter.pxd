cdef class Spec:
    cdef bint always, at, bearer
    cdef int digits
    cdef tuple literals

cdef bint c_might_match(bytes value, Spec p) except -1
