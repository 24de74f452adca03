"""Loads bpf/intercept.c with bcc, attaches it to cgroups, and reads its maps and events.

bcc exists only for the system interpreter (Debian's python3-bpfcc), which is why the
project venv is made with --system-site-packages. Every failure here is a refusal to
start with one message saying what is missing: interception never runs half-loaded.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import platform
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hostagent.intercept import unixhooks
from hostagent.intercept.cgroups import cgroup_id

log = logging.getLogger("agentgate.intercept")

BPF_SRC = Path(__file__).resolve().parents[2] / "bpf" / "intercept.c"
PIN_DIR = Path("/sys/fs/bpf/agentgate")
PREFIX = "ag_"
MODES = {"deny": 0, "record": 1, "allow": 2}
ACT_TARGET, ACT_RECORD = 1, 2
(EV_EXEC, EV_EXIT, EV_DENY_CONNECT, EV_ALLOW_DIRECT, EV_DENY_UDP, EV_DENY_SOCKET,
 EV_EXEC_OUTSIDE, EV_DENY_BIND) = range(1, 9)
EV_DENY_UNIX = 9
EVENT_NAMES = {EV_EXEC: "exec", EV_EXIT: "exit", EV_DENY_CONNECT: "connect_denied",
               EV_ALLOW_DIRECT: "connect_direct", EV_DENY_UDP: "udp_denied",
               EV_DENY_SOCKET: "socket_denied", EV_EXEC_OUTSIDE: "exec_outside",
               EV_DENY_BIND: "bind_denied", EV_DENY_UNIX: "unix_denied"}
FLAG_STOPPED = 1
BPF_F_ALLOW_MULTI = 2
RECORD_TTL_NS = 10_000_000_000   # a redirected connect reaches accept() within this

# (function, bcc program type name, attach type name, bpftool's attach type name)
PROGRAMS = [
    ("ag_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT", "connect4"),
    ("ag_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT", "connect6"),
    ("ag_sendmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG", "sendmsg4"),
    ("ag_sendmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG", "sendmsg6"),
    ("ag_sock_create", "CGROUP_SOCK", "CGROUP_INET_SOCK_CREATE", "sock_create"),
    ("ag_bind4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_BIND", "bind4"),
    ("ag_bind6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_BIND", "bind6"),
    ("ag_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS", "sock_ops"),
]


class InterceptError(Exception):
    """Interception can't run; the message says what is missing and how to fix it."""


class AddrKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class RawEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("tgid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("cgroup_id", ctypes.c_uint64),
                ("ktime_ns", ctypes.c_uint64), ("addr", AddrKey), ("comm", ctypes.c_char * 16),
                ("filename", ctypes.c_char * 128)]


@dataclass(frozen=True)
class ConnRecord:
    """What the kernel saw at connect(): who, and where they were going."""
    cookie: int
    cgroup_id: int
    ktime_ns: int
    pid: int
    tid: int
    uid: int
    gid: int
    dst_host: str
    dst_port: int
    action: int
    family: int
    comm: str


@dataclass(frozen=True)
class KernelEvent:
    kind: str
    pid: int
    uid: int
    cgroup_id: int
    comm: str
    filename: str = ""
    addr: str = ""
    stopped: bool = False    # stopped at exec for enrollment: must be continued


_V4_MAPPED = bytes(10) + b"\xff\xff"


def addr_key(host: str, port: int) -> AddrKey:
    # (every accepted connection asks: inet_pton, not the ipaddress module)
    try:
        packed = _V4_MAPPED + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ValueError(f"{host!r} is not an IP address") from None
    k = AddrKey()
    k.addr[:] = struct.unpack("=4I", packed)
    k.port = socket.htons(port)
    return k


def key_to_addr(k) -> tuple[str, int]:
    packed = struct.pack("=4I", *k.addr)
    if packed.startswith(_V4_MAPPED):
        host = socket.inet_ntop(socket.AF_INET, packed[12:])
    else:
        host = str(ipaddress.IPv6Address(packed))
    return host, socket.ntohs(k.port)


