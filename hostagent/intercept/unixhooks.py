"""The cgroup unix-socket hooks (kernel 6.7+): programs bcc compiles but can't load.

bcc 0.26 neither knows these attach types nor calls kfuncs, and reading a unix address
in these hooks takes two (bpf_cast_to_kern_ctx, bpf_rdonly_cast). So intercept.c calls
placeholder helpers (AG_KFUNC_*), and here the compiled instructions are rewritten into
kfunc calls to the ids vmlinux's BTF gives, then loaded and attached by system call.
Whether the kernel has the hooks is found by probing (BTF, then the load), never by
its version.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BTF = Path("/sys/kernel/btf/vmlinux")
SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 13, 15, 16
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_UNIX_CONNECT, BPF_CGROUP_UNIX_SENDMSG = 49, 50
BPF_F_ALLOW_MULTI = 2
PSEUDO_KFUNC_CALL = 2
CALL = 0x85                 # BPF_JMP | BPF_CALL
PLACEHOLDERS = {0x7ff0: "bpf_cast_to_kern_ctx", 0x7ff1: "bpf_rdonly_cast",
                0x7ff2: "bpf_sock_addr_set_sun_path"}
PROGRAMS = (("ag_unix_connect", BPF_CGROUP_UNIX_CONNECT),
            ("ag_unix_sendmsg", BPF_CGROUP_UNIX_SENDMSG))
SUN_PATH = 108


@dataclass(frozen=True)
class Btf:
    funcs: dict[str, int]        # kfunc name -> BTF id
    sockaddr_un: int             # struct sockaddr_un's BTF id
    uaddrlen_off: int            # offset of bpf_sock_addr_kern.uaddrlen (6.7+ only)

    def cflags(self) -> list[str]:
        return ["-DAG_UNIX_HOOKS=1", f"-DAG_SOCKADDR_UN_ID={self.sockaddr_un}",
                f"-DAG_UADDRLEN_OFF={self.uaddrlen_off}"]


CACHE = Path("/run/agentgate/btf-unix.json")


def probe_btf() -> Btf | None:
    """What the hooks need from the kernel's BTF, or None (no BTF, no bpftool, or a kernel
    whose bpf_sock_addr_kern has no uaddrlen: one without the unix hooks). Kept in
    /run (a boot's, root's) for this kernel: reading BTF takes half a second."""
    if not BTF.exists() or not shutil.which("bpftool"):
        return None
    st = BTF.stat()
    stamp = f"{platform.release()} {st.st_size} {st.st_mtime_ns}"
    try:
        cached = json.loads(CACHE.read_text())
        if cached.get("stamp") == stamp:
            return Btf(cached["funcs"], cached["sockaddr_un"], cached["uaddrlen_off"]) \
                if cached.get("funcs") else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = _read_btf()
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, **(found.__dict__ if found else {})}))
        tmp.replace(CACHE)
    except OSError:
        pass    # (a read-only /run: read it again next time)
    return found


def _read_btf() -> Btf | None:
    r = subprocess.run(["bpftool", "btf", "dump", "file", str(BTF)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return None
    text = r.stdout
    funcs = {}
    for name in PLACEHOLDERS.values():
        m = re.search(rf"^\[(\d+)\] FUNC '{name}' ", text, re.M)
        if m is None:
            return None
        funcs[name] = int(m.group(1))
    sun = re.search(r"^\[(\d+)\] STRUCT 'sockaddr_un' ", text, re.M)
    kern = re.search(r"^\[\d+\] STRUCT 'bpf_sock_addr_kern' [^\n]*\n((?:\t[^\n]*\n)*)", text, re.M)
    if sun is None or kern is None:
        return None
    off = re.search(r"'uaddrlen' type_id=\d+ bits_offset=(\d+)", kern.group(1))
    if off is None:
        return None
    return Btf(funcs, int(sun.group(1)), int(off.group(1)) // 8)


def patch(insns: bytes, btf: Btf) -> bytes:
    """The placeholder helper calls rewritten into kfunc calls."""
    out = bytearray(insns)
    for off in range(0, len(out), 8):
        imm = int.from_bytes(out[off + 4:off + 8], "little", signed=True)
        if out[off] == CALL and imm in PLACEHOLDERS:
            out[off + 1] = (PSEUDO_KFUNC_CALL << 4) | (out[off + 1] & 0x0F)
            out[off + 4:off + 8] = btf.funcs[PLACEHOLDERS[imm]].to_bytes(4, "little")
    return bytes(out)


class _ProgLoad(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
                ("rest", ctypes.c_uint8 * 64)]


class _ProgAttach(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 44)]


def _bpf(cmd: int, attr) -> int:
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"bpf(): unknown system call number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # A load is refused with EAGAIN when a signal arrives while the verifier runs (ours
    # take seconds: a profiler, a child's SIGCHLD): tried again, as libbpf does
    for _ in range(5):
        r = libc.syscall(nr, ctypes.c_int(cmd), ctypes.byref(attr),
                         ctypes.c_uint(ctypes.sizeof(attr)))
        if r >= 0:
            return r
        err = ctypes.get_errno()
        if err != errno.EAGAIN or cmd != BPF_PROG_LOAD:
            break
    raise OSError(err, os.strerror(err))


@dataclass
class UnixProgram:
    name: str
    fd: int
    attach_type: int


def load(bpf, btf: Btf) -> list[UnixProgram]:
    """Both hooks loaded from `bpf` (a bcc BPF built with btf.cflags()). OSError with the
    verifier's last words if the kernel refuses them."""
    out = []
    insns = patch(bpf.dump_func(b"ag_unix"), btf)
    for name, atype in PROGRAMS:
        buf = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(1 << 24)
        attr = _ProgLoad(prog_type=BPF_PROG_TYPE_CGROUP_SOCK_ADDR, insn_cnt=len(insns) // 8,
                         insns=ctypes.addressof(buf), license=ctypes.addressof(lic),
                         prog_name=name.encode()[:15], expected_attach_type=atype)
        try:
            fd = _bpf(BPF_PROG_LOAD, attr)
        except OSError:
            attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
            try:
                fd = _bpf(BPF_PROG_LOAD, attr)
            except OSError as exc:
                lines = [x for x in log.value.decode(errors="replace").strip().splitlines()
                         if not x.startswith(("processed ", "verification time"))]
                for p in out:
                    os.close(p.fd)
                why = lines[-1] if lines else ""
                raise OSError(exc.errno, f"{name}: {exc.strerror}: {why}".strip()) from None
        out.append(UnixProgram(name, fd, atype))
    return out


