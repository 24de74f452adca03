"""The HTTP/1.1 layer: a sans-IO state machine the driver runs, one exchange at a time.

Each request is read and framing-checked (wire.py), judged (head, and the body when a
`json` rule needs it), recorded, then written anew towards the server with the
credentials of the target and nothing hop-by-hop. Pipelined requests wait, bounded,
until the answer before them is out, so answers keep their order. An answer streams
through as it arrives unless masking must see it: then it is buffered (bounded) and
rewritten whole, or, for event streams, masked line by line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import h11

from agentgate.events import OUTPUT
from hostagent.policy import Decision, Request
from hostagent.protocols.api import (CLIENT, Aborted, ApprovalDecided, Close, Command,
                                     DataReceived, EofReceived, Handoff, HoldPending,
                                     ProtocolError, Record, Start, StartClientTls,
                                     StartUpstreamTls, TlsEstablished, TlsFailed, ToClient,
                                     ToUpstream)
from hostagent.protocols.enforce import Enforcer
from hostagent.protocols.http import bodies, records
from hostagent.protocols.http.bodies import BodyMasker, MaskRefused, Scrubber
from hostagent.protocols.http.requests import (BadTarget, flatten, form_fields,
                                               host_values, looks_like_json,
                                               normalize_target, parse_json, request_for)
from hostagent.protocols.http.wire import (ClientSide, HeadError, ServerSide, end_to_end,
                                           header, tokens)

MAX_PIPELINED = 1 << 20       # read past the request in flight, waiting its turn
ALPN = ("http/1.1",)          # HTTP/2 clients fall back by ALPN (h2 is not parsed)


@dataclass(eq=False)
class Exchange:
    id: int
    request: h11.Request
    method: str
    path: str = ""
    query: str = ""
    host: str = ""
    phase: str = "reading"       # reading | held | forward | refused
    body: bytearray = field(default_factory=bytearray)
    body_done: bool = False
    forwarded: bool = False
    mode: str = ""               # the answer: stream | buffer | lines
    answered: bool = False       # the answer's head went to the client
    response: h11.Response | None = None
    mtype: str = ""
    codings: list = field(default_factory=list)
    resp_body: bytearray = field(default_factory=bytearray)
    lines: bytearray = field(default_factory=bytearray)
    sample: bytearray = field(default_factory=bytearray)
    size: int = 0
    masked_before: dict = field(default_factory=dict)
    scrub: Scrubber | None = None
    fields: list | None = None   # the body's fields, as judged


class HttpLayer:
    name = "http"
    # a client's half-close waits until what it sent before is answered (pipelining)
    relays_eof = False
    # query parameters as `json` fields (web frameworks bind them with the body's)
    query_fields = True
    # protocols an allowed request may switch the connection to (its layer: _upgraded)
    upgrades = frozenset((b"websocket",))

    def __init__(self, *, decide, target: str, identity: dict, protocol: str = "http",
                 tls: bool = False, names: tuple[str, ...] = (), server_name: str = "",
                 ca: str | None = None, inject: tuple[tuple[bytes, bytes], ...] = (),
                 keep_authorization: bool = False, masker: BodyMasker | None = None,
                 judge_json: bool = False, max_body: int = 8 << 20, sample_bytes: int = 4096,
                 client_cert: str | None = None, client_key: str | None = None):
        self.enforcer = Enforcer(decide)
        self.target, self.identity, self.protocol = target, identity, protocol
        self.tls, self.names, self.server_name, self.ca = tls, names, server_name, ca
        self.client_cert, self.client_key = client_cert, client_key
        self.inject = inject
        self.hostnames = frozenset(n.lower().rstrip(".").strip("[]") for n in names)
        drop = {n.lower() for n, _ in inject}
        if not keep_authorization:
            drop.add(b"authorization")
        # (method and URL overrides: frameworks and proxies behind would act on what the
        # policy did not judge)
        self.dropped = frozenset(drop) | _OVERRIDES
        self.secret_names = frozenset(n.decode("latin-1").lower() for n, _ in inject)
        # what must never reach the agent, even echoed back by the server
        secrets = []
        for _, value in inject:
            secrets.append(value)
            if value.lower().startswith(b"bearer "):
                secrets.append(value[7:].strip())
        # ...and as an echo may give them back: JSON-escaped, percent-encoded
        from urllib.parse import quote, quote_plus
        secrets += [v.replace(b"/", b"\\/") for v in secrets] + \
            [quote(v, safe="").encode() for v in secrets] + \
            [quote_plus(v, safe="").encode() for v in secrets]
        self.secrets = tuple(dict.fromkeys(v for v in secrets if len(v) >= 8))
        self.masker = masker if masker is not None and masker.active else None
        self.judge_json = judge_json
        self.max_body = max_body
        self.sample_bytes = sample_bytes
        self.client = ClientSide()
        self.server: ServerSide | None = None
        self.ex: Exchange | None = None
        self.n = 0
        self.upstream_error = ""
        self.client_eof = False

    # ------------------------------------------------------------------ events

    def handle(self, event) -> list[Command]:
        kind = type(event)
        try:
            if kind is DataReceived:
                if event.side == CLIENT:
                    return self._client_data(event.data)
                return self._upstream_data(event.data)
            if kind is EofReceived:
                return self._client_eof() if event.side == CLIENT else self._upstream_eof()
            if kind is Start:
                return [StartClientTls(self.names, ALPN)] if self.tls else []
            if kind is ApprovalDecided:
                return self._decided(event)
            if kind is HoldPending:
                return []
            if kind is TlsEstablished:
                return self._tls_up(event)
            if kind is TlsFailed:
                return self._tls_failed(event)
            if kind is Aborted:
                return self._fail(502, f"agentgate: {event.reason}", event.reason)
        except HeadError as exc:
            return self._fail(400, f"agentgate: refused request framing: {exc}",
                              f"refused request framing: {exc}")
        return []

    def buffered(self) -> int:
        ex = self.ex
        n = self.client.buffered
        if ex is not None:
            n += len(ex.body) + len(ex.resp_body) + len(ex.lines)
        return n

    # ------------------------------------------------------------------ TLS

    def _tls_up(self, ev: TlsEstablished) -> list[Command]:
        rec = Record("tls", {"side": ev.side, "version": ev.version, "alpn": ev.alpn,
                             **({"sni": ev.sni} if ev.sni else {})})
        if ev.side != CLIENT:
            rec.fields["verified"] = True
            return [rec]
        # the server's name: the one the client asked for, if it is one of the target's
        name = self.server_name or (ev.sni if ev.sni in self.names else "") \
            or next(iter(self.names), "")
        return [rec, StartUpstreamTls(name, verify=True, ca=self.ca, alpn=ALPN,
                                      cert=self.client_cert, key=self.client_key)]

    def _tls_failed(self, ev: TlsFailed) -> list[Command]:
        if ev.side == CLIENT:
            return [Close(f"client TLS handshake failed: {ev.error}")]
        self.upstream_error = f"the server's TLS failed verification or handshake: {ev.error}"
        out = [Record("tls", {"side": "upstream", "error": ev.error, "verified": False})]
        if self.ex is not None and self.ex.forwarded:
            out += self._fail(502, f"agentgate: {self.upstream_error}", self.upstream_error)
        return out

    # ------------------------------------------------------------------ the client

    def _client_data(self, data: bytes) -> list[Command]:
        if self.ex is not None and self.client.ended:
            self.client.later += data
            if len(self.client.later) > MAX_PIPELINED:
                raise ProtocolError(f"more than {MAX_PIPELINED} bytes pipelined behind a "
                                    f"request in flight")
            return []
        self.client.feed(data)
        return self._client_events()

    def _client_events(self) -> list[Command]:
        out: list[Command] = []
        for ev in self.client.events():
            t = type(ev)
            if t is h11.Request:
                out += self._request(ev)
            elif t is h11.Data:
                out += self._request_data(bytes(ev.data))
            elif t is h11.EndOfMessage:
                out += self._request_end()
            elif t is h11.ConnectionClosed:
                out.append(Close("client closed"))
            if out and type(out[-1]) is Close:
                break
        return out

    def _client_eof(self) -> list[Command]:
        self.client_eof = True
        if self.ex is None:
            return [Close("client closed")]
        if not self.client.ended:
            return [Close("client closed in the middle of a request")]
        return []     # the answer still goes out

    def _request(self, req: h11.Request) -> list[Command]:
        self.n += 1
        ex = self.ex = Exchange(self.n, req, req.method.decode("ascii", "replace"))
        ex.masked_before = self.masker.counts() if self.masker else {}
        ex.scrub = Scrubber(self.secrets) if self.secrets else None
        if ex.method == "PRI":
            return self._fail(505, "agentgate: HTTP/2 with prior knowledge is not supported; "
                                   "use HTTP/1.1", "HTTP/2 prior knowledge refused")
        if ex.method == "CONNECT":
            return self._judged_refusal(ex, 405, "CONNECT tunnels are refused: what goes "
                                                 "through one can't be judged")
        try:
            ex.path, ex.query = normalize_target(req.target)
        except BadTarget as exc:
            return self._fail(400, f"agentgate: {exc}", str(exc))
        host = header(req.headers, b"host")
        if host is None and req.http_version == b"1.0" and self.names:
            host = self.names[0].encode()      # (HTTP/1.1 upstream needs one)
        ex.host = (host or b"").decode("latin-1")
        if not _HOST.fullmatch(host or b"") or \
                host_values(host)[0].strip("[]") not in self.hostnames:
            # the connection goes to the target whatever the Host says; behind a shared
            # ingress another name is another site, and would get the target's credentials
            return self._judged_refusal(ex, 421, f"the Host {ex.host!r} is not a name of "
                                                 f"this target ({', '.join(self.names)})")
        if self.upstream_error:
            return self._fail(502, f"agentgate: {self.upstream_error}", self.upstream_error)
        length = header(req.headers, b"content-length")
        chunked = bool(tokens(req.headers, b"transfer-encoding"))
        has_body = chunked or (length is not None and length != b"0")
        small = length is not None and int(length) <= self.sample_bytes \
            and not self.client.waits_for_100
        if has_body and (self.judge_json or small):
            return []      # judged once the body is here
        return self._judge(ex)

    def _request_data(self, data: bytes) -> list[Command]:
        ex = self.ex
        if ex.phase == "forward":
            return [ToUpstream(self.server.send(h11.Data(data)))]
        if ex.phase in ("reading", "held"):
            ex.body += data
            if len(ex.body) > self.max_body:
                if ex.phase == "held":
                    self.enforcer.release(self._held_key)
                return self._judged_refusal(ex, 413, f"a request body over {self.max_body} "
                                                     f"bytes can't be judged")
        return []

    def _request_end(self) -> list[Command]:
        ex = self.ex
        ex.body_done = True
        if ex.phase == "reading":
            return self._judge(ex)
        if ex.phase == "forward":
            end = self.server.send(h11.EndOfMessage())
            return [ToUpstream(end)] if end else []
        if ex.phase == "refused":
            return self._cycle_end()
        return []

    # ------------------------------------------------------------------ judging

    def _body_fields(self, ex: Exchange) -> tuple[list[str] | None, bool]:
        """The body's fields for `json` rules, and whether it could be read. A body that
        is, claims or looks like JSON and does not parse is unparseable: a server may
        read it anyway (Go ignores trailing data and the Content-Type)."""
        if not (self.judge_json and ex.body):
            return None, True
        mtype = bodies.media_type(header(ex.request.headers, b"content-type"))
        try:
            body = bodies.decode(bytes(ex.body), tokens(ex.request.headers, b"content-encoding"),
                                 self.max_body)
        except MaskRefused:
            return None, False
        if mtype.startswith("multipart/"):
            return None, False     # (its fields are not read: a rule could not see them)
        if mtype == "application/x-www-form-urlencoded":
            try:
                return form_fields(body.decode("utf-8", "replace")), True
            except ValueError:
                return None, False
        try:
            return flatten(parse_json(body)), True
        except (ValueError, RecursionError):
            return None, not (bodies.is_json(mtype) or looks_like_json(body))

    def _judge(self, ex: Exchange) -> list[Command]:
        req, rec = self._policy_request(ex)
        verdict, recs = self.enforcer.judge([(req, rec)])
        if verdict.action == "allow":
            return recs + self._forward(ex)
        if verdict.action == "deny":
            return recs + self._deny(ex, verdict)
        ex.phase = "held"
        hold = self.enforcer.hold(ex, verdict, req.text)
        self._held_key = hold.key
        return recs + [hold]

    def _policy_request(self, ex: Exchange) -> tuple[Request, dict]:
        """The policy request and the command record of an exchange (a child protocol,
        e.g. Kubernetes, adds its own matchers and fields)."""
        fields, parsed = self._body_fields(ex)
        ex.fields = fields
        req = request_for(target=self.target, identity=self.identity, method=ex.method,
                          host=ex.host.encode("latin-1"), path=ex.path, query=ex.query,
                          headers=ex.request.headers, body_fields=fields, parsed=parsed,
                          protocol=self.protocol, query_fields=self.query_fields)
        rec = records.command_fields(
            method=ex.method, path=ex.path, query=ex.query, host=ex.host,
            version=ex.request.http_version.decode(), headers=ex.request.headers,
            body=bytes(ex.body) if ex.body_done else None, limit=self.sample_bytes,
            also=self.secret_names)
        return req, rec

    def _decided(self, ev: ApprovalDecided) -> list[Command]:
        entry = self.enforcer.release(ev.key)
        if entry is None or self.ex is not entry[0]:
            return []
        ex, decision = entry
        if ev.approved:
            return self._forward(ex)
        return self._deny(ex, Decision("deny", decision.rule, ev.reason))

    def _judged_refusal(self, ex: Exchange, status: int, reason: str) -> list[Command]:
        """A refusal of the proxy's own (not a rule's), recorded as a command."""
        d = Decision("deny", "(agentgate)", reason)
        rec = records.command_fields(
            method=ex.method, path=ex.path or ex.request.target.decode("latin-1"),
            query=ex.query, host=(header(ex.request.headers, b"host") or b"").decode("latin-1"),
            version=ex.request.http_version.decode(), headers=ex.request.headers, body=None,
            limit=self.sample_bytes, also=self.secret_names)
        return [Record("command", {**rec, "decision": d.as_dict()})] + \
            self._deny(ex, d, status=status)

    # ------------------------------------------------------------------ refusing

    def _answer(self, status: int, body: dict, close: bool) -> bytes:
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        c = self.client
        return (c.send(h11.Response(status_code=status, headers=headers,
                                    reason=_REASONS.get(status, b"")))
                + c.send(h11.Data(payload)) + c.send(h11.EndOfMessage()))

    def _refusal_body(self, status: int, d: Decision) -> dict:
        return {"error": "refused by agentgate", "rule": d.rule, "reason": d.reason}

    def _deny(self, ex: Exchange, d: Decision, status: int = 403) -> list[Command]:
        ex.phase = "refused"
        # a client waiting for 100 may send its body or not: the connection can't be
        # trusted to be at a message boundary, so it ends with this answer
        close = not ex.body_done and self.client.waits_for_100
        data = self._answer(status, self._refusal_body(status, d), close)
        out: list[Command] = [
            Record(OUTPUT, {"summary": f"{status} refused by agentgate (rule {d.rule})",
                            "status": status, "error": d.reason}),
            ToClient(data)]
        if close:
            return out + [Close(f"refused a request whose body was not sent ({d.rule})")]
        if ex.body_done:
            out += self._cycle_end()
        return out

    def _fail(self, status: int, message: str, reason: str) -> list[Command]:
        """An error of the exchange (not a policy decision): answered if the answer has
        not started, then the connection ends."""
        ex = self.ex
        if (ex is not None and ex.answered) or self.client.conn.our_state is not h11.SEND_RESPONSE:
            return [Close(reason)]
        if ex is not None:
            ex.answered = True
        data = self._answer(status, {"error": message}, close=True)
        return [Record(OUTPUT, {"summary": f"{status} {reason}", "status": status,
                                "error": reason},
                       stop=ex.id if ex is not None and ex.forwarded else None),
                Close(reason, data)]

    # ------------------------------------------------------------------ forwarding

    def _forward(self, ex: Exchange) -> list[Command]:
        req = ex.request
        headers = end_to_end(req.headers, self.dropped | _MASKING_DROPS
                             if self.masker or self.secrets else self.dropped)
        if header(req.headers, b"host") is None:
            headers.append((b"host", ex.host.encode("latin-1")))
        upgrade = tokens(req.headers, b"upgrade")
        if len(upgrade) == 1 and upgrade[0] in self.upgrades \
                and b"upgrade" in tokens(req.headers, b"connection"):
            headers += [(b"connection", b"Upgrade"), (b"upgrade", header(req.headers, b"upgrade"))]
        headers += list(self.inject)
        if self.masker or self.secrets:
            # codings we may have to undo: identity asked for, whatever comes is decoded
            headers.append((b"accept-encoding", b"identity"))
        if tokens(req.headers, b"transfer-encoding"):
            headers.append((b"transfer-encoding", b"chunked"))
        elif header(req.headers, b"content-length") is not None:
            headers.append((b"content-length", header(req.headers, b"content-length")))
        self.server = ServerSide()
        target = (ex.path + ("?" + ex.query if ex.query else "")).encode()
        try:
            head = h11.Request(method=req.method, target=target, headers=headers,
                               http_version=b"1.1")
        except h11.LocalProtocolError as exc:
            return self._fail(400, f"agentgate: the request can't be sent on: {exc}", str(exc))
        out: list[Command] = [ToUpstream(self.server.send(head), starts=(ex.id,))]
        ex.phase, ex.forwarded = "forward", True
        if ex.body:
            out.append(ToUpstream(self.server.send(h11.Data(bytes(ex.body)))))
            ex.body = bytearray()
        if ex.body_done:
            end = self.server.send(h11.EndOfMessage())
            if end:
                out.append(ToUpstream(end))
        return out

    # ------------------------------------------------------------------ the server

    def _upstream_data(self, data: bytes) -> list[Command]:
        if self.server is None or self.server.ended:
            if not data.strip():
                return []
            return [Close("the server sent data no request asked for")]
        self.server.feed(data)
        return self._upstream_events()

    def _upstream_eof(self) -> list[Command]:
        if self.server is None or self.server.ended:
            return [Close("the server closed the connection")]
        self.server.feed(b"")
        try:
            out = self._upstream_events()
        except ProtocolError:     # (h11: closed in the middle of its answer)
            out = []
        return out or self._fail(
            502, "agentgate: the server closed the connection before answering",
            "the server closed the connection before answering")

    def _upstream_events(self) -> list[Command]:
        out: list[Command] = []
        for ev in self.server.events():
            t = type(ev)
            if t is h11.InformationalResponse:
                out += self._informational(ev)
            elif t is h11.Response:
                out += self._response(ev)
            elif t is h11.Data:
                out += self._response_data(bytes(ev.data))
            elif t is h11.EndOfMessage:
                out += self._response_end()
            elif t is h11.ConnectionClosed:
                out += self._fail(502, "agentgate: the server closed the connection before "
                                       "answering", "the server closed before answering")
            if out and type(out[-1]) in (Close, Handoff):
                break
        return out

    def _informational(self, ev: h11.InformationalResponse) -> list[Command]:
        c = self.client
        if ev.status_code == 101:
            return self._switch(ev)
        if ev.status_code == 100 and not c.waits_for_100:
            return []
        return [ToClient(c.send(h11.InformationalResponse(
            status_code=ev.status_code, headers=self._clean(end_to_end(ev.headers)),
            reason=ev.reason)))]

    def _switch(self, ev: h11.InformationalResponse) -> list[Command]:
        """An allowed websocket upgrade: from here the upgraded layer has the bytes."""
        offered = tokens(self.ex.request.headers, b"upgrade")
        upgrade = header(ev.headers, b"upgrade") or b""
        if upgrade.strip().lower() not in offered:
            return self._fail(502, "agentgate: the server switched to a protocol the client "
                                   "did not ask for", "unasked-for protocol switch")
        head = self.client.send(h11.InformationalResponse(
            status_code=101, headers=self._clean(end_to_end(ev.headers)) + [
                (b"connection", b"Upgrade"), (b"upgrade", upgrade)], reason=ev.reason))
        later = bytes(self.client.later)     # (what followed the request, all of it)
        up_later = bytes(self.server.conn.trailing_data[0])
        layer, summary = self._upgraded(ev)
        return [Record(OUTPUT, {"summary": summary, "status": 101}, stop=self.ex.id),
                ToClient(head), Handoff(layer, later, up_later)]

    def _upgraded(self, ev: h11.InformationalResponse):
        """The layer for a connection upgraded to a websocket, and what the answer says."""
        from hostagent.protocols.tcp.layer import RawTcp
        return RawTcp(), "101 switching to websocket (relayed raw)"

    def _response(self, resp: h11.Response) -> list[Command]:
        ex = self.ex
        ex.response = resp
        ex.mtype = bodies.media_type(header(resp.headers, b"content-type"))
        ex.codings = tokens(resp.headers, b"content-encoding")
        bodiless = ex.method == "HEAD" or resp.status_code in (204, 304)
        coded = [c for c in ex.codings if c != b"identity"]
        mask = self.masker is not None and bodies.inspected(ex.mtype)
        if not bodiless and (mask or (coded and ex.scrub)):
            if mask and bodies.streaming(ex.mtype) and not coded:
                ex.mode = "lines"
                return [ToClient(self._head(resp, drop=_REWRITTEN))]
            ex.mode = "buffer"
            length = header(resp.headers, b"content-length")
            if length is not None and int(length) > self.max_body:
                return self._fail(502, f"agentgate: the answer ({int(length)} bytes) is over "
                                       f"{self.max_body} bytes and can't be masked",
                                  "answer too large to mask")
            return []
        ex.mode = "stream"
        length = header(resp.headers, b"content-length")
        extra = [(b"content-length", length)] if length is not None else []
        return [ToClient(self._head(resp, extra=extra))]

    def _head(self, resp: h11.Response, extra=(), drop=frozenset()) -> bytes:
        self.ex.answered = True
        if self.masker is not None:
            drop = drop | _DIGESTS
            headers = [(n, v) for n, v in end_to_end(resp.headers, drop)
                       if not n.lower().startswith(_DIGEST_PREFIXES)]
        else:
            headers = end_to_end(resp.headers, drop)
        headers = self._clean(headers) + list(extra)
        reason = self._clean([(b"", resp.reason)])[0][1]
        if not self.server.conn.our_state is h11.DONE and _closes(resp):
            headers.append((b"connection", b"close"))
        return self.client.send(h11.Response(status_code=resp.status_code, headers=headers,
                                             reason=reason))

    def _clean(self, headers: list) -> list:
        """Header values (and a reason phrase) as the agent may see them: injected secrets
        blanked, masking's detectors applied (a Location can carry an address)."""
        ex = self.ex
        out = []
        for n, v in headers:
            if ex is not None and ex.scrub is not None:
                v = ex.scrub.whole(v)
            if self.masker is not None and self.masker.detectors:
                v = self.masker.mask_text(v.decode("latin-1")).encode("latin-1")
            out.append((n, v))
        return out

    def _response_data(self, data: bytes) -> list[Command]:
        ex = self.ex
        ex.size += len(data)
        if ex.mode == "stream":
            if ex.scrub is not None:
                data = ex.scrub.feed(data)
                if not data:
                    return []
            if len(ex.sample) < self.sample_bytes:
                ex.sample += data[:self.sample_bytes - len(ex.sample)]
            return [ToClient(self.client.send(h11.Data(data)))]
        if ex.mode == "buffer":
            ex.resp_body += data
            if len(ex.resp_body) > self.max_body:
                return self._fail(502, f"agentgate: the answer is over {self.max_body} bytes "
                                       f"and can't be masked", "answer too large to mask")
            return []
        sse = ex.mtype == "text/event-stream"
        # (only what came since the last look is searched: a long line in small reads
        # is not scanned again and again)
        since = max(0, len(ex.lines) - 3)
        ex.lines += data
        # (event streams in whole events: JSON may be split over an event's data lines)
        if sse:
            ends = [m.end() for m in _EVENT_END.finditer(ex.lines, since)]
            cut = ends[-1] if ends else 0
        else:
            cut = ex.lines.rfind(b"\n", since) + 1
        if not cut:
            if len(ex.lines) > self.max_body:
                return [Close(f"a line of the event stream is over {self.max_body} bytes "
                              f"and can't be masked")]
            return []
        chunk, ex.lines = bytes(ex.lines[:cut]), ex.lines[cut:]
        if ex.scrub is not None:
            chunk = ex.scrub.whole(chunk)
        if sse:     # (split keeps the separators: events at even places)
            masked = b"".join(self.masker.mask_event(part) if i % 2 == 0 else part
                              for i, part in enumerate(_EVENT_END.split(chunk)))
        else:
            masked = b"".join(self.masker.mask_line(ln)
                              for ln in chunk.splitlines(keepends=True))
        if ex.scrub is not None:
            masked = ex.scrub.whole(masked)
        if len(ex.sample) < self.sample_bytes:
            ex.sample += masked[:self.sample_bytes - len(ex.sample)]
        return [ToClient(self.client.send(h11.Data(masked)))]

    def _response_end(self) -> list[Command]:
        ex = self.ex
        out: list[Command] = []
        error = ""
        if ex.mode == "buffer":
            try:
                body = bodies.decode(bytes(ex.resp_body), ex.codings, self.max_body)
                if ex.scrub is not None:    # first: a detector could cut a secret apart
                    body = ex.scrub.whole(body)
                if self.masker is not None and bodies.inspected(ex.mtype):
                    body = self.masker.mask_body(body, ex.mtype)
                if ex.scrub is not None:
                    body = ex.scrub.whole(body)
            except MaskRefused as exc:
                return self._fail(502, f"agentgate: the answer can't be masked: {exc}",
                                  f"answer refused: {exc}")
            ex.sample = bytearray(body[:self.sample_bytes])
            head = self._head(ex.response, extra=[(b"content-length", str(len(body)).encode())],
                              drop=_REWRITTEN)
            out.append(ToClient(head + self.client.send(h11.Data(body)) if body else head))
            ex.resp_body = bytearray()
        elif ex.mode == "lines" and ex.lines:
            rest = ex.scrub.whole(bytes(ex.lines)) if ex.scrub else bytes(ex.lines)
            masked = self.masker.mask_event(rest) if ex.mtype == "text/event-stream" \
                else self.masker.mask_line(rest)
            if ex.scrub is not None:
                masked = ex.scrub.whole(masked)
            ex.lines = bytearray()
            out.append(ToClient(self.client.send(h11.Data(masked))))
        elif ex.mode == "stream" and ex.scrub is not None and ex.scrub.tail:
            out.append(ToClient(self.client.send(h11.Data(ex.scrub.flush()))))
        end = self.client.send(h11.EndOfMessage())
        if end:
            out.append(ToClient(end))
        masked = {}
        if self.masker:
            now = self.masker.counts()
            masked = {k: v - ex.masked_before.get(k, 0) for k, v in now.items()
                      if v != ex.masked_before.get(k, 0)}
        if ex.scrub is not None and ex.scrub.hits:
            masked["injected_secret"] = ex.scrub.hits
        resp = ex.response
        rec = records.output_fields(status=resp.status_code, reason=resp.reason.decode(
            "latin-1"), headers=resp.headers, body=bytes(ex.sample), size=ex.size,
            mtype=ex.mtype, limit=self.sample_bytes, masked=masked, error=error)
        return [Record(OUTPUT, rec, stop=ex.id)] + out + self._cycle_end()

    # ------------------------------------------------------------------ between requests

    def _cycle_end(self) -> list[Command]:
        """Both sides are done with this exchange: the next request (pipelined, or
        later) starts afresh, or the connection ends as one side asked."""
        c, s = self.client, self.server
        if not c.reusable:
            return [Close("connection closed after the answer")]
        if s is not None and not s.reusable:
            return [Close("the server closes after this answer")]
        later = bytes(c.later)
        self.client, self.server, self.ex = ClientSide(), None, None
        if not later and self.client_eof:
            return [Close("client closed")]
        if later:
            self.client.feed(later)
        if self.client_eof:
            self.client.eof()     # (an unfinished request behind it is an error)
        return self._client_events()


