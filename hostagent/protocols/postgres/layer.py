"""The PostgreSQL layer: sans-IO, between the agent and the server.

- The server's leg: SSLRequest first unless the target's `tls` is disable; 'S' -> TLS
  (verified in verify-full), 'N' -> plaintext only where the mode allows, bytes sent
  before the handshake refused (CVE-2021-23222). The client's start-up waits meanwhile;
  if the server's leg fails, the client's start-up is answered with a FATAL error.
- Startup: an SSLRequest is answered with TLS terminated by the proxy (a certificate
  from the host agent's local CA naming the original host) when the target offers it,
  else declined; GSSENCRequest is always declined. The agent's StartupMessage goes upstream with
  the injected user; the proxy answers the server's authentication (SCRAM-SHA-256, md5,
  cleartext) with the injected password, and the agent only sees AuthenticationOk: it
  never holds, nor needs, the real password. Without injected credentials the agent's
  own authentication passes through.
- Every Query and Parse is classified (pglast) and decided by policy before it goes
  upstream; its command and decision are recorded first (record before execute).
- A denied statement is replaced by one the server itself rejects (a unique token that
  is a syntax error), so the server's own error handling keeps the session and the
  transaction state exactly right (the rest of an extended-protocol pipeline is
  discarded up to Sync, an open transaction is marked failed); the proxy rewrites that
  error into SQLSTATE 42501 naming the rule and reason.
"""
from __future__ import annotations

import secrets
from typing import Callable

from agentgate.events import COMMAND, OUTPUT
from hostagent.masking import Masker, for_target
from hostagent.policy import Decision, Request, decide
from hostagent.protocols.api import (CLIENT, Aborted, ApprovalDecided, Close, Command,
                                     DataReceived, EofReceived, Event, HoldPending,
                                     ProtocolError, Record, SessionContext, SideAnswered, Start,
                                     StartClientTls, StartUpstreamTls, TlsEstablished, TlsFailed,
                                     ToClient, ToUpstream)
from hostagent.protocols.enforce import Enforcer
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.auth import AuthRefused, UpstreamAuth
from hostagent.protocols.postgres.catalog import CatalogCache, UsesCatalog
from hostagent.protocols.postgres.classify import Unparseable, classify
from hostagent.protocols.postgres.fastpath import FastPath
from hostagent.protocols.postgres.masks import Masking, withheld
from hostagent.protocols.postgres.names import SearchPath
from hostagent.protocols.outputs import Outputs, SampleLimits
from hostagent.protocols.standins import Owned, new_stand_in
from hostagent.protocols.statements import requests_for
from hostagent.protocols.postgres.results import Results, provenance

MAX_CLASSIFIED = 1 << 20        # characters of statement text the parser is given
# Start-up parameters passed on. Others (`options`, `replication`, ...) could change what
# the server does beyond policy's view (e.g. `-c search_path=...`): dropped, recorded.
STARTUP_PARAMS = frozenset({"user", "database", "application_name",
                            "fallback_application_name", "client_encoding", "DateStyle",
                            "TimeZone", "extra_float_digits", "IntervalStyle"})
# Client encodings whose multibyte characters can end in a byte that reads as `\` or a
# quote (PostgreSQL's client-only encodings, with the aliases it accepts): the server
# would split a statement where the parser (UTF-8) sees one string. Refused, as is
# standard_conforming_strings = off (backslashes escaping quotes in plain strings).
UNSAFE_ENCODINGS = frozenset({
    "sjis", "mskanji", "shiftjis", "win932", "windows932", "shiftjis2004", "big5",
    "win950", "windows950", "gbk", "win936", "windows936", "uhc", "win949", "windows949",
    "gb18030", "johab"})


def _parsing_hazard(name: str, value: str) -> str | None:
    """Why a setting the server reports (or a client asks for) would make the server
    read statements otherwise than the parser that judged them."""
    if name.lower() == "client_encoding" and \
            "".join(c for c in value.lower() if c.isalnum()) in UNSAFE_ENCODINGS:
        return f"client_encoding {value} is refused: statements are judged as UTF-8"
    if name.lower() == "standard_conforming_strings" and value.lower() != "on":
        return "standard_conforming_strings must stay on: statements are judged with it"
    return None
