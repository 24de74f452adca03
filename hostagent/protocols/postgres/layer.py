"""The PostgreSQL layer: sans-IO, between the agent and the server.

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

from agentgate.events import COMMAND, DECISION, OUTPUT
from hostagent.masking import MASK, Masker
from hostagent.policy import Decision, Request
from hostagent.protocols import (Action, Close, Hold, ProtocolError, Record, StartTls, ToClient,
                                 ToUpstream)
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.auth import ScramSha256, md5_password
from hostagent.protocols.postgres.classify import Unparseable, classify
from hostagent.protocols.postgres.outputs import Outputs, SampleLimits

MAX_RECORDED_PARAM = 1024
# Start-up parameters passed on. Others (`options`, `replication`, ...) could change what
# the server does beyond policy's view (e.g. `-c search_path=...`): dropped, recorded.
STARTUP_PARAMS = frozenset({"user", "database", "application_name",
                            "fallback_application_name", "client_encoding", "DateStyle",
                            "TimeZone", "extra_float_digits", "IntervalStyle"})
TEXT_OID = 25
_MASK = MASK.encode()
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 114, 142, 705})   # text, varchar, char, name...
# bool, int2/4/8, oid, float4/8, numeric, date, time(tz), timestamp(tz), interval, uuid
PLAIN_BINARY_TYPES = frozenset({16, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1266, 1114,
                                1184, 1186, 2950})


class _Results:
    """Which result shape the rows coming back belong to, following the client's
    messages in order (simple queries carry their RowDescription; an extended Execute
    uses the one its statement or portal was described with)."""

    def __init__(self):
        self._expect: list[tuple] = []            # client order: describe/execute/sync/query
        self._stmt_plan: dict[str, list] = {}
        self._portal_plan: dict[str, list] = {}
        self._portal_stmt: dict[str, str] = {}
        # Where each result's columns come from, snapshotted in client order: a
        # pipeline may re-use a statement name (or the unnamed one) before the server
        # has answered for the earlier text. None: unknown, every column is masked.
        self._stmt_prov: dict[str, tuple | None] = {}
        self._portal_prov: dict[str, tuple | None] = {}
        self._plan: list | None = None

    def client(self, kind: bytes, body: bytes) -> None:
        c = m.Cursor(body)
        if kind == b"Q":
            self._expect.append(("query", None))
        elif kind == b"B":
            portal, stmt = c.cstr(), c.cstr()
            self._portal_stmt[portal] = stmt
            self._portal_plan.pop(portal, None)
            self._portal_prov[portal] = self._stmt_prov.get(stmt)
        elif kind == b"D":
            what = body[:1]
            c.pos = 1
            name = c.cstr()
            prov = (self._stmt_prov if what == b"S" else self._portal_prov).get(name)
            self._expect.append(("describe", what, name, prov))
        elif kind == b"E":
            self._expect.append(("execute", c.cstr()))
        elif kind == b"S":
            self._expect.append(("sync",))

    def provenance(self, statement: str | None, prov: tuple | None) -> None:
        """What a Query (statement None) or a Parse (its name) reads: (tables, sources,
        lineages), or None when it can't be known."""
        if statement is not None:
            self._stmt_prov[statement] = prov
            return
        for i in range(len(self._expect) - 1, -1, -1):
            if self._expect[i][0] == "query":
                self._expect[i] = ("query", prov)
                return

    def current(self) -> tuple | None:
        front = self._expect[0] if self._expect else ("query", None)
        if front[0] == "describe":
            return front[3]
        if front[0] == "query":
            return front[1]
        return None

    def set_plan(self, plan: list) -> None:
        front = self._expect[0] if self._expect else ("query",)
        if front[0] == "describe":
            self._expect.pop(0)
            (self._stmt_plan if front[1] == b"S" else self._portal_plan)[front[2]] = plan
        self._plan = plan

    def plan(self) -> list | None:
        front = self._expect[0] if self._expect else ("query",)
        if front[0] == "execute":
            portal = front[1]
            return self._portal_plan.get(portal) or self._stmt_plan.get(
                self._portal_stmt.get(portal, ""))
        return self._plan

    def done(self) -> None:
        if self._expect and self._expect[0][0] == "execute":
            self._expect.pop(0)

    def upstream(self, kind: bytes) -> None:
        if kind in (b"n", b"t") and self._expect and self._expect[0][0] == "describe":
            if kind == b"n":
                self._expect.pop(0)
        elif kind in (b"s", b"I") and self._expect and self._expect[0][0] == "execute":
            self._expect.pop(0)
        elif kind == b"E":
            # the server skips the rest up to Sync
            while self._expect and self._expect[0][0] not in ("sync", "query"):
                self._expect.pop(0)
        elif kind == b"Z" and self._expect:
            self._expect.pop(0)


