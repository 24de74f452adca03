"""The one I/O driver: accept a redirected connection, learn from the kernel where it was
going and who opened it, connect upstream, and run the bytes through a sans-IO layer.

All awaits live here. A layer's actions are performed in order, so a Record is in the
spool before the ToUpstream after it is written: record before execute. Anything that
can't be attributed, recorded or connected is closed: fail closed.
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from agentgate.events import SESSION_END, SESSION_START
from hostagent.intercept.identity import canonical_ip as canonical, peer_identity, summary
from hostagent.intercept.loader import ACT_TARGET, ConnRecord
from hostagent.protocols import Close, Hold, ProtocolError, Record, StartTls, ToClient, ToUpstream
from hostagent.approvals import Approver
from hostagent.masking import for_target
from hostagent.policy import Policy, decide
from hostagent.protocols.postgres import messages as pg_messages
from hostagent.protocols.postgres.layer import PostgresLayer
from hostagent.protocols.postgres.outputs import SampleLimits
from hostagent.protocols.tcp import RawTcp
from hostagent.recording.recorder import SessionRecorder
from hostagent.recording.spool import Spool, SpoolError
from hostagent.tls import LocalCA

log = logging.getLogger("agentgate.proxy")
READ_SIZE = 64 << 10
DRAIN_ABOVE = 256 << 10   # a peer this far behind makes the other side wait (backpressure)
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Target:
    name: str
    protocol: str
    addresses: tuple[tuple[str, int], ...]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: str = "prefer"              # upstream: disable | prefer | require | verify-full
    ca: str | None = None            # for verify-full (default: the system's CAs)
    server_name: str | None = None   # for verify-full (default: the address's host)
    names: tuple[str, ...] = ()      # as configured (host names too): the client-side
                                     # certificate names them
    client_tls: str = "offer"        # towards the agent: offer (terminate) | decline
    listen: tuple[str, int] | None = None   # a plain listener (no eBPF) for this target


class Targets:
    def __init__(self, targets: list[Target]):
        self.targets = targets
        self._by_addr = {(canonical(h), p): t for t in targets for h, p in t.addresses}

    def match(self, host: str, port: int) -> Target | None:
        host = canonical(host)
        return self._by_addr.get((host, port)) or self._by_addr.get((host, 0))

    def addresses(self) -> list[tuple[str, int]]:
        return list(self._by_addr)


class _Closed(Exception):
    pass


class Proxy:
    def __init__(self, *, lookup: Callable[[str, int], ConnRecord | None],
                 identify: Callable[[ConnRecord], dict], spool: Spool, host: str,
                 targets: Targets, session_group: str = "",
                 on_session: Callable[[str], None] | None = None, policy: Policy | None = None,
                 approver: "Approver | None" = None, ca: "LocalCA | None" = None,
                 samples: SampleLimits | None = None):
        self.lookup = lookup
        self.samples = samples
        self.ca = ca
        self.identify = identify
        self.spool = spool
        self.host = host
        self.targets = targets
        self.session_group = session_group
        self.on_session = on_session
        self.policy = policy or Policy()
        self.cancel_keys: dict = {}
        self.approver = approver
        self.servers: list[asyncio.AbstractServer] = []
        self.active: set[asyncio.Task] = set()
        self.refused = 0

    async def listen(self, socks: list[socket.socket]) -> None:
        for s in socks:
            self.servers.append(await asyncio.start_server(self._accept, sock=s,
                                                           limit=READ_SIZE))

    async def close(self, grace: float = 5.0) -> None:
        for s in self.servers:
            s.close()
        if self.active:
            await asyncio.wait(self.active, timeout=grace)
        for t in self.active:
            t.cancel()

    async def listen_plain(self, target: Target, sock: socket.socket) -> None:
        """A listener for one target without eBPF (tests, hosts without it): whoever
        connects is proxied to the target. Who they are comes from /proc, best effort:
        unlike a redirect, not attested by the kernel at connect()."""
        async def accept(reader, writer):
            await self._accept(reader, writer, target)
        self.servers.append(await asyncio.start_server(accept, sock=sock, limit=READ_SIZE))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      plain: Target | None = None) -> None:
        task = asyncio.current_task()
        self.active.add(task)
        try:
            await self._session(reader, writer, plain)
        except Exception:
            log.exception("proxy session failed")
        finally:
            self.active.discard(task)
            writer.close()

    async def _redirected(self, peer) -> tuple[Target | None, list[tuple[str, int]], dict] | None:
        rec = self.lookup(peer[0], peer[1])
        if rec is None:
            await asyncio.sleep(0)   # the client's sock_ops update may trail by a hair
            rec = self.lookup(peer[0], peer[1])
        if rec is None:
            self.refused += 1
            log.warning("refused a connection from %s:%s with no interception record",
                        peer[0], peer[1])
            return None
        target = self.targets.match(rec.dst_host, rec.dst_port) if rec.action == ACT_TARGET else None
        return target, [(rec.dst_host, rec.dst_port)], self.identify(rec)

    async def _session(self, reader, writer, plain: Target | None = None) -> None:
        peer = writer.get_extra_info("peername")
        if plain is None:
            found = await self._redirected(peer)
            if found is None:
                return
            target, upstreams, ident = found
        else:
            target, upstreams = plain, list(plain.addresses)
            ident = await asyncio.to_thread(peer_identity, peer, writer.get_extra_info("sockname"))
            if "uid" not in ident:
                # nobody on this host to attribute it to: no credentials for it (fail closed)
                self.refused += 1
                log.warning("refused a connection to the %s listener from %s:%s: %s",
                            plain.name, peer[0], peer[1], ident.get("mismatch", "unknown peer"))
                return
        dst_host, dst_port = upstreams[0]
        dst = hostport(dst_host, dst_port)
        # the address the client dialed: its certificate (if it asks for TLS) names it
        dialed = writer.get_extra_info("sockname")[0] if plain else dst_host
        layer = self._layer(target, ident)
        recorder = SessionRecorder(self.spool)
        start = {"host": self.host, "target": target.name if target else dst,
                 "protocol": target.protocol if target else "tcp", "destination": dst,
                 "process": ident, "session_group": self.session_group,
                 "mode": "target" if target else "record", "layer": layer.name,
                 "via": "listener" if plain else "redirect"}
        start["agent"] = summary(ident)
        try:
            recorder.record(SESSION_START, start)
        except SpoolError as exc:
            log.error("refusing %s -> %s: cannot record: %s", start["agent"], dst, exc)
            return
        if self.on_session:
            self.on_session(recorder.session_id)
        counts = {"bytes_in": 0, "bytes_out": 0}
        reason = "client closed"
        up_writer = None
        try:
            try:
                up_reader, up_writer, (dst_host, dst_port) = await _connect_any(upstreams)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = f"upstream unreachable: {exc or 'timeout'}"
                _reset(writer)   # the client sees a refused connection, not a clean EOF
                return
            if target is not None and target.protocol == "postgres" and target.tls != "disable":
                try:
                    await postgres_upstream_tls(up_reader, up_writer, target, dst_host)
                except (OSError, ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
                    reason = f"upstream TLS failed ({target.tls}): {exc}"
                    await self._refuse_at_startup(layer, reader, writer, f"agentgate: {reason}",
                                                  lambda: self._client_tls(target, dialed))
                    return
            reason = await self._pump(layer, recorder, reader, writer, up_reader, up_writer, counts,
                                      ident, lambda: self._client_tls(target, dialed))
        except SpoolError as exc:
            reason = f"recording failed, session closed: {exc}"
            log.error("%s", reason)
            refusal = getattr(layer, "refusal", None)
            if refusal is not None:   # a protocol-correct error: nothing ran unrecorded
                writer.write(refusal(f"agentgate: refused, the recording could not be "
                                     f"stored ({exc})"))
        finally:
            if hasattr(layer, "close"):
                layer.close()
            if up_writer is not None:
                up_writer.close()
            try:
                recorder.record(SESSION_END, {"reason": reason, **counts})
            except SpoolError as exc:
                log.error("cannot record the end of session %s: %s", recorder.session_id, exc)

    async def _refuse_at_startup(self, layer, reader, writer, message: str, tls_context) -> None:
        """Answer the client's start-up with an error it can show (the layer knows how),
        without any upstream."""
        layer.refusing = message
        try:
            while data := await asyncio.wait_for(reader.read(READ_SIZE), CONNECT_TIMEOUT):
                for act in layer.client_data(data):
                    if isinstance(act, ToClient):
                        writer.write(act.data)
                    elif isinstance(act, StartTls):
                        await writer.drain()
                        await writer.start_tls(tls_context(),
                                               ssl_handshake_timeout=CONNECT_TIMEOUT)
                    elif isinstance(act, Close):
                        await writer.drain()
                        return
                await writer.drain()
        except (OSError, ProtocolError, asyncio.TimeoutError):
            return

    async def _hold(self, hold: Hold, layer, recorder, writer, ident: dict) -> list:
        """Ask for approval; the session waits (only this one). Fail closed: if no
        approval can be asked for or awaited, the statement is refused."""
        from hostagent.approvals import when
        start = recorder.session_id
        try:
            if self.approver is None:
                raise RuntimeError("no collector to ask")
            ap = await self.approver.ask(
                session_id=start, host=self.host, target=layer.target, protocol=layer.name,
                command=hold.command, requested_by=str(ident.get("user", "")), rule=hold.rule,
                reason=hold.reason)
        except Exception as exc:
            recorder.record("approval", {"state": "unavailable", "error": str(exc)})
            return layer.decided(hold.key, False, f"{hold.reason} (needs approval, which "
                                 f"could not be requested: {exc})")
        recorder.record("approval", {"id": ap.id, "state": "pending", "rule": hold.rule,
                                     "expires_ns": ap.expires_ns})
        writer.write(layer.held_notice(ap.id, when(ap.expires_ns)))
        await writer.drain()
        try:
            state, by, why = await self.approver.wait(ap.id)
        except Exception as exc:
            state, by, why = "unavailable", "", str(exc)
        recorder.record("approval", {"id": ap.id, "state": state, "decided_by": by,
                                     "reason": why})
        if state == "approved":
            return layer.decided(hold.key, True, why)
        what = {"denied": f"denied by {by}", "expired": "not approved in time"}.get(state, state)
        return layer.decided(hold.key, False, f"{hold.reason} (approval {ap.id} {what}"
                             f"{': ' + why if why else ''})")

    def _client_tls(self, target: Target, dialed: str) -> ssl.SSLContext:
        """A certificate for whatever name the client may have used: the target's names
        as configured and the address it dialed."""
        return self.ca.server_context((*target.names, dialed))

    def _layer(self, target: Target | None, ident: dict):
        """The protocol layer for a connection: by the target's protocol."""
        if target is not None and target.protocol == "postgres":
            policy = self.policy
            return PostgresLayer(decide=lambda req: decide(policy, req), target=target.name,
                                 identity=ident, user=target.user, password=target.password,
                                 cancel_keys=self.cancel_keys,
                                 masker=for_target(policy.masks, target.name),
                                 client_tls=self.ca is not None and target.client_tls == "offer",
                                 samples=self.samples)
        return RawTcp()

    async def _pump(self, layer, recorder, reader, writer, up_reader, up_writer, counts,
                    ident: dict, tls_context: Callable[[], ssl.SSLContext]) -> str:
        started: dict[int, int] = {}   # statement id -> when it went upstream

        async def perform(actions) -> None:
            # A batch's bytes for each peer go out in one write (one syscall, not one per
            # message), after every Record before them is in the spool: record before
            # execute. Anything that waits or ends the session sends what is pending first.
            up: list[bytes] = []
            down: list[bytes] = []
            records: list[tuple[str, dict]] = []

            def flush() -> None:
                if records:   # one spool write for the batch, before any of its bytes
                    recorder.record_many(records)
                    records.clear()
                if up:
                    up_writer.write(b"".join(up) if len(up) > 1 else up[0])
                    up.clear()
                if down:
                    writer.write(b"".join(down) if len(down) > 1 else down[0])
                    down.clear()

            for act in actions:
                if isinstance(act, Record):
                    if act.stop is None:
                        records.append((act.kind, act.fields))
                    else:
                        records.append((act.kind, {**act.fields,
                                                   "duration_us": _elapsed(started, act.stop)}))
                elif isinstance(act, ToUpstream):
                    if act.starts:
                        now = time.monotonic_ns()
                        for sid in act.starts:
                            started[sid] = now
                    up.append(act.data)
                elif isinstance(act, ToClient):
                    down.append(act.data)
                elif isinstance(act, Close):
                    flush()
                    await writer.drain()
                    raise _Closed(act.reason)
                elif isinstance(act, StartTls):
                    flush()
                    await writer.drain()
                    try:
                        await writer.start_tls(tls_context(), ssl_handshake_timeout=CONNECT_TIMEOUT)
                    except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
                        raise _Closed(f"client TLS handshake failed: {exc!r}")
                    records.append(("tls", {"side": "client", "version":
                                            writer.get_extra_info("ssl_object").version()}))
                elif isinstance(act, Hold):
                    flush()
                    await up_writer.drain()
                    await writer.drain()
                    await perform(await self._hold(act, layer, recorder, writer, ident))
            flush()
            # wait only for a peer that is slow to read (a transport over its high mark)
            if up_writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await up_writer.drain()
            if writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await writer.drain()

        async def client_to_upstream():
            while data := await reader.read(READ_SIZE):
                counts["bytes_in"] += len(data)
                await perform(layer.client_data(data))
            await perform(layer.client_eof())
            if up_writer.can_write_eof():
                up_writer.write_eof()
            return "client closed"

        async def upstream_to_client():
            while data := await up_reader.read(READ_SIZE):
                counts["bytes_out"] += len(data)
                await perform(layer.upstream_data(data))
            await perform(layer.upstream_eof())
            if writer.can_write_eof():
                writer.write_eof()
            return "upstream closed"

        tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
        reason = None   # whoever closed first
        try:
            pending = set(tasks)
            # a half-close in one direction keeps the other flowing until both end
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    exc = t.exception()
                    if isinstance(exc, _Closed):
                        return str(exc)
                    if isinstance(exc, ProtocolError):
                        return f"protocol error: {exc}"
                    if isinstance(exc, (ConnectionError, OSError)):
                        return f"connection reset: {exc}"
                    if exc is not None:
                        raise exc
                    reason = reason or t.result()
            return reason
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def postgres_upstream_tls(reader, writer, target: Target, host: str) -> None:
    """PostgreSQL's TLS upgrade on the upstream leg, per the target's mode: ask with
    SSLRequest; 'S' -> handshake, 'N' -> plaintext only if the mode allows it."""
    writer.write(pg_messages.untyped(struct.pack("!i", pg_messages.SSL_REQUEST)))
    await writer.drain()
    answer = await reader.readexactly(1)
    if answer == b"N":
        if target.tls in ("require", "verify-full"):
            raise ConnectionError("the server does not offer TLS")
        return
    if answer != b"S":
        raise ConnectionError(f"unexpected answer {answer!r} to SSLRequest")
    if len(reader._buffer):   # StreamReader has no public peek
        # bytes after 'S' but before the handshake would be read as if TLS-protected
        # (CVE-2021-23222): a man in the middle's, not the server's
        raise ConnectionError("the server sent data before the TLS handshake")
    ctx = ssl.create_default_context(cafile=target.ca)
    if target.tls != "verify-full":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE   # encrypted, not authenticated (libpq's require)
    await writer.start_tls(ctx, server_hostname=target.server_name or host)


