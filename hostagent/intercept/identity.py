"""Who opened a connection: the kernel's record, completed from /proc and cross-checked.

The BPF record (pid, uid, gid, comm, cgroup id at connect time) is the authority. /proc
adds exe, argv, cwd, parents, unit and container, but only if that pid is still the
same process: same cgroup, same uid, and started before the connect. Otherwise the
identity carries just the kernel's fields and says why (`mismatch` / `exited`).
"""
from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import time
from pathlib import Path

import psutil

from hostagent.intercept import cgroups
from hostagent.intercept.loader import ConnRecord

MAX_PARENTS = 16


def _name(fn, ident: int) -> str:
    try:
        return fn(ident)[0]
    except KeyError:
        return str(ident)


def _boot_offset() -> float:
    # bpf_ktime_get_ns is CLOCK_MONOTONIC: wall = monotonic + offset
    return time.time() - time.monotonic()


class IdentityCache:
    """/proc reads cost ~0.4 ms a connection; an agent opening many connections is the
    same process each time. Entries are keyed by what the kernel attested (pid, uid,
    cgroup) and live briefly, so a reused pid can't inherit an identity for long."""

    def __init__(self, mount: Path, tree: str = cgroups.TREE, ttl: float = 1.0,
                 size: int = 4096):
        self.mount, self.tree, self.ttl, self.size = mount, tree, ttl, size
        self._cache: dict[tuple, tuple[float, dict]] = {}

    def __call__(self, rec: ConnRecord) -> dict:
        key = (rec.pid, rec.uid, rec.gid, rec.cgroup_id)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return {**hit[1], "tid": rec.tid, "comm": rec.comm}
        ident = identify(rec, self.mount, self.tree)
        if ident.get("verified"):
            if len(self._cache) >= self.size:
                self._cache.clear()
            self._cache[key] = (now + self.ttl, ident)
        return ident


def identify(rec: ConnRecord, mount: Path, tree: str = cgroups.TREE) -> dict:
    ident = {
        "pid": rec.pid, "tid": rec.tid, "uid": rec.uid, "gid": rec.gid,
        "user": _name(pwd.getpwuid, rec.uid), "group": _name(grp.getgrgid, rec.gid),
        "comm": rec.comm, "cgroup_id": rec.cgroup_id, "verified": False,
    }
    try:
        proc = psutil.Process(rec.pid)
        with proc.oneshot():
            cg = cgroups.cgroup_of(rec.pid) or ""
            try:
                same_cgroup = cgroups.cgroup_id(mount / cg.lstrip("/")) == rec.cgroup_id
            except OSError:
                same_cgroup = False
            started = proc.create_time()
            connected = rec.ktime_ns / 1e9 + _boot_offset()
            uids = proc.uids()
            if not same_cgroup:
                ident["mismatch"] = "the pid is in another cgroup now (reused or moved)"
            elif started > connected + 1.0:
                ident["mismatch"] = "the pid was reused after the connect"
            elif rec.uid not in (uids.real, uids.effective):
                ident["mismatch"] = "the pid's uid differs from the connecting one"
            else:
                ident.update(verified=True, exe=_safe(proc.exe), argv=_safe(proc.cmdline),
                             cwd=_safe(proc.cwd), cgroup=cg, unit=cgroups.unit_of(cg),
                             container=cgroups.container_of(cg), ppid=proc.ppid(),
                             parents=_parents(proc, tree))
    except psutil.NoSuchProcess:
        ident["exited"] = True
    except psutil.AccessDenied as exc:
        ident["mismatch"] = f"cannot read /proc/{rec.pid}: {exc}"
    return ident


def _safe(fn):
    try:
        return fn()
    except (psutil.Error, OSError):
        return None


def _parents(proc: psutil.Process, tree: str) -> list[dict]:
    """The ppid chain up to the process that enrolled the session (the first one
    outside the agentgate tree is included: it is who ran `agentgate run`)."""
    chain = []
    p = proc
    for _ in range(MAX_PARENTS):
        try:
            p = p.parent()
        except psutil.Error:
            break
        if p is None:
            break
        cg = cgroups.cgroup_of(p.pid) or ""
        chain.append({"pid": p.pid, "exe": _safe(p.exe), "comm": _safe(p.name)})
        if not cg.startswith(f"/{tree}/") or p.pid == 1:
            break
    return chain