def unix_name(raw: bytes) -> str:
    """A refused unix address for people: an abstract name as '@name' (NULs in it as
    '\\0'), a path as it was given."""
    if raw.startswith(b"\0"):
        raw = b"@" + raw[1:]
    return raw.rstrip(b"\0").decode(errors="backslashreplace").replace("\0", "\\0")


def preflight() -> None:
    """Raise InterceptError naming the first missing piece."""
    if os.geteuid() != 0:
        raise InterceptError("interception needs root (to load BPF programs and manage cgroups)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise InterceptError("bcc is not importable: install python3-bpfcc and use a venv made "
                             "from /usr/bin/python3 with --system-site-packages (make setup)") from None
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not (build / "include").exists() and not (build / "Makefile").exists():
        raise InterceptError(f"no kernel headers at {build}: install linux-headers for this kernel "
                             "or link a nearby version there (scripts/setup-host.sh does)")
    if not Path("/sys/kernel/tracing/events").exists() and not Path("/sys/kernel/debug/tracing/events").exists():
        raise InterceptError("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")
    if not os.path.ismount("/sys/fs/bpf"):
        raise InterceptError("bpffs is not mounted: mount -t bpf bpf /sys/fs/bpf")
    if not BPF_SRC.exists():
        raise InterceptError(f"BPF source missing: {BPF_SRC}")


def attached(cgroup: Path) -> list[dict]:
    """Programs attached to a cgroup itself, as bpftool reports them."""
    if not shutil.which("bpftool"):
        raise InterceptError("bpftool is not installed (apt-get install bpftool)")
    r = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise InterceptError(f"bpftool cgroup show {cgroup}: {r.stderr.strip()}")
    return json.loads(r.stdout.strip() or "[]")


def pinned_map_ids(pin_dir: Path) -> set[int]:
    """Ids of the maps one loader pinned (every program of it uses one of them): how a
    program on a shared cgroup (the cgroup2 root) is told to be that loader's."""
    ids = set()
    for name in ("enrolled", "conns"):
        r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin_dir / name)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            ids.add(json.loads(r.stdout)["id"])
    return ids


def uses(prog_id: int, maps: set[int]) -> bool:
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                       capture_output=True, text=True)
    return r.returncode == 0 and bool(maps & set(json.loads(r.stdout).get("map_ids", [])))


def detach_ours(cgroup: Path, ids: set[int] | None = None,
                keep: list[unixhooks.UnixProgram] = (), owner: set[int] | None = None) -> int:
    """Detach programs named with our prefix from `cgroup`: only `ids`, if given (of the
    unix hooks, all but those in `keep`); only those using one of the maps `owner`
    names (pinned_map_ids), if given."""
    n = 0
    try:
        n += unixhooks.detach_ours(cgroup, PREFIX, keep, owner)
    except OSError as exc:
        raise InterceptError(f"cannot detach the unix-socket hooks from {cgroup}: "
                             f"{exc.strerror}") from None
    for prog in attached(cgroup):
        if prog.get("name", "").startswith(PREFIX) and (ids is None or prog["id"] in ids) \
                and (owner is None or uses(prog["id"], owner)):
            r = subprocess.run(["bpftool", "cgroup", "detach", str(cgroup), prog["attach_type"],
                                "id", str(prog["id"])], capture_output=True, text=True)
            if r.returncode != 0:
                raise InterceptError(f"cannot detach program {prog['id']} from {cgroup}: "
                                     f"{r.stderr.strip()}")
            n += 1
    return n


class _PerfEventAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup_events", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 76)]


SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
BPF_PERF_EVENT = 41      # enum bpf_attach_type: a link on a perf event


