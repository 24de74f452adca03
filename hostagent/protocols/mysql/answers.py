"""The MySQL layer reading the server's answers packet by packet: the results of each
statement (OK, ERR, result sets in the text or binary protocol), PREPARE_OK and its
definitions, and LOAD DATA LOCAL's request for a file, judged as the file it names.
Rows are masked (results.py) and each statement's output recorded. A mixin of
MysqlLayer: it never awaits."""
from __future__ import annotations

from agentgate.events import OUTPUT
from hostagent.policy import Request
from hostagent.protocols.api import Command, ProtocolError, Record
from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.packets import Cursor, Packet
from hostagent.protocols.mysql.results import mask_row, plan


class Answers:
    # ------------------------------------------------------------------ the server's side

    def _from_upstream(self, pkt: Packet) -> list[Command]:
        if self.up_phase == "greeting":
            return self._greet(pkt)
        if self.phase == "auth" and self._auth_state["upstream"] is None:
            return self._upstream_auth(pkt)
        if self.phase == "probe":
            return self._probed(pkt)
        if self.phase != "ready":
            raise ProtocolError(f"the server spoke during {self.phase}")
        if self.answer is None:
            raise ProtocolError("the server spoke out of turn")
        if self._swallow:
            return self._swallowed(pkt)
        answer = self.answer
        if answer == "results":
            return self._result_packet(pkt)
        if answer == "prepare":
            return self._prepare_packet(pkt)
        if answer == "fields":
            if pkt.payload[:1] == b"\xff" or m.is_eof(pkt.payload):
                return self._done([self._pass_to_client(pkt)])
            return [self._pass_to_client(pkt)]
        # "ok" and "one": a single packet answers
        return self._done([self._pass_to_client(pkt)])

    def _done(self, out: list[Command]) -> list[Command]:
        self.answer = None
        self._to_utf8 = False
        self._effects = {}       # (after an error: the statements that never ran)
        self.outputs.ready()
        return out + self._resume()

    def _result_packet(self, pkt: Packet) -> list[Command]:
        p = pkt.payload
        step = self.step
        if step == "first":
            head = p[:1]
            if head == b"\x00":
                return self._ok(pkt)
            if head == b"\xff":
                return self._error(pkt)
            if head == b"\xfb":
                return self._local_infile(pkt)
            n = Cursor(p).lenenc()
            if not n or n > 4096:   # (MySQL's and MariaDB's limit)
                raise ProtocolError(f"a result set of {n} columns")
            self.columns_left, self.columns = n, []
            self.step = "columns"
            return [self._pass_to_client(pkt)]
        if step == "columns":
            self.columns.append(m.parse_column(p))
            self._held.append(pkt)
            self.columns_left -= 1
            if self.columns_left:
                return []
            self.step = "rows" if self.caps & m.DEPRECATE_EOF else "columns_eof"
            return self._planned()
        if step == "columns_eof":
            if not m.is_eof(p):
                raise ProtocolError("column definitions not ended by EOF")
            self.step = "rows"
            if self._cursor and m.eof_status(p) & m.CURSOR_EXISTS:
                # an EXECUTE that opened a cursor: its rows come with COM_STMT_FETCH
                self._execute_stmt.cursor = (self.columns, self.plan, self.unsigned)
                self._cursor = False
                return self._end_result(pkt, m.eof_status(p))
            return [self._pass_to_client(pkt)]
        # rows
        head = p[:1]
        if head == b"\xfe" and len(p) < 0xFFFFFF:
            status = m.eof_status(p) if m.is_eof(p) else m.parse_ok(p).status
            if self._cursor and status & m.CURSOR_EXISTS:
                # (under DEPRECATE_EOF the metadata's end comes here)
                self._execute_stmt.cursor = (self.columns, self.plan, self.unsigned)
                self._cursor = False
            return self._end_result(pkt, status)
        if head == b"\xff":
            return self._error(pkt)
        return self._row(pkt)

    def _planned(self) -> list[Command]:
        """The column definitions, held until the last: masking's plan needs them all."""
        pkts, self._held = self._held, []
        cols = self.columns
        self.unsigned = tuple(bool(c.flags & m.UNSIGNED_FLAG) for c in cols)
        self.outputs.columns([c.name for c in cols], [0] * len(cols))
        self.plan = plan(cols, self.masker, self.reads) if self.masker else None
        if self.plan is None or self.plan.trivial:
            return [self._pass_to_client(p) for p in pkts]
        return [self._to_client(self.plan.payloads[i]) if self.plan.payloads[i] is not None
                else self._pass_to_client(p) for i, p in enumerate(pkts)]

    def _row(self, pkt: Packet) -> list[Command]:
        p = self.plan
        sample = self.outputs.wants_sample()
        if (p is None or p.trivial) and not sample:
            self.outputs.row(None)
            return [self._pass_to_client(pkt)]
        if self.binary:
            values = m.parse_binary_row(pkt.payload, [c.type for c in self.columns])
            if p is not None and not p.trivial:
                values = mask_row(values, p, self.masker, self.unsigned)
                out_types = list(p.out_types)
                payload = m.binary_row(values, out_types)
            else:
                out_types, payload = [c.type for c in self.columns], None
            if sample:
                self.outputs.row([None if v is None else (
                    v if t not in m.FIXED_SIZE and t not in m.DATE_TYPES else
                    m.render_binary(v, t, u).encode())
                    for v, t, u in zip(values, out_types, self.unsigned)])
            else:
                self.outputs.row(None)
        else:
            values = m.parse_text_row(pkt.payload, len(self.columns))
            payload = None
            if p is not None and not p.trivial:
                values = mask_row(values, p, self.masker)
                payload = m.text_row(values)
            self.outputs.row(values if sample else None)
        return [self._to_client(payload) if payload is not None else self._pass_to_client(pkt)]

    def _end_result(self, pkt: Packet, status: int) -> list[Command]:
        rows = self.outputs.rows
        sid, out = self.outputs.complete(f"{rows} row{'s' if rows != 1 else ''} in set")
        if self.masker is not None and self.masker.counts:
            out["masked"] = dict(self.masker.counts)
            self.masker.counts.clear()
        self.plan = None
        cmds: list[Command] = [Record(OUTPUT, out, stop=sid), self._pass_to_client(pkt)]
        return self._after_result(cmds, status)

    def _after_result(self, cmds: list[Command], status: int) -> list[Command]:
        effect = self._effects.pop(self._result_index, None)
        self._result_index += 1
        if effect is not None:
            database, prepared, reads = effect
            if database:
                self.database = database
            if prepared:
                self.sql_prepared[prepared] = reads
        if status & m.MORE_RESULTS_EXISTS:
            self.step = "first"
            return cmds
        return self._done(cmds)

    def _ok(self, pkt: Packet) -> list[Command]:
        ok = m.parse_ok(pkt.payload)
        if self._to_utf8 and not ok.status & m.MORE_RESULTS_EXISTS:
            self.ascii_only = self._to_utf8 = False
        sid, out = self.outputs.complete(f"OK, {ok.affected} row"
                                         f"{'s' if ok.affected != 1 else ''} affected")
        out["rows_affected"] = ok.affected
        if ok.warnings:
            out["warnings"] = ok.warnings
        return self._after_result([Record(OUTPUT, out, stop=sid), self._pass_to_client(pkt)],
                                  ok.status)

    def _error(self, pkt: Packet) -> list[Command]:
        e = m.parse_err(pkt.payload)
        message = e.message
        reply = None
        if self.masker is not None:
            if self.reads.masked or self._last_read_masked:
                message = "agentgate: the error's text is withheld (the statement reads " \
                          "masked columns)"
            else:
                message = self.masker.scan(message)[0]
            if message != e.message:
                reply = m.err(e.code, e.state or "HY000", message)
        sid, out = self.outputs.error(e.state, message)
        out["summary"] = f"ERROR {e.code} ({e.state}): {message}"
        out["code"] = e.code
        cmds = [Record(OUTPUT, out, stop=sid),
                self._to_client(reply) if reply is not None else self._pass_to_client(pkt)]
        return self._done(cmds)

    def _swallowed(self, pkt: Packet) -> list[Command]:
        """The rest of an answer whose agent already got an error in its place."""
        p = pkt.payload
        if p[:1] == b"\xff":
            self._swallow = False
            return self._done([])
        if p[:1] in (b"\x00", b"\xfe") and len(p) < 0xFFFFFF and self.step == "first":
            status = m.parse_ok(p).status
            if not status & m.MORE_RESULTS_EXISTS:
                self._swallow = False
                return self._done([])
        return []

    # ------------------------------------------------------------------ prepared statements

    def _prepare_packet(self, pkt: Packet) -> list[Command]:
        """PREPARE_OK, then the parameters' definitions and the columns', each followed
        by an EOF unless DEPRECATE_EOF: the columns' are masked as an EXECUTE's are."""
        p = pkt.payload
        if self.step == "ok":
            if p[:1] == b"\xff":
                self._prepare = None
                return self._error(pkt)
            ok = m.parse_prepare_ok(p)
            stmt, self._prepare = self._prepare, None
            stmt.params = ok.params
            if len(self.stmts) >= 4096:
                raise ProtocolError("more than 4096 prepared statements open")
            self.stmts[ok.statement_id] = stmt
            eof = [] if self.caps & m.DEPRECATE_EOF else ["eof"]
            self._expect = (["param"] * ok.params + (eof if ok.params else [])
                            + ["column"] * ok.columns + (eof if ok.columns else []))
            self.columns, self._held, self.reads = [], [], stmt.reads
            self.step = "meta"
            sid, out = self.outputs.complete(f"prepared statement {ok.statement_id}")
            out.update(statement=ok.statement_id, params=ok.params)
            return self._prepare_more([Record(OUTPUT, out, stop=sid), self._pass_to_client(pkt)])
        what = self._expect.pop(0) if self._expect else None
        if what == "column":
            self.columns.append(m.parse_column(p))
            self._held.append(pkt)
            out = self._planned() if not self._expect or self._expect[0] != "column" else []
        elif what == "eof" and not m.is_eof(p) or what is None:
            raise ProtocolError("prepared statement metadata out of order")
        else:
            out = [self._pass_to_client(pkt)]
        return self._prepare_more(out)

    def _prepare_more(self, out: list[Command]) -> list[Command]:
        if self._expect:
            return out
        self.plan = None
        return self._done(out)

    # ------------------------------------------------------------------ LOAD DATA LOCAL

    def _local_infile(self, pkt: Packet) -> list[Command]:
        """The server asks the agent for a file: judged as the file it names (a server can
        ask for any file, whatever the statement said)."""
        name = m.local_infile_name(pkt.payload)
        req = Request(target=self.target, protocol="mysql", identity=self.identity,
                      text=f"LOAD DATA LOCAL INFILE {name!r}", action="LOCAL INFILE",
                      resources=(name,), attributes={
                          "databases": (self.database,), "paths": (name,),
                          "statements": frozenset({"LOAD"}), "flags": frozenset({"local_files"}),
                          "tables": (), "functions": ()},
                      unknown=("local_files",))
        d = self.decide(req)
        rec = Record("local_file", {"path": name, "decision": d.as_dict()})
        if d.action == "allow":
            self._infile = {"path": name, "sending": True, "bytes": 0}
            return [rec, self._pass_to_client(pkt)]
        # the server gets an empty file; the agent, an error in place of the result
        self.useq = (pkt.seq + pkt.chunks) & 0xFF
        self._swallow = True
        self.step = "first"
        return [rec, self._to_server(b""), self._to_client(m.err(
            1148, "42000", f'agentgate: LOAD DATA LOCAL of {name!r} refused by rule '
                           f'"{d.rule}": {d.reason}'))]

    def _infile_data(self, pkt: Packet) -> list[Command]:
        info = self._infile
        info["bytes"] += len(pkt.payload)
        self.useq = pkt.seq
        out = [self._to_server(pkt.payload)]
        if not pkt.payload:
            self._infile = None
            self.cseq = (pkt.seq + pkt.chunks) & 0xFF
            out.insert(0, Record("local_file", {"path": info["path"], "bytes": info["bytes"],
                                                "sent": True}))
        return out