def summary(ident: dict) -> str:
    who = ident.get("user") or str(ident.get("uid"))
    what = ident.get("exe") or ident.get("comm") or "?"
    return f"{who} {what} (pid {ident.get('pid')})"


def _proc_net_addr(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # each 32-bit word is in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return canonical_ip(str(ipaddress.ip_address(words))), int(port, 16)


def canonical_ip(host: str) -> str:
    """One spelling per address, as the kernel reports it: v4-mapped IPv6 as IPv4."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def _socket_owner(peer: tuple, local: tuple) -> tuple[int, int] | None:
    """(uid, inode) of the client's socket: the kernel's own table of TCP sockets."""
    want = ((canonical_ip(peer[0]), peer[1]), (canonical_ip(local[0]), local[1]))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            # inode 0: a socket with no owner any more (TIME_WAIT), not our client
            if f[9] != "0" and (_proc_net_addr(f[1]), _proc_net_addr(f[2])) == want:
                return int(f[7]), int(f[9])
    return None


def _pid_of_inode(uid: int, inode: int) -> int | None:
    target = f"socket:[{inode}]"
    for proc in psutil.process_iter(["uids"]):
        try:
            if uid not in proc.info["uids"] or proc.pid == os.getpid():
                continue
            for fd in os.scandir(f"/proc/{proc.pid}/fd"):
                if os.readlink(fd.path) == target:
                    return proc.pid
        except (OSError, psutil.Error, TypeError):
            continue
    return None


def peer_identity(peer: tuple, local: tuple) -> dict:
    """Who is on the other end of a plain (non-redirected) loopback connection, from
    /proc: the socket's uid as the kernel keeps it, and the process holding it if one
    is found. Best effort, and marked so: `attested` says it was not the BPF record."""
    ident: dict = {"peer": f"{peer[0]}:{peer[1]}", "attested": "proc", "verified": False}
    if not ipaddress.ip_address(canonical_ip(peer[0])).is_loopback:
        ident["mismatch"] = "a remote peer: no process to attribute"
        return ident
    owner = _socket_owner(peer, local)
    if owner is None:
        ident["mismatch"] = "the client's socket is gone"
        return ident
    uid, inode = owner
    ident.update(uid=uid, user=_name(pwd.getpwuid, uid))
    pid = _pid_of_inode(uid, inode)
    if pid is None:
        ident["mismatch"] = "no process holds the client's socket"
        return ident
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cg = cgroups.cgroup_of(pid) or ""
            found = dict(pid=pid, gid=proc.gids().real, comm=_safe(proc.name),
                         exe=_safe(proc.exe), argv=_safe(proc.cmdline), cwd=_safe(proc.cwd),
                         cgroup=cg, unit=cgroups.unit_of(cg),
                         container=cgroups.container_of(cg), ppid=proc.ppid())
    except psutil.Error:
        ident["exited"] = True
        return ident
    status = _status(pid)
    # read last: what was read above belongs to a process that, after it, still holds the
    # socket as that user (not one that took a freed pid meanwhile)
    if status is None or uid not in status[0] or not _holds(pid, inode):
        ident["exited"] = True
        return ident
    found["gids"] = status[1]
    ident.update(found)
    ident["group"] = _name(grp.getgrgid, ident["gid"])
    return ident


def _status(pid: int) -> tuple[tuple[int, ...], list[int]] | None:
    """(uids, gids) of a process from /proc/<pid>/status: its real, effective, saved and
    fs uids; its real gid and supplementary groups. Not the effective gid: a setgid
    program holds that, and a socket it inherited from its user with it."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    uids, real, groups = (), None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uids = tuple(int(v) for v in value.split())
        elif key == "Gid":
            real = int(value.split()[0])
        elif key == "Groups":
            groups = [int(v) for v in value.split()]
    if real is None:
        return None
    return uids, list(dict.fromkeys([real, *groups]))


def _holds(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd.path) == target:
                return True
        except OSError:
            continue
    return False