# statements after which the catalog's names may have changed
CATALOG_KINDS = frozenset({"CREATE", "ALTER", "DROP", "DO", "CALL", "IMPORT", "REFRESH"})
def _qualified_tables(policy) -> bool:
    return any("." in p for r in policy.rules for name, pats in r.matchers
               if name == "tables" for p in pats)


def new_cancel_key(keys: dict) -> tuple[int, int]:
    """A stand-in backend key: a positive pid and a secret, 62 random bits together,
    unused among `keys`."""
    return new_stand_in(keys, lambda: (secrets.randbelow((1 << 31) - 1) + 1,
                                       secrets.randbits(32) - (1 << 31)))


class PostgresLayer(FastPath, UsesCatalog, Masking):
    name = "postgres"

    def __init__(self, *, decide: Callable[[Request], Decision], target: str,
                 identity: dict | None = None, user: str | None = None,
                 password: str | None = None, max_message: int = m.DEFAULT_MAX_MESSAGE,
                 cancel_keys: dict | None = None, masker: Masker | None = None,
                 client_tls: bool = False, client_names: tuple[str, ...] = ("localhost",),
                 samples: SampleLimits | None = None, tls: str = "disable",
                 ca: str | None = None, server_name: str = "",
                 catalogs: CatalogCache | None = None, weak_password_auth: str = "refuse",
                 wants_catalog: bool = False):
        self.enforcer = Enforcer(decide)
        self.outputs = Outputs(samples)
        # Where result columns come from (catalog.py): the target's shared snapshots,
        # this session's, and upstream messages held while one is read
        self.catalogs = catalogs
        self.catalog = None
        self._catalog_tried: set[int] = set()   # table OIDs a fresh read didn't know
        self._catalog_failed = -1               # the generation whose read failed
        self._stalled: list[tuple[bytes, bytes]] | None = None
        self._stalled_bytes = 0
        self._ddl_in_tx = False
        self._fetching = False
        self.wants_catalog = wants_catalog   # policy names schema-qualified tables
        self.names: SearchPath | None = None
        self.client_tls = client_tls   # may answer SSLRequest with 'S' (the driver has a CA)
        self.client_names = client_names
        self.client_tls_on = False
        self.target = target
        self.identity = identity or {}
        self.user = user
        self.password = password
        self.tls, self.ca, self.server_name = tls, ca, server_name
        self.client = m.FrameReader(startup=True, max_message=max_message)
        self.upstream = m.FrameReader(max_message=max_message)
        self.state = "startup"
        # upstream leg: connecting -> (ssl_request -> handshake ->) ready
        self.upstream_phase = "connecting"
        self._waiting: list[Command] = []      # for the server once its leg is ready
        self.database = ""
        self.upstream_user = ""
        self.tx_status = b"I"
        # the server's authentication, answered with the injected password (auth.py)
        self.upstream_auth = UpstreamAuth(password or "", target=target, tls=tls,
                                          weak_password_auth=weak_password_auth)
        self._denials: dict[str, bytes] = {}   # token -> our ErrorResponse
        self._descriptions: dict[bytes, list] = {}   # RowDescription body -> its columns
        self.masker = masker if masker is not None and masker.active else None
        self._results = Results() if self.masker else None
        self._compiled_for: list | None = None
        self._mask_cols: list[tuple[int, str]] = []
        self._scan_cols: list[int] = []
        self._actions = b""                          # (the same, for the compiled loop)
        self._keys: tuple[str, ...] = ()
        self.refusing = ""   # set when the session can't go on: start-up gets this error
        self._startup_seen = False
        # Shared by the sessions of this target alone (a key issued for another target
        # is unknown here): the key the agent holds -> the server's (an Owned). The
        # agent never learns the server's key; a cancel from it is mapped back.
        self.cancel_keys = cancel_keys if cancel_keys is not None else {}
        self.client_key: tuple[int, int] | None = None

    @classmethod
    def for_session(cls, ctx: SessionContext) -> "PostgresLayer":
        opts, policy = ctx.options, ctx.policy
        return cls(decide=lambda req: decide(policy, req), target=ctx.target.name,
                   identity=ctx.identity, user=opts.user, password=opts.get("password"),
                   cancel_keys=ctx.shared.setdefault("cancel_keys", {}),
                   catalogs=ctx.shared.setdefault("catalogs", CatalogCache()),
                   wants_catalog=_qualified_tables(policy),
                   masker=for_target(policy.masks, ctx.target.name),
                   client_tls=ctx.tls_available and opts.client_tls == "offer",
                   client_names=tuple(dict.fromkeys((*ctx.target.names, ctx.dialed))),
                   samples=ctx.samples, tls=opts.tls, ca=opts.ca,
                   # the certificate must name the host the target is configured with
                   server_name=opts.server_name or next(iter(ctx.target.names), ""),
                   weak_password_auth=opts.get("weak_password_auth") or "refuse")

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> list[Command]:
        kind = type(event)
        if kind is DataReceived:
            if event.side == CLIENT:
                return self.client_data(event.data)
            return self.upstream_data(event.data)
        if kind is Start:
            return self._start(event)
        if kind is HoldPending:
            return self._held_notice(event)
        if kind is SideAnswered:
            return self._catalog_read(event)
        if kind is ApprovalDecided:
            return self.decided(event.key, event.approved, event.reason)
        if kind is TlsEstablished:
            return self._tls_up(event)
        if kind is TlsFailed:
            if event.side == CLIENT:
                return [Close(f"client TLS handshake failed: {event.error}")]
            return self._refuse_session(f"agentgate: upstream TLS failed ({self.tls}): "
                                        f"{event.error}")
        if kind is Aborted:
            self.close()
            return [Close(event.reason, self.refusal(f"agentgate: {event.reason}"))]
        if kind is EofReceived and event.side == CLIENT:
            self.close()
            if self._waiting:   # gone before the server's leg was ready: nothing to send
                self._waiting.clear()
                return [Close("client closed during start-up")]
        return []

    def buffered(self) -> int:
        return (self.client.buffered + self.upstream.buffered + self._stalled_bytes
                + self.enforcer.deferred_bytes + 256 * len(self._denials)
                + sum(len(c.data) for c in self._waiting if isinstance(c, ToUpstream)))

    def close(self) -> None:
        """The session is over: its cancel key goes with it."""
        if self.client_key is not None:
            self.cancel_keys.pop(self.client_key, None)
            self.client_key = None

    # ------------------------------------------------------------------ the upstream leg

    def _start(self, event: Start) -> list[Command]:
        """The server's leg: TLS asked for with SSLRequest unless the target disables it;
        what the client sends meanwhile waits."""
        if self.tls == "disable":
            self.upstream_phase = "ready"
            return []
        self.upstream_phase = "ssl_request"
        if not self.server_name:
            self.server_name = event.upstream[0]
        return [ToUpstream(m.untyped(m._I32.pack(m.SSL_REQUEST)))]

    def _ssl_answer(self, data: bytes) -> list[Command]:
        answer, rest = data[:1], data[1:]
        if answer == b"N" and not rest:
            if self.tls in ("require", "verify-full"):
                # a man in the middle's first move; a server that really has no TLS (a
                # loopback one) is the target's explicit opt-out
                return self._refuse_session(
                    f"agentgate: upstream TLS failed ({self.tls}): the server does not offer "
                    f'TLS; for a server without TLS set tls = "disable" on target '
                    f'"{self.target}"')
            return self._upstream_ready()
        if answer == b"S" and not rest:
            self.upstream_phase = "handshake"
            verify = self.tls == "verify-full"
            return [StartUpstreamTls(self.server_name, verify=verify, ca=self.ca)]
        if answer == b"S":
            # bytes after 'S' but before the handshake would be read as if TLS-protected
            # (CVE-2021-23222): a man in the middle's, not the server's
            why = "the server sent data before the TLS handshake"
        else:
            why = f"unexpected answer {data[:16]!r} to SSLRequest"
        return self._refuse_session(f"agentgate: upstream TLS failed ({self.tls}): {why}")

    def _tls_up(self, event: TlsEstablished) -> list[Command]:
        rec = Record("tls", {"side": event.side, "version": event.version,
                             **({"sni": event.sni} if event.sni else {})})
        if event.side == CLIENT:
            return [rec]
        # what the server's authentication may rely on: a verified certificate, and the
        # certificate SCRAM-SHA-256-PLUS binds to
        verified = self.tls == "verify-full"
        self.upstream_auth.tls_up(event.peer_cert, verified)
        rec.fields["verified"] = verified
        return [rec] + self._upstream_ready()

    def _upstream_ready(self) -> list[Command]:
        self.upstream_phase = "ready"
        waiting, self._waiting = self._waiting, []
        return waiting

    def _to_server(self, commands: list[Command]) -> list[Command]:
        """Start-up traffic waits until the server's leg is ready (TLS or not)."""
        if self.upstream_phase == "ready":
            return commands
        self._waiting += commands
        return []

    def _refuse_session(self, message: str) -> list[Command]:
        """The session can't go on: the client's start-up gets this error (now, or when
        it comes; after its own TLS if it asks)."""
        self.refusing = message
        self.upstream_phase = "refused"
        self._waiting.clear()
        if self._startup_seen:
            return [Close(message, self.refusal(message))]
        return []

    # ------------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> list[Command]:
        fast = self._client_fast(data)
        if fast is not None:
            return fast
        return self._client_frames(self.client.receive_data(data))

    def _client_frames(self, frames) -> list[Command]:
        out: list[Command] = []
        for kind, body in frames:
            if out and isinstance(out[-1], StartClientTls):
                # bytes sent in the clear after SSLRequest would be taken as if they
                # came through TLS (CVE-2021-23214): the client must wait for 'S'
                raise ProtocolError("data after SSLRequest before the TLS handshake")
            out += self._from_client(kind, body)
        if out and isinstance(out[-1], StartClientTls) and self.client.buffered:
            raise ProtocolError("data after SSLRequest before the TLS handshake")
        return out

    def refusal(self, message: str) -> bytes:
        """What the client gets when the proxy must end the session: an error it can
        show, as the server would send it."""
        return m.error_response(message, "53100", "FATAL")

    def _from_client(self, kind: bytes, body: bytes) -> list[Command]:
        if self.enforcer.holding:
            self.enforcer.defer((kind, body), len(body))   # nothing overtakes a hold
            return []
        if kind == b"":
            return self._untyped(body)
        raw = m.frame(kind, body)
        if self.state != "ready":
            if self.state == "auth" and self.password is None and kind == b"p":
                return self._to_server([ToUpstream(raw)])   # pass-through authentication
            raise ProtocolError(f"message {kind!r} before the session is ready")
        if self._results is not None:
            self._results.client(kind, body)
        if kind == b"Q":
            return self._statement(m.parse_query(body), raw, extended=None)
        if kind == b"P":
            parse = m.parse_parse(body)
            return self._statement(parse.query, raw, extended=parse.name)
        if kind == b"E":
            return [ToUpstream(raw, self.outputs.sent_execute())]
        if kind == b"S":
            self.outputs.sent_sync()
            return [ToUpstream(raw)]
        if kind == b"B":
            return [Record("bind", m.bind_fields(body, 0, len(body))), ToUpstream(raw)]
        if kind == b"F":
            # A function called by OID carries no SQL to judge, and its result can't be
            # masked: refused (the server answers it with an error, as for a denial).
            refusal = Decision("deny", "(function call)", "function calls by OID are not allowed")
            return [Record(COMMAND, {"text": "<function call by OID>", "protocol": "function",
                                     "decision": refusal.as_dict()})] + \
                self._refuse(refusal, None)
        return [ToUpstream(raw)]

    def _untyped(self, body: bytes) -> list[Command]:
        msg = m.parse_untyped(body)
        if isinstance(msg, m.SpecialRequest):
            if msg.code == m.SSL_REQUEST and self.client_tls and not self.client_tls_on \
                    and self.state == "startup":
                self.client_tls_on = True
                return [ToClient(b"S"), StartClientTls(self.client_names)]
            if msg.code in (m.SSL_REQUEST, m.GSSENC_REQUEST):
                return [ToClient(b"N")]   # declined: the client goes on in the clear
            real = self.cancel_keys.get((msg.pid, msg.secret))
            if isinstance(real, Owned) and not real.live():   # its session ended
                self.cancel_keys.pop((msg.pid, msg.secret), None)
                real = None
            if real is None:
                return [Record("cancel", {"matched": False}),
                        Close("cancel with a key no live session of this target holds")]
            uid = self.identity.get("uid")
            owner = getattr(real, "uid", None)
            if owner is not None and uid != owner:
                # a key is the capability PostgreSQL trusts; here it is good only in the
                # hands of the user whose session it is (as the kernel tells us)
                return [Record("cancel", {"matched": True, "forwarded": False}),
                        Close(f"cancel refused: the key is uid {owner}'s session's, "
                              f"sent by uid {uid}")]
            if self.refusing:
                return [Record("cancel", {"matched": True, "forwarded": False}),
                        Close(self.refusing)]
            return [Record("cancel", {"matched": True})] + self._to_server(
                [ToUpstream(m.cancel_request(*real)), Close("cancel request forwarded")])
        if self.state != "startup":
            raise ProtocolError("a second startup message")
        self._startup_seen = True
        if self.refusing:
            return [Close(self.refusing, self.refusal(self.refusing))]
        dropped = sorted(k for k in msg.params if k not in STARTUP_PARAMS)
        params = {k: v for k, v in msg.params.items() if k in STARTUP_PARAMS}
        hazard = next((h for k, v in params.items() for h in [_parsing_hazard(k, v)] if h), None)
        if hazard:
            message = f"agentgate: {hazard}"
            self.refusing = message
            return [Record("startup", {"user": params.get("user", ""), "refused": hazard}),
                    Close(message, self.refusal(message))]
        client_user = params.get("user", "")
        self.database = params.get("database", client_user)
        if self.user:
            params["user"] = self.user
        self.upstream_user = params.get("user", "")
        self.state = "auth"
        return [Record("startup", {"user": client_user, "database": self.database,
                                   "upstream_user": self.upstream_user,
                                   "application_name": params.get("application_name", ""),
                                   "credentials": "injected" if self.password is not None
                                   else "client's own", "dropped_params": dropped,
                                   "client_tls": self.client_tls_on})] + \
            self._to_server([ToUpstream(m.startup_message(params, msg.version))])

    def _statement(self, text: str, raw: bytes, extended: str | None) -> list[Command]:
        try:
            if len(text) > MAX_CLASSIFIED:
                # parsing runs on the proxy's loop, in time linear in the text: past this
                # a statement is judged unparseable rather than stall every session
                raise Unparseable("too long to judge")
            statements = classify(text)
        except Unparseable:
            statements = [None]
        return self._judged(text, raw, extended, statements)

    def _judged(self, text: str, raw: bytes, extended: str | None, statements) -> list[Command]:
        commands = requests_for(statements, text, target=self.target, identity=self.identity,
                                database=self.database, extended=extended,
                                tables_of=self._tables_resolver(bool(extended)))
        extra = []
        laundering = self._copies_masked(statements) if self._results is not None else None
        if laundering:
            extra.append(Decision("deny", "(masking)", laundering))
        if self.masker and any("copy_out" in (st.flags if st else ()) for st in statements):
            # COPY TO STDOUT bypasses row-by-row masking: refused, never leaked
            extra.append(Decision("deny", "(masking)", "COPY out of a masked target "
                                  "is refused"))
        verdict, out = self.enforcer.judge(commands, extra)
        if verdict.action != "deny":
            # the search path as it will be once this has run; a held statement may
            # never run, so what it would set is unknown until then
            in_tx = verdict.action == "review" or self.tx_status != b"I" or any(
                s is not None and "TRANSACTION" in s.kinds for s in statements)
            for st in statements:
                self.names.after(st, in_transaction=in_tx)
            if self.catalogs is not None and any(
                    st is None or st.kinds & CATALOG_KINDS for st in statements):
                self._ddl_in_tx = True   # the catalog is read again once it has run
        if self._results is not None:
            self._results.provenance(extended, provenance(statements))
        if verdict.action == "deny":
            return out + self._refuse(verdict, extended)
        if verdict.action == "review":
            pending = (raw, extended, len(statements))
            return out + [self.enforcer.hold(pending, verdict, text)]
        return out + [self._forward(raw, extended, len(statements))]

    def _forward(self, raw: bytes, extended: str | None, statements: int) -> ToUpstream:
        """A Query starts its statements now; a Parse starts nothing (its Executes do)."""
        if extended is None:
            return ToUpstream(raw, self.outputs.sent_query(statements))
        return ToUpstream(raw)

    def _refuse(self, decision: Decision, extended: str | None) -> list[Command]:
        """Send the server a statement it rejects itself (a unique token, a syntax error):
        its own error handling then keeps the session and transaction state right, and
        the error it returns is rewritten into ours."""
        token = f"agentgate_denied_{secrets.token_hex(8)}"   # unguessable
        self._denials[token] = m.error_response(
            f'agentgate: denied by rule "{decision.rule}": {decision.reason}', "42501")
        if extended is None:
            return [ToUpstream(m.frame(b"Q", token.encode() + b"\0"), self.outputs.sent_query(1))]
        return [ToUpstream(m.frame(b"P", extended.encode() + b"\0" + token.encode() + b"\0\0\0"))]

    def _held_notice(self, event: HoldPending) -> list[Command]:
        decision = self.enforcer.held(event.key)
        if decision is None:
            return []
        return [ToClient(m.notice_response(
            f'agentgate: held for approval {event.approval_id} (rule "{decision.rule}": '
            f'{decision.reason}); expires {event.expires}'))]

    def decided(self, key: int, approved: bool, reason: str) -> list[Command]:
        """The answer to a Hold: run the statement, or refuse it; then what the client sent
        meanwhile (an extended-protocol pipeline) goes on in order."""
        released = self.enforcer.release(key)
        if released is None:
            return []
        (raw, extended, statements), decision = released
        if approved:
            out: list[Command] = [self._forward(raw, extended, statements)]
        else:
            out = self._refuse(Decision("deny", decision.rule, reason), extended)
        for kind, body in self.enforcer.take_deferred():
            out += self._from_client(kind, body)
        return out

    # ------------------------------------------------------------------ server side

    def upstream_data(self, data: bytes) -> list[Command]:
        if self.upstream_phase != "ready":
            if self.upstream_phase == "ssl_request":
                return self._ssl_answer(data)
            raise ProtocolError(f"the server spoke during {self.upstream_phase}")
        fast = self._upstream_fast(data)
        if fast is not None:
            return fast
        return self._upstream_frames(self.upstream.receive_data(data))

    def _upstream_frames(self, frames) -> list[Command]:
        out: list[Command] = []
        for i, (kind, body) in enumerate(frames):
            if self._stalled is not None:
                self._stalled += frames[i:]
                self._stalled_bytes += sum(len(b) + 64 for _, b in frames[i:])
                break
            if kind == b"Z" and self.state == "auth" and self._can_read_catalog() \
                    and self._current_catalog() is None:
                # the session starts once the catalog is known (the search path, where
                # result columns come from): its first statement is judged with it
                self._stalled = list(frames[i:])
                self._stalled_bytes = sum(len(b) + 64 for _, b in self._stalled)
                out += self._fetch_catalog()
                break
            if kind == b"T" and self._results is not None and self._catalog_needed(body):
                # a result from relations the snapshot doesn't know: held (this and all
                # that follows) until the catalog has been read again
                self._stalled = list(frames[i:])
                self._stalled_bytes = sum(len(b) + 64 for _, b in self._stalled)
                out += self._fetch_catalog()
                break
            out += self._from_upstream(kind, body)
            if out and type(out[-1]) is Close:
                break   # nothing the server said after that counts
        return out

    def _from_upstream(self, kind: bytes, body: bytes) -> list[Command]:
        raw = m.frame(kind, body)
        if self.state == "auth" and kind == b"R":
            return self._auth(body, raw)
        if self.state == "auth" and self.password is not None and not self.upstream_auth.ok \
                and kind not in b"ENv":
            # a server (or a relay) that skips authentication never proved it knows the
            # password: nothing it says reaches the client as a session
            message = (f"agentgate: the server sent {kind!r} before authenticating "
                       f"(target {self.target!r})")
            self.refusing, self.upstream_phase = message, "refused"
            return [Close(message, m.error_response(message, "28000", "FATAL"))]
        if kind == b"S":
            c = m.Cursor(body)
            hazard = _parsing_hazard(c.cstr(), c.cstr())
            if hazard:   # set by the role, the database, or a statement we let through
                message = f"agentgate: {hazard}"
                self.refusing, self.upstream_phase = message, "refused"
                return [Close(message, self.refusal(message))]
        if kind == b"K":
            real = Owned(*m.parse_backend_key(body), uid=self.identity.get("uid"), layer=self)
            self.close()   # a second key replaces the first
            fake = new_cancel_key(self.cancel_keys)
            self.cancel_keys[fake] = real
            self.client_key = fake
            return [ToClient(m.backend_key_data(*fake))]
        if kind == b"Z":
            self._ready_for_query(body)
            if self._results is not None:
                self._results.upstream(kind)
        elif kind == b"E":
            if self.state != "ready":
                return [ToClient(raw), Close("upstream refused the session")]
            fields = m.parse_fields(body)
            denial = next((t for t in self._denials if t in fields.get("M", "")), None)
            if self._results is not None:
                if denial is None and self._running_reads_masked():
                    fields = withheld(fields)
                self._results.upstream(kind)
            message = fields.get("M", "")
            sid, out = self.outputs.error(fields.get("C", ""), message)
            if denial is not None:   # our denial: its decision is the record
                return [ToClient(self._denials.pop(denial))]
            reply = self._mask_fields(b"E", fields) if self._results is not None else raw
            if self._results is not None:
                out["error"] = self.masker.scan(message)[0]
            out["summary"] = f"ERROR {out['sqlstate']}: {out['error']}"
            return [Record(OUTPUT, out, stop=sid), ToClient(reply)]
        elif kind == b"N" and self._results is not None:
            fields = m.parse_fields(body)
            if self._running_reads_masked():
                fields = withheld(fields)
            return [ToClient(self._mask_fields(b"N", fields))]
        elif kind == b"A" and self._results is not None:
            return [ToClient(self._mask_notification(body))]
        elif kind == b"D":
            if self._results is not None:
                values = self._mask_row(body)
                self.outputs.row(values if self.outputs.wants_sample() else None)
                return [ToClient(m.data_row(values))]
            self.outputs.row(m.parse_data_row(body) if self.outputs.wants_sample() else None)
        elif kind in (b"C", b"I", b"s"):
            if kind == b"C":
                sid, out = self.outputs.complete(body.rstrip(b"\0").decode(errors="replace"))
            else:
                sid, out = (self.outputs.empty if kind == b"I" else self.outputs.suspended)()
            if self._results is not None:
                if kind == b"C":
                    self._results.done()
                else:
                    self._results.upstream(kind)
                if self.masker.counts:
                    out["masked"] = dict(self.masker.counts)
                    self.masker.counts.clear()
            return [Record(OUTPUT, out, stop=sid), ToClient(raw)]
        elif kind == b"T":
            cols = self._described(body)
            if self._results is not None:
                return [ToClient(self._plan(cols))]
        elif self._results is not None:
            self._results.upstream(kind)
        return [ToClient(raw)]

    def _ready_for_query(self, body: bytes) -> None:
        self.tx_status = body[:1] or b"I"
        if self._ddl_in_tx and self.tx_status == b"I":
            self._ddl_in_tx = False   # committed (or not): what the catalog says changed
            self.catalogs.invalidate()
        self.state = "ready"
        self._denials.clear()   # a denial the server skipped (after an earlier error)
        self.outputs.ready()

    def _described(self, body: bytes) -> tuple:
        """A RowDescription's columns. A prepared statement's comes again with every
        execution: parsed once."""
        cols = self._descriptions.get(body)
        if cols is None:
            cols = tuple(m.parse_row_description(body))
            if len(self._descriptions) >= 64:
                self._descriptions.clear()
            self._descriptions[body] = cols
        self.outputs.columns([c.name for c in cols], [c.format for c in cols])
        return cols

    def _auth(self, body: bytes, raw: bytes) -> list[Command]:
        """The server's Authentication requests, answered with the injected password under
        auth.UpstreamAuth's rules (principle 9); AuthenticationOk reaches the client only
        once the server has shown it is the real one. Anything else refuses the session:
        a FATAL error naming why (and the option that would change it), which is also the
        session's recorded close reason."""
        code, data = m.parse_authentication(body)
        if self.password is None:
            return [ToClient(raw)]   # the client answers for itself
        if self.upstream_phase == "refused":
            return []                # already refused (frames from the same read)
        try:
            if code == m.AUTH_OK:
                self.upstream_auth.authenticated()
                return [Record("auth", self.upstream_auth.summary()), ToClient(raw)]
            reply = self.upstream_auth.answer(code, data, self.upstream_user)
        except AuthRefused as exc:
            message = f"agentgate: {exc}"
            self.refusing = message
            self.upstream_phase = "refused"
            return [Close(message, m.error_response(message, "28000", "FATAL"))]
        return [ToUpstream(reply)] if reply is not None else []