def attach(progs: list[UnixProgram], cgroup_fd: int) -> None:
    for p in progs:
        _bpf(BPF_PROG_ATTACH, _ProgAttach(target_fd=cgroup_fd, attach_bpf_fd=p.fd,
                                          attach_type=p.attach_type,
                                          attach_flags=BPF_F_ALLOW_MULTI))


def detach(progs: list[UnixProgram], cgroup_fd: int) -> None:
    for p in progs:
        _bpf(BPF_PROG_DETACH, _ProgAttach(target_fd=cgroup_fd, attach_bpf_fd=p.fd,
                                          attach_type=p.attach_type))


class _Query(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("rest", ctypes.c_uint8 * 36)]


class _GetById(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 52)]


class _InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 48)]


PROG_INFO_NAME = 64     # offset of bpf_prog_info.name (UAPI)


PROG_INFO_NR_MAP_IDS, PROG_INFO_MAP_IDS = 52, 56


def _map_ids(fd: int) -> set[int]:
    ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(PROG_INFO_NAME + 16)
    ctypes.memmove(ctypes.addressof(info) + PROG_INFO_NR_MAP_IDS,
                   ctypes.byref(ctypes.c_uint32(64)), 4)
    ctypes.memmove(ctypes.addressof(info) + PROG_INFO_MAP_IDS,
                   ctypes.byref(ctypes.c_uint64(ctypes.addressof(ids))), 8)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=len(info),
                                           info=ctypes.addressof(info)))
    n = int.from_bytes(info.raw[PROG_INFO_NR_MAP_IDS:PROG_INFO_NR_MAP_IDS + 4], "little")
    return set(ids[:min(n, 64)])


def attached(cgroup_fd: int, prefix: str) -> list[tuple[int, int]]:
    """(program fd, attach type) of the unix hooks attached to the cgroup itself whose
    names start with `prefix` (bpftool of this vintage doesn't list these types). The
    caller closes the fds."""
    out = []
    for _, atype in PROGRAMS:
        ids = (ctypes.c_uint32 * 64)()
        q = _Query(target_fd=cgroup_fd, attach_type=atype, prog_ids=ctypes.addressof(ids),
                   prog_cnt=64)
        try:
            _bpf(BPF_PROG_QUERY, q)
        except OSError:
            continue     # a kernel without this hook: nothing attached
        for pid in ids[:q.prog_cnt]:
            try:
                fd = _bpf(BPF_PROG_GET_FD_BY_ID, _GetById(id=pid))
            except OSError:
                continue     # gone since the query
            info = ctypes.create_string_buffer(PROG_INFO_NAME + 16)
            try:
                _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=len(info),
                                                       info=ctypes.addressof(info)))
            except OSError:
                os.close(fd)
                continue
            name = info.raw[PROG_INFO_NAME:PROG_INFO_NAME + 16].split(b"\0", 1)[0].decode()
            if name.startswith(prefix):
                out.append((fd, atype))
            else:
                os.close(fd)
    return out


