"""A small MySQL 8-style server for tests: caching_sha2_password as MySQL 8.0 speaks it
(sql/auth/sha2_password.cc), then just enough commands for a client to connect, run
`SELECT 1`, ping and quit.

- The greeting announces caching_sha2_password with a 20-byte nonce; a client that
  answers with another plugin is switched to it (the same nonce, NUL-terminated).
- Fast path: the account is in the cache (a flag per user; set by a successful full
  authentication, as MySQL's cache is) and the scramble matches -> 0x01 0x03, OK.
  Otherwise (not cached, unknown user, wrong scramble) -> 0x01 0x04, full path.
- Full path over TLS: the password and a NUL in cleartext. Without TLS: 0x02 asks for
  the server's RSA key (sent as 0x01 + PEM), then the password XOR nonce, RSA-OAEP
  (SHA-1); anything else that does not decrypt is a failed login, as in MySQL.
- A failed login is ERR 1045 (28000) "Access denied for user 'u'@'host' (using
  password: YES)".
- TLS (optional): pass an ssl.SSLContext; the greeting then offers CLIENT_SSL.

The event loop runs in a thread of its own: start() returns once the port is bound.
"""
from __future__ import annotations

import asyncio
import hmac
import ssl
import threading
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.auth import caching_sha2_scramble, new_nonce
from hostagent.protocols.mysql.packets import MAX_CHUNK, frame, lenenc

PLUGIN = "caching_sha2_password"
UTF8MB4_0900_AI_CI = 255
# MySQL 8's capabilities, less compression and the options that change the protocol
# for every command (query attributes, optional metadata)
CAPS = m.SUPPORTED | m.IGNORE_SPACE | m.CAN_HANDLE_EXPIRED_PASSWORDS
_KEY: rsa.RSAPrivateKey | None = None


def _server_key() -> rsa.RSAPrivateKey:
    global _KEY   # one per test process: generating 2048 bits is not free
    if _KEY is None:
        _KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEY


@dataclass
class Login:
    """What one connection did, for tests to assert on."""
    user: str = ""
    client_plugin: str = ""
    tls: bool = False
    path: str = ""            # fast / full-tls / full-rsa / empty
    key_requested: bool = False
    ok: bool = False
    commands: list[bytes] = field(default_factory=list)   # command payloads after login
    closed: bool = False


def command_reply(payload: bytes, caps: int) -> list[bytes] | None:
    """The reply to one command after login; None: close the connection (COM_QUIT)."""
    cmd = payload[:1]
    if cmd == bytes((m.COM_QUIT,)):
        return None
    if cmd in (bytes((m.COM_PING,)), bytes((m.COM_INIT_DB,)), bytes((m.COM_RESET_CONNECTION,))):
        return [m.ok()]
    if cmd == bytes((m.COM_QUERY,)):
        sql = payload[1:].decode("utf-8", "replace").strip().rstrip(";").strip()
        if sql.lower() == "select 1":
            return select_one(caps)
        if sql.lower().startswith("select @@session.sql_mode, @@session.character_set_client"):
            return settings(caps)   # what the proxy asks at login
        if sql.lower().split(" ", 1)[0] in ("set", "use", "commit", "rollback", "begin"):
            return [m.ok()]
        return [m.err(1064, "42000", f"the fake server answers SELECT 1 only, not {sql[:60]!r}")]
    return [m.err(1047, "08S01", "Unknown command")]


def select_one(caps: int) -> list[bytes]:
    """`SELECT 1` as MySQL 8 answers it: one BIGINT NOT NULL column named "1"."""
    col = m.Column(schema="", table="", org_table="", name="1", org_name="",
                   charset=m.BINARY_CHARSET, length=1, type=m.T_LONGLONG,
                   flags=1 | m.BINARY_FLAG | m.NUM_FLAG, decimals=0)
    out = [lenenc(1), m.column(col)]
    if not caps & m.DEPRECATE_EOF:
        out.append(m.eof(m.STATUS_AUTOCOMMIT))
    out.append(m.text_row([b"1"]))
    out.append(m.ok(header=0xFE) if caps & m.DEPRECATE_EOF else m.eof(m.STATUS_AUTOCOMMIT))
    return out


def settings(caps: int) -> list[bytes]:
    """The session's sql_mode and client character set, as MySQL 8's defaults."""
    cols = [m.Column("", "", "", name, "", 255, 1024, m.T_VAR_STRING, 0, 0x1f)
            for name in ("@@SESSION.sql_mode", "@@SESSION.character_set_client")]
    out = [lenenc(2)] + [m.column(c) for c in cols]
    if not caps & m.DEPRECATE_EOF:
        out.append(m.eof(m.STATUS_AUTOCOMMIT))
    out.append(m.text_row([b"ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,"
                           b"NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION",
                           b"utf8mb4"]))
    out.append(m.ok(header=0xFE) if caps & m.DEPRECATE_EOF else m.eof(m.STATUS_AUTOCOMMIT))
    return out


