"""The egress guard: every way around the proxy that an enrolled agent might try."""
import json
import os
import pwd

import pytest

from hostagent.intercept.cgroups import cgroup2_mount
from tests.hostagent.intercept.conftest import Host, UnixServer


def results(out):
    return {r["op"] + (f":{i}" if i else ""): r for i, r in enumerate(out)}


@pytest.mark.parametrize("user", ["nobody", None])
def test_bypass_attempts_fail(host, user):
    """Everything fails, as a user and as root (capabilities dropped by `agentgate run`,
    and a cgroup namespace rooted at the run's cgroup: no cgroup outside it can be
    entered)."""
    unlisted = "127.0.0.1 9"           # not a target: deny mode refuses the connect
    procs = cgroup2_mount() / "cgroup.procs"
    cmds = ["udp 127.0.0.1 9999", "udp 127.0.0.1 9999 connect", "udp ::1 9999",
            "raw", "packet", "ping", f"connect {unlisted}", f"escape {procs}"]
    rc, out, err = host.run(*" ; ".join(cmds).split(), user=user)
    assert rc == 0, err
    assert len(out) == len(cmds), out
    for cmd, res in zip(cmds, out):
        assert not res["ok"], (cmd, res)
    errors = [r.get("error") for r in out]
    assert errors[:3] == ["EPERM"] * 3                 # UDP: only the resolvers
    assert errors[3] == errors[4] == "EPERM"           # raw, AF_PACKET
    assert errors[6] == "EPERM"                        # unlisted destination
    # leaving the tree: a user lacks the permission, root can't see outside its namespace
    assert errors[7] in (("EACCES", "EPERM") if user else ("EROFS", "ENOENT")), errors[7]
    run = [s for s in host.sessions("run")][0]
    denied = [f for k, f in run["events"] if k == "connect_denied"]
    assert any(f["address"] == "127.0.0.1:9" for f in denied)
    assert any(k == "udp_denied" for k, _ in run["events"])


def test_dns_resolvers_are_reachable_over_udp(host):
    rc, out, err = host.run("udp", "127.0.0.1", "53535", user="nobody")
    assert rc == 0 and out[0]["ok"], (out, err)


def test_record_mode_proxies_unlisted_destinations_as_raw_tcp(tmp_path, collector, echo):
    h = Host(tmp_path, collector, echo, mode="record")
    h.config = h.write("record", mode="record").parent / "record.toml"
    import socket
    other = socket.create_server(("127.0.0.1", 0))
    port = other.getsockname()[1]
    import threading

    def serve():
        conn, _ = other.accept()
        with conn:
            conn.sendall(b"hi " + conn.recv(100))
    threading.Thread(target=serve, daemon=True).start()
    try:
        rc, out, err = h.run("connect", "127.0.0.1", str(port), user="nobody")
        assert rc == 0 and out[0]["ok"] and out[0]["reply"].startswith("hi hello"), (out, err)
        (s,) = h.sessions("tcp")
        assert s["start"]["mode"] == "record" and s["target"] == f"127.0.0.1:{port}"
        assert any(k == "data" for k, _ in s["events"])
    finally:
        other.close()
        h.cleanup()


def test_allow_mode_lets_unlisted_destinations_through_and_logs_them(tmp_path, collector, echo):
    h = Host(tmp_path, collector, echo)
    import socket
    import threading
    other = socket.create_server(("127.0.0.1", 0))
    port = other.getsockname()[1]
    threading.Thread(target=lambda: other.accept()[0].sendall(b"direct\n"), daemon=True).start()
    try:
        rc, out, err = h.run("connect", "127.0.0.1", str(port), mode="allow", user="nobody")
        assert rc == 0 and out[0]["reply"] == "direct\n", (out, err)
        assert h.sessions("tcp") == []                 # not proxied...
        run = h.sessions("run")[0]                     # ...but logged
        assert any(k == "connect_direct" and f["address"] == f"127.0.0.1:{port}"
                   for k, f in run["events"])
    finally:
        other.close()
        h.cleanup()


def test_agents_cannot_listen_beyond_loopback(host):
    rc, out, err = host.run("bind 0.0.0.0 17555 ; bind :: 17556 ; bind 127.0.0.1 17557 ; "
                            "bind ::1 17558", user="nobody")
    assert rc == 0, err
    assert [(r["ok"], r.get("error")) for r in out] == [
        (False, "EPERM"), (False, "EPERM"), (True, None), (True, None)]
    run = host.sessions("run")[0]
    assert any(k == "bind_denied" and f["address"] == "0.0.0.0:17555" for k, f in run["events"])


def test_a_connect_loop_cannot_flood_the_recording(host):
    rc, out, err = host.run("flood", "127.0.0.1", "9", "600", user="nobody")
    assert rc == 0 and out[0]["failed"] == 600, (out, err)
    run = host.sessions("run")[0]
    recorded = sum(1 for k, _ in run["events"] if k == "connect_denied")
    suppressed = sum(f["count"] for k, f in run["events"] if k == "events_suppressed")
    suppressed += run["events"][-1][1].get("events_suppressed", 0)
    assert recorded + suppressed == 600
    assert recorded < 600 and suppressed > 0