def _closes(resp: h11.Response) -> bool:
    return b"close" in tokens(resp.headers, b"connection") or resp.http_version == b"1.0"


# a body rewritten by masking: its length, coding and digests are no longer the server's
_REWRITTEN = frozenset((b"content-encoding", b"content-md5", b"digest", b"etag",
                        b"content-range", b"accept-ranges"))
# with masking on, a part of a body could split a value the detectors look for: whole
# bodies are asked for
_MASKING_DROPS = frozenset((b"range", b"if-range", b"accept-encoding", b"want-repr-digest",
                            b"want-content-digest",
                            # an ETag that hashes the body would confirm a guessed value
                            b"if-none-match", b"if-match", b"if-modified-since",
                            b"if-unmodified-since"))
_EVENT_END = re.compile(rb"(\r?\n\r?\n)")   # a server-sent event ends with a blank line
# hashes of a body (or of the unmasked one): with masking on they would confirm a guess
_DIGESTS = frozenset((b"etag", b"content-md5", b"digest", b"repr-digest", b"content-digest",
                      b"x-goog-hash"))
_DIGEST_PREFIXES = (b"x-amz-checksum-", b"x-amz-meta-")
_OVERRIDES = frozenset((b"x-http-method-override", b"x-http-method", b"x-method-override",
                        b"x-original-url", b"x-rewrite-url", b"x-original-method"))
# a host name or an address, and a port of digits: nothing a URL parser reads otherwise
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{1,5})?")
_REASONS = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed",
            413: b"Content Too Large", 502: b"Bad Gateway", 505: b"HTTP Version Not Supported"}
