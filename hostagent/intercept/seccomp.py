"""A seccomp filter for `agentgate run`: no user namespaces, no entering namespaces.

In a user namespace of its own an unprivileged agent holds CAP_SYS_ADMIN over a mount
namespace of its own, and could put a link or a socket under a path the unix-socket hook
allows (it judges paths as written), or over the proxy's socket. So CMD may not make one
(unshare, clone with CLONE_NEWUSER; clone3, whose flags a filter can't read, fails with
ENOSYS and C libraries fall back to clone) nor enter another's (setns). Installed in the
child before exec, after no_new_privs; inherited by everything CMD starts.
"""
from __future__ import annotations

import ctypes
import platform
import struct

CLONE_NEWUSER = 0x10000000
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
OFF_NR, OFF_ARCH, OFF_ARG0_LO = 0, 4, 16
# (arch token, syscall numbers: unshare, clone, clone3, setns, the x32 bit or 0)
ARCHES = {
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435, "setns": 308},
               0x40000000),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435, "setns": 268}, 0),
}
# classic BPF
LD_W_ABS, JEQ_K, JSET_K, JGE_K, RET_K = 0x20, 0x15, 0x45, 0x35, 0x06


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    arch, nrs, x32 = ARCHES[machine or platform.machine()]
    deny = SECCOMP_RET_ERRNO | EPERM
    p = [
        _insn(LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(JEQ_K, 1, 0, arch),
        _insn(RET_K, 0, 0, deny),                    # another ABI (i386 on x86_64): refused
        _insn(LD_W_ABS, 0, 0, OFF_NR),
    ]
    if x32:
        p += [_insn(JGE_K, 0, 1, x32), _insn(RET_K, 0, 0, deny)]   # the x32 ABI: refused
    p += [
        _insn(JEQ_K, 0, 1, nrs["setns"]), _insn(RET_K, 0, 0, deny),
        _insn(JEQ_K, 0, 1, nrs["clone3"]), _insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
        _insn(JEQ_K, 1, 0, nrs["unshare"]),
        _insn(JEQ_K, 0, 3, nrs["clone"]),
        # unshare or clone: their flags are the first argument (its low 32 bits)
        _insn(LD_W_ABS, 0, 0, OFF_ARG0_LO),
        _insn(JSET_K, 0, 1, CLONE_NEWUSER),
        _insn(RET_K, 0, 0, deny),
        _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(p)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def prepare() -> tuple[_SockFprog, ctypes.Array] | None:
    """Built before fork (allocation); None on an architecture we have no table for."""
    if platform.machine() not in ARCHES:
        return None
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))
    return _SockFprog(len(code) // 8, ctypes.addressof(buf)), buf


def install(prepared, libc) -> bool:
    """In the child, after PR_SET_NO_NEW_PRIVS."""
    prog, _buf = prepared
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0