def detach_ours(cgroup: Path, prefix: str, keep: list[UnixProgram] = (),
                owner: set[int] | None = None) -> int:
    """Detach the unix hooks named with `prefix` from `cgroup`, but those in `keep` (a
    running loader's own); if `owner` is given, only those using one of these maps."""
    try:
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return 0
    n = 0
    try:
        mine = set()
        for p in keep:
            mine.add(_prog_id(p.fd))
        for fd, atype in attached(cg, prefix):
            try:
                if _prog_id(fd) not in mine and (owner is None or owner & _map_ids(fd)):
                    _bpf(BPF_PROG_DETACH, _ProgAttach(target_fd=cg, attach_bpf_fd=fd,
                                                      attach_type=atype))
                    n += 1
            finally:
                os.close(fd)
    finally:
        os.close(cg)
    return n


def _prog_id(fd: int) -> int:
    info = ctypes.create_string_buffer(PROG_INFO_NAME + 16)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=len(info),
                                           info=ctypes.addressof(info)))
    return int.from_bytes(info.raw[4:8], "little")


# ---------------------------------------------------------------------- the allowlist

@dataclass(frozen=True)
class Entry:
    name: bytes          # b'/path', or an abstract name with its leading NUL
    exact: bool          # exact, or a prefix

    @property
    def table(self) -> str:
        return "unix_exact" if self.exact else "unix_prefix"

    @property
    def key_len(self) -> int:
        """intercept.c's unix_key.len: bytes for an exact name, bits for a prefix."""
        return len(self.name) if self.exact else len(self.name) * 8


_WILD = re.compile(r"[*?\[]")
# what the hook refuses outright (intercept.c): such a name is never worth an entry
_NOT_PLAIN = re.compile(r"//|/\.\.?(/|$)|/$")


def _shape(glob: str) -> str:
    """"exact" (no wildcard), "prefix" (a trailing '*' its only one), or "glob"."""
    wild = _WILD.search(glob)
    if wild is None:
        return "exact"
    return "prefix" if wild.start() == len(glob) - 1 and glob.endswith("*") else "glob"


def plain(path: str) -> bool:
    """Absolute, no '.' or '..' segments, no '//', no trailing '/'."""
    return path.startswith("/") and (path == "/" or not _NOT_PLAIN.search(path))


def _segment_glob(glob: str) -> re.Pattern:
    """A glob whose '*' and '?' stay within one path segment (fnmatch's cross '/')."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in glob[i + 2:]:
            j = glob.index("]", i + 2)
            body = glob[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def spellings(path: str) -> list[str]:
    """/run and /var/run name the same place on Debian: a client may use either."""
    for a, b in (("/run/", "/var/run/"), ("/var/run/", "/run/")):
        if path.startswith(a):
            return [path, b + path[len(a):]]
    return [path]


def entries(globs: tuple[str, ...], abstract_allowed: bool,
            bound: set[str] | None = None) -> list[Entry]:
    """The allowlist's entries for these globs: a name without wildcards is exact, one
    whose only wildcard is a trailing '*' a prefix (the hook refuses '..' segments, so
    it can't climb out); any other glob is matched, segment by segment, against the
    plainly written names bound now (`bound`, from /proc/net/unix) and refreshed as
    they change. Abstract names are given as '@name'."""
    out: list[Entry] = []
    names = sorted(bound or ())
    for glob in globs:
        if glob.startswith("@"):        # abstract: keyed with its NUL, never a spelling
            key = "\0" + glob[1:]
            shape = _shape(key)
            if shape == "glob":
                rx = _segment_glob(glob)
                out += [Entry(("\0" + n[1:]).encode(), True) for n in names
                        if n.startswith("@") and rx.match(n)]
            else:
                out.append(Entry(key.rstrip("*").encode(), shape == "exact"))
            continue
        for g in spellings(glob):
            shape = _shape(g)
            if shape == "glob":
                rx = _segment_glob(g)
                out += [Entry(sp.encode(), True) for n in names
                        if plain(n) and rx.match(n) for sp in spellings(n)]
            else:
                out.append(Entry(g.rstrip("*").encode(), shape == "exact"))
    if abstract_allowed:
        out.append(Entry(b"\0", False))
    return [e for e in dict.fromkeys(out) if len(e.name) <= SUN_PATH]


def needs_refresh(globs: tuple[str, ...]) -> bool:
    return any(_shape(g) == "glob" for g in globs)