@pytest.mark.parametrize("user", ["nobody", None])
def test_no_user_namespaces_and_no_entering_namespaces(host, user):
    """In a user namespace of its own an agent could mount over a path the unix-socket
    hook judges as written: refused, by unshare, clone and the unshare tool alike; and
    programs that spawn (clone3 refused: the C library falls back) still run."""
    cmds = ["userns", "clone_userns", "setns_cgroup", "tool unshare -Ur true",
            "tool /bin/sh -c true", f"connect 127.0.0.1 {host.echo.port}"]
    rc, out, err = host.run(*" ; ".join(cmds).split(), user=user)
    assert rc == 0, err
    assert [r["ok"] for r in out] == [False, False, False, False, True, True], out
    assert out[0]["error"] == out[1]["error"] == "EPERM", out
    assert "Operation not permitted" in out[3]["stderr"], out


def test_a_root_agent_stays_in_its_cgroup(host, tmp_path):
    """Root can't move itself out (to the tree's root, to a sibling made for the test),
    can't mount another cgroup2 to get around the namespace, can't enter the host's
    cgroup namespace or make a new one; it sees its own cgroup as the root; a connect
    afterwards is still proxied."""
    mount = cgroup2_mount()
    sibling = mount / host.tree / "outside-sibling"
    sibling.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "cg2"
    target.mkdir()
    try:
        cmds = [f"escape {mount / 'cgroup.procs'}", f"escape {sibling / 'cgroup.procs'}",
                f"mount_cgroup2 {target}", "setns_cgroup", "unshare_cgroup", "cgroup",
                f"connect 127.0.0.1 {host.echo.port}",
                # root's other ways out: the kernel's knobs (core_pattern's helper runs
                # outside every namespace), killing or making cgroups elsewhere
                "escape /proc/sys/kernel/core_pattern", f"escape {sibling / 'cgroup.kill'}",
                f"mkdir_cgroup {mount / 'agentgate-escape'}"]
        rc, out, err = host.run(*" ; ".join(cmds).split())
        assert rc == 0, err
        assert [r["op"] for r in out] == [c.split()[0] for c in cmds], out
        assert [r.get("ok") for r in out[:5]] == [False] * 5, out
        assert out[0]["uid"] == 0
        # /sys is read-only for a root agent (its own cgroup aside); below it, the
        # namespace would refuse the move anyway (ENOENT)
        assert out[0]["error"] == out[1]["error"] == "EROFS", out
        # (the host's namespace can't even be opened without CAP_SYS_PTRACE)
        assert out[2]["error"] == out[4]["error"] == "EPERM", out
        assert out[3]["error"] in ("EACCES", "EPERM"), out
        v2 = [line for line in out[5]["cgroup"].splitlines() if line.startswith("0::")]
        assert v2 == ["0::/"], out[5]                            # its own cgroup is root
        assert out[6]["ok"] and host.sessions("tcp"), out
        assert [r["error"] for r in out[7:]] == ["EROFS"] * 3, out
        assert not (mount / "agentgate-escape").exists()
        assert not (sibling / "cgroup.procs").read_text().strip()
    finally:
        sibling.rmdir()