def _pin_tracepoint_links(bpf, func: str, events: tuple[str, ...], pin: Path) -> list[Path]:
    """Attach `func` to cgroup tracepoints through bpf links pinned at `pin`_<event>:
    unlike bcc's perf-event attachment, a pinned link outlives this process. The link
    of an earlier run is replaced only once the new one is in place."""
    from bcc import BPF, libbcc
    fn = bpf.load_func(func.encode(), BPF.TRACEPOINT)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = SYS_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise InterceptError(f"perf_event_open: unknown system call number on {platform.machine()}")
    link_create = libbcc.lib.bpf_link_create
    link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    tracing = Path("/sys/kernel/tracing/events")
    if not tracing.exists():
        tracing = Path("/sys/kernel/debug/tracing/events")
    pins = []
    for event in events:
        attr = _PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=128, sample_period=1,
                              wakeup_events=1)
        attr.config = int((tracing / "cgroup" / event / "id").read_text())
        pfd = libc.syscall(nr, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
        if pfd < 0:
            raise InterceptError(f"perf_event_open cgroup:{event}: {os.strerror(ctypes.get_errno())}")
        lfd = link_create(fn.fd, pfd, BPF_PERF_EVENT, None)
        os.close(pfd)
        if lfd < 0:
            raise InterceptError(f"cannot link {func} to cgroup:{event}: "
                                 f"{os.strerror(ctypes.get_errno())}")
        path = pin.with_name(f"{pin.name}_{event}")     # (bpffs refuses dots in names)
        fresh = path.with_name(path.name + "_new")
        fresh.unlink(missing_ok=True)
        ok = libbcc.lib.bpf_obj_pin(lfd, str(fresh).encode()) == 0
        os.close(lfd)
        if not ok:
            raise InterceptError(f"cannot pin the cgroup:{event} link at {fresh}")
        fresh.replace(path)      # the old link goes with its last pin
        pins.append(path)
    return pins


class Interceptor:
    """One loaded copy of the programs, attached to one or more cgroups."""

    def __init__(self, proxy_port: int, *, proxy_ip4: str = "127.0.0.1", mode: str = "deny",
                 pin_dir: Path = PIN_DIR, unix_hooks: bool = True):
        if mode not in MODES:
            raise InterceptError(f"unknown mode {mode!r}: use deny, record or allow")
        preflight()
        from bcc import BPF
        self._BPF = BPF
        pin_dir.mkdir(parents=True, exist_ok=True)
        ip = struct.unpack("=I", socket.inet_aton(proxy_ip4))[0]
        port = struct.unpack("=H", struct.pack("!H", proxy_port))[0]
        cflags = [f"-DAG_PROXY_IP4={ip}u", f"-DAG_PROXY_PORT={port}", f"-DAG_MODE={MODES[mode]}",
                  f'-DAG_PIN="{pin_dir}"']
        # the unix-socket hooks, where BTF says the kernel has them (else `unix_error`)
        btf = unixhooks.probe_btf() if unix_hooks else None
        self.unix_error = "" if btf else ("turned off ([intercept] unix_hooks)" if not unix_hooks
                                          else "no cgroup unix-socket hooks (kernel 6.7+ with "
                                               "BTF and bpftool)")
        self.bpf = None
        if btf:
            try:
                self.bpf = BPF(src_file=str(BPF_SRC).encode(), cflags=cflags + btf.cflags())
            except Exception as exc:   # the rest must not depend on the newest part
                btf = None
                self.unix_error = f"the unix-socket hooks did not compile: {exc}"
                log.warning("%s", self.unix_error)
        if self.bpf is None:
            try:
                self.bpf = BPF(src_file=str(BPF_SRC).encode(), cflags=cflags)
            except Exception as exc:
                raise InterceptError(f"cannot compile or load {BPF_SRC.name}: {exc}") from None
        from bcc import BPFAttachType
        self.funcs = []
        for name, ptype, atype, tool_name in PROGRAMS:
            try:
                fn = self.bpf.load_func(name.encode(), getattr(BPF, ptype),
                                        attach_type=getattr(BPFAttachType, atype))
            except Exception as exc:
                raise InterceptError(f"the kernel refused BPF program {name} ({ptype}): {exc}") from None
            self.funcs.append((fn, getattr(BPFAttachType, atype), tool_name))
        self.unix_progs: list[unixhooks.UnixProgram] = []
        if btf:
            try:
                self.unix_progs = unixhooks.load(self.bpf, btf)
            except OSError as exc:
                self.unix_error = f"the kernel refused the unix-socket hooks: {exc.strerror}"
                log.warning("%s", self.unix_error)
        self._unix_globs: tuple[str, ...] = ()
        self._unix_abstract = False
        self.mode = mode
        self.proxy_port = proxy_port
        self.pin_dir = pin_dir
        self.owner = pinned_map_ids(pin_dir)   # this tree's programs use these maps
        self.cgroups: list[Path] = []
        self._peers = self.bpf[b"peers"]
        self._conns = self.bpf[b"conns"]
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._links: list[Path] = []

    # ------------------------------------------------------------------ attach

    def pin_programs(self, directory: Path) -> dict[str, Path]:
        """Pin the programs (bpftool's attach type name -> path), for systemd's
        BPFProgram= to attach to a unit's cgroup as it is made, before its first
        instruction. Pins of an earlier run are replaced."""
        from bcc import libbcc
        directory.mkdir(parents=True, exist_ok=True)
        out = {}
        for fn, _atype, tool_name in self.funcs:
            path = directory / tool_name
            path.unlink(missing_ok=True)
            if libbcc.lib.bpf_obj_pin(fn.fd, str(path).encode()) != 0:
                raise InterceptError(f"cannot pin program {fn.name.decode()} at {path}")
            out[tool_name] = path
        return out

    def attach(self, cgroup: Path, *, enroll: bool = True) -> None:
        """Attach every program to `cgroup` (descendants inherit them) and enroll it;
        `enroll=False` for the parent of watched cgroups, whose other processes the
        programs let be. Programs of an earlier run are detached only after ours are in
        place: no unguarded moment."""
        if enroll:
            self.enroll(cgroup_id(cgroup))
        old = [p for p in attached(cgroup) if p.get("name", "").startswith(PREFIX)]
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for fn, atype, _ in self.funcs:
                try:
                    self._BPF.attach_func(fn, fd, atype, BPF_F_ALLOW_MULTI)
                except Exception as exc:
                    raise InterceptError(f"cannot attach {fn.name.decode()} to {cgroup}: {exc}") from None
            try:
                unixhooks.attach(self.unix_progs, fd)
            except OSError as exc:
                raise InterceptError(f"cannot attach the unix-socket hooks to {cgroup}: "
                                     f"{exc.strerror}") from None
        finally:
            os.close(fd)
        self.cgroups.append(cgroup)
        ids = {p["id"] for p in old}
        n = detach_ours(cgroup, ids, keep=self.unix_progs, owner=self.owner)
        if n:
            log.info("replaced %d program(s) of an earlier run on %s", n, cgroup)

    def detach(self, cgroup: Path) -> None:
        if cgroup in self.cgroups:
            self.cgroups.remove(cgroup)
        try:
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return   # a removed cgroup takes its programs with it
        try:
            for fn, atype, _ in self.funcs:
                try:
                    self._BPF.detach_func(fn, fd, atype)
                except Exception as exc:
                    log.warning("detach %s from %s: %s", fn.name.decode(), cgroup, exc)
            try:
                unixhooks.detach(self.unix_progs, fd)
            except OSError as exc:
                log.warning("detach the unix-socket hooks from %s: %s", cgroup, exc.strerror)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ maps

    def _replace(self, name: str, addrs: list[tuple[str, int]]) -> None:
        """New keys in first, stale ones out after: the programs still running see
        either set, never an empty one."""
        table = self.bpf[name.encode()]
        wanted = {bytes(addr_key(h, p)): addr_key(h, p) for h, p in addrs}
        for key in wanted.values():
            table[key] = ctypes.c_uint32(1)
        for key in list(table.keys()):
            if bytes(key) not in wanted:
                del table[key]

    def set_targets(self, addrs: list[tuple[str, int]]) -> None:
        self._replace("targets", addrs)

    def set_resolvers(self, addrs: list[tuple[str, int]]) -> None:
        self._replace("resolvers", addrs)

    def watch(self, paths: list[str]) -> None:
        """Enroll the cgroups at these paths (under the cgroup2 mount, e.g.
        '/system.slice/x.service') in the kernel whenever they are made or renamed to,
        through links pinned in the pin directory that outlive this process. The programs
        must be attached above them (attach(parent, enroll=False))."""
        table = self.bpf[b"watched"]
        wanted = {}
        for path in paths:
            key = table.Key()
            raw = path.encode()
            if len(raw) > 127:
                raise InterceptError(f"cgroup path too long to watch (127 bytes at most): {path}")
            ctypes.memmove(ctypes.addressof(key), raw, len(raw))
            wanted[bytes(key)] = key
        for key in wanted.values():
            table[key] = ctypes.c_uint32(1)
        for key in list(table.keys()):
            if bytes(key) not in wanted:
                del table[key]
        if not self._links:
            self._links = _pin_tracepoint_links(self.bpf, "ag_cgroup_made",
                                                ("cgroup_mkdir", "cgroup_rename"),
                                                self.pin_dir / "enroll")

    def set_unix_allow(self, globs: tuple[str, ...], abstract_allowed: bool) -> None:
        """The unix sockets enrolled processes may reach: path globs and '@name's."""
        self._unix_globs, self._unix_abstract = tuple(globs), abstract_allowed
        self.refresh_unix()

    def refresh_unix(self) -> None:
        """Entries in first, stale ones out after (as _replace). Globs other than exact
        names and trailing-'*' prefixes follow the sockets bound now: call again when
        unixhooks.needs_refresh(globs)."""
        if not self.unix_progs:
            return
        from hostagent.intercept.unixguard import bound_sockets
        paths, abstract = bound_sockets() if unixhooks.needs_refresh(self._unix_globs) \
            else (set(), set())
        wanted: dict[str, dict[bytes, object]] = {"unix_exact": {}, "unix_prefix": {}}
        for e in unixhooks.entries(self._unix_globs, self._unix_abstract, paths | abstract):
            key = self.bpf[e.table.encode()].Key()
            key.len = e.key_len
            ctypes.memmove(ctypes.addressof(key) + 4, e.name, len(e.name))
            wanted[e.table][bytes(key)] = key
        for name, keys in wanted.items():
            table = self.bpf[name.encode()]
            for key in keys.values():
                table[key] = ctypes.c_uint32(1)
            for key in list(table.keys()):
                if bytes(key) not in keys:
                    del table[key]

    def set_unix_redirects(self, redirects: dict[str, str]) -> None:
        """A target's local socket path -> the proxy's socket for it: enrolled connects
        to the one are rewritten to the other (and remembered: take_unix_peer)."""
        table = self.bpf[b"unix_redirect"]
        table.clear()
        for given, proxy in redirects.items():
            key = table.Key()
            key.len = len(given.encode())
            ctypes.memmove(ctypes.addressof(key) + 4, given.encode(), key.len)
            dest = table.Leaf()
            dest.len = len(proxy.encode())
            ctypes.memmove(ctypes.addressof(dest) + 4, proxy.encode(), dest.len)
            table[key] = dest

    def take_unix_peer(self, pid: int) -> ConnRecord | None:
        """The record of the process (SO_PEERCRED's pid) the kernel sent to one of the
        proxy's unix sockets, while fresh. Kept (a process may open several
        connections); the next redirect of that process replaces it."""
        try:
            ci = self.bpf[b"unix_conns"][ctypes.c_uint32(pid)]
        except KeyError:
            return None
        if time.monotonic_ns() - ci.ktime_ns > RECORD_TTL_NS:
            return None
        return ConnRecord(cookie=ci.cookie, cgroup_id=ci.cgroup_id, ktime_ns=ci.ktime_ns,
                          pid=ci.tgid, tid=ci.tid, uid=ci.uid, gid=ci.gid, dst_host="",
                          dst_port=0, action=ci.action, family=socket.AF_UNIX,
                          comm=bytes(ci.comm).split(b"\0", 1)[0].decode(errors="replace"))

    def enroll(self, cgroup_id: int) -> None:
        self.bpf[b"enrolled"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint32(1)

    def unenroll(self, cgroup_id: int) -> None:
        try:
            del self.bpf[b"enrolled"][ctypes.c_uint64(cgroup_id)]
        except KeyError:
            pass

    def clear_records(self) -> None:
        """Forget every connect record (at start: a record left from before, whose
        client is gone, must not lend its identity to whoever reuses that port)."""
        self._peers.clear()
        self._conns.clear()
        if self.unix_progs:
            self.bpf[b"unix_conns"].clear()

    def take_peer(self, host: str, port: int) -> ConnRecord | None:
        """The connect record of the client whose local address is host:port, removed
        from the maps (each record is used once, and only while fresh)."""
        key = addr_key(host, port)
        try:
            ci = self._peers[key]
        except KeyError:
            return None
        try:
            del self._peers[key]
            del self._conns[ctypes.c_uint64(ci.cookie)]
        except KeyError:
            pass
        if time.monotonic_ns() - ci.ktime_ns > RECORD_TTL_NS:
            log.warning("ignored a stale connect record for %s:%d", host, port)
            return None
        dst_host, dst_port = key_to_addr(ci.orig)
        return ConnRecord(cookie=ci.cookie, cgroup_id=ci.cgroup_id, ktime_ns=ci.ktime_ns,
                          pid=ci.tgid, tid=ci.tid, uid=ci.uid, gid=ci.gid, dst_host=dst_host,
                          dst_port=dst_port, action=ci.action, family=ci.family,
                          comm=bytes(ci.comm).split(b"\0", 1)[0].decode(errors="replace"))

    def watch_all_execs(self, uids: list[int], exes: list[str]) -> None:
        """Report execs outside the tree too, and stop those of these users or paths
        at exec until they are enrolled (enrollment by uid or executable)."""
        for uid in uids:
            self.bpf[b"stop_uids"][ctypes.c_uint32(uid)] = ctypes.c_uint32(1)
        table = self.bpf[b"stop_exes"]
        for exe in exes:
            key = table.Key()
            raw = exe.encode()[:127]
            ctypes.memmove(ctypes.addressof(key), raw, len(raw))
            table[key] = ctypes.c_uint32(1)
        self.bpf[b"settings"][ctypes.c_int(0)] = ctypes.c_uint32(1)

    def lost_events(self) -> int:
        return sum(self.bpf[b"lost"][ctypes.c_int(0)])

    def suppressed(self, cgroup_id: int) -> int:
        """Refusals of this cgroup's processes the kernel counted but did not report
        (over its per-second rate); the count is taken (a run's end reports it)."""
        table = self.bpf[b"guard_suppressed"]
        key = ctypes.c_uint64(cgroup_id)
        try:
            n = table[key].value
            del table[key]
        except KeyError:
            return 0
        try:
            del self.bpf[b"guard_rate"][key]
        except KeyError:
            pass
        return n

    # ------------------------------------------------------------------ events

    def start_events(self, callback: Callable[[KernelEvent], None]) -> None:
        def on_event(_ctx, data, _size):
            raw = ctypes.cast(data, ctypes.POINTER(RawEvent)).contents
            kind = EVENT_NAMES.get(raw.type, str(raw.type))
            addr = ""
            filename = raw.filename
            if raw.type in (EV_DENY_CONNECT, EV_ALLOW_DIRECT, EV_DENY_UDP, EV_DENY_BIND):
                host, port = key_to_addr(raw.addr)
                addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            elif raw.type == EV_DENY_UNIX:   # the address as the caller gave it
                addr, filename = unix_name(ctypes.string_at(
                    ctypes.addressof(raw) + RawEvent.filename.offset, 110)), b""
            try:
                callback(KernelEvent(kind, raw.tgid, raw.uid, raw.cgroup_id,
                                     raw.comm.decode(errors="replace"),
                                     filename.decode(errors="replace"), addr,
                                     bool(raw.flags & FLAG_STOPPED)))
            except Exception:  # a bad consumer must not kill the poller
                log.exception("kernel event consumer failed")

        self.bpf[b"events"].open_ring_buffer(on_event)

        def poll():
            while not self._stop.is_set():
                self.bpf.ring_buffer_poll(100)

        self._poller = threading.Thread(target=poll, name="bpf-events", daemon=True)
        self._poller.start()

    def close(self, detach: bool = False) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(2)
        if detach:
            for cg in list(self.cgroups):
                self.detach(cg)
        for p in self.unix_progs:
            os.close(p.fd)
        self.bpf.cleanup()

