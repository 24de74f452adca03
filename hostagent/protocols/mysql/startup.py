"""The MySQL layer's start-up: the server's greeting read, TLS asked of it per the
target's mode, the agent greeted with the server's version, the capabilities both legs
can share, the proxy's nonce and a stand-in thread id; then each leg's login (auth.py),
the agent's OK sent only once the server's came. COM_CHANGE_USER logs in again the same
way, with the injected credentials. A mixin of MysqlLayer: it never awaits."""
from __future__ import annotations

import secrets

from hostagent.protocols.api import (CLIENT, Close, Command, ProtocolError, Record, StartClientTls,
                                     StartUpstreamTls, TlsEstablished)
from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.auth import AuthRefused, ClientAuth, UpstreamAuth
from hostagent.protocols.mysql.classify import PARSING_MODES, SAFE_CHARSETS
from hostagent.protocols.mysql.packets import Packet
from hostagent.protocols.standins import Owned, new_stand_in

# Collations of the client character sets whose multibyte characters can end in a byte
# that reads as `\` or a quote (big5, sjis, gbk, cp932, gb18030 and their nopad
# variants): the server would split a statement where the judge (UTF-8) sees one string.
ASCII_CHARSETS = frozenset({
    "latin1", "latin2", "latin5", "latin7", "ascii", "cp1250", "cp1251", "cp1256", "cp1257",
    "cp850", "cp852", "cp866", "koi8r", "koi8u", "greek", "hebrew", "armscii8", "geostd8",
    "keybcs2", "macce", "macroman", "swe7", "tis620", "dec8", "hp8"})
PROBE = b"SELECT @@SESSION.sql_mode, @@SESSION.character_set_client"
UNSAFE_COLLATIONS = frozenset({1, 84, 1025, 1108, 13, 88, 1037, 1112, 28, 87, 1052, 1111,
                               95, 96, 1119, 1120, 248, 249, 250})


