"""The I/O driver with a fake layer, on real loopback sockets under uvloop: TLS on each
leg, a hold, abort, half-close, backpressure from a slow reader, a layer that raises
ProtocolError (only that session ends), the memory budget and the idle timeout.

The fake protocol is line-based: the client's "TLS" asks for TLS towards it, "HOLD x"
is held for approval, "BAD" is a protocol error, "BIG" makes the layer buffer a lot;
anything else is recorded and relayed. With `upstream_tls`, the layer starts TLS
towards the server at connect (as HTTPS will)."""
from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvloop

from hostagent.protocols.api import (CLIENT, Aborted, ApprovalDecided, Close, DataReceived,
                                     EofReceived, Handoff, Hold, HoldPending, ProtocolError,
                                     Record, Start, StartClientTls, StartUpstreamTls,
                                     TlsEstablished, TlsFailed, ToClient, ToUpstream)
from hostagent.protocols.registry import Options, ProtocolSpec
from hostagent.proxy.driver import Proxy
from hostagent.proxy.targets import ROOT_ONLY, ListenAllow, Target, Targets
from hostagent.recording.spool import Spool
from hostagent.tls import LocalCA
from tests.certs import CA


class FakeLayer:
    def __init__(self, ctx):
        self.ctx = ctx
        self.buf = b""
        self.big = 0
        self.holding = False

    def buffered(self) -> int:
        return len(self.buf) + self.big

    def handle(self, event):
        t = type(event)
        if t is Start:
            if self.ctx.options.get("upstream_tls"):
                return [StartUpstreamTls("localhost", verify=True, ca=self.ctx.options["ca"])]
            return []
        if t is DataReceived and event.side == CLIENT:
            self.buf += event.data
            return self.lines()
        if t is DataReceived:
            return [ToClient(event.data)]
        if t is TlsEstablished:
            return [Record("tls", {"side": event.side, "version": event.version,
                                   "sni": event.sni}), ToClient(b"tls up " + event.side.encode()
                                                                + b"\n")]
        if t is TlsFailed:
            return [Close(f"TLS failed: {event.error}")]
        if t is HoldPending:
            return [ToClient(f"held {event.approval_id}\n".encode())]
        if t is ApprovalDecided:
            self.holding = False   # what came behind the hold goes on now, in order
            return [ToUpstream(b"approved\n" if event.approved else b"refused\n")] + self.lines()
        if t is Aborted:
            return [Close(event.reason, f"ERR {event.reason}\n".encode())]
        if t is EofReceived:
            return [Record("eof", {"side": event.side})]
        return []

    def lines(self):
        out = []
        while b"\n" in self.buf and not self.holding:
            line, _, self.buf = self.buf.partition(b"\n")
            out += self.line(line)
        return out

    def line(self, line: bytes):
        if line == b"TLS":
            return [ToClient(b"OK\n"), StartClientTls(("localhost", "127.0.0.1"))]
        if line.startswith(b"HOLD"):
            self.holding = True
            return [Record("command", {"text": line.decode()}), Hold(1, line.decode(), "r", "why")]
        if line == b"BAD":
            raise ProtocolError("bad line")
        if line == b"BIG":
            self.big = 10 << 20
            return [ToClient(b"big\n")]
        if line == b"UPGRADE":
            return [ToClient(b"switching\n"), Handoff(Upper(), client_data=b"rest\n")]
        return [Record("command", {"text": line.decode()}), ToUpstream(line + b"\n")]


class Upper:
    """A child layer after a Handoff: upper-cases what the client sends."""

    def handle(self, event):
        if type(event) is DataReceived and event.side == CLIENT:
            return [ToUpstream(event.data.upper())]
        if type(event) is DataReceived:
            return [ToClient(event.data)]
        if type(event) is Aborted:
            return [Close(event.reason)]
        return []

    def buffered(self) -> int:
        return 0


SPEC = ProtocolSpec(name="fake", summary="test", layer=FakeLayer, idle_timeout=3600)
RAW = ProtocolSpec(name="tcp", summary="raw", layer=FakeLayer)


class Approver:
    def __init__(self):
        self.decision = asyncio.get_event_loop().create_future()

    async def ask(self, **kw):
        @dataclass
        class Ap:
            id: str = "ap-7"
            expires_ns: int = 2_000_000_000_000_000_000
        self.asked = kw
        return Ap()

    async def wait(self, approval_id):
        return await self.decision