def _provenance(statements) -> tuple | None:
    """(tables, sources, lineages) of what a Query or Parse runs; None when some of it
    is unknown: unparsed, or rows of a statement prepared or declared earlier."""
    if not statements or any(st is None or st.lineage is None or
                             st.kinds & {"EXECUTE", "FETCH"} for st in statements):
        return None
    sources: dict[str, set] = {}
    for st in statements:
        for name, cols in st.sources:
            sources.setdefault(name, set()).update(cols)
    tables = {t.rsplit(".", 1)[-1] for st in statements for t in st.tables}
    return tables, sources, [st.lineage for st in statements]


class PostgresLayer:
    name = "postgres"

    def __init__(self, *, decide: Callable[[Request], Decision], target: str,
                 identity: dict | None = None, user: str | None = None,
                 password: str | None = None, max_message: int = m.DEFAULT_MAX_MESSAGE,
                 cancel_keys: dict | None = None, masker: Masker | None = None,
                 client_tls: bool = False, samples: SampleLimits | None = None):
        self.decide = decide
        self.outputs = Outputs(samples)
        self.client_tls = client_tls   # may answer SSLRequest with 'S' (the driver has a CA)
        self.client_tls_on = False
        self.target = target
        self.identity = identity or {}
        self.user = user
        self.password = password
        self.client = m.FrameReader(startup=True, max_message=max_message)
        self.upstream = m.FrameReader(max_message=max_message)
        self.state = "startup"
        self.database = ""
        self.upstream_user = ""
        self.tx_status = b"I"
        self._scram: ScramSha256 | None = None
        self._denials: dict[str, bytes] = {}   # token -> our ErrorResponse
        self._counter = 0
        self._held: int | None = None
        self.masker = masker if masker is not None and masker.active else None
        self._results = _Results() if self.masker else None
        self._compiled_for: list | None = None
        self._mask_cols: list[tuple[int, str]] = []
        self._scan_cols: list[int] = []
        self.refusing = ""   # set when the session can't go on: start-up gets this error
        self._pending: dict[int, tuple[bytes, str | None, Decision, int]] = {}
        self._queue: list[tuple[bytes, bytes]] = []
        # Shared by all sessions to this target: the key the agent holds -> the server's.
        # The agent never learns the server's key; a cancel from it is mapped back.
        self.cancel_keys = cancel_keys if cancel_keys is not None else {}
        self.client_key: tuple[int, int] | None = None

    # ------------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> list[Action]:
        out: list[Action] = []
        for kind, body in self.client.receive_data(data):
            if out and isinstance(out[-1], StartTls):
                # bytes sent in the clear after SSLRequest would be taken as if they
                # came through TLS (CVE-2021-23214): the client must wait for 'S'
                raise ProtocolError("data after SSLRequest before the TLS handshake")
            out += self._from_client(kind, body)
        if out and isinstance(out[-1], StartTls) and self.client.buffered:
            raise ProtocolError("data after SSLRequest before the TLS handshake")
        return out

    def client_eof(self) -> list[Action]:
        return []

    def refusal(self, message: str) -> bytes:
        """What the client gets when the proxy must end the session (e.g. the spool
        is full): an error it can show, as the server would send it."""
        return m.error_response(message, "53100", "FATAL")

    def close(self) -> None:
        """The session is over: its cancel key goes with it."""
        if self.client_key is not None:
            self.cancel_keys.pop(self.client_key, None)

    def _from_client(self, kind: bytes, body: bytes) -> list[Action]:
        if self._held is not None:
            self._queue.append((kind, body))   # nothing overtakes a held statement
            return []
        if kind == b"":
            return self._untyped(body)
        raw = m.frame(kind, body)
        if self.state != "ready":
            if self.state == "auth" and self.password is None and kind == b"p":
                return [ToUpstream(raw)]   # pass-through authentication
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
            bind = m.parse_bind(body)
            params = [None if p is None else p[:MAX_RECORDED_PARAM] for p in bind.params]
            return [Record("bind", {"statement": bind.statement, "portal": bind.portal,
                                    "params": params, "formats": list(bind.param_formats)}),
                    ToUpstream(raw)]
        if kind == b"F":
            # A function called by OID carries no SQL to judge, and its result can't be
            # masked: refused (the server answers it with an error, as for a denial).
            return [Record(COMMAND, {"text": "<function call by OID>", "protocol": "function"}),
                    Record(DECISION, {"action": "deny", "rule": "(function call)",
                                      "reason": "function calls by OID are not allowed"})] + \
                self._refuse(Decision("deny", "(function call)",
                                      "function calls by OID are not allowed"), None)
        return [ToUpstream(raw)]

    def _untyped(self, body: bytes) -> list[Action]:
        msg = m.parse_untyped(body)
        if isinstance(msg, m.SpecialRequest):
            if msg.code == m.SSL_REQUEST and self.client_tls and not self.client_tls_on \
                    and self.state == "startup":
                self.client_tls_on = True
                return [ToClient(b"S"), StartTls()]
            if msg.code in (m.SSL_REQUEST, m.GSSENC_REQUEST):
                return [ToClient(b"N")]   # declined: the client goes on in the clear
            real = self.cancel_keys.get((msg.pid, msg.secret))
            if real is None:
                return [Record("cancel", {"matched": False}), Close("cancel with an unknown key")]
            return [Record("cancel", {"matched": True}),
                    ToUpstream(m.cancel_request(*real)),
                    Close("cancel request forwarded")]
        if self.state != "startup":
            raise ProtocolError("a second startup message")
        if self.refusing:
            return [ToClient(self.refusal(self.refusing)), Close(self.refusing)]
        dropped = sorted(k for k in msg.params if k not in STARTUP_PARAMS)
        params = {k: v for k, v in msg.params.items() if k in STARTUP_PARAMS}
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
                                   "client_tls": self.client_tls_on}),
                ToUpstream(m.startup_message(params, msg.version))]

    def _statement(self, text: str, raw: bytes, extended: str | None) -> list[Action]:
        try:
            statements = classify(text)
        except Unparseable:
            statements = [None]
        return self._judged(text, raw, extended, statements)

    def _judged(self, text: str, raw: bytes, extended: str | None, statements) -> list[Action]:
        out: list[Action] = []
        decisions = []
        for st in statements or [None]:
            req = (Request(target=self.target, protocol="postgres", identity=self.identity,
                           database=self.database, text=text, parsed=False)
                   if st is None else
                   Request(target=self.target, protocol="postgres", identity=self.identity,
                           database=self.database, text=st.text, kinds=st.kinds,
                           tables=st.tables, functions=st.functions, flags=st.flags))
            decision = self.decide(req)
            out.append(Record(COMMAND, {
                "text": req.text, "kinds": sorted(req.kinds), "tables": list(req.tables),
                "functions": list(req.functions), "flags": sorted(req.flags),
                "database": self.database, "statement": extended,
                "protocol": "simple" if extended is None else "extended"}))
            out.append(Record(DECISION, decision.as_dict()))
            decisions.append(decision)
        if self.masker and any("copy_out" in (st.flags if st else ()) for st in statements):
            # COPY TO STDOUT bypasses row-by-row masking: refused, never leaked
            decisions.append(Decision("deny", "(masking)", "COPY out of a masked target "
                                      "is refused"))
            out.append(Record(DECISION, decisions[-1].as_dict()))
        if self._results is not None:
            self._results.provenance(extended, _provenance(statements))
        # the strictest wins: deny, then review, then allow
        deny = next((d for d in decisions if d.action == "deny"), None)
        review = next((d for d in decisions if d.action == "review"), None)
        if deny is not None:
            return out + self._refuse(deny, extended)
        if review is not None:
            self._counter += 1
            key = self._counter
            self._held = key
            self._pending[key] = (raw, extended, review, len(statements))
            return out + [Hold(key, text, review.rule, review.reason)]
        return out + [self._forward(raw, extended, len(statements))]

    def _forward(self, raw: bytes, extended: str | None, statements: int) -> ToUpstream:
        """A Query starts its statements now; a Parse starts nothing (its Executes do)."""
        if extended is None:
            return ToUpstream(raw, self.outputs.sent_query(statements))
        return ToUpstream(raw)

    def _refuse(self, decision: Decision, extended: str | None) -> list[Action]:
        """Send the server a statement it rejects itself (a unique token, a syntax error):
        its own error handling then keeps the session and transaction state right, and
        the error it returns is rewritten into ours."""
        token = f"agentgate_denied_{secrets.token_hex(8)}"   # unguessable
        self._denials[token] = m.error_response(
            f'agentgate: denied by rule "{decision.rule}": {decision.reason}', "42501")
        if extended is None:
            return [ToUpstream(m.frame(b"Q", token.encode() + b"\0"), self.outputs.sent_query(1))]
        return [ToUpstream(m.frame(b"P", extended.encode() + b"\0" + token.encode() + b"\0\0\0"))]

    def held_notice(self, approval_id: str, expires: str) -> bytes:
        key = self._held
        _raw, _ext, decision, _n = self._pending[key]
        return m.notice_response(f'agentgate: held for approval {approval_id} (rule '
                                 f'"{decision.rule}": {decision.reason}); expires {expires}')

    def decided(self, key: int, approved: bool, reason: str) -> list[Action]:
        """The answer to a Hold: run the statement, or refuse it; then what the client sent
        meanwhile (an extended-protocol pipeline) goes on in order."""
        raw, extended, decision, statements = self._pending.pop(key)
        self._held = None
        if approved:
            out: list[Action] = [self._forward(raw, extended, statements)]
        else:
            out = self._refuse(Decision("deny", decision.rule, reason), extended)
        queued, self._queue = self._queue, []
        for kind, body in queued:
            out += self._from_client(kind, body)
        return out

    # ------------------------------------------------------------------ server side

    def upstream_data(self, data: bytes) -> list[Action]:
        out: list[Action] = []
        for kind, body in self.upstream.receive_data(data):
            out += self._from_upstream(kind, body)
        return out

    def upstream_eof(self) -> list[Action]:
        return []

    def _from_upstream(self, kind: bytes, body: bytes) -> list[Action]:
        raw = m.frame(kind, body)
        if self.state == "auth" and kind == b"R":
            return self._auth(body, raw)
        if kind == b"K":
            real = m.parse_backend_key(body)
            fake = (secrets.randbits(31), secrets.randbits(31))
            self.cancel_keys[fake] = real
            self.client_key = fake
            return [ToClient(m.backend_key_data(*fake))]
        if kind == b"Z":
            self.tx_status = body[:1] or b"I"
            self.state = "ready"
            self._denials.clear()   # a denial the server skipped (after an earlier error)
            self.outputs.ready()
            if self._results is not None:
                self._results.upstream(kind)
        elif kind == b"E":
            if self.state != "ready":
                return [ToClient(raw), Close("upstream refused the session")]
            fields = m.parse_fields(body)
            if self._results is not None:
                self._results.upstream(kind)
            message = fields.get("M", "")
            sid, out = self.outputs.error(fields.get("C", ""), message)
            for token, ours in list(self._denials.items()):
                if token in message:   # our denial: its decision is the record
                    del self._denials[token]
                    return [ToClient(ours)]
            reply = self._mask_fields(b"E", fields) if self._results is not None else raw
            if self._results is not None:
                out["error"] = self.masker.scan(message)[0]
            out["summary"] = f"ERROR {out['sqlstate']}: {out['error']}"
            return [Record(OUTPUT, out, stop=sid), ToClient(reply)]
        elif kind == b"N" and self._results is not None:
            return [ToClient(self._mask_fields(b"N", m.parse_fields(body)))]
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
            cols = m.parse_row_description(body)
            self.outputs.columns([c.name for c in cols], [c.format for c in cols])
            if self._results is not None:
                return [ToClient(self._plan(cols))]
        elif self._results is not None:
            self._results.upstream(kind)
        return [ToClient(raw)]

    # ------------------------------------------------------------------ masking

    def _plan(self, cols: list[m.Column]) -> bytes:
        """Decide, per column, mask whole / scan with detectors / pass; a masked column
        becomes text, so any client (binary formats too) decodes the mask."""
        prov = self._results.current()
        if prov is not None:
            tables, sources, lineages = prov
            # Names can be followed only so far; a statement that reads a masked column
            # (or whole rows) anywhere gets every result column not proven clean masked.
            touches = any(lin.whole_rows or any(self._column_rule(tables, c) for c in lin.columns)
                          for lin in lineages)
            renamed = any(lin.renamed for lin in lineages)
            opaque = set().union(*(lin.opaque for lin in lineages))
        plan = []
        for col in cols:
            if prov is None:
                rule = "(unknown provenance)"
            else:
                rule = self._column_rule(tables, col.name)
                for src in sources.get(col.name, ()):   # through aliases and expressions
                    table, _, name = src.rpartition(".")
                    rule = rule or (self.masker.column_masked(table, name) if table
                                    else self._column_rule(tables, name))
                if not rule and touches and (
                        renamed or col.name in opaque or "?column?" in opaque or
                        (col.table_oid == 0 and col.name not in sources)):
                    # computed by the server under a name we can't follow (CASE,
                    # coalesce, a cast, a subquery, a whole row, renamed columns)
                    rule = "(derived from masked data)"
            if rule:
                plan.append(("mask", rule, col.format))
            elif self.masker.has_detectors and (col.format == 0 or col.type_oid in TEXT_TYPES):
                plan.append(("scan", "", col.format))
            elif col.format == 1 and col.type_oid not in PLAIN_BINARY_TYPES:
                # binary arrays, json(b), bytea...: the detectors can't read them
                plan.append(("mask", "(unscannable binary)", col.format))
            else:
                plan.append(("pass", "", col.format))
        self._results.set_plan(plan)
        out = [m.Column(c.name, c.table_oid, c.column, TEXT_OID, -1, -1, c.format)
               if p[0] == "mask" else c for c, p in zip(cols, plan)]
        return m.row_description(out)

    def _column_rule(self, tables: set, column: str) -> str | None:
        """A column of unknown table is masked if any table the statement reads has
        it masked."""
        if not self.masker.column_rules:
            return None
        return next((r for t in (tables or {""}) for r in [self.masker.column_masked(t, column)]
                     if r), None)

    def _mask_fields(self, kind: bytes, fields: dict[str, str]) -> bytes:
        """Errors and notices can quote row data ("Key (email)=(...) already exists"):
        their texts go through the detectors too."""
        out = {}
        for code, value in fields.items():
            out[code] = self.masker.scan(value)[0] if code in "MDHW" else value
        body = b"".join(k.encode() + v.encode() + b"\0" for k, v in out.items()) + b"\0"
        return m.frame(kind, body)

    def _mask_notification(self, body: bytes) -> bytes:
        c = m.Cursor(body)
        pid, channel, payload = c.i32(), c.cstr(), c.cstr()
        payload = self.masker.scan(payload)[0]
        return m.frame(b"A", m._I32.pack(pid) + channel.encode() + b"\0" + payload.encode() + b"\0")

    def _mask_row(self, body: bytes) -> list[bytes | None]:
        values = m.parse_data_row(body)
        plan = self._results.plan()
        if plan is None or len(plan) != len(values):
            # rows whose shape we don't know: nothing goes out unmasked
            plan = [("mask", "(unknown shape)", 0)] * len(values)
        if plan is not self._compiled_for:
            # per result shape, not per row: which columns to blank, which to scan
            self._compiled_for = plan
            self._mask_cols = [(i, f"{p[1]}:column") for i, p in enumerate(plan)
                               if p[0] == "mask"]
            self._scan_cols = [i for i, p in enumerate(plan) if p[0] == "scan"]
        counts = self.masker.counts
        for i, key in self._mask_cols:
            if values[i] is not None:
                values[i] = _MASK
                counts[key] = counts.get(key, 0) + 1
        scan = self.masker.scan_bytes
        for i in self._scan_cols:
            value = values[i]
            if value is not None:
                try:
                    values[i] = scan(value)
                except UnicodeDecodeError:
                    self.masker.count_column("(undecodable)")
                    values[i] = _MASK
        return values

    def _auth(self, body: bytes, raw: bytes) -> list[Action]:
        code, data = m.parse_authentication(body)
        if code == m.AUTH_OK:
            return [ToClient(raw)]
        if self.password is None:
            return [ToClient(raw)]   # the client answers for itself
        if code == m.AUTH_SASL:
            if "SCRAM-SHA-256" not in m.sasl_mechanisms(data):
                return [Close(f"upstream offers no supported SASL mechanism: {data!r}")]
            self._scram = ScramSha256(self.password)
            return [ToUpstream(m.sasl_initial_response(self._scram.mechanism,
                                                       self._scram.client_first()))]
        if code == m.AUTH_SASL_CONTINUE and self._scram:
            return [ToUpstream(m.sasl_response(self._scram.client_final(data)))]
        if code == m.AUTH_SASL_FINAL and self._scram:
            self._scram.verify_server_final(data)
            return []
        if code == m.AUTH_MD5:
            return [ToUpstream(m.password_message(md5_password(self.upstream_user,
                                                               self.password, data)))]
        if code == m.AUTH_CLEARTEXT:
            return [ToUpstream(m.password_message(self.password))]
        return [ToClient(m.error_response(f"agentgate: unsupported upstream authentication "
                                          f"method {code}", "28000", "FATAL")),
                Close(f"unsupported upstream authentication method {code}")]