class Startup:
    # ------------------------------------------------------------------ start-up

    def _greet(self, pkt: Packet) -> list[Command]:
        g = self.greeting = m.parse_greeting(pkt.payload)
        if not g.capabilities & m.REQUIRED == m.REQUIRED:
            return self._refuse(f"agentgate: the server of target {self.target!r} speaks a "
                                f"protocol older than 4.1", 1043, "08S01")
        self.useq = (pkt.seq + pkt.chunks) & 0xFF
        out: list[Command] = []
        # TLS is asked of the server once the agent's capabilities are known: the server
        # takes them from the SSL request (a leg whose formats differ would misread)
        self._up_tls = self.tls != "disable" and bool(g.capabilities & m.SSL)
        if not self._up_tls and self.tls in ("require", "verify-full"):
            return self._refuse(
                f"agentgate: upstream TLS failed ({self.tls}): the server does not offer TLS; "
                f'for a server without TLS set tls = "disable" on target "{self.target}"',
                1043, "08S01")
        self.up_phase = "pending"
        self.client_auth = ClientAuth(tls=False)
        self.stand_in = new_stand_in(self.thread_ids, lambda: secrets.randbelow((1 << 31) - 2) + 1)
        self.thread_ids[self.stand_in] = Owned(g.thread_id, uid=self.identity.get("uid"),
                                               layer=self)
        caps = (g.capabilities & m.SUPPORTED) | m.REQUIRED | m.PLUGIN_AUTH
        caps = caps | m.SSL if self.client_tls else caps & ~m.SSL
        self.phase = "hello"
        self.cseq = 0
        out.append(self._to_client(m.greeting(m.Greeting(
            g.version, self.stand_in, self.client_auth.nonce, caps, g.charset,
            m.STATUS_AUTOCOMMIT, ClientAuth.plugin))))
        return out

    def _tls_up(self, event: TlsEstablished) -> list[Command]:
        rec = Record("tls", {"side": event.side, "version": event.version,
                             **({"sni": event.sni} if event.sni else {})})
        if event.side == CLIENT:
            self.client_tls_on = self.client_auth.tls = True
            return [rec]
        self.up_tls, self.up_verified = True, self.tls == "verify-full"
        self.up_auth.tls, self.up_auth.verified = True, self.up_verified   # for its later steps
        rec.fields["verified"] = self.up_verified
        self.up_phase = "ready"
        waiting, self._waiting = self._waiting, []
        return [rec] + waiting

    def _hello(self, pkt: Packet) -> list[Command]:
        r = m.parse_handshake_response(pkt.payload)
        self.cseq = (pkt.seq + pkt.chunks) & 0xFF
        if r.ssl_request:
            if not self.client_tls or self.client_tls_on:
                raise ProtocolError("TLS asked for where it was not offered")
            return [StartClientTls(self.client_names)]
        g = self.greeting
        if r.charset in UNSAFE_COLLATIONS:
            return self._refuse(f"agentgate: character set {r.charset} is refused: statements "
                                f"are judged as UTF-8", 1115, "42000")
        self.caps = (r.capabilities & m.SUPPORTED & g.capabilities) | m.REQUIRED
        use = self._database_refused(r.database)
        if use and type(use[-1]) is Close:
            return use
        self.database = r.database or ""
        self.phase = "auth"
        self.up_auth = UpstreamAuth(self.user, self.password, target=self.target,
                                    tls=self.up_tls, verified=self.up_verified,
                                    weak_password_auth=self.weak_password_auth,
                                    server_key=self.server_key)
        out: list[Command] = [Record("startup", {
            "user": r.user, "database": self.database, "upstream_user": self.user,
            "credentials": "injected", "client_tls": self.client_tls_on,
            "plugin": r.plugin, "server_version": g.version,
            "program": r.attrs.get("program_name", r.attrs.get("_client_name", ""))})] + use
        try:
            to_client, done = self.client_auth.response(r.plugin, r.auth)
            plugin, auth = self.up_auth.first(g)
        except AuthRefused as exc:
            return out + self._refuse(f"agentgate: {exc}")
        out += [self._to_client(p) for p in to_client]
        self._auth_state = {"client": done, "upstream": None}
        caps = self.caps | (g.capabilities & m.PLUGIN_AUTH_LENENC_CLIENT_DATA) | m.PLUGIN_AUTH
        caps = caps | m.CONNECT_WITH_DB if self.database else caps & ~m.CONNECT_WITH_DB
        if not g.capabilities & m.CONNECT_ATTRS:
            caps &= ~m.CONNECT_ATTRS
        self.useq = 1
        if self._up_tls:
            caps |= m.SSL
            out += [self._to_server(m.handshake_response(m.HandshakeResponse(
                        caps, 1 << 30, r.charset, ssl_request=True))),
                    StartUpstreamTls(self.server_name, verify=self.tls == "verify-full",
                                     ca=self.ca)]
            self.up_phase = "tls"
        response = self._to_server(m.handshake_response(m.HandshakeResponse(
            caps, 1 << 30, r.charset, self.user, auth, self.database or None, plugin,
            {**r.attrs, "_proxy": "agentgate"} if caps & m.CONNECT_ATTRS else {})))
        if not self._up_tls:
            self.up_phase = "ready"
            return out + [response]
        self._waiting.append(response)   # sent once the handshake is done
        return out

    def _client_auth(self, pkt: Packet) -> list[Command]:
        self.cseq = (pkt.seq + pkt.chunks) & 0xFF
        if self._auth_state["client"]:
            raise ProtocolError("authentication data after the agent's login was done")
        try:
            to_client, done = self.client_auth.response("", pkt.payload)
        except AuthRefused as exc:
            return self._refuse(f"agentgate: {exc}")
        self._auth_state["client"] = done
        return [self._to_client(p) for p in to_client] + self._auth_done()

    def _upstream_auth(self, pkt: Packet) -> list[Command]:
        self.useq = (pkt.seq + pkt.chunks) & 0xFF
        first = pkt.payload[:1]
        if first == b"\x00":
            self._auth_state["upstream"] = pkt.payload
            return [Record("auth", self.up_auth.summary())] + self._auth_done()
        if first == b"\xff":
            e = m.parse_err(pkt.payload)
            return self._refuse(f"agentgate: the server of target {self.target!r} refused "
                                f"the injected credentials: {e.message}", e.code,
                                e.state or "28000")
        try:
            reply = self.up_auth.step(pkt.payload)
        except AuthRefused as exc:
            return self._refuse(f"agentgate: {exc}")
        return [self._to_server(reply)] if reply is not None else []

    def _database_refused(self, db: str | None) -> list[Command]:
        """The database a login (or COM_CHANGE_USER) names is judged as USE would be; a
        login can't wait for an approval, so review refuses it too (USE can be held)."""
        if not db:
            return []
        verdict, records = self.enforcer.judge([self._use_request(db)])
        if verdict.action == "allow":
            return records
        return records + self._refuse(
            f'agentgate: database {db!r} refused by rule "{verdict.rule}": {verdict.reason}'
            + (" (connect without a database, then USE it: that can be held for approval)"
               if verdict.action == "review" else ""), 1044, "42000")

    def _auth_done(self) -> list[Command]:
        """Both legs logged in: before the agent's OK, the session's settings are read
        from the server (PROBE): a mode or character set under which the server would
        read statements otherwise than the judge (a server's or a user's default) ends
        the session."""
        ok = self._auth_state["upstream"]
        if not self._auth_state["client"] or ok is None:
            return []
        self.phase = "probe"
        self._probe: list[bytes] = []
        self._ok_status = m.parse_ok(ok).status
        self.useq = 0
        return [self._to_server(bytes((m.COM_QUERY,)) + PROBE)]

    def _probed(self, pkt: Packet) -> list[Command]:
        p = pkt.payload
        if p[:1] == b"\xff":
            e = m.parse_err(p)
            return self._refuse(f"agentgate: the session's settings could not be read: "
                                f"{e.message}", 1045, "28000")
        self._probe.append(p)
        # column count, 2 definitions, [EOF], the row, its end
        if len(self._probe) < (5 if self.caps & m.DEPRECATE_EOF else 6):
            return []
        mode, charset = (v.decode("utf-8", "replace").upper() if v is not None else ""
                         for v in m.parse_text_row(self._probe[-2], 2))
        hazard = next((f for f in mode.split(",") if f in PARSING_MODES), None)
        charset = charset.lower()
        # a single-byte character set that agrees with ASCII (libmysqlclient logs in with
        # latin1, then sets utf8mb4): statements must then be ASCII until it is UTF-8
        self.ascii_only = self._login_ascii_only = charset not in SAFE_CHARSETS
        if hazard or self.ascii_only and charset not in ASCII_CHARSETS:
            why = f"sql_mode {hazard}" if hazard else f"character set {charset.lower()}"
            return self._refuse(f"agentgate: the session's {why} would make the server read "
                                f"statements otherwise than they are judged", 1231, "42000")
        self.phase = "ready"
        waiting = self._change_user_done() if self.answer == "change_user" else []
        self.answer = None
        return [self._to_client(m.ok(self._ok_status))] + waiting

    # ------------------------------------------------------------------ change user

    def _change_user(self, pkt: Packet) -> list[Command]:
        cu = m.parse_change_user(pkt.payload, self.caps)
        use = self._database_refused(cu.database)
        if use and type(use[-1]) is Close:
            return use
        self.stmts.clear()
        self.sql_prepared.clear()
        self.phase = "auth"
        self.answer = "change_user"
        self._new_db = cu.database
        self.client_auth = ClientAuth(tls=self.client_tls_on)
        self.up_auth = UpstreamAuth(self.user, self.password, target=self.target,
                                    tls=self.up_tls, verified=self.up_verified,
                                    weak_password_auth=self.weak_password_auth,
                                    server_key=self.server_key)
        try:
            to_client, done = self.client_auth.response(cu.plugin, cu.auth)
            plugin, auth = self.up_auth.first(self.greeting)
        except AuthRefused as exc:
            return self._refuse(f"agentgate: {exc}")
        self._auth_state = {"client": done, "upstream": None}
        self.useq = 0
        return [Record("startup", {"user": cu.user, "database": cu.database,
                                   "upstream_user": self.user, "credentials": "injected",
                                   "change_user": True})] + use + \
            [self._to_client(p) for p in to_client] + \
            [self._to_server(m.change_user(m.ChangeUser(self.user, auth, cu.database,
                                                       cu.charset, plugin, {}), self.caps))]

    def _change_user_done(self) -> list[Command]:
        self.database = self._new_db
        return []

