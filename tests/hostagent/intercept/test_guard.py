"""The egress guard: every way around the proxy that an enrolled agent might try."""
import pytest

from hostagent.intercept.cgroups import cgroup2_mount
from tests.hostagent.intercept.conftest import Host


def results(out):
    return {r["op"] + (f":{i}" if i else ""): r for i, r in enumerate(out)}


@pytest.mark.parametrize("user", ["nobody", None])
def test_bypass_attempts_fail(host, user):
    """As a non-root agent everything fails. As root (capabilities dropped by `agentgate
    run`) everything but leaving the cgroup fails: root may write any cgroup.procs, which
    is why agents should run as a user of their own (README)."""
    unlisted = "127.0.0.1 9"           # not a target: deny mode refuses the connect
    procs = cgroup2_mount() / "cgroup.procs"
    cmds = ["udp 127.0.0.1 9999", "udp 127.0.0.1 9999 connect", "udp ::1 9999",
            "raw", "packet", "ping", f"connect {unlisted}", f"escape {procs}"]
    rc, out, err = host.run(*" ; ".join(cmds).split(), user=user)
    assert rc == 0, err
    assert len(out) == len(cmds), out
    for cmd, res in zip(cmds if user else cmds[:-1], out):
        assert not res["ok"], (cmd, res)
    errors = [r.get("error") for r in out]
    assert errors[:3] == ["EPERM"] * 3                 # UDP: only the resolvers
    assert errors[3] == errors[4] == "EPERM"           # raw, AF_PACKET
    assert errors[6] == "EPERM"                        # unlisted destination
    if user:                                           # a non-root agent can't leave
        assert errors[7] in ("EACCES", "EPERM")
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
