"""One proxied connection: the two legs, the layer, and the order of things.

Events go into the layer one at a time and its commands are performed at once, in
order, without awaiting: bytes for a leg whose TLS handshake is pending wait in that
leg's queue, handshakes and approvals run as tasks that feed their outcome back as
events. So nothing another event causes can overtake what the layer already said.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time

from hostagent.protocols.api import (CLIENT, UPSTREAM, Aborted, Answer, ApprovalDecided,
                                     Close, DataReceived, EofReceived, Handoff, Hold,
                                     HoldPending, OpenSide, ProtocolError, Record, SideAnswered,
                                     Start, StartClientTls, StartUpstreamTls, TlsEstablished,
                                     TlsFailed, ToClient, ToUpstream)
from hostagent.proxy.net import CONNECT_TIMEOUT, connect_any
from hostagent.recording.spool import SpoolError

log = logging.getLogger("agentgate.proxy")
READ_SIZE = 64 << 10
DRAIN_ABOVE = 256 << 10   # a peer this far behind makes the other side wait (backpressure)
CLOSE_GRACE = 5.0         # for final bytes to reach a client that reads slowly


class Leg(asyncio.Protocol):
    """One side's transport, feeding its session: the bytes it reads go to the layer as
    they arrive (no reader task, no buffer of ours), what the layer sends goes out
    through the session's turn. Reading pauses for as long as any reason holds (a TLS
    handshake, a hold on the client, the other side's backlog)."""

    def __init__(self, session: "Session | None", name: str):
        self.session = session
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.paused: set[str] = set()
        self.handshaking = False
        self.queued: list[bytes] = []
        self.eof = False           # read EOF from it
        self.eof_sent = False      # half-closed it
        self.lost = False
        self.early: list[bytes] = []   # read before the session was there
        self.tls_early: list[bytes] = []   # of those, what belongs to a TLS handshake
        self.tls_first: list[bytes] = []   # read through TLS before its handshake's end
                                           # reached the layer (a client's first request)
        self.early_eof = False
        self.tls_failed = False

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        # (also once a TLS handshake is done, with the TLS transport: it reads at once,
        # while the session still holds the leg paused for the handshake's end)
        self.transport = transport
        transport.set_write_buffer_limits(high=DRAIN_ABOVE)
        if self.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            self.early.append(data)
        else:
            self.session.received(self, data)

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.eof(self)
        else:
            self.early_eof = True
        # half-closed: the other direction keeps flowing (TLS has no half-close, and
        # asyncio warns when asked for one)
        t = self.transport
        return t is None or t.get_extra_info("ssl_object") is None

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.session is not None:
            self.session.lost(self, exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.other(self).pause("backlog")

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.other(self).resume("backlog")

    # -- ours
    def pause(self, why: str) -> None:
        if not self.paused and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        if why not in self.paused:
            return
        self.paused.discard(why)
        if not self.paused and self.transport is not None and not self.lost \
                and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.handshaking:
            self.queued.append(data)
        elif self.transport is not None and not self.transport.is_closing() \
                and not self.eof_sent:
            self.transport.write(data)
        # else: the leg is half-closed or gone; the session's end says why

    def holding(self) -> int:
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return size + sum(map(len, self.queued))


class Session:
    def __init__(self, proxy, ctx, layer, recorder, client: Leg, upstream: Leg,
                 upstream_addr: tuple[str, int]):
        self.proxy = proxy
        self.turn = proxy.turn
        self.ctx = ctx
        self.layer = layer
        self.recorder = recorder
        recorder.turn = self.turn
        recorder.on_failure = self._spool_failure
        self.client = client
        self.upstream = upstream
        self.sides = {CLIENT: client, UPSTREAM: upstream}
        self.upstream_addr = upstream_addr
        self.bytes_in = self.bytes_out = 0
        self.reason: str | None = None
        self.ended = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.holds = 0
        self.started: dict[int, int] = {}   # statement id -> when it went upstream
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self.held_bytes = 0                 # charged to the proxy's budget
        self._aborting = False
        self._spool_failed = False

    # ------------------------------------------------------------------ running

    async def run(self) -> str:
        try:
            return await self._run()
        finally:
            if not self.ended.is_set():     # cancelled (the proxy is closing)
                self.finish("the proxy closed")
            for leg in (self.client, self.upstream):
                if leg.transport is not None and not leg.transport.is_closing():
                    leg.transport.abort() if self.reason == "the proxy closed" \
                        else leg.transport.close()

    async def _run(self) -> str:
        self.feed(Start(self.upstream_addr))
        for leg in (self.client, self.upstream):
            leg.session = self
            early, leg.early = leg.early, []
            for data in early:
                if leg.handshaking:    # TLS was asked for at Start: these are its bytes
                    leg.tls_early.append(data)
                else:
                    self.received(leg, data)
            if leg.early_eof:
                self.eof(leg)
            if leg.lost:
                self.lost(leg, None)
        self.client.resume("setup")
        self.upstream.resume("setup")
        await self.ended.wait()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.turn.flush()
        self.proxy.budget.update(self.held_bytes, 0)
        self.held_bytes = 0
        # final bytes (an error the client should see) get a moment to leave
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            deadline = self._loop.time() + CLOSE_GRACE
            while transport.get_write_buffer_size() and not self.client.lost \
                    and self._loop.time() < deadline:
                await asyncio.sleep(0.01)
            transport.close()
        if self.upstream.transport is not None:
            self.upstream.transport.close()
        return self.reason or "closed"

    def finish(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.ended.set()

    def idle_since(self, now: float) -> float:
        return 0.0 if self.holds or self.ended.is_set() else now - self.last

    def abort(self, reason: str) -> None:
        """End the session with the protocol's own error (idle, over budget, spool)."""
        if self.ended.is_set() or self._aborting:
            return
        self._aborting = True
        self.feed(Aborted(reason))
        self.finish(reason)

    def other(self, leg: Leg) -> Leg:
        return self.upstream if leg is self.client else self.client

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, (ConnectionError, OSError)):
            self.finish(f"connection reset: {exc}")
        elif exc is not None:
            log.error("session %s failed", self.recorder.session_id, exc_info=exc)
            self.finish(f"internal error: {exc!r}")

    # ------------------------------------------------------------------ the legs

    def received(self, leg: Leg, data: bytes) -> None:
        if self.ended.is_set():
            return
        if leg.handshaking:
            # (TLS 1.3 clients send their first request with their Finished: the TLS
            # protocol may pass it on before start_tls returns; the layer must first
            # hear that the handshake is done)
            leg.tls_first.append(data)
            return
        if leg is self.client:
            self.bytes_in += len(data)
        else:
            self.bytes_out += len(data)
        self.last = self._loop.time()
        self.feed(DataReceived(leg.name, data))

    @property
    def counts(self) -> dict:
        return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out}

    def eof(self, leg: Leg) -> None:
        if self.ended.is_set() or leg.eof:
            return
        leg.eof = True
        self.feed(EofReceived(leg.name))
        other = self.other(leg)
        if self.ended.is_set():
            return
        transport = other.transport
        # (a layer that answers in turns, like HTTP's, says when the other side may
        # hear it: requests the client sent before its EOF may still be queued in it)
        if getattr(self.layer, "relays_eof", True) and transport is not None \
                and not other.handshaking and not other.lost and transport.can_write_eof():
            self.turn.flush()              # what the layer sent goes before the EOF
            if not transport.is_closing():
                transport.write_eof()      # a half-close: the other way keeps flowing
                other.eof_sent = True
        if other.eof:
            self.finish("client closed" if other is self.client else "upstream closed")
        elif self.reason is None:
            self.reason = f"{leg.name} closed"

    def lost(self, leg: Leg, exc) -> None:
        if self.ended.is_set() or leg.handshaking or leg.tls_failed:
            return      # (a failed handshake is the layer's to answer: TlsFailed)
        if exc is not None:
            self.finish(f"connection reset: {exc}")
            return
        if not leg.eof:
            self.eof(leg)
        if not self.ended.is_set() and self.other(leg).lost:
            self.finish("client closed" if leg is self.client else "upstream closed")
        elif not self.ended.is_set():
            # gone for good (a TLS leg has no half-close): nothing more can come from it
            self.finish(f"{leg.name} closed")

    # ------------------------------------------------------------------ layer in, commands out

    def feed(self, event) -> None:
        if self.ended.is_set():
            return
        try:
            commands = self.layer.handle(event)
        except ProtocolError as exc:
            self.finish(f"protocol error: {exc}")
            return
        try:
            self.perform(commands)
        except SpoolError as exc:
            self._spool_failure(exc)
            return
        self._charge()

    def _spool_failure(self, exc: SpoolError) -> None:
        """Nothing runs unrecorded: the layer refuses with its protocol's error (its own
        records are dropped: they can't be stored either) and the session ends."""
        if self._spool_failed:
            return
        log.error("session %s: recording failed, session closed: %s",
                  self.recorder.session_id, exc)
        self._spool_failed = True
        self.abort(f"refused, the recording could not be stored ({exc})")

    def _charge(self) -> None:
        # statements in flight cost a little each: a pipeline that never syncs is charged
        now = (self.layer.buffered() + self.client.holding() + self.upstream.holding()
               + 64 * len(self.started))
        before = self.held_bytes
        if now == before:
            return
        self.held_bytes = now
        if not self.proxy.budget.update(before, now):
            self.abort("over the host agent's memory budget: session closed")

    def perform(self, commands) -> None:
        # Records go to the turn now; the bytes after them leave with the turn's flush,
        # once every record of the turn is in the spool: record before execute.
        records: list[tuple[str, dict]] = []
        turn, recorder = self.turn, self.recorder
        handoff = None
        for cmd in commands:
            t = type(cmd)
            if t is Record:
                if cmd.stop is None:
                    records.append((cmd.kind, cmd.fields))
                else:
                    records.append((cmd.kind, {**cmd.fields,
                                               "duration_us": self._elapsed(cmd.stop)}))
                continue
            if records:
                if not self._spool_failed:
                    recorder.record_many(records)
                records = []
            if t is ToUpstream:
                if cmd.starts:
                    now = time.monotonic_ns()
                    for sid in cmd.starts:
                        self.started[sid] = now
                turn.send(self.upstream, cmd.data, recorder)
            elif t is ToClient:
                turn.send(self.client, cmd.data, recorder)
            elif t is Close:
                if cmd.final:
                    turn.send(self.client, cmd.final, recorder)
                turn.flush()
                self.finish(cmd.reason)
                return
            elif t is StartClientTls or t is StartUpstreamTls:
                turn.flush()
                self._start_tls(cmd)
            elif t is Hold:
                self.holds += 1
                self.client.pause("hold")
                self._spawn(self._hold(cmd))
            elif t is Handoff:
                handoff = cmd
            elif t is OpenSide:
                self._spawn(self._side(cmd))
            else:
                raise TypeError(f"not a command: {cmd!r}")
        if records and not self._spool_failed:
            recorder.record_many(records)
        if handoff is not None:
            self.layer = handoff.layer
            self.feed(Start(self.upstream_addr))
            if handoff.client_data:
                self.feed(DataReceived(CLIENT, handoff.client_data))
            if handoff.upstream_data:
                self.feed(DataReceived(UPSTREAM, handoff.upstream_data))

    def _elapsed(self, sid: int) -> int | None:
        """Microseconds since statement sid went upstream. Answers come in the order
        statements were sent, so older ids still waiting were skipped by the server
        (after an error): they are dropped, which keeps the table small."""
        started = self.started
        t = started.pop(sid, None)
        while started and next(iter(started)) < sid:
            del started[next(iter(started))]
        return None if t is None else (time.monotonic_ns() - t) // 1000

    # ------------------------------------------------------------------ TLS on a leg

    def _start_tls(self, cmd) -> None:
        leg = self.client if type(cmd) is StartClientTls else self.upstream
        # From this moment the leg's bytes are TLS records for the handshake: they stay
        # in the kernel until the TLS protocol is in place (bytes read in the clear after
        # the layer asked for TLS would be taken as if they came through it:
        # CVE-2021-23214/23222; the layer refuses those it was given).
        leg.pause("handshake")
        leg.handshaking = True
        if getattr(cmd, "early", b""):
            leg.tls_early.insert(0, cmd.early)
        self._spawn(self._handshake(leg, cmd))

    async def _handshake(self, leg: Leg, cmd) -> None:
        try:
            if leg is self.client:
                if self.proxy.ca is None:
                    raise ssl.SSLError("no local CA to terminate TLS with")
                early, leg.tls_early = b"".join(leg.tls_early), []
                transport = await _start_tls(
                    self._loop, leg.transport, self._loop.start_tls(
                        leg.transport, leg, self.proxy.client_tls(cmd.names, cmd.alpn),
                        server_side=True, ssl_handshake_timeout=CONNECT_TIMEOUT), early)
            else:
                ctx = self.proxy.upstream_tls(cmd.verify, cmd.ca, cmd.alpn, cmd.cert, cmd.key)
                transport = await self._loop.start_tls(
                    leg.transport, leg, ctx, server_hostname=cmd.server_name or None,
                    ssl_handshake_timeout=CONNECT_TIMEOUT)
        except (ssl.SSLError, ssl.CertificateError, OSError, asyncio.TimeoutError,
                ValueError, ConnectionError) as exc:
            leg.tls_failed = True
            leg.handshaking = False
            leg.queued.clear()
            leg.tls_first.clear()
            self.feed(TlsFailed(leg.name, _tls_error(exc)))
            if leg is self.client:   # nothing more can reach the client
                self.finish(f"client TLS handshake failed: {_tls_error(exc)}")
            # the server's leg stays unread: the layer answers its client (e.g. an error
            # for its start-up) and closes
            return
        leg.transport = transport
        transport.set_write_buffer_limits(high=DRAIN_ABOVE)
        leg.handshaking = False
        queued, leg.queued = leg.queued, []
        for data in queued:
            transport.write(data)
        obj = transport.get_extra_info("ssl_object")
        peer = obj.getpeercert(binary_form=True) if leg is self.upstream else None
        self.feed(TlsEstablished(leg.name, obj.version(), obj.selected_alpn_protocol(),
                                 getattr(obj, "agentgate_sni", None), peer))
        first, leg.tls_first = leg.tls_first, []
        for data in first:
            self.received(leg, data)
        leg.resume("handshake")

    # ------------------------------------------------------------------ side connections

    async def _side(self, cmd: OpenSide) -> None:
        """Run a side layer on its own connection to this session's server; its Answer
        (or why there is none) goes back to the session's layer. Nothing of it reaches
        the client; its bytes are bounded by the side layer itself."""
        writer = None
        answer: list = []
        try:
            async with asyncio.timeout(cmd.timeout):
                reader, writer, _ = await connect_any([self.upstream_addr], READ_SIZE)
                error = await self._run_side(cmd.layer, reader, writer, answer)
        except TimeoutError:   # (an OSError too: first)
            error = f"side connection timed out after {cmd.timeout:g} s"
        except (OSError, ConnectionError) as exc:
            error = f"side connection failed: {exc}"
        except ProtocolError as exc:
            error = f"side connection: protocol error: {exc}"
        finally:
            if writer is not None:
                writer.close()
        if answer:
            self.feed(SideAnswered(cmd.key, answer[0]))
        else:
            self.feed(SideAnswered(cmd.key, None, error or "closed without an answer"))

    async def _run_side(self, layer, reader, writer, answer: list) -> str:
        pending = list(layer.handle(Start(self.upstream_addr)))
        while True:
            while pending:
                cmd = pending.pop(0)
                t = type(cmd)
                if t is ToUpstream:
                    writer.write(cmd.data)
                elif t is Answer:
                    answer[:] = [cmd.value]
                elif t is Close:
                    return cmd.reason
                elif t is StartUpstreamTls:
                    try:
                        await writer.start_tls(
                            self.proxy.upstream_tls(cmd.verify, cmd.ca, cmd.alpn, cmd.cert, cmd.key),
                            server_hostname=cmd.server_name or None,
                            ssl_handshake_timeout=CONNECT_TIMEOUT)
                    except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
                        pending = list(layer.handle(TlsFailed(UPSTREAM, _tls_error(exc))))
                        continue
                    obj = writer.get_extra_info("ssl_object")
                    pending += layer.handle(TlsEstablished(
                        UPSTREAM, obj.version(), obj.selected_alpn_protocol(), None,
                        obj.getpeercert(binary_form=True)))
                elif t is not Record:   # a side connection is not the session's record
                    raise TypeError(f"not a side connection's command: {cmd!r}")
            data = await reader.read(READ_SIZE)
            pending = list(layer.handle(DataReceived(UPSTREAM, data) if data
                                        else EofReceived(UPSTREAM)))
            if not data and not pending:
                return "the server closed the side connection"

    # ------------------------------------------------------------------ approvals

    async def _hold(self, hold: Hold) -> None:
        """Ask for approval; this session's client waits (only this one). Fail closed:
        if no approval can be asked for or awaited, the command is refused."""
        from hostagent.approvals import when
        try:
            approved, why = await self.proxy.await_approval(
                self.recorder, self.ctx, hold.command, hold.rule, hold.reason,
                on_pending=lambda ap: self.feed(HoldPending(hold.key, ap.id,
                                                            when(ap.expires_ns))))
            self.feed(ApprovalDecided(hold.key, approved, why))
        except SpoolError as exc:
            self._spool_failure(exc)
        finally:
            self.holds -= 1
            if not self.holds:
                self.client.resume("hold")


def _tls_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc) \
        or type(exc).__name__


async def _start_tls(loop, transport, start_tls, early: bytes):
    """`start_tls`, with `early` handed to its TLS protocol first: bytes of the handshake
    read before the session asked for TLS. uvloop starts reading an accepted connection
    right after connection_made, whatever the protocol paused, so a client that speaks
    at once (a ClientHello) can be read a turn before its session exists; the kernel
    can't take them back. They go in through the protocol's BufferedProtocol interface
    once start_tls has put it in place and called its connection_made (which it queues
    right after swapping it in: hence one more turn)."""
    task = asyncio.ensure_future(start_tls)
    if not early:
        return await task
    before = transport.get_protocol()

    def feed(swapped: bool) -> None:
        proto = transport.get_protocol()
        if task.done():
            return
        if proto is before or not swapped:
            loop.call_soon(feed, proto is not before)
            return
        view = memoryview(early)
        while view:
            buf = proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
    loop.call_soon(feed, False)
    return await task