class Upstream:
    """A line echo server, optionally TLS, that can stop reading (backpressure)."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.tls = tls
        self.accepted = 0
        self.got = bytearray()
        self.eof = asyncio.Event()
        self.reading = asyncio.Event()
        self.reading.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader, writer):
        self.accepted += 1
        while True:
            await self.reading.wait()
            data = await reader.read(65536)
            if not data:
                self.eof.set()
                writer.write(b"bye\n")
                await writer.drain()
                writer.close()
                return
            self.got += data
            writer.write(b"echo " + data)
            await writer.drain()


async def proxy_for(tmp: Path, port: int, *, options=None, budget=256 << 20, idle=3600.0,
                    approver=None, allow: ListenAllow = ROOT_ONLY):
    spool = Spool(tmp / "spool")
    target = Target("fake-t", "fake", (("127.0.0.1", port),), spec=SPEC,
                    options=Options(options or {}), names=("localhost",), idle_timeout=idle,
                    listen_allow=allow)
    ca = LocalCA.load_or_create(tmp / "ca")
    proxy = Proxy(lookup=lambda h, p: None, identify=lambda r: {}, spool=spool, host="h",
                  targets=Targets([target]), raw=RAW, ca=ca, budget_bytes=budget,
                  approver=approver)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    await proxy.listen_plain(target, sock)
    return proxy, sock.getsockname()[1], spool, ca


def events(spool: Spool) -> list[tuple[str, dict]]:
    """Everything recorded (the spool closed first; it is opened again to read)."""
    again = Spool(spool.dir)
    try:
        out, pos = [], again.start()
        while True:
            batch, pos = again.read(pos)
            if not batch:
                return [(e.kind, e.fields()) for e in out]
            out += batch
    finally:
        again.close()


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 60))


async def line(reader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 10)


def test_tls_on_both_legs_and_bytes_in_order(tmp_path):
    async def main():
        test_ca = CA(tmp_path / "test-ca")
        cert, key = test_ca.issue("localhost", server=True)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        up = Upstream(server_ctx)
        port = await up.start()
        proxy, pport, spool, ca = await proxy_for(tmp_path, port, options={
            "upstream_tls": True, "ca": str(test_ca.pem)})
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"TLS\n")
        assert await line(r) == b"OK\n"
        client_ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        await w.start_tls(client_ctx, server_hostname="localhost")
        got = {await line(r), await line(r)}   # both legs report, in either order
        assert got == {b"tls up client\n", b"tls up upstream\n"}
        w.write(b"one\ntwo\n")
        got = await line(r) + await line(r)   # the echo server prefixes each read it gets
        assert got.replace(b"echo ", b"") == b"one\ntwo\n"
        w.close()
        await proxy.close()
        spool.close()
        tls = [f for k, f in events(spool) if k == "tls"]
        assert {t["side"] for t in tls} == {"client", "upstream"}
        assert next(t for t in tls if t["side"] == "client")["sni"] == "localhost"
    run(main())


def test_unverifiable_upstream_fails_closed(tmp_path):
    async def main():
        other = CA(tmp_path / "other")
        cert, key = other.issue("localhost", server=True)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        up = Upstream(ctx)
        port = await up.start()
        trusted = CA(tmp_path / "trusted")
        proxy, pport, spool, _ = await proxy_for(tmp_path, port, options={
            "upstream_tls": True, "ca": str(trusted.pem)})
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"secret\n")
        assert await asyncio.wait_for(r.read(), 10) == b""    # closed, nothing relayed
        await proxy.close()
        spool.close()
        assert not up.got
        (end,) = [f for k, f in events(spool) if k == "session_end"]
        assert "TLS failed" in end["reason"]
    run(main())


def test_hold_waits_for_the_approval_and_the_rest_waits_behind_it(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        approver = Approver()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port, approver=approver)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"HOLD rm -rf\nafter\n")
        assert await line(r) == b"held ap-7\n"
        await asyncio.sleep(0.2)
        assert not up.got                      # nothing overtook the hold
        assert approver.asked["command"] == "HOLD rm -rf"
        approver.decision.set_result(("approved", "alice", "ok"))
        got = await line(r) + await line(r)   # the echo server prefixes each read it gets
        assert got.replace(b"echo ", b"") == b"approved\nafter\n"
        w.close()
        await proxy.close()
        spool.close()
        states = [f["state"] for k, f in events(spool) if k == "approval"]
        assert states == ["pending", "approved"]
    run(main())


def test_half_close_keeps_the_other_direction_flowing(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"last\n")
        w.write_eof()
        assert await line(r) == b"echo last\n"
        assert await line(r) == b"bye\n"       # the server answered after our EOF
        assert await asyncio.wait_for(r.read(), 10) == b""
        await proxy.close()
        spool.close()
        kinds = [k for k, _ in events(spool)]
        assert kinds.count("eof") == 2
        (end,) = [f for k, f in events(spool) if k == "session_end"]
        assert end["reason"] == "client closed"
    run(main())


def test_a_protocol_error_ends_that_session_only(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port)
        r1, w1 = await asyncio.open_connection("127.0.0.1", pport)
        r2, w2 = await asyncio.open_connection("127.0.0.1", pport)
        w1.write(b"BAD\n")
        assert await asyncio.wait_for(r1.read(), 10) == b""
        w2.write(b"fine\n")
        assert await line(r2) == b"echo fine\n"
        w2.close()
        await proxy.close()
        spool.close()
        reasons = [f["reason"] for k, f in events(spool) if k == "session_end"]
        assert "protocol error: bad line" in reasons
    run(main())


def test_a_slow_reader_holds_the_sender_back(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        up.reading.clear()                       # the server stops reading
        chunk = b"x" * 65535 + b"\n"
        sent = 0

        async def flood():
            nonlocal sent
            while True:
                w.write(chunk)
                await w.drain()
                sent += len(chunk)

        task = asyncio.create_task(flood())
        # the proxy stops reading us once the server is DRAIN_ABOVE behind: we stall
        await asyncio.sleep(1.0)
        stalled = sent
        await asyncio.sleep(1.0)
        assert sent == stalled and sent < 64 << 20
        (session,) = proxy.sessions
        assert session.upstream.transport.get_write_buffer_size() < 8 << 20
        task.cancel()
        up.reading.set()
        w.close()
        await proxy.close()
        spool.close()
    run(main())


def test_over_the_memory_budget_only_the_greedy_session_is_closed(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port, budget=4 << 20)
        r1, w1 = await asyncio.open_connection("127.0.0.1", pport)
        r2, w2 = await asyncio.open_connection("127.0.0.1", pport)
        w2.write(b"hello\n")
        assert await line(r2) == b"echo hello\n"
        w1.write(b"BIG\n")
        data = await asyncio.wait_for(r1.read(), 10)
        assert data.startswith(b"big\n") and b"ERR over the host agent's memory budget" in data
        w2.write(b"still\n")
        assert await line(r2) == b"echo still\n"
        assert proxy.budget.used < 4 << 20      # what the closed session held is released
        w2.close()
        await proxy.close()
        spool.close()
    run(main())


def test_an_idle_session_gets_its_protocols_error(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port, idle=1.0)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        data = await asyncio.wait_for(r.read(), 10)
        assert data == b"ERR idle for 1 s: session closed\n"
        await proxy.close()
        spool.close()
    run(main())


def test_a_layer_hands_the_connection_to_a_child(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"UPGRADE\n")
        assert await line(r) == b"switching\n"
        assert await line(r) == b"echo REST\n"     # what the parent read past: the child's
        w.write(b"more\n")
        assert await line(r) == b"echo MORE\n"
        w.close()
        await proxy.close()
        spool.close()
    run(main())


def test_the_spool_failing_refuses_with_the_protocols_error(tmp_path):
    async def main():
        from hostagent.recording.spool import SpoolError
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"first\n")
        assert await line(r) == b"echo first\n"

        def full(events):
            raise SpoolError("spool is full")
        spool.append_many = full
        w.write(b"second\n")
        data = await asyncio.wait_for(r.read(), 10)
        assert data.startswith(b"ERR refused, the recording could not be stored")
        await asyncio.sleep(0.1)
        assert b"second" not in up.got           # nothing ran unrecorded
        await proxy.close()
    run(main())


async def serve_upper(ctx, wire):
    """A protocol whose library owns the wire (as asyncssh does for SSH): it gets the
    client's socket (and what was read of it already), a way to reach the target, its
    recorder, sessions of its own and approvals."""
    reader, writer = await asyncio.open_connection(sock=wire.sock)
    up = await wire.connect()
    up_r, up_w = await asyncio.open_connection(sock=up)
    line = wire.early + await reader.readline()
    wire.recorder.record("command", {"text": line.decode().strip()})
    child = wire.open_recording({"channel": "one"})
    child.record("command", {"text": "in the child"})
    ok, why = await wire.approve(child, "risky", "rule-x", "a human says")
    child.record("output", {"approved": ok, "why": why})
    up_w.write(line.upper())
    writer.write(await up_r.readline())
    await writer.drain()
    writer.close()
    up_w.close()
    return "served"


def test_a_protocol_that_owns_the_wire_gets_the_socket(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        spool = Spool(tmp_path / "spool")
        spec = ProtocolSpec(name="owned", summary="test", serve=serve_upper)
        target = Target("t", "owned", (("127.0.0.1", port),), spec=spec)
        proxy = Proxy(lookup=lambda h, p: None, identify=lambda r: {}, spool=spool, host="h",
                      targets=Targets([target]), raw=RAW)
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        await proxy.listen_plain(target, sock)
        r, w = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        w.write(b"hello\n")
        assert await line(r) == b"echo HELLO\n"
        await proxy.close()
        spool.close()
        evs = events(spool)
        assert ("command", {"text": "hello"}) in evs
        # the child: its own session, naming its parent, ended by the driver if not by
        # the protocol; an approval that can't be asked for is a no (fail closed)
        starts = [f for k, f in evs if k == "session_start"]
        assert [s.get("channel") for s in starts] == [None, "one"]
        assert starts[1]["parent"] and starts[1]["target"] == "t"
        out = next(f for k, f in evs if k == "output")
        assert out["approved"] is False and "no collector to ask" in out["why"]
        assert ("approval", {"state": "unavailable", "error": "no collector to ask"}) in evs
        assert sorted(f["reason"] for k, f in evs if k == "session_end") == \
            ["connection closed", "served"]
    run(main())


# ---------------------------------------------------------------- who a plain listener serves

def allow(*entries: str) -> ListenAllow:
    from types import SimpleNamespace
    from hostagent.config import parse_listen_allow
    from hostagent.proxy.targets import resolve_allow
    return resolve_allow(SimpleNamespace(name="fake-t",
                                         listen_allow=parse_listen_allow(list(entries), "t")))


def test_listen_allow_matches_the_socket_owner_its_groups_and_system_units():
    a = allow("user:nobody", "uid:1001", "group:root", "gid:998", "unit:ci-runner.service",
              "unit:ci.slice")
    proc = {"pid": 42, "gids": [1000], "cgroup": "/"}
    assert a.admits({"uid": 65534}) == "user:nobody"      # no process needed for these
    assert a.admits({"uid": 1001, **proc}) == "uid:1001"
    assert a.admits({"uid": 1000, **proc}) is None
    assert a.admits({"uid": 1000, **proc, "gids": [1000, 0]}) == "group:root"
    assert a.admits({"uid": 1000, **proc, "gids": [998]}) == "gid:998"
    # groups and units are the process's: without one found, they can't match
    assert a.admits({"uid": 1000, "gids": [998], "cgroup": "/system.slice/ci-runner.service"}) \
        is None
    unit = {"uid": 1000, "pid": 42, "gids": [1000]}
    assert a.admits({**unit, "cgroup": "/system.slice/ci-runner.service"}) \
        == "unit:ci-runner.service"
    assert a.admits({**unit, "cgroup": "/system.slice/ci-runner.service/job/x.scope"}) \
        == "unit:ci-runner.service"                         # its delegated subtree too
    assert a.admits({**unit, "cgroup": "/ci.slice/ci-other.slice/build.service"}) \
        == "unit:ci.slice"
    # a user's own manager lets its user name cgroups anything: not a system unit
    spoof = "/user.slice/user-1000.slice/user@1000.service/app.slice/ci-runner.service"
    assert a.admits({**unit, "cgroup": spoof}) is None
    assert a.admits({**unit, "cgroup": "/system.slice/other.service/ci-runner.service"}) is None
    assert a.admits({**unit, "cgroup": "/ci-runner.service.d/x"}) is None
    why = a.refusal({**unit, "user": "eve", "exe": "/usr/bin/psql", "cgroup": spoof})
    assert why.startswith("user eve (uid 1000, pid 42, /usr/bin/psql, gids 1000, cgroup " + spoof)
    assert why.endswith(") is not in listen_allow (user:nobody, uid:1001, group:root, gid:998, "
                        "unit:ci-runner.service, unit:ci.slice)")
    assert "no process found" in a.refusal({"uid": 1000, "mismatch": "the socket is gone"})


def test_the_peer_identity_of_a_plain_connection_has_its_groups(tmp_path):
    """A client as nobody with a supplementary group and a setgid-like effective gid: the
    socket's owner, the process holding it, its real gid and supplementary groups from
    /proc, and not its effective gid."""
    import os
    import subprocess
    import pytest
    from hostagent.intercept.identity import peer_identity
    if os.geteuid() != 0:
        pytest.skip("needs root (setpriv)")
    srv = socket.create_server(("127.0.0.1", 0))
    code = (f"import socket, sys; s = socket.create_connection(('127.0.0.1', "
            f"{srv.getsockname()[1]})); print('up', flush=True); sys.stdin.read()")
    child = subprocess.Popen(["setpriv", "--reuid=65534", "--rgid=65534", "--egid=5",
                              "--groups=22", "--", "/usr/bin/python3", "-c", code],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        conn, peer = srv.accept()
        ident = peer_identity(peer, conn.getsockname())
        conn.close()
    finally:
        child.communicate("", timeout=30)
        srv.close()
    assert ident["uid"] == 65534 and ident["user"] == "nobody"
    assert ident["pid"] == child.pid and ident["gid"] == 65534
    assert ident["gids"] == [65534, 22]                  # not 5: the effective gid


def test_a_plain_listener_refuses_whom_listen_allow_does_not_name_and_records_it(
        tmp_path, caplog):
    """The test runs as root: a listener for uid 4242 alone refuses it before anything
    goes upstream, and the refusal is a recorded session that starts and ends."""
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port, allow=allow("uid:4242"))
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"secret\n")
        try:
            assert await asyncio.wait_for(r.read(), 10) == b""    # closed, nothing relayed
        except ConnectionResetError:
            pass                                  # closed with our bytes unread
        await proxy.close()
        spool.close()
        assert up.accepted == 0 and not up.got                # no connection upstream
        assert proxy.refused == 1
        evs = events(spool)
        assert [k for k, _ in evs] == ["session_start", "session_end"]
        start, end = evs[0][1], evs[1][1]
        assert start["target"] == "fake-t" and start["via"] == "listener"
        assert start["process"]["uid"] == 0 and start["process"]["user"] == "root"
        # (the test's own process is the client: the proxy doesn't take itself for one)
        assert end["reason"].startswith("refused: at the fake-t listener: user root (uid 0")
        assert end["reason"].endswith(") is not in listen_allow (uid:4242)")
    run(main())
    assert any("refused a connection" in r.message and r.levelname == "WARNING"
               for r in caplog.records)


def test_root_alone_is_served_by_default_and_the_admitting_entry_is_recorded(tmp_path):
    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port)     # no listen_allow
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"hello\n")
        assert await line(r) == b"echo hello\n"
        w.close()
        await proxy.close()
        spool.close()
        start = next(f for k, f in events(spool) if k == "session_start")
        assert start["process"]["allowed_by"] == "uid:0"
    run(main())


def test_a_unit_entry_admits_a_system_units_process_and_not_a_users_namesake(
        tmp_path, monkeypatch):
    """Without systemd here, the identity /proc would give is stood in for: the same
    connection, as a process of ci-runner.service, then of a user's unit of that name."""
    import hostagent.proxy.driver as driver
    seen = {}

    def fake_identity(peer, local):
        return {"peer": f"{peer[0]}:{peer[1]}", "attested": "proc", "uid": 1234,
                "user": "ci", "pid": 99, "gids": [1234], "exe": "/usr/bin/psql",
                "cgroup": seen["cgroup"]}
    monkeypatch.setattr(driver, "peer_identity", fake_identity)

    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port,
                                                 allow=allow("unit:ci-runner.service"))
        seen["cgroup"] = "/system.slice/ci-runner.service"
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"hello\n")
        assert await line(r) == b"echo hello\n"
        w.close()
        seen["cgroup"] = "/user.slice/user-1234.slice/user@1234.service/app.slice/" \
                         "ci-runner.service"
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        assert await asyncio.wait_for(r.read(), 10) == b""
        await proxy.close()
        spool.close()
        assert up.accepted == 1
        starts = [f for k, f in events(spool) if k == "session_start"]
        ends = [f["reason"] for k, f in events(spool) if k == "session_end"]
        assert starts[0]["process"]["allowed_by"] == "unit:ci-runner.service"
        assert any(e.startswith("refused: at the fake-t listener: user ci (uid 1234") and
                   "cgroup /user.slice/" in e for e in ends), ends
    run(main())


