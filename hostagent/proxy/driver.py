"""The one I/O driver: accept a redirected connection, learn from the kernel where it was
going and who opened it, connect upstream, and run the bytes through the target's
protocol layer (hostagent/protocols/api.py is the contract; this module imports no
protocol: a target carries its protocol's declaration).

All awaits live here. A layer's commands are performed in order, so a Record is in the
spool before the bytes after it are written: record before execute. Anything that
can't be attributed, recorded or connected is closed: fail closed.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import struct
from typing import Callable

from agentgate.events import APPROVAL, SESSION_END, SESSION_START
from hostagent.intercept.identity import peer_identity, summary
from hostagent.intercept.loader import ACT_TARGET, ConnRecord
from hostagent.policy import Policy
from hostagent.protocols.api import SessionContext, Wire
from hostagent.protocols.registry import ProtocolSpec
from hostagent.proxy.budget import Budget
from hostagent.proxy.net import connect_any, connect_leg, hostport, reset
from hostagent.proxy.session import READ_SIZE, Leg, Session
from hostagent.proxy.turn import Turn
from hostagent.proxy.targets import Target, Targets
from hostagent.recording.recorder import SessionRecorder
from hostagent.recording.spool import Spool, SpoolError

log = logging.getLogger("agentgate.proxy")
SWEEP_EVERY = 1.0   # seconds between idle checks
REFUSALS_RECORDED, REFUSALS_WINDOW = 20, 60.0   # per listener and user: recorded, seconds


class Proxy:
    def __init__(self, *, lookup: Callable[[str, int], ConnRecord | None],
                 unix_lookup: Callable[[int], ConnRecord | None] | None = None,
                 identify: Callable[[ConnRecord], dict], spool: Spool, host: str,
                 targets: Targets, raw: ProtocolSpec, session_group: str = "",
                 on_session: Callable[[str], None] | None = None, policy: Policy | None = None,
                 approver=None, ca=None, samples=None, budget_bytes: int = 256 << 20,
                 services: dict | None = None):
        self.lookup = lookup
        self.unix_lookup = unix_lookup
        self.identify = identify
        self.spool = spool
        self.host = host
        self.targets = targets
        self.raw = raw                  # for connections to non-targets (mode "record")
        self.session_group = session_group
        self.on_session = on_session
        self.policy = policy or Policy()
        self.approver = approver
        self.ca = ca
        self.samples = samples
        self.services = services or {}   # protocol name -> its setup's state
        self.budget = Budget(budget_bytes)
        self.turn = Turn(spool)
        self.shared: dict[str, dict] = {}          # per target: state its sessions share
        self.servers: list[asyncio.AbstractServer] = []
        self.active: set[asyncio.Task] = set()
        self.sessions: set[Session] = set()
        self.refused = 0
        self._refused_by: collections.Counter[str] = collections.Counter()
        self._refusals: dict[tuple, list] = {}     # (listener, uid): [since, count, unrecorded]
        self._upstream_ctx: dict[tuple, ssl.SSLContext] = {}
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------ listening

    async def listen(self, socks: list[socket.socket]) -> None:
        for s in socks:
            self.servers.append(await _serve(self._accept, s))
        self._sweep_start()

    async def listen_plain(self, target: Target, sock: socket.socket) -> None:
        """A listener for one target without eBPF (tests, hosts without it): a process
        the target's `listen_allow` admits (root alone by default) is proxied to it;
        anyone else is refused before a byte goes upstream, and the refusal recorded.
        Who they are comes from /proc: the socket's owner as the kernel keeps it, and
        the process holding it (unlike a redirect, not attested at connect())."""
        async def accept(reader, writer):
            await self._accept(reader, writer, target)
        self.servers.append(await _serve(accept, sock))
        self._sweep_start()

    async def listen_unix(self, target: Target, sock: socket.socket) -> None:
        """The proxy's unix socket for a target's local socket path: the kernel rewrites
        an enrolled connect to that path to this socket, and keeps who made it
        (unix_lookup, by the peer's pid). Anyone else is refused."""
        async def accept(reader, writer):
            await self._accept(reader, writer, unix=target)
        self.servers.append(await _serve(accept, sock, unix=True))
        self._sweep_start()

    async def close(self, grace: float = 5.0) -> None:
        for s in self.servers:
            s.close()
        if self._sweeper:
            self._sweeper.cancel()
        if self.active:
            await asyncio.wait(self.active, timeout=grace)
        for t in self.active:
            t.cancel()

    def refused_for(self, cgroup: str) -> int:
        """Refusals attributed to processes of one cgroup (a run's own count)."""
        cgroup = str(cgroup).rstrip("/")
        return sum(n for cg, n in self._refused_by.items()
                   if cg and (cgroup == cg or cgroup.endswith("/" + cg.strip("/"))))

    # ------------------------------------------------------------------ one connection

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      plain: Target | None = None, unix: Target | None = None) -> None:
        task = asyncio.current_task()
        self.active.add(task)
        # nothing is read before the session knows its protocol: one that owns the wire
        # (serve) takes the socket with every byte still in the kernel
        writer.transport.pause_reading()
        try:
            await self._session(reader, writer, plain, unix)
        except Exception:
            log.exception("proxy session failed")
        finally:
            self.active.discard(task)
            writer.close()

    async def _refuse(self, peer, local, why: str, ident: dict | None = None,
                      listener: Target | None = None) -> None:
        """Count a refusal, against the refused process's cgroup (a run's own count). At
        a plain listener it is recorded too: a session that starts and ends, refused."""
        self.refused += 1
        if ident is None:
            ident = await asyncio.to_thread(peer_identity, peer, local)
        self._refused_by[ident.get("cgroup") or ""] += 1
        if listener is None:
            log.warning("refused a connection from %s: %s", hostport(*peer[:2]), why)
            return
        # bounded per target and user: refusals must not fill the spool (recording fails
        # closed: a full spool would stop every agent's sessions)
        now = asyncio.get_running_loop().time()
        key = (listener.name, ident.get("uid"))
        w = self._refusals.get(key)
        if w is None or now - w[0] >= REFUSALS_WINDOW:
            w = self._refusals[key] = [now, 0, w[2] if w else 0]
        w[1] += 1
        if w[1] > REFUSALS_RECORDED:
            w[2] += 1
            if w[1] == REFUSALS_RECORDED + 1:
                log.warning("refused %s at the %s listener %d times in %g s: further "
                            "refusals counted, not recorded, for now", summary(ident),
                            listener.name, REFUSALS_RECORDED, REFUSALS_WINDOW)
            return
        if w[2]:
            why += f" ({w[2]} more refusals of this user not recorded before this one)"
            w[2] = 0
        log.warning("refused a connection from %s (%s): %s", hostport(*peer[:2]),
                    summary(ident), why)
        dst = hostport(*listener.addresses[0])
        start = {"host": self.host, "target": listener.name, "protocol": listener.spec.name,
                 "destination": dst, "process": ident, "session_group": self.session_group,
                 "mode": "target", "layer": listener.spec.name, "via": "listener",
                 "agent": summary(ident)}
        try:
            SessionRecorder(self.spool).record_many([(SESSION_START, start),
                                                     (SESSION_END, {"reason": f"refused: {why}"})])
        except SpoolError as exc:
            log.error("cannot record a refused connection to %s: %s", listener.name, exc)

    async def _who(self, writer, plain: Target | None, unix: Target | None = None):
        """(target, upstream addresses, identity), or None when refused."""
        if unix is not None:
            sock = writer.get_extra_info("socket")
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            rec = self.unix_lookup(pid) if self.unix_lookup else None
            if rec is not None and rec.uid != uid:
                rec = None      # not the process the kernel sent here (its pid, reused)
            if rec is None:
                self.refused += 1
                log.warning("refused a connection to the %s unix socket from pid %d (uid %d): "
                            "no interception record", unix.name, pid, uid)
                return None
            return unix, list(unix.addresses), self.identify(rec)
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        if plain is not None:
            ident = await asyncio.to_thread(peer_identity, peer, local)
            if "uid" not in ident:
                # nobody on this host to attribute it to: no credentials for it (fail closed)
                why = f"{ident.get('mismatch', 'unknown peer')}: nobody to attribute it to"
            else:
                allowed_by = plain.listen_allow.admits(ident)
                if allowed_by:
                    ident["allowed_by"] = allowed_by
                    return plain, list(plain.addresses), ident
                why = plain.listen_allow.refusal(ident)
            await self._refuse(peer, local, f"at the {plain.name} listener: {why}", ident, plain)
            return None
        rec = self.lookup(peer[0], peer[1])
        if rec is None:
            await asyncio.sleep(0)   # the client's sock_ops update may trail by a hair
            rec = self.lookup(peer[0], peer[1])
        if rec is None:
            await self._refuse(peer, local, "no interception record")
            return None
        target = self.targets.match(rec.dst_host, rec.dst_port) if rec.action == ACT_TARGET \
            else None
        return target, [(rec.dst_host, rec.dst_port)], self.identify(rec)

    async def _session(self, reader, writer, plain: Target | None = None,
                       unix: Target | None = None) -> None:
        found = await self._who(writer, plain, unix)
        if found is None:
            return
        target, upstreams, ident = found
        dst = hostport(*upstreams[0])
        spec = target.spec if target is not None else self.raw
        # the address the client dialed: a certificate for it names it
        dialed = writer.get_extra_info("sockname")[0] if plain else upstreams[0][0]
        ctx = SessionContext(target=target or Target(dst, self.raw.name, tuple(upstreams),
                                                     spec=self.raw),
                             identity=ident, dialed=dialed, policy=self.policy,
                             tls_available=self.ca is not None, samples=self.samples,
                             shared=self.shared.setdefault(target.name if target else "", {}),
                             service=self.services.get(spec.name))
        recorder = SessionRecorder(self.spool)
        start = {"host": self.host, "target": target.name if target else dst,
                 "protocol": spec.name, "destination": dst, "process": ident,
                 "session_group": self.session_group, "mode": "target" if target else "record",
                 "layer": spec.name,
                 "via": "listener" if plain else "unix" if unix else "redirect",
                 "agent": summary(ident)}
        try:
            recorder.record(SESSION_START, start)
        except SpoolError as exc:
            log.error("refusing %s -> %s: cannot record: %s", start["agent"], dst, exc)
            return
        if self.on_session:
            self.on_session(recorder.session_id)
        reason, counts = "client closed", {}
        try:
            if spec.serve is not None:   # it connects upstream itself, when it is ready to
                reason = await self._serve(spec, ctx, reader, writer, upstreams, recorder,
                                           start)
                return
            upstream = Leg(None, "upstream")
            try:
                addr = await connect_leg(upstreams, upstream)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = f"upstream unreachable: {exc or 'timeout'}"
                reset(writer)   # the client sees a refused connection, not a clean EOF
                return
            upstream.pause("setup")
            client = Leg(None, "client")
            # From here the client's transport feeds its leg (the stream reader only
            # served the lookups; reading was paused since accept)
            client.connection_made(writer.transport)
            client.pause("setup")
            if reader._buffer:
                client.early.append(bytes(reader._buffer))
                reader._buffer.clear()
            client.early_eof = reader._eof
            writer.transport.set_protocol(client)
            session = Session(self, ctx, spec.layer(ctx), recorder, client, upstream, addr)
            self.sessions.add(session)
            try:
                reason = await session.run()
            finally:
                self.sessions.discard(session)
                counts = session.counts
        finally:
            try:
                recorder.record(SESSION_END, {"reason": reason, **counts})
            except SpoolError as exc:
                log.error("cannot record the end of session %s: %s", recorder.session_id, exc)

    async def _serve(self, spec, ctx, reader, writer, upstreams, recorder, start: dict) -> str:
        """A protocol whose library owns the wire (SSH with asyncssh) gets the client's
        socket itself and the driver's services (api.Wire)."""
        sock = writer.get_extra_info("socket")
        client = socket.socket(fileno=socket.dup(sock.fileno()))
        client.setblocking(False)
        early = bytes(reader._buffer)   # (read before the session knew its protocol)
        writer.transport.abort()
        children: list[SessionRecorder] = []

        async def connect():
            _r, w, _ = await connect_any(upstreams, READ_SIZE)
            s = w.get_extra_info("socket")
            dup = socket.socket(fileno=socket.dup(s.fileno()))
            dup.setblocking(False)
            w.transport.abort()
            return dup

        def open_recording(fields: dict) -> SessionRecorder:
            child = SessionRecorder(self.spool)
            child.record(SESSION_START, {**start, **fields, "parent": recorder.session_id})
            children.append(child)
            if self.on_session:
                self.on_session(child.session_id)
            return child

        async def approve(rec, command: str, rule: str, reason: str, on_pending=None):
            return await self.await_approval(rec, ctx, command, rule, reason, on_pending)

        wire = Wire(sock=client, early=early, connect=connect, recorder=recorder,
                    open_recording=open_recording, approve=approve)
        try:
            return await spec.serve(ctx, wire) or "session ended"
        finally:
            client.close()
            for child in children:    # (each normally records its own end)
                if not child.ended:
                    try:
                        child.record(SESSION_END, {"reason": "connection closed"})
                    except SpoolError as exc:
                        log.error("cannot record the end of session %s: %s",
                                  child.session_id, exc)

    # ------------------------------------------------------------------ for sessions

    def client_tls(self, names: tuple[str, ...], alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = self.ca.server_context(names, alpn)
        ctx.sni_callback = _keep_sni
        return ctx

    def upstream_tls(self, verify: bool, ca: str | None, alpn: tuple[str, ...],
                     cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
        """A context towards servers (cached by its settings). `cert`/`key`: the client
        certificate the target's credentials are (Kubernetes); root's files, read here."""
        cache = (verify, ca, alpn, cert, key)
        ctx = self._upstream_ctx.get(cache)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca)
            if cert:
                ctx.load_cert_chain(cert, key)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE   # encrypted, not authenticated
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._upstream_ctx[cache] = ctx
        return ctx

    async def ask_approval(self, recorder, ctx, command: str, rule: str, reason: str):
        """(approval, None) or (None, error): fail closed if none can be asked for."""
        if self.approver is None:
            return None, "no collector to ask"
        try:
            ap = await self.approver.ask(
                session_id=recorder.session_id, host=self.host, target=ctx.target.name,
                protocol=ctx.target.protocol, command=command,
                requested_by=str(ctx.identity.get("user", "")), rule=rule, reason=reason)
        except Exception as exc:
            return None, str(exc)
        return ap, None

    async def await_approval(self, recorder, ctx, command: str, rule: str, reason: str,
                             on_pending=None) -> tuple[bool, str]:
        """Ask, record, wait: (approved, why). Fail closed: if no approval can be asked
        for or awaited, the answer is no. Raises SpoolError when it can't be recorded."""
        ap, error = await self.ask_approval(recorder, ctx, command, rule, reason)
        if ap is None:
            recorder.record(APPROVAL, {"state": "unavailable", "error": error})
            return False, f"{reason} (needs approval, which could not be requested: {error})"
        recorder.record(APPROVAL, {"id": ap.id, "state": "pending", "rule": rule,
                                   "expires_ns": ap.expires_ns})
        if on_pending is not None:
            on_pending(ap)
        try:
            state, by, why = await self.approver.wait(ap.id)
        except asyncio.CancelledError:
            # what asked went away (an SSH channel closed): the request is withdrawn, so
            # nobody decides what will never run
            await asyncio.shield(self._withdraw(recorder, ap.id))
            raise
        except Exception as exc:
            state, by, why = "unavailable", "", str(exc)
        if recorder.ended:     # (what asked went away meanwhile: an SSH channel closed)
            return False, f"{reason} (the session ended before approval {ap.id} was decided)"
        recorder.record(APPROVAL, {"id": ap.id, "state": state, "decided_by": by,
                                   "reason": why})
        if state == "approved":
            return True, why
        what = {"denied": f"denied by {by}", "expired": "not approved in time"}.get(state, state)
        return False, f"{reason} (approval {ap.id} {what}{': ' + why if why else ''})"

    async def _withdraw(self, recorder, approval_id: str) -> None:
        try:
            await self.approver.cancel(approval_id)
        except Exception as exc:
            log.warning("cannot withdraw approval %s: %s", approval_id, exc)
        if not recorder.ended:
            try:
                recorder.record(APPROVAL, {"id": approval_id, "state": "cancelled",
                                           "reason": "withdrawn: the session went away"})
            except SpoolError as exc:
                log.error("cannot record the withdrawal of approval %s: %s", approval_id, exc)

    def _sweep_start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Sessions idle past their protocol's timeout end with its error (a session
        waiting for an approval is not idle)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = loop.time()
            for s in list(self.sessions):
                if s.idle_since(now) > s.ctx.target.idle_timeout:
                    s.abort(f"idle for {s.ctx.target.idle_timeout:g} s: session closed")


class _Unread(asyncio.StreamReaderProtocol):
    """A connection nothing is read from until its session knows its protocol: a
    protocol that starts with TLS (https) needs the ClientHello still in the kernel,
    and the handler runs a loop turn after the accept, when it may have arrived."""

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        super().connection_made(transport)


async def _serve(accept, sock: socket.socket, unix: bool = False):
    loop = asyncio.get_running_loop()

    def factory():
        return _Unread(asyncio.StreamReader(limit=READ_SIZE, loop=loop), accept, loop=loop)
    if unix:
        return await loop.create_unix_server(factory, sock=sock)
    return await loop.create_server(factory, sock=sock)


def _keep_sni(sslobj, name, _ctx) -> None:
    sslobj.agentgate_sni = name
