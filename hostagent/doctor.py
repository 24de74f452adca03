"""`agentgate-hostagent doctor`: can interception work here, and does it?

Each check is a row; the canary at the end is the real test: a process in a fresh cgroup
connects to a local listener, and the connection must arrive at a stand-in proxy with
that process's pid and the original destination.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hostagent.intercept import cgroups
from hostagent.intercept.loader import (PREFIX, PROGRAMS, InterceptError, Interceptor,
                                        attached, preflight, pinned_map_ids, uses)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _check(name: str, fn) -> Check:
    try:
        detail = fn()
        return Check(name, True, detail or "ok")
    except Exception as exc:
        return Check(name, False, str(exc) or type(exc).__name__)


def _bcc() -> str:
    import bcc
    return f"bcc {getattr(bcc, '__version__', '?')} ({Path(bcc.__file__).parent})"


def _headers() -> str:
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not build.exists():
        raise InterceptError(f"{build} missing")
    return f"{build} -> {os.path.realpath(build)}"


def _mounted(path: str, what: str):
    def check() -> str:
        if not os.path.ismount(path):
            raise InterceptError(f"{what} not mounted at {path}")
        return path
    return check


def _unix_guard() -> str:
    from hostagent.intercept import unixguard, unixhooks
    abi = unixguard.landlock_abi()
    hooks = unixhooks.probe_btf() is not None
    landlock = abi >= unixguard.LANDLOCK_ABI_SCOPES
    connect = ("every connect judged by the BPF unix-socket hooks (below), for every enrolled "
               "process" if hooks else "no BPF unix-socket hooks (kernel < 6.7, or no BTF)")
    abstract = " and ".join(w for w, on in (("the hooks", hooks),
                                            (f"Landlock scope (ABI {abi})", landlock)) if on)
    return (f"{connect}; under agentgate run, pathname ones covered in a mount namespace; "
            f"abstract ones: {abstract or 'NOT guarded'}")


def run_doctor(tree: str = cgroups.TREE) -> list[Check]:
    checks = [
        _check("running as root", lambda: "yes" if os.geteuid() == 0 else
               (_ for _ in ()).throw(InterceptError("not root"))),
        _check("bcc importable", _bcc),
        _check("kernel headers", _headers),
        _check("tracefs", _mounted("/sys/kernel/tracing", "tracefs")),
        _check("bpffs", _mounted("/sys/fs/bpf", "bpffs")),
        _check("cgroup v2", lambda: str(cgroups.cgroup2_mount())),
        _check("root agents kept in their cgroup", lambda: "cgroup namespaces are "
               "delegation boundaries (nsdelegate)" if cgroups.ensure_nsdelegate() else
               (_ for _ in ()).throw(InterceptError(
                   "nsdelegate can't be set on the cgroup v2 mount: a root agent could "
                   "leave the tree; run agents as users of their own"))),
        _check("unix sockets of agentgate run", _unix_guard),
    ]
    if not all(c.ok for c in checks):
        return checks
    root = cgroups.ensure_tree(tree)
    ours = [p for p in attached(root) if p.get("name", "").startswith(PREFIX)]
    # a daemon enrolling units or cgroups has them on the cgroup2 root, using its maps
    owner = pinned_map_ids(Path("/sys/fs/bpf") / tree)
    mount = cgroups.cgroup2_mount()
    on_root = [p for p in attached(mount) if owner and p.get("name", "").startswith(PREFIX)
               and uses(p["id"], owner)] if mount != root else []
    where = [f"{len(ours)} attached to {root}"] * bool(ours) + \
        [f"{len(on_root)} attached to {mount} (for units and cgroups)"] * bool(on_root)
    checks.append(Check("host agent programs", True,
                        "; ".join(where) if where else f"none attached to {root}"))
    pins = sorted(p.name for p in (Path("/sys/fs/bpf") / tree).glob("*"))
    checks.append(Check("pinned maps", True, ", ".join(pins) if pins else "none"))
    checks += _canary(root)
    return checks


def _unix_canary(icpt: Interceptor, cg: Path, pin: Path) -> Check:
    """A unix socket nobody allowed: an enrolled connect to it must fail with EPERM."""
    if not icpt.unix_progs:
        return Check("unix-socket hooks", True, f"not loaded: {icpt.unix_error}")
    import tempfile
    icpt.set_unix_allow((), False)
    with tempfile.TemporaryDirectory() as d, socket.socket(socket.AF_UNIX) as srv:
        path = f"{d}/canary.sock"
        srv.bind(path)
        srv.listen(1)
        code = ("import socket,errno\ntry: socket.socket(socket.AF_UNIX).connect(%r); "
                "print('connected')\nexcept OSError as e: print(errno.errorcode[e.errno])" % path)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30, preexec_fn=lambda: (cg / "cgroup.procs").write_text(
                               str(os.getpid())))
    if r.stdout.strip() != "EPERM":
        return Check("unix-socket hooks", False, f"a refused connect gave {r.stdout.strip() or r.stderr.strip()!r}, not EPERM")
    return Check("unix-socket hooks", True, "loaded; a refused connect fails with EPERM")


def _canary(root: Path) -> list[Check]:
    out: list[Check] = []
    name = f"doctor-{uuid.uuid4().hex[:8]}"
    pin = Path("/sys/fs/bpf") / name
    target = socket.create_server(("127.0.0.1", 0))
    proxy = socket.create_server(("127.0.0.1", 0))
    proxy.settimeout(10)
    tport, pport = target.getsockname()[1], proxy.getsockname()[1]
    icpt = None
    cg = None
    try:
        try:
            preflight()
            icpt = Interceptor(pport, pin_dir=pin)
        except InterceptError as exc:
            out.append(Check("BPF programs load", False, str(exc)))
            return out
        for fn_name, ptype, atype, _ in PROGRAMS:
            out.append(Check(f"program {fn_name}", True, f"{ptype} / {atype}"))
        out.append(Check("tracepoints + ring buffer", True, "sched_process_exec, sched_process_exit"))
        # outside the tree: a running host agent's programs would judge it too
        cg = cgroups.make_cgroup(cgroups.cgroup2_mount(), name)
        icpt.attach(cg)
        icpt.set_targets([("127.0.0.1", tport)])
        code = ("import socket,os,sys;s=socket.create_connection(('127.0.0.1',%d),5);"
                "s.sendall(str(os.getpid()).encode());s.close()" % tport)
        child = subprocess.Popen([sys.executable, "-c", code],
                                 preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
        try:
            conn, peer = proxy.accept()
        except socket.timeout:
            out.append(Check("canary", False, "the enrolled connect never reached the proxy"))
            return out
        with conn:
            rec = None
            deadline = time.monotonic() + 2
            while rec is None and time.monotonic() < deadline:
                rec = icpt.take_peer(peer[0], peer[1])
            child.wait(10)
            if rec is None:
                out.append(Check("canary", False, "redirected, but no interception record"))
            elif rec.pid != child.pid or (rec.dst_host, rec.dst_port) != ("127.0.0.1", tport):
                out.append(Check("canary", False, f"wrong attribution: pid {rec.pid} "
                                 f"(expected {child.pid}), {rec.dst_host}:{rec.dst_port}"))
            else:
                out.append(Check("canary", True, f"pid {rec.pid} uid {rec.uid} -> "
                                 f"127.0.0.1:{tport} redirected and attributed"))
        out.append(_unix_canary(icpt, cg, pin))
        return out
    finally:
        target.close()
        proxy.close()
        if icpt:
            icpt.close(detach=True)
        if cg is not None:
            cgroups.remove(cg)
        subprocess.run(["rm", "-rf", str(pin)], check=False)