@pytest.mark.parametrize("user", ["nobody", None])
def test_unix_sockets_are_reachable_only_as_the_policy_allows(host, tmp_path, user):
    import grp
    import os
    base = host.public / "run"          # a place `nobody` may reach, were it allowed
    (base / "dbus").mkdir(parents=True)
    os.chmod(base, 0o755)
    os.chmod(base / "dbus", 0o755)
    nogroup = grp.getgrnam("nogroup").gr_gid
    docker = UnixServer(str(base / "docker.sock"), group=nogroup)
    bus = UnixServer(str(base / "dbus" / "system_bus_socket"), group=nogroup)
    allowed = UnixServer(str(base / "allowed.sock"), group=nogroup)
    import uuid
    name = f"agentgate-test-{uuid.uuid4().hex[:8]}"
    abstract = UnixServer("\0" + name)
    cfg = host.config.read_text().replace(
        "dns = [", f'unix_allow = ["{base}/allowed*"]\ndns = [')
    host.config.write_text(cfg)
    # a link whose name the policy allows, to a socket it doesn't (the agent could make
    # one wherever it may write): the hook judges the name, the mount namespace the target
    os.symlink(base / "docker.sock", base / "allowed-link")
    (base / "alloweddir").mkdir()
    late = None
    try:
        cmds = [f"unix {base}/docker.sock", f"unix {base}/dbus/system_bus_socket",
                f"abstract {name}", f"unix {base}/allowed-link", f"unix_wait {base}/late.sock",
                f"unix {base}/allowed.sock",
                "tool id", "tool getent passwd root", "tool logger agentgate-test",
                # written to climb out of an allowed prefix, or otherwise not plainly
                f"unix {base}/alloweddir/../late.sock", f"unix {base}/alloweddir/./../late.sock",
                f"unix {base}//late.sock", f"unix {base}/allowed.sock/"]
        proc = host.popen(*" ; ".join(cmds).split(), user=user)
        # bound after the run started: no mount namespace covers it, the hook refuses it
        late = UnixServer(str(base / "late.sock"), group=nogroup)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        res = {c: json.loads(r) for c, r in zip(cmds, out.splitlines())}
        for refused in cmds[:5]:
            assert not res[refused]["ok"], (refused, res[refused])
        for by_hook in cmds[:3] + cmds[4:5]:
            assert res[by_hook]["error"] == "EPERM", (by_hook, res[by_hook])
        assert res[cmds[3]]["error"] == "ECONNREFUSED"      # the cover under the link
        assert res[cmds[5]]["ok"] and res[cmds[5]]["reply"] == "ok"
        assert all(res[c]["ok"] for c in cmds[6:9]), [res[c] for c in cmds[6:9]]
        for climbing in cmds[9:]:
            assert res[climbing]["error"] == "EPERM", (climbing, res[climbing])
        assert docker.accepted == bus.accepted == abstract.accepted == late.accepted == 0
        assert allowed.accepted == 1
        # outside the run, nothing changed: the host still reaches them
        assert UnixClient(str(base / "docker.sock"))
        run = host.sessions("run")[0]
        (guard,) = [f for k, f in run["events"] if k == "unix_guard"]
        assert f"{base}/docker.sock" in guard["hidden"]
        assert f"{base}/allowed.sock" in guard["allowed"]
        assert guard["abstract"].startswith("refused")
        assert guard["connect"].startswith("judged by the BPF")
        # each refusal by the hook is recorded with who tried, and the address as given
        denied = [f for k, f in run["events"] if k == "unix_denied"]
        assert [d["address"] for d in denied] == [
            f"{base}/docker.sock", f"{base}/dbus/system_bus_socket", f"@{name}",
            f"{base}/late.sock"] + [c.split(" ", 1)[1] for c in cmds[9:]]
        uid = pwd.getpwnam(user).pw_uid if user else 0
        assert {(d["uid"], d["comm"]) for d in denied} == {(uid, "python3")}
        assert all(d["pid"] > 0 for d in denied)
    finally:
        for s in (docker, bus, allowed, abstract, late):
            if s is not None:
                s.close()


def UnixClient(path: str) -> bool:
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b"x")
        return s.recv(10) == b"ok"


def test_the_cover_plan_covers_sockets_only(tmp_path):
    """/proc/net/unix lists names as bound: the binder may since have put a link to
    anything there (a program, /etc): only what is a socket now is covered."""
    import os
    import socket

    from hostagent.intercept import unixguard
    keep = []
    for name, target in (("to-file.sock", "/etc/hostname"), ("to-dir.sock", "/etc"),
                         ("real.sock", None)):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        keep.append(s)
        if target:
            os.unlink(tmp_path / name)
            os.symlink(target, tmp_path / name)
    try:
        plan = unixguard.plan(())
        assert str(tmp_path / "real.sock") in plan.hidden
        assert "/etc/hostname" not in plan.hidden and "/etc" not in plan.hidden
    finally:
        for s in keep:
            s.close()


def test_a_unix_redirect_is_recorded_for_its_process_alone_and_goes_with_it(tmp_path):
    """The proxy serves a unix peer by the record the hook made for its pid: the record
    is gone once that process is, so a pid used again is nobody's."""
    import socket
    import struct
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    from hostagent.intercept import cgroups
    from hostagent.intercept.loader import Interceptor
    from tests.support import wait_for
    name = f"agentgate-test-{uuid.uuid4().hex[:8]}"
    icpt = Interceptor(64999, pin_dir=Path("/sys/fs/bpf") / name)
    cg = cgroups.make_cgroup(cgroups.cgroup2_mount(), name)
    proxy = socket.socket(socket.AF_UNIX)
    proxy.bind(str(tmp_path / "proxy.sock"))
    proxy.listen(4)
    try:
        assert icpt.unix_progs, icpt.unix_error
        icpt.attach(cg)
        icpt.set_unix_redirects({str(tmp_path / "db.sock"): str(tmp_path / "proxy.sock")})
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "print('in', flush=True); sys.stdin.read()")
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "db.sock")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: (cg / "cgroup.procs").write_text(
                                     str(os.getpid())))
        assert child.stdout.readline() == "in\n"          # rewritten to the proxy's socket
        conn, _ = proxy.accept()
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_PEERCRED, 12))
        rec = icpt.take_unix_peer(pid)
        assert rec is not None and rec.pid == child.pid and rec.uid == uid
        assert icpt.take_unix_peer(os.getpid()) is None    # not sent here: no record
        child.stdin.close()
        child.wait(10)
        wait_for(lambda: icpt.take_unix_peer(pid) is None, what="the record gone with it")
        conn.close()
    finally:
        proxy.close()
        icpt.close(detach=True)
        cgroups.remove(cg)
        subprocess.run(["rm", "-rf", f"/sys/fs/bpf/{name}"])
