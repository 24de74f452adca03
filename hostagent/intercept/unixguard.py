"""Unix-domain sockets for `agentgate run`: an agent reaches only those a policy allows.

A unix socket is a way around everything else: docker.sock starts a container on the
host's network, the system bus or the systemd manager starts a unit outside the tree, a
database's local socket skips the proxy. Two guards, chosen by probing the kernel:

- pathname sockets: CMD runs in a mount namespace of its own in which every socket the
  host has bound, and the policy does not allow, is covered by /dev/null (a connect then
  fails with ECONNREFUSED). Undoing it takes CAP_SYS_ADMIN, which the run drops.
- abstract sockets (no path; anyone in the network namespace could reach them): Landlock
  scoping (ABI 6, kernel 6.12+) lets CMD reach only those made inside its own domain.

What is covered is worked out in the parent (before fork: reading /proc takes locks);
`apply()` runs in the child between fork and exec and does system calls alone.
"""
from __future__ import annotations

import ctypes
import fnmatch
import os
import stat
from dataclasses import dataclass

# Sockets ordinary programs need: name service caches and user databases (getent, id),
# the journal and syslog (logger). Container runtimes, the system and session buses, the
# systemd manager and databases are not here: a policy lists them to allow them.
DEFAULT_ALLOW = ("/run/nscd/socket", "/var/run/nscd/socket", "/run/systemd/journal/socket",
                 "/run/systemd/journal/stdout", "/run/systemd/journal/dev-log", "/dev/log",
                 "/run/systemd/userdb/*", "/var/lib/sss/pipes/*")



def unix_allowed(cfg) -> tuple[str, ...]:
    """What enrolled processes may reach: the defaults and the config's `unix_allow`."""
    return DEFAULT_ALLOW + tuple(cfg.intercept.unix_allow)


CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
SYS_LANDLOCK_CREATE_RULESET = 444     # x86_64 and aarch64 alike (generic syscall table)
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1
LANDLOCK_ABI_SCOPES = 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                     ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(v), 0)


def bound_sockets() -> tuple[set[str], set[str]]:
    """(pathname, abstract) sockets bound on the host, from /proc/net/unix."""
    paths, abstract = set(), set()
    try:
        lines = open("/proc/net/unix").read().splitlines()[1:]
    except OSError:
        return paths, abstract
    for line in lines:
        parts = line.split(None, 7)
        if len(parts) == 8:
            name = parts[7]
            (paths if name.startswith("/") else abstract if name.startswith("@") else set()
             ).add(name)
    return paths, abstract


MAX_COVERS = 4096