class _Conn:
    def __init__(self, server: "FakeMySQL", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        self.seq = 0
        self.login = Login()
        self.tls: ssl.SSLObject | None = None
        self.plain = bytearray()

    # TLS runs through an SSLObject over the plain stream rather than start_tls: the
    # client sends its ClientHello right after the SSLRequest, and the stream may have
    # read it already, where start_tls would never see it.
    async def _read(self, n: int) -> bytes:
        if self.tls is None:
            try:
                return await self.reader.readexactly(n)
            except asyncio.IncompleteReadError:
                raise EOFError from None
        while len(self.plain) < n:
            chunk = await self._tls_call(self.tls.read, 65536)
            if not chunk:
                raise EOFError
            self.plain += chunk
        out, self.plain = bytes(self.plain[:n]), self.plain[n:]
        return out

    async def _tls_call(self, fn, *args):
        """fn on the SSLObject, feeding it what the client sends until it has enough."""
        while True:
            try:
                result = fn(*args)
                await self._flush()
                return result
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.reader.read(65536)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
            except ssl.SSLZeroReturnError:
                return b""

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        await self._tls_call(self.tls.do_handshake)

    async def recv(self) -> bytes:
        parts = []
        while True:
            head = await self._read(4)
            n = int.from_bytes(head[:3], "little")
            parts.append(await self._read(n))
            self.seq = (head[3] + 1) & 0xFF
            if n < MAX_CHUNK:
                return b"".join(parts)

    async def send(self, *payloads: bytes) -> None:
        for payload in payloads:
            data, self.seq = frame(payload, self.seq)
            if self.tls is None:
                self.writer.write(data)
            else:
                self.tls.write(data)
        if self.tls is None:
            await self.writer.drain()
        else:
            await self._flush()

    async def run(self) -> None:
        s = self.server
        s.logins.append(self.login)
        try:
            caps = await self._login()
            if caps is None:
                return
            while True:
                payload = await self.recv()
                self.login.commands.append(payload)
                reply = command_reply(payload, caps)
                if reply is None:
                    return
                await self.send(*reply)
        except (EOFError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.login.closed = True
            self.writer.close()

    async def _login(self) -> int | None:
        s = self.server
        nonce = new_nonce()
        caps = CAPS | (m.SSL if s.tls else 0)
        s.thread_ids += 1
        await self.send(m.greeting(m.Greeting("8.0.36-fake", s.thread_ids, nonce, caps,
                                              UTF8MB4_0900_AI_CI, m.STATUS_AUTOCOMMIT, PLUGIN)))
        resp = m.parse_handshake_response(await self.recv())
        if resp.ssl_request:
            if not s.tls:
                return None
            await self.start_tls(s.tls)
            self.login.tls = True
            resp = m.parse_handshake_response(await self.recv())
        caps &= resp.capabilities
        user, self.login.user = resp.user, resp.user
        self.login.client_plugin = resp.plugin
        scramble = resp.auth
        if resp.plugin != PLUGIN:
            await self.send(m.auth_switch(PLUGIN, nonce + b"\0"))
            scramble = await self.recv()
        password = s.users.get(user)
        if scramble in (b"", b"\0"):
            self.login.path = "empty"
            return await self._result(password == "", caps, using=False)
        if password is not None and user in s.cached and hmac.compare_digest(
                scramble, caching_sha2_scramble(password.encode(), nonce)):
            self.login.path = "fast"
            await self.send(b"\x01\x03")
            return await self._result(True, caps)
        await self.send(b"\x01\x04")
        sent = await self.recv()
        if self.login.tls:
            self.login.path = "full-tls"
            given = sent[:-1] if sent.endswith(b"\0") else None
        else:
            self.login.path = "full-rsa"
            if sent == b"\x02":
                self.login.key_requested = True
                await self.send(b"\x01" + s.public_pem)
                sent = await self.recv()
            given = self._decrypt(sent, nonce)
        good = password is not None and given is not None and hmac.compare_digest(
            given, password.encode())
        if good:
            s.cached.add(user)
        return await self._result(good, caps)

    def _decrypt(self, cipher: bytes, nonce: bytes) -> bytes | None:
        try:
            plain = _server_key().decrypt(cipher, padding.OAEP(
                mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
        except ValueError:
            return None
        plain = bytes(c ^ nonce[i % 20] for i, c in enumerate(plain))
        return plain[:-1] if plain.endswith(b"\0") else None

    async def _result(self, good: bool, caps: int, using: bool = True) -> int | None:
        self.login.ok = good
        if good:
            await self.send(m.ok())
            return caps
        host = self.writer.get_extra_info("peername")[0]
        await self.send(m.err(1045, "28000", f"Access denied for user '{self.login.user}'@"
                              f"'{host}' (using password: {'YES' if using else 'NO'})"))
        return None


class FakeMySQL:
    """users: name -> password; `cached`: the users whose next login takes the fast
    path; `logins`: one Login per connection, in order."""

    def __init__(self, users: dict[str, str] | None = None,
                 tls: ssl.SSLContext | None = None):
        self.users = dict(users if users is not None else {"app": "app-secret-pw"})
        self.tls = tls
        self.cached: set[str] = set()
        self.logins: list[Login] = []
        self.thread_ids = 0
        self.host = "127.0.0.1"
        self.port = 0
        self.public_pem = _server_key().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-mysql")
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> "FakeMySQL":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await _Conn(self, reader, writer).run()
        finally:
            self._tasks.discard(task)

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._thread.is_alive():
            if self._server is not None:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "FakeMySQL":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