def _elapsed(started: dict[int, int], sid: int) -> int | None:
    """Microseconds since statement sid went upstream. Answers come in the order
    statements were sent, so older ids still waiting were skipped by the server (after
    an error): they are dropped, which keeps the table small."""
    t = started.pop(sid, None)
    while started and next(iter(started)) < sid:
        del started[next(iter(started))]
    return None if t is None else (time.monotonic_ns() - t) // 1000


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connect_any(addresses: list[tuple[str, int]]):
    """The first address that answers, in order (a target may list several)."""
    error: Exception | None = None
    for host, port in addresses:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=READ_SIZE),
                                          CONNECT_TIMEOUT)
            return r, w, (host, port)
        except (OSError, asyncio.TimeoutError) as exc:
            error = exc
    raise error or OSError("no address")


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def unprivileged_port_start() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read())
    except (OSError, ValueError):
        return 1024


def _bind_both(port: int, host4: str, host6: str) -> list[socket.socket]:
    s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        for s in (s4, s6):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s4.bind((host4, port))
        s6.bind((host6, s4.getsockname()[1]))
    except OSError:
        s4.close()
        s6.close()
        raise
    for s in (s4, s6):
        s.listen(1024)
        s.setblocking(False)
    return [s4, s6]


def bind_pair(port: int = 0, host4: str = "127.0.0.1", host6: str = "::1", *,
              privileged: bool = True) -> list[socket.socket]:
    """Listening sockets on host4 and host6 with one port number. The proxy's port is a
    privileged one: while the host agent is down nobody else may take it and receive
    what the programs still redirect there. Port 0 picks a free one."""
    limit = unprivileged_port_start()
    if port:
        if privileged and port >= limit:
            raise OSError(f"proxy port {port} is not privileged (< {limit}): any user could "
                          "take it while the host agent is down")
        return _bind_both(port, host4, host6)
    if not privileged:
        for _ in range(20):
            try:
                return _bind_both(0, host4, host6)
            except OSError:
                continue
        raise OSError("no port free on both IPv4 and IPv6 loopback")
    candidates = list(range(max(limit - 512, 1), limit))
    random.shuffle(candidates)
    for candidate in candidates:
        try:
            return _bind_both(candidate, host4, host6)
        except OSError:
            continue
    raise OSError(f"no privileged port (< {limit}) free on both IPv4 and IPv6 loopback")


def parse_hostport(text: str, default_port: int = 0) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return host, int(port) if port else default_port


def resolve(host: str, port: int) -> list[tuple[str, int]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({(i[4][0], port) for i in infos})

