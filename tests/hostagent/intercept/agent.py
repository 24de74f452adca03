"""A stand-in agent, run enrolled by the tests (stdlib only: it runs as other users).

Prints one JSON line per action with what happened, e.g.
  agent.py connect 127.0.0.1 5000      {"op": "connect", "pid": .., "reply": "..."}
  agent.py grandchild connect ::1 5000 the same, done by a grandchild
"""
import errno
import json
import os
import socket
import sys


def report(**kw):
    kw.update(pid=os.getpid(), ppid=os.getppid(), uid=os.getuid())
    print(json.dumps(kw), flush=True)


def err(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno)) if isinstance(exc, OSError) else str(exc)


def connect(host, port, payload="hello"):
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
    except OSError as exc:
        return report(op="connect", ok=False, error=err(exc))
    try:
        s.sendall(f"{payload} from {os.getpid()}\n".encode())
        reply = s.recv(4096).decode()
        report(op="connect", ok=bool(reply), reply=reply)
    except OSError as exc:
        report(op="connect", ok=False, error=err(exc))
    finally:
        s.close()


def udp(host, port, connect_first=False):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if connect_first == "connect":
            s.connect((host, int(port)))
            s.send(b"x")
        else:
            s.sendto(b"x", (host, int(port)))
        report(op="udp", ok=True)
    except OSError as exc:
        report(op="udp", ok=False, error=err(exc))


def open_socket(kind):
    args = {"raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0),
            "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)}[kind]
    try:
        socket.socket(*args).close()
        report(op=kind, ok=True)
    except OSError as exc:
        report(op=kind, ok=False, error=err(exc))


def bind(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, int(port)))
        s.listen(1)
        report(op="bind", ok=True)
    except OSError as exc:
        report(op="bind", ok=False, error=err(exc))
    finally:
        s.close()


def escape(cgroup_procs):
    try:
        with open(cgroup_procs, "w") as fh:
            fh.write(str(os.getpid()))
        report(op="escape", ok=True)
    except OSError as exc:
        report(op="escape", ok=False, error=err(exc))


def contain(op, arg=""):
    """Ways out of a cgroup namespace: mount another cgroup2, enter the host's cgroup
    namespace, make a new one."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if op == "mount_cgroup2":
        rc = libc.mount(b"none", arg.encode(), b"cgroup2", 0, None)
    elif op == "setns_cgroup":
        try:
            fd = os.open("/proc/1/ns/cgroup", os.O_RDONLY)
        except OSError as exc:
            report(op=op, ok=False, error=err(exc))
            return
        rc = libc.setns(fd, 0x02000000)
        os.close(fd)
    elif op == "userns":       # a user (and mount) namespace of its own
        rc = libc.unshare(0x10000000 | 0x00020000)
    elif op == "clone_userns":  # the same through clone(2), as a child
        import signal
        stack = ctypes.create_string_buffer(1 << 16)
        child = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(lambda _: 0)
        rc = libc.clone(child, ctypes.c_void_p(ctypes.addressof(stack) + (1 << 16)),
                        0x10000000 | signal.SIGCHLD, None)
        if rc > 0:
            os.waitpid(rc, 0)
            rc = 0
    else:   # unshare_cgroup
        rc = libc.unshare(0x02000000)
    if rc == 0:
        report(op=op, ok=True)
    else:
        report(op=op, ok=False, error=err(OSError(ctypes.get_errno(), "")))


def descend(tree):
    """Move into a sub-cgroup of its own cgroup (found under `tree`), then exec a
    program there: still in the tree."""
    import glob
    import subprocess
    mine = next(os.path.dirname(p) for p in glob.glob(f"{tree}/**/cgroup.procs", recursive=True)
                if str(os.getpid()) in open(p).read().split())
    sub = os.path.join(mine, "sub")
    os.mkdir(sub)
    with open(os.path.join(sub, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))
    subprocess.run(["/bin/true"], check=True)
    report(op="descend", ok=True, cgroup=sub)


def unix(op, name):
    if op == "unix_wait":    # a socket bound after the run started
        import time
        deadline = time.monotonic() + 10
        while not os.path.exists(name) and time.monotonic() < deadline:
            time.sleep(0.01)
        op = "unix"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(name if op == "unix" else "\0" + name)
        s.sendall(b"hi")
        report(op=op, ok=True, reply=s.recv(100).decode())
    except OSError as exc:
        report(op=op, ok=False, error=err(exc))
    finally:
        s.close()


def run_tool(*argv):
    import subprocess
    p = subprocess.run(list(argv), capture_output=True, text=True)
    report(op="tool", ok=p.returncode == 0, argv=list(argv), stderr=p.stderr[-300:])


def main(argv):
    if argv[0] in ("child", "grandchild"):
        depth = 1 if argv[0] == "child" else 2
        pid = os.fork()
        if pid == 0:
            if depth == 2:
                main(["child"] + argv[1:])
            else:
                main(argv[1:])
            os._exit(0)
        os.waitpid(pid, 0)
        return
    op, args = argv[0], argv[1:]
    if op == "connect":
        connect(*args)
    elif op == "udp":
        udp(*args)
    elif op in ("raw", "packet", "ping"):
        open_socket(op)
    elif op == "escape":
        escape(*args)
    elif op in ("mount_cgroup2", "setns_cgroup", "unshare_cgroup", "userns", "clone_userns"):
        contain(op, *args)
    elif op in ("unix", "abstract", "unix_wait"):
        unix(op, *args)
    elif op == "tool":
        run_tool(*args)
    elif op == "mkdir_cgroup":
        try:
            os.mkdir(args[0])
            report(op=op, ok=True)
        except OSError as exc:
            report(op=op, ok=False, error=err(exc))
    elif op == "descend":
        descend(*args)
    elif op == "cgroup":
        report(op="cgroup", cgroup=open("/proc/self/cgroup").read().strip())
    elif op == "bind":
        bind(*args)
    elif op == "flood":
        failed = 0
        for _ in range(int(args[2])):
            try:
                socket.create_connection((args[0], int(args[1])), timeout=2).close()
            except OSError:
                failed += 1
        report(op="flood", failed=failed)
    elif op == "sleep":
        import time
        report(op="sleep")
        time.sleep(float(args[0]))
    elif op == "wait":
        report(op="wait")
        sys.stdin.readline()
    elif op == "exit":
        sys.exit(int(args[0]))


if __name__ == "__main__":
    for cmd in " ".join(sys.argv[1:]).split(" ; "):
        main(cmd.split())
