"""The MySQL/MariaDB layer: sans-IO, between the agent and the server.

- Start-up: the server speaks first. Its greeting is read, TLS is asked of it per the
  target's mode, and the agent is greeted with the server's own version (clients key
  behaviour on it), the capabilities both legs can share, a nonce of the proxy's and a
  stand-in thread id. Each leg authenticates on its own (auth.py): the agent's password
  is ignored, the server gets the injected credentials, and the agent's OK is sent only
  once the server's has come.
- Every COM_QUERY and COM_STMT_PREPARE is classified (classify.py) and judged before it
  goes upstream, its record spooled first; a denial is an ERR (1142, 42000) naming rule
  and reason, and the session goes on. EXECUTE's parameters are recorded.
- Answers are followed packet by packet (results of several statements, result sets in
  the text and binary protocols, PREPARE_OK, LOAD DATA LOCAL's file request) so rows can
  be masked (results.py) and each statement's output recorded. Sequence ids towards the
  agent are kept by the layer, so a packet it rewrites may change size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from hostagent.masking import Masker, for_target
from hostagent.policy import Decision, Request, decide
from hostagent.protocols.api import (CLIENT, Aborted, ApprovalDecided, Close, Command,
                                     DataReceived, EofReceived, Event, ProtocolError, Record,
                                     SessionContext, Start, StartClientTls, TlsEstablished,
                                     TlsFailed,
                                     ToClient, ToUpstream)
from hostagent.protocols.enforce import Enforcer
from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.answers import Answers
from hostagent.protocols.mysql.auth import ClientAuth, UpstreamAuth
from hostagent.protocols.mysql.classify import Unparseable, classify
from hostagent.protocols.mysql.packets import Packet, PacketReader, frame
from hostagent.protocols.mysql.results import Plan, Reads, reads_of
from hostagent.protocols.mysql.startup import Startup
from hostagent.protocols.outputs import Outputs
from hostagent.protocols.statements import requests_for

# characters of statement text the judge reads (linear, on the proxy's loop: past this a
# text is unparseable rather than stall every session; big values go as parameters)
MAX_CLASSIFIED = 4 << 20         # (the lexer: about 0.1 s; sqlglot's share is capped apart)
TO_UTF8 = re.compile(r"\s*SET\s+(?:NAMES|CHARSET|CHARACTER\s+SET)\s+['\"`]?utf8(?:mb[34])?"
                     r"['\"`]?\s*(?:COLLATE\s+['\"`]?utf8\w*['\"`]?\s*)?;?\s*$", re.I)
DENIED_CODE, DENIED_STATE = 1142, "42000"
# commands passed on as they are, with the answer each gets
SIMPLE = {m.COM_PING: "ok", m.COM_STMT_RESET: "ok", m.COM_SET_OPTION: "ok",
          m.COM_RESET_CONNECTION: "ok", m.COM_STATISTICS: "one", m.COM_STMT_CLOSE: None,
          m.COM_STMT_SEND_LONG_DATA: None, m.COM_QUIT: None}
COMMAND_NAMES = {0x00: "COM_SLEEP", 0x05: "COM_CREATE_DB", 0x06: "COM_DROP_DB",
                 0x07: "COM_REFRESH", 0x08: "COM_SHUTDOWN", 0x0A: "COM_PROCESS_INFO",
                 0x0B: "COM_CONNECT", 0x0D: "COM_DEBUG", 0x10: "COM_TIME",
                 0x12: "COM_BINLOG_DUMP", 0x13: "COM_TABLE_DUMP", 0x15: "COM_REGISTER_SLAVE",
                 0x1D: "COM_DAEMON", 0xFA: "COM_STMT_BULK_EXECUTE"}


@dataclass
class Prepared:
    text: str
    reads: Reads
    params: int = 0
    types: tuple[int, ...] = ()          # bound by the last EXECUTE that sent them
    long_data: set = field(default_factory=set)
    cursor: tuple | None = None          # (columns, plan, unsigned) of its open cursor


class MysqlLayer(Startup, Answers):
    name = "mysql"
    # a side's EOF ends the session (a TLS leg has no half-close: the agent would wait)
    relays_eof = False

    def __init__(self, *, decide: Callable[[Request], Decision], target: str,
                 identity: dict | None = None, user: str = "", password: str = "",
                 masker: Masker | None = None, client_tls: bool = False,
                 client_names: tuple[str, ...] = ("localhost",), samples=None,
                 tls: str = "disable", ca: str | None = None, server_name: str = "",
                 weak_password_auth: str = "refuse", server_key: bytes | None = None,
                 thread_ids: dict | None = None):
        self.decide = decide
        self.enforcer = Enforcer(decide)
        self.outputs = Outputs(samples)
        self.target, self.identity = target, identity or {}
        self.user, self.password = user, password
        self.masker = masker if masker is not None and masker.active else None
        self.client_tls, self.client_names = client_tls, client_names
        self.tls, self.ca, self.server_name = tls, ca, server_name
        self.weak_password_auth, self.server_key = weak_password_auth, server_key
        self.thread_ids = thread_ids if thread_ids is not None else {}
        self.client = PacketReader()
        self.upstream = PacketReader()
        self.phase = "greeting"        # greeting -> hello -> auth -> ready | refused
        self.up_phase = "greeting"     # greeting -> (tls ->) ready
        self.up_tls = self.up_verified = False
        self.client_tls_on = False
        self._waiting: list[Command] = []    # for the server once its leg is ready
        self.greeting: m.Greeting | None = None
        self.caps = 0
        self.database = ""
        self.closed = False
        self.stand_in = 0
        self.cseq = 0                   # the next sequence id towards the agent
        self.useq = 0                   # ... towards the server
        self.client_auth: ClientAuth | None = None
        self.up_auth: UpstreamAuth | None = None
        self._auth_state = {"client": False, "upstream": None}
        # the answer being read: its kind and where in it we are
        self.answer: str | None = None
        self.step = ""
        self.columns_left = 0
        self.columns: list[m.Column] = []
        self._held: list[Packet] = []   # column definitions until the last one
        self.plan: Plan | None = None
        self.binary = False
        self.unsigned: tuple[bool, ...] = ()
        self.reads = Reads()
        self.running: list = []         # the statements whose answers these are
        self.kind = ""                  # what produced the answer (for the record)
        self._prepare: Prepared | None = None
        self._prepare_params = 0
        self._prepare_cols = 0
        self.stmts: dict[int, Prepared] = {}
        self.sql_prepared: dict[str, Reads] = {}
        self._execute_stmt: Prepared | None = None
        self._infile: dict | None = None
        self._swallow = False           # the rest of an answer the agent won't get
        self._last_read_masked = False
        self._cursor = False            # the EXECUTE being answered opens a cursor
        self.ascii_only = True          # until the server says the session is UTF-8
        self._login_ascii_only = True   # what the login's character set gave
        self._to_utf8 = False           # the statement being answered makes it UTF-8
        self._effects: dict = {}        # result index -> (USE db, PREPARE name, its reads)
        self._result_index = 0

    @classmethod
    def for_session(cls, ctx: SessionContext) -> "MysqlLayer":
        opts, policy = ctx.options, ctx.policy
        key = None
        if opts.get("server_public_key"):
            key = open(opts.server_public_key, "rb").read()
        return cls(decide=lambda req: decide(policy, req), target=ctx.target.name,
                   identity=ctx.identity, user=opts.user or "", password=opts.get("password") or "",
                   masker=for_target(policy.masks, ctx.target.name),
                   client_tls=ctx.tls_available and opts.client_tls == "offer",
                   client_names=tuple(dict.fromkeys((*ctx.target.names, ctx.dialed))),
                   samples=ctx.samples, tls=opts.tls, ca=opts.ca,
                   server_name=opts.server_name or next(iter(ctx.target.names), ""),
                   weak_password_auth=opts.get("weak_password_auth") or "refuse",
                   server_key=key, thread_ids=ctx.shared.setdefault("thread_ids", {}))

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> list[Command]:
        kind = type(event)
        if kind is DataReceived:
            reader = self.client if event.side == CLIENT else self.upstream
            out: list[Command] = []
            packets = reader.receive_data(event.data)
            for i, pkt in enumerate(packets):
                if self.closed:
                    break
                out += self._from_client(pkt) if event.side == CLIENT else self._from_upstream(pkt)
                if out and type(out[-1]) is StartClientTls:
                    # what followed the SSL request is the ClientHello: TLS's, not ours
                    early = b"".join(p.raw for p in packets[i + 1:]) + reader.take_rest()
                    out[-1] = StartClientTls(out[-1].names, out[-1].alpn, early)
                    break
            return out
        if kind is Start:
            if not self.server_name:
                self.server_name = event.upstream[0]
            return []
        if kind is ApprovalDecided:
            return self._decided(event.key, event.approved, event.reason)
        if kind is TlsEstablished:
            return self._tls_up(event)
        if kind is TlsFailed:
            if event.side == CLIENT:
                return [Close(f"client TLS handshake failed: {event.error}")]
            return self._refuse(f"agentgate: upstream TLS failed ({self.tls}): {event.error}")
        if kind is Aborted:
            return self._close(event.reason, self._err_packet(1927, "70100",
                                                              f"agentgate: {event.reason}"))
        if kind is EofReceived:
            return self._close("the agent closed" if event.side == CLIENT
                               else "the server closed the connection")
        return []

    def buffered(self) -> int:
        return (self.client.buffered + self.upstream.buffered + self.enforcer.deferred_bytes
                + sum(len(c.data) for c in self._waiting if isinstance(c, ToUpstream)))

    def _close(self, reason: str, final: bytes = b"") -> list[Command]:
        self.closed = True
        self.thread_ids.pop(self.stand_in, None)
        return [Close(reason, final)]

    # ------------------------------------------------------------------ sending

    def _to_client(self, payload: bytes) -> ToClient:
        data, self.cseq = frame(payload, self.cseq)
        return ToClient(data)

    def _pass_to_client(self, pkt: Packet) -> ToClient:
        """A server packet as it came, unless the agent's numbering has moved."""
        if pkt.seq == self.cseq:
            self.cseq = (pkt.seq + pkt.chunks) & 0xFF
            return ToClient(pkt.raw)
        return self._to_client(pkt.payload)

    def _to_server(self, payload: bytes, starts: tuple[int, ...] = ()) -> ToUpstream:
        data, self.useq = frame(payload, self.useq)
        return ToUpstream(data, starts)

    def _err_packet(self, code: int, state: str, message: str) -> bytes:
        return frame(m.err(code, state, message), self.cseq)[0]

    def _refuse(self, message: str, code: int = 1045, state: str = "28000") -> list[Command]:
        """The session can't go on: the agent gets the error at once (before its own
        greeting if need be: a server that refuses a host does the same)."""
        greeted = self.phase != "greeting"
        self.phase = self.up_phase = "refused"
        self._waiting.clear()
        if not greeted:   # in place of a greeting: no SQLSTATE, as a server refusing a host
            return self._close(message, frame(b"\xff" + m.u16(code) + message.encode(), 0)[0])
        return self._close(message, self._err_packet(code, state, message))

    # ------------------------------------------------------------------ the agent's side

    def _from_client(self, pkt: Packet) -> list[Command]:
        if self.phase == "hello":
            return self._hello(pkt)
        if self.phase == "auth":
            return self._client_auth(pkt)
        if self.phase != "ready":
            raise ProtocolError(f"the agent spoke during {self.phase}")
        if self._infile is not None and self._infile.get("sending"):
            return self._infile_data(pkt)
        if self.enforcer.holding or self.answer is not None:
            # nothing overtakes a hold, nor an answer being read (a pipelining client)
            self.enforcer.defer(pkt, len(pkt.raw))
            return []
        return self._command(pkt)

    def _command(self, pkt: Packet) -> list[Command]:
        payload = pkt.payload
        if not payload:
            raise ProtocolError("an empty command packet")
        self.cseq = (pkt.seq + pkt.chunks) & 0xFF
        self.useq = self.cseq
        code = payload[0]
        if code == m.COM_QUERY or code == m.COM_STMT_PREPARE:
            return self._statement(pkt, code == m.COM_STMT_PREPARE)
        if code == m.COM_STMT_EXECUTE:
            return self._execute(pkt)
        if code == m.COM_STMT_FETCH:
            return self._fetch(pkt)
        if code == m.COM_INIT_DB:
            db = payload[1:].decode("utf-8", "replace")
            return self._judge_and_send(pkt, [self._use_request(db)], "ok", db=db)
        if code == m.COM_FIELD_LIST:
            table = payload[1:].split(b"\0", 1)[0].decode("utf-8", "replace")
            return self._judge_and_send(pkt, [self._field_list_request(table)], "fields")
        if code == m.COM_PROCESS_KILL:
            return self._kill("connection", int.from_bytes(payload[1:5], "little"), pkt)
        if code == m.COM_CHANGE_USER:
            return self._change_user(pkt)
        if code in SIMPLE:
            answer = SIMPLE[code]
            if code == m.COM_STMT_CLOSE:
                self.stmts.pop(m.statement_id(payload), None)
            elif code == m.COM_STMT_RESET and m.statement_id(payload) in self.stmts:
                self.stmts[m.statement_id(payload)].cursor = None
            elif code == m.COM_STMT_SEND_LONG_DATA and len(payload) >= 7:
                stmt = self.stmts.get(m.statement_id(payload))
                if stmt is not None and len(stmt.long_data) < 4096:
                    stmt.long_data.add(int.from_bytes(payload[5:7], "little"))
            elif code == m.COM_RESET_CONNECTION:
                self.stmts.clear()
                self.sql_prepared.clear()
                # the server goes back to the login's character set
                self.ascii_only = self._login_ascii_only
            elif code == m.COM_QUIT:
                return [ToUpstream(pkt.raw)] + self._close("the agent quit")
            self.answer, self.kind = answer, COMMAND_NAMES.get(code, "command")
            return [ToUpstream(pkt.raw)]
        name = COMMAND_NAMES.get(code, f"command 0x{code:02x}")
        decision = Decision("deny", "(protocol)", f"{name} is not allowed through agentgate")
        return [Record("command", {"text": f"<{name}>", "protocol": "command",
                                   "decision": decision.as_dict()}),
                self._to_client(m.err(1047, "08S01", f"agentgate: {name} is refused: "
                                                     f"it is not judged"))]

    def _use_request(self, db: str) -> tuple[Request, dict]:
        req = Request(target=self.target, protocol="mysql", identity=self.identity,
                      text=f"USE {db}", action="USE", attributes={
                          "databases": (db,), "statements": frozenset({"USE"}),
                          "tables": (), "functions": (), "flags": frozenset()})
        return req, {"text": req.text, "kinds": ["USE"], "database": db,
                     "protocol": "COM_INIT_DB"}

    def _field_list_request(self, table: str) -> tuple[Request, dict]:
        req = Request(target=self.target, protocol="mysql", identity=self.identity,
                      text=f"SHOW COLUMNS FROM {table}", action="SHOW", resources=(table,),
                      attributes={"databases": (self.database,),
                                  "statements": frozenset({"SHOW"}), "tables": (table,),
                                  "functions": (), "flags": frozenset()})
        return req, {"text": req.text, "kinds": ["SHOW"], "tables": [table],
                     "database": self.database, "protocol": "COM_FIELD_LIST"}

    def _judge_and_send(self, pkt: Packet, commands, answer: str, db: str | None = None):
        verdict, out = self.enforcer.judge(commands)
        if verdict.action == "deny":
            return out + [self._denied(verdict)]
        if verdict.action == "review":
            return out + [self.enforcer.hold(("plain", pkt, answer, db), verdict,
                                             commands[0][0].text)]
        return out + self._send_plain(pkt, answer, db)

    def _send_plain(self, pkt: Packet, answer: str, db: str | None) -> list[Command]:
        if db is not None:
            self.database = db
        self.answer, self.kind, self.reads = answer, "", Reads()
        self.columns = []
        return [ToUpstream(pkt.raw)]

    def _denied(self, d: Decision) -> ToClient:
        return self._to_client(m.err(DENIED_CODE, DENIED_STATE,
                                     f'agentgate: denied by rule "{d.rule}": {d.reason}'))

    def _statement(self, pkt: Packet, prepare: bool) -> list[Command]:
        text = m.query_text(pkt.payload)
        self._to_utf8 = False
        try:
            if self.ascii_only and not text.isascii():
                # the server reads these bytes in a single-byte character set (0xA0 is a
                # space in latin1): only ASCII reads the same to it and to the judge
                raise Unparseable("not ASCII while the session's character set isn't UTF-8")
            if len(text) > MAX_CLASSIFIED:
                raise Unparseable("too long to judge")
            statements = classify(text)
        except Unparseable:
            statements = [None]
        commands = requests_for(statements, text, target=self.target, identity=self.identity,
                                database=self.database, protocol="mysql",
                                how="prepare" if prepare else "query")
        if self.ascii_only and not prepare and len(statements) == 1 and TO_UTF8.match(text):
            self._to_utf8 = True     # once its OK comes, statements may be UTF-8
        reads = reads_of(statements, self.masker) if self.masker else Reads()
        extra = []
        if self.masker and reads.masked and any(
                st is None or st.copies or st.kinds & {"CREATE", "ALTER"} and (
                    st.reads or "SELECT" in st.kinds)
                for st in statements):
            extra.append(Decision("deny", "(masking)", "it could copy masked columns "
                                  "where masking does not follow them"))
        if len(statements) > 1 and any(st is not None and "CALL" in st.kinds for st in statements) \
                and any(st is not None and (st.database or st.prepares) for st in statements):
            # a CALL's results can't be counted: what follows it could not be tied to
            # its answer
            extra.append(Decision("deny", "(protocol)", "USE or PREPARE after a CALL in one "
                                  "text: send them apart"))
        kill = [st.kill for st in statements if st is not None and st.kill]
        if any(st is not None and "KILL" in st.kinds and not (st.kind == "KILL" and st.kill)
               for st in statements) or (kill and (len(statements) != 1 or prepare)):
            # thread ids are mapped only for a KILL sent as itself: inside PREPARE, a
            # procedure or SET STATEMENT it would reach the server's ids unmapped
            extra.append(Decision("deny", "(protocol)", "KILL must be sent alone, as itself"))
        verdict, out = self.enforcer.judge(commands, extra)
        if verdict.action == "deny":
            return out + [self._denied(verdict)]
        if kill:
            if verdict.action == "review":
                return out + [self.enforcer.hold(("kill", pkt, kill[0]), verdict, text)]
            return out + self._kill(kill[0][0], kill[0][1], None)
        pending = ("statement", pkt, prepare, statements, reads, text)
        if verdict.action == "review":
            return out + [self.enforcer.hold(pending, verdict, text)]
        return out + self._send_statement(*pending[1:])

    def _send_statement(self, pkt, prepare, statements, reads, text) -> list[Command]:
        # what USE and PREPARE change takes effect with each one's own answer: a
        # statement after an error in a multi-statement text never runs
        self._effects, self._result_index = {}, 0
        for i, st in enumerate(statements if not prepare else ()):
            if st is not None and (st.database or st.prepares):
                self._effects[i] = (st.database, st.prepares and st.prepares[0].lower(), reads)
        if self.masker is not None:
            # EXECUTE of an SQL-prepared statement: what its PREPARE could read
            for st in statements:
                if st is not None and st.executes:
                    prior = self.sql_prepared.get(st.executes.lower(), Reads(masked=True))
                    reads = Reads(reads.tables | prior.tables, reads.masked or prior.masked,
                                  reads.rules + prior.rules)
        if self.masker is not None and self._last_read_masked and any(
                st is None or st.kind in ("SHOW", "GET") for st in statements):
            # SHOW WARNINGS / ERRORS, GET DIAGNOSTICS quote the values the statement
            # before read: its columns without a source are masked whole
            reads = Reads(reads.tables, True, reads.rules or ("(masking)",))
        self.reads, self.running = reads, statements
        if reads.masked:
            self._last_read_masked = True
        elif all(st is not None and st.tables and st.kind not in ("SHOW", "GET")
                 for st in statements):
            # the server keeps a statement's warnings until one that uses a table
            self._last_read_masked = False
        if prepare:
            self.answer, self.step = "prepare", "ok"
            self._prepare = Prepared(text, reads)
            return [ToUpstream(pkt.raw)]
        self.answer, self.step, self.binary = "results", "first", False
        self.kind = " ".join(sorted(statements[0].kinds)) if statements[0] else ""
        return [ToUpstream(pkt.raw, self.outputs.sent_query(len(statements)))]

    def _execute(self, pkt: Packet) -> list[Command]:
        sid = m.statement_id(pkt.payload)
        stmt = self.stmts.get(sid)
        self._cursor, self._execute_stmt = False, stmt
        if stmt is None:
            # an id the proxy didn't see prepared (MariaDB's -1: the last one): the server
            # answers it; its columns are masked whole, and no cursor is opened on it
            if len(pkt.payload) > 5 and pkt.payload[5] & 0x0F:
                return [self._to_client(m.err(1243, "HY000", "agentgate: a cursor on a "
                                              "statement not prepared through the proxy "
                                              "is refused"))]
            self.answer, self.step, self.binary = "results", "first", True
            self.reads = Reads(masked=True)
            return [ToUpstream(pkt.raw, self.outputs.sent_query(1))]
        ex = m.parse_execute(pkt.payload, stmt.params, stmt.types, frozenset(stmt.long_data))
        stmt.types = ex.types
        stmt.long_data.clear()
        self.answer, self.step, self.binary = "results", "first", True
        self.reads, self._execute_stmt = stmt.reads, stmt
        self._cursor = bool(ex.flags & 0x0F)     # CURSOR_TYPE_*: rows come by FETCH
        self._last_read_masked = self._last_read_masked or stmt.reads.masked
        stmt.cursor = None       # executing again closes the cursor it had
        params = [None if v is None else v[:1024] for v in ex.values]
        return [Record("bind", {"statement": sid, "text": stmt.text[:4096], "params": params}),
                ToUpstream(pkt.raw, self.outputs.sent_query(1))]

    def _fetch(self, pkt: Packet) -> list[Command]:
        """Rows of a cursor an EXECUTE opened, read with the columns it described."""
        stmt = self.stmts.get(m.statement_id(pkt.payload))
        self._cursor = False
        if stmt is None or stmt.cursor is None:
            # its rows would come without the columns that say how to read (and mask) them
            return [self._to_client(m.err(1421, "HY000", "agentgate: FETCH from a cursor the "
                                          "proxy did not see opened is refused"))]
        self.columns, self.plan, self.unsigned = stmt.cursor
        self.answer, self.step, self.binary = "results", "rows", True
        self.outputs.columns([c.name for c in self.columns], [0] * len(self.columns))
        return [ToUpstream(pkt.raw, self.outputs.sent_query(1))]

    def _kill(self, what: str, stand_in: int, pkt: Packet | None) -> list[Command]:
        """KILL [QUERY] / COM_PROCESS_KILL: the agent names a stand-in id; it reaches the
        server's thread only if a live session of this target and of the same uid has it."""
        key = self.thread_ids.get(stand_in)
        uid = self.identity.get("uid")
        if key is None or not key.live() or key.uid != uid:
            return [Record("kill", {"thread": stand_in, "matched": False}),
                    self._to_client(m.err(1094, "HY000", f"Unknown thread id: {stand_in}"))]
        real = key[0]
        self.answer, self.step, self.binary, self.reads = "results", "first", False, Reads()
        self.kind = "KILL"
        rec = Record("kill", {"thread": stand_in, "matched": True, "query": what == "query"})
        if pkt is not None and what == "connection":
            return [rec, self._to_server(bytes((m.COM_PROCESS_KILL,)) + real.to_bytes(4, "little"),
                                         self.outputs.sent_query(1))]
        text = f"KILL {'QUERY' if what == 'query' else 'CONNECTION'} {real}"
        self.useq = 0
        return [rec, self._to_server(bytes((m.COM_QUERY,)) + text.encode(),
                                     self.outputs.sent_query(1))]

    def _decided(self, key: int, approved: bool, reason: str) -> list[Command]:
        released = self.enforcer.release(key)
        if released is None:
            return []
        pending, decision = released
        if not approved:
            out = [self._denied(Decision("deny", decision.rule, reason))]
        elif pending[0] == "statement":
            out = self._send_statement(*pending[1:])
        elif pending[0] == "kill":
            out = self._kill(pending[2][0], pending[2][1], None)
        else:
            out = self._send_plain(*pending[1:])
        return out + self._resume()

    def _resume(self) -> list[Command]:
        """What the agent sent behind a hold or an answer, in order."""
        out: list[Command] = []
        while not self.enforcer.holding and self.answer is None and not self.closed:
            deferred = self.enforcer.take_deferred()
            if not deferred:
                break
            first, rest = deferred[0], deferred[1:]
            for p in rest:
                self.enforcer.defer(p, len(p.raw))
            out += self._from_client(first)
        return out