def test_refusals_recorded_are_bounded_per_user(tmp_path, monkeypatch, caplog):
    """A refused user can't fill the spool (a full spool stops every agent's sessions):
    past the bound, refusals are counted, and the count goes with the next recorded one."""
    import hostagent.proxy.driver as driver
    monkeypatch.setattr(driver, "REFUSALS_RECORDED", 3)

    async def main():
        up = Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await proxy_for(tmp_path, port, allow=allow("uid:4242"))
        for _ in range(6):
            r, w = await asyncio.open_connection("127.0.0.1", pport)
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
        assert proxy.refused == 6
        key = ("fake-t", 0)
        proxy._refusals[key][0] -= driver.REFUSALS_WINDOW      # a minute later
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        assert await asyncio.wait_for(r.read(), 10) == b""
        await proxy.close()
        spool.close()
        ends = [f["reason"] for k, f in events(spool) if k == "session_end"]
        assert len(ends) == 4
        assert "(3 more refusals of this user not recorded before this one)" in ends[-1]
    run(main())
    assert any("further refusals counted, not recorded" in r.message for r in caplog.records)


def test_an_approval_decided_after_its_session_ended_is_a_no(tmp_path):
    """Red team (SSH): a channel closed while its command was held; the decision came
    later and recording it into the ended session raised, taking the connection down."""
    from types import SimpleNamespace

    from agentgate.events import SESSION_END, SESSION_START
    from hostagent.recording.recorder import SessionRecorder

    class Approver:
        def __init__(self):
            self.asked = asyncio.Event()
            self.decide = asyncio.Event()

        async def ask(self, **kw):
            self.asked.set()
            return SimpleNamespace(id="ap-1", expires_ns=0)

        async def wait(self, approval_id):
            await self.decide.wait()
            return "approved", "alice", "fine"

        async def cancel(self, approval_id):
            self.cancelled = approval_id

    async def main():
        spool = Spool(tmp_path / "spool")
        approver = Approver()
        proxy = Proxy(lookup=lambda h, p: None, identify=lambda r: {}, spool=spool, host="h",
                      targets=Targets([]), raw=RAW, approver=approver)
        rec = SessionRecorder(spool)
        rec.record(SESSION_START, {})
        ctx = SimpleNamespace(target=SimpleNamespace(name="t", protocol="ssh"), identity={})
        waiting = asyncio.ensure_future(proxy.await_approval(rec, ctx, "echo restart", "r", "why"))
        await approver.asked.wait()
        rec.record(SESSION_END, {"reason": "agent closed the channel"})
        approver.decide.set()
        ok, why = await asyncio.wait_for(waiting, 5)
        assert not ok and "ended before approval ap-1 was decided" in why
        # what waits going away withdraws the request (nobody decides a dead one)
        rec = SessionRecorder(spool)
        rec.record(SESSION_START, {})
        approver.asked.clear()
        approver.decide.clear()
        waiting = asyncio.ensure_future(proxy.await_approval(rec, ctx, "echo restart", "r", "why"))
        await approver.asked.wait()
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert approver.cancelled == "ap-1"
        spool.close()
        assert [f.get("state") for k, f in events(spool) if k == "approval"][-1] == "cancelled"
    run(main())