def _socket_owner(path: str) -> int | None:
    """The uid owning the socket at `path`, or None if it is not a socket (now)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid if stat.S_ISSOCK(st.st_mode) else None


@dataclass(frozen=True)
class UnixPlan:
    hidden: tuple[str, ...]          # pathname sockets covered in CMD's mount namespace
    allowed: tuple[str, ...]         # pathname sockets left reachable (by the policy)
    scope_abstract: bool             # Landlock keeps abstract sockets out of reach
    gap: str = ""                    # what is not guarded, and why
    hooks: bool = False              # the BPF unix-socket hooks judge every connect

    def record(self) -> dict:
        by = [w for w, on in (("BPF hook", self.hooks), ("Landlock scope", self.scope_abstract))
              if on]
        out = {"hidden": list(self.hidden), "allowed": list(self.allowed),
               "connect": "judged by the BPF unix-socket hooks (refused: EPERM, recorded)"
               if self.hooks else "not judged at connect (no BPF unix-socket hooks)",
               "abstract": f"refused unless allowed ({', '.join(by)})" if by else
               "reachable: no guard on this kernel, or allowed by policy"}
        if self.gap:
            out["gap"] = self.gap
        return out


def plan(allow: tuple[str, ...] = DEFAULT_ALLOW, abstract_allowed: bool = False,
         hooks: bool = False) -> UnixPlan:
    """What to cover for a run: every bound pathname socket the allow globs don't name
    (also under its resolved path, for /var/run -> /run)."""
    paths, _abstract = bound_sockets()
    hidden, allowed = {}, []
    for p in sorted(paths):
        real = os.path.realpath(p)
        if any(fnmatch.fnmatchcase(x, g) for g in allow for x in (p, real)):
            allowed.append(p)
        else:
            # what a name in /proc/net/unix leads to now may be anything (its binder can
            # swap the socket for a link to /etc): only sockets are covered
            owner = _socket_owner(real)
            if owner is not None:
                hidden[real] = owner
    gap = ""
    order = sorted(hidden, key=lambda x: (hidden[x] != 0, x))   # the system's first
    if hooks and len(order) > MAX_COVERS:
        # any user can bind sockets by the hundred thousand, and each cover is a mount
        # (fs.mount-max): where the hooks judge every connect, covers are a second line
        gap = (f"{len(order) - MAX_COVERS} of {len(order)} bound sockets not covered "
               f"(more than {MAX_COVERS}; the unix-socket hooks still judge every connect)")
        order = order[:MAX_COVERS]
    scope = not abstract_allowed and landlock_abi() >= LANDLOCK_ABI_SCOPES
    return UnixPlan(tuple(order), tuple(allowed), scope, gap=gap, hooks=hooks)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


SYS_MOUNT_SETATTR = 442
MOUNT_ATTR_RDONLY = 1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MS_RDONLY = 1
MS_REMOUNT = 32
# what a root agent could change the host's kernel through (core_pattern's helper runs
# outside every namespace, with every capability; sysrq reboots): read-only for it
KERNEL_KNOBS = (b"/proc/sys", b"/proc/sysrq-trigger")


def _read_only(libc, path: bytes) -> bool:
    return (libc.mount(path, path, None, MS_BIND | MS_REC, None) == 0 and
            libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) == 0)


def apply(p: UnixPlan, libc, own_cgroup: bytes | None = None) -> bool:
    """In the child, before exec (with CAP_SYS_ADMIN still held): a private mount
    namespace with the refused sockets covered; for a root agent (`own_cgroup` given)
    also /sys (but its own cgroup) and the kernel's knobs read-only. False if a step
    that must hold failed (the caller exits rather than run unguarded)."""
    if not p.hidden and own_cgroup is None:
        return True
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    # our mounts must not propagate back to the host's namespace
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    for path in p.hidden:
        # Opened without following a link, and covered through that descriptor: the
        # socket listed, never what a link put there since points to.
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue        # gone since it was listed: nothing to cover
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode) and \
                    libc.mount(b"/dev/null", b"/proc/self/fd/%d" % fd, None, MS_BIND, None) != 0:
                if not p.hooks:
                    return False
                break       # (out of mounts: the hooks judge every connect all the same)
        finally:
            os.close(fd)
    if own_cgroup is not None:
        attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        libc.syscall.restype = ctypes.c_long
        if libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(AT_FDCWD), b"/sys",
                        ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
            return False
        # its own cgroup stays writable: it may make cgroups below it (still enrolled)
        if libc.mount(own_cgroup, own_cgroup, None, MS_BIND, None) != 0 or \
                libc.mount(None, own_cgroup, None, MS_REMOUNT | MS_BIND, None) != 0:
            return False
        for knob in KERNEL_KNOBS:
            if not _read_only(libc, knob) and ctypes.get_errno() != 2:   # (absent: fine)
                return False
    return True


def restrict_abstract(libc) -> bool:
    """Landlock: only abstract sockets made inside this domain are reachable. Needs
    no_new_privs (or CAP_SYS_ADMIN) set before."""
    attr = _RulesetAttr(0, 0, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if fd < 0:
        return False
    ok = libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(fd)
    return ok
