"""The injected credential goes only to the real server (principle 9), end to end through
the real proxy: the driver and the PostgreSQL layer, from a config read by the config
loader, behind a plain listener on loopback; psql and psycopg as the agent.

Men in the middle are played by fake upstreams (asyncio servers on 127.0.0.1): one that
declines TLS and asks for a cleartext or md5 password, one that answers AuthenticationOk
without the server's final SCRAM message, one that signs it wrongly, and one that
terminates TLS with its own certificate and relays to the real server (channel binding
must fail). The real thing is PostgreSQL 15 with TLS: SCRAM-SHA-256-PLUS, verify-full
with a private CA, the default configuration."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import struct
import subprocess
import threading

import pytest
import uvloop

from hostagent.protocols import registry
from hostagent.protocols.postgres import messages as m
from hostagent.proxy.driver import Proxy
from hostagent.proxy.targets import Targets, build_targets
from hostagent.recording.spool import Spool
from tests.certs import CA
from tests.hostagent.protocols.postgres.test_auth import ScramServer
from tests.hostagent.proxy.test_driver import events
from tests.pg import PgServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real PostgreSQL runs as postgres")
PASSWORD = "app-secret-pw"
SSL_REQUEST = m.untyped(m._I32.pack(m.SSL_REQUEST))


# ---------------------------------------------------------------- a loop on a thread

class Loop:
    """An event loop (uvloop, as the host agent runs) on its own thread: the proxy and
    the fake servers live there, the test's clients (psql, psycopg) block here."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        async def settle():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(settle())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.stop()


class Gate:
    """The host agent's proxy for one postgres target at `port`, configured by `options`
    (TOML lines) through the config loader, behind a plain listener."""

    def __init__(self, loop: Loop, tmp_path, port: int, options: str = "",
                 user: str = "app", password: str = PASSWORD):
        from hostagent.config import load_config
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.loop, self.tmp = loop, tmp_path
        secret = tmp_path / "pg-password"
        secret.write_text(password + "\n")
        cfg = tmp_path / "hostagent.toml"
        cfg.write_text(f'''state_dir = "{tmp_path}/state"
[[targets]]
name = "orders-db"
protocol = "postgres"
address = "127.0.0.1:{port}"
user = "{user}"
password_file = "{secret}"
{options}
''')
        (target,) = build_targets(load_config(str(cfg))).targets
        self.layers: list = []

        def layer(ctx):
            made = target.spec.layer(ctx)
            self.layers.append(made)
            return made
        self.target = dataclasses.replace(
            target, spec=dataclasses.replace(target.spec, layer=layer))
        self.port = loop.run(self._start())

    async def _start(self) -> int:
        self.spool = Spool(self.tmp / "spool")
        self.proxy = Proxy(lookup=lambda h, p: None, identify=lambda r: {}, spool=self.spool,
                           host="test", targets=Targets([self.target]),
                           raw=registry.get("tcp"))
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        await self.proxy.listen_plain(self.target, sock)
        return sock.getsockname()[1]

    def psql(self, *sql: str, database: str = "shop") -> subprocess.CompletedProcess:
        args = ["psql", "-X", "-A", "-t", f"host=127.0.0.1 port={self.port} user=agent "
                f"dbname={database} sslmode=disable connect_timeout=10"]
        for s in sql:
            args += ["-c", s]
        return subprocess.run(args, capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ["PATH"]})

    def close(self) -> list[tuple[str, dict]]:
        """Every event recorded, once the sessions have ended."""
        async def stop():
            await self.proxy.close()
            self.spool.close()
        self.loop.run(stop())
        return events(self.spool)

    def end_reasons(self) -> list[str]:
        return [f["reason"] for k, f in self.close() if k == "session_end"]


# ---------------------------------------------------------------- fake upstreams

class Fake:
    """A server on 127.0.0.1:0 played by `script(fake, reader, writer)`; `got` is every
    byte the proxy sent it after its StartupMessage."""

    def __init__(self, loop: Loop, script, **kw):
        self.script, self.kw = script, kw
        self.got = bytearray()
        self.startups: list[bytes] = []
        self.loop = loop
        self.port = loop.run(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        try:
            await self.script(self, reader, writer, **self.kw)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def startup(self, reader, writer, tls_answer: bytes = b"N") -> None:
        """SSLRequest answered with `tls_answer` ('N': plaintext), then the StartupMessage."""
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        body = await reader.readexactly(length - 4)
        if body == SSL_REQUEST[4:]:
            writer.write(tls_answer)
            await writer.drain()
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
        self.startups.append(body)

    async def message(self, reader) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(reader.readexactly(5), 10)
        body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
        self.got += head + body
        return head[:1], body

    async def rest(self, reader) -> None:
        """Whatever else the proxy sends, until it hangs up."""
        while data := await asyncio.wait_for(reader.read(65536), 10):
            self.got += data

    def close(self):
        async def stop():
            self.server.close()
        self.loop.run(stop())


def server_welcome() -> bytes:
    return (m.frame(b"S", b"server_version\x0015.0\0") + m.frame(b"K", b"\0\0\0\1\0\0\0\2")
            + m.ready_for_query())


async def asks_for_a_password(fake, reader, writer, code: int):
    await fake.startup(reader, writer)
    writer.write(m.authentication(code, b"salt" if code == m.AUTH_MD5 else b""))
    await writer.drain()
    await fake.rest(reader)


async def scram_without_proof(fake, reader, writer, signature: bytes | None = None):
    """SCRAM up to the client's proof, then AuthenticationOk: without the server's final
    message, or (with `signature`) with a wrong one. It doesn't know the password."""
    await fake.startup(reader, writer)
    server = ScramServer("not-the-password")
    writer.write(m.authentication(m.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    await writer.drain()
    _, initial = await fake.message(reader)
    writer.write(m.authentication(m.AUTH_SASL_CONTINUE, server.first(initial)))
    await writer.drain()
    await fake.message(reader)                  # the client's proof: useless to us
    final = b"" if signature is None else m.authentication(m.AUTH_SASL_FINAL,
                                                           b"v=" + signature)
    writer.write(final + m.authentication(m.AUTH_OK) + server_welcome())
    await writer.drain()
    await fake.rest(reader)


# ---------------------------------------------------------------- the fakes' tests

@pytest.mark.parametrize("code,kind", [(m.AUTH_CLEARTEXT, "cleartext"), (m.AUTH_MD5, "md5")])
def test_a_man_in_the_middle_declining_tls_gets_no_password(loop, tmp_path, code, kind):
    fake = Fake(loop, asks_for_a_password, code=code)
    try:
        # the default (verify-full): a server without TLS gets nothing but the SSLRequest
        gate = Gate(loop, tmp_path / "default", fake.port)
        p = gate.psql("SELECT 1")
        assert p.returncode != 0
        why = ('agentgate: upstream TLS failed (verify-full): the server does not offer TLS; '
               'for a server without TLS set tls = "disable" on target "orders-db"')
        assert f"FATAL:  {why}" in p.stderr, p.stderr
        assert gate.end_reasons() == [why]
        assert not fake.startups and not fake.got
        # prefer (libpq's default): it goes on in the clear, and the password is refused
        for options in ('tls = "prefer"', 'tls = "disable"'):
            gate = Gate(loop, tmp_path / options[7:-1], fake.port, options)
            p = gate.psql("SELECT 1")
            assert p.returncode != 0
            assert f"asked for a {kind} password over a connection without TLS" in p.stderr
            assert 'weak_password_auth = "allow"' in p.stderr, p.stderr
            (reason,) = gate.end_reasons()
            assert reason in p.stderr and "weak_password_auth" in reason
        assert len(fake.startups) == 2
        assert bytes(fake.got) == b""          # no PasswordMessage, no md5 answer, nothing
    finally:
        fake.close()


def test_the_fake_would_have_got_the_password_had_the_target_opted_in(loop, tmp_path):
    """The control for the test above: with the explicit opt-in, it does."""
    fake = Fake(loop, asks_for_a_password, code=m.AUTH_CLEARTEXT)
    try:
        gate = Gate(loop, tmp_path, fake.port, 'tls = "disable"\nweak_password_auth = "allow"')
        gate.psql("SELECT 1")
        gate.close()
        assert bytes(fake.got) == m.password_message(PASSWORD)
    finally:
        fake.close()


@pytest.mark.parametrize("signature,why", [
    (None, "accepted the login without proving it knows the password (its final SCRAM "
           "message never came): not the real server"),
    (b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
     "the server's SCRAM signature is wrong: not the real server"),
])
def test_authentication_ok_without_the_servers_proof_ends_the_session(loop, tmp_path,
                                                                      signature, why):
    fake = Fake(loop, scram_without_proof, signature=signature)
    try:
        gate = Gate(loop, tmp_path, fake.port, 'tls = "disable"')
        p = gate.psql("SELECT 'reached the man in the middle'")
        assert p.returncode != 0 and why in p.stderr, p.stderr
        assert "FATAL" in p.stderr and "reached" not in p.stdout
        (reason,) = gate.end_reasons()
        assert why in reason
        assert PASSWORD.encode() not in fake.got
        assert b"reached" not in fake.got      # not one statement went its way
    finally:
        fake.close()


# ---------------------------------------------------------------- real PostgreSQL with TLS

@pytest.fixture(scope="module")
def pg_tls():
    server = PgServer(tls=True).start()
    server.sql("CREATE TABLE orders (id int PRIMARY KEY, item text); "
               "INSERT INTO orders VALUES (1, 'book'), (2, 'pen'); "
               "ALTER TABLE orders OWNER TO app", db="shop")
    yield server
    server.stop()


def test_verify_full_with_a_private_ca_uses_scram_sha_256_plus(loop, tmp_path, pg_tls):
    # the defaults but for the CA: tls = "verify-full", the name from `address`
    gate = Gate(loop, tmp_path, pg_tls.port, f'ca = "{pg_tls.ca.pem}"')
    p = gate.psql("SELECT current_user, ssl, count(*) FROM pg_stat_ssl, orders "
                  "WHERE pid = pg_backend_pid() GROUP BY 1, 2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "app|t|2"
    script = tmp_path / "agent.py"
    script.write_text(f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={gate.port}, dbname="shop", user="agent",
                     sslmode="disable", connect_timeout=10) as conn:
    print(conn.execute("SELECT item FROM orders WHERE id = %s", (2,)).fetchone()[0])
''')
    py = subprocess.run([str(_venv_python()), str(script)], capture_output=True, text=True,
                        timeout=60)
    assert py.returncode == 0 and py.stdout.strip() == "pen", py.stderr
    for layer in gate.layers:
        assert layer.upstream_auth.summary() == {
            "method": "SCRAM-SHA-256-PLUS", "channel_binding": "tls-server-end-point",
            "server_verified": "certificate, scram+channel binding"}
    recorded = gate.close()
    tls = [f for k, f in recorded if k == "tls"]
    assert tls and all(f["side"] == "upstream" and f["verified"] for f in tls)


def _venv_python():
    from tests.support import BIN
    return BIN / "python"


@pytest.mark.parametrize("user,method", [("legacy", "md5"), ("plain", "cleartext")])
def test_md5_and_cleartext_go_to_a_server_verify_full_verified(loop, tmp_path, pg_tls,
                                                               user, method):
    gate = Gate(loop, tmp_path, pg_tls.port, f'ca = "{pg_tls.ca.pem}"', user=user,
                password=f"{user}-secret-pw")
    p = gate.psql("SELECT current_user")
    assert p.returncode == 0 and p.stdout.strip() == user, p.stderr
    assert gate.layers[0].upstream_auth.method == method
    gate.close()


def test_the_default_refuses_a_server_without_tls_naming_the_opt_out(loop, tmp_path):
    pg = PgServer().start()
    try:
        gate = Gate(loop, tmp_path, pg.port)
        p = gate.psql("SELECT 1", database="postgres")
        assert p.returncode != 0 and 'set tls = "disable" on target "orders-db"' in p.stderr
        gate.close()
        gate = Gate(loop, tmp_path / "optout", pg.port, 'tls = "disable"')
        p = gate.psql("SELECT current_user", database="postgres")
        assert p.returncode == 0 and p.stdout.strip() == "app", p.stderr
        assert gate.layers[0].upstream_auth.summary()["method"] == "SCRAM-SHA-256"
        gate.close()
    finally:
        pg.stop()


# ---------------------------------------------------------------- a relay with its own TLS

async def relay(fake, reader, writer, pg, cert, key, strip_plus=False, server_tls=True):
    """A man in the middle: TLS towards the proxy with its own certificate, the bytes
    relayed to the real server (over TLS, or not), PLUS struck from its list if asked."""
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    assert await reader.readexactly(length - 4) == SSL_REQUEST[4:]
    writer.write(b"S")
    await writer.drain()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    await writer.start_tls(ctx)
    fake.startups.append(b"tls")
    up_r, up_w = await asyncio.open_connection(pg.host, pg.port)
    if server_tls:
        up_w.write(SSL_REQUEST)
        await up_w.drain()
        assert await up_r.readexactly(1) == b"S"
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        await up_w.start_tls(client, server_hostname="localhost")

    async def to_server():
        while data := await reader.read(65536):
            fake.got += data
            up_w.write(data)
            await up_w.drain()
        up_w.close()

    async def to_proxy():
        frames = m.FrameReader()
        while data := await up_r.read(65536):
            out = b""
            for kind, body in frames.receive_data(data):
                if strip_plus and kind == b"R" and body[:4] == struct.pack("!i", m.AUTH_SASL):
                    body = struct.pack("!i", m.AUTH_SASL) + b"SCRAM-SHA-256\0\0"
                out += m.frame(kind, body)
            writer.write(out)
            await writer.drain()
        writer.close()

    try:
        await asyncio.gather(to_server(), to_proxy())
    finally:
        up_w.close()


@pytest.fixture
def mitm_cert(tmp_path):
    return CA(tmp_path / "mitm", "mitm-ca").issue("localhost", server=True)


@pytest.mark.parametrize("tls,strip_plus,server_tls,why", [
    # verify-full: the relay's certificate is not the server's: TLS fails, nothing sent
    ("verify-full", False, True, "upstream TLS failed (verify-full): unable to get local "
                                 "issuer certificate"),
    # require: PLUS binds to the relay's certificate; the real server's check fails
    ("require", False, True, "SCRAM channel binding check failed"),
    # require, PLUS struck out: no channel binding, no credentials
    ("require", True, True, 'tls = "require" does not verify the server\'s certificate'),
    # prefer, PLUS struck out: y,, tells the real server (over its TLS) of the downgrade
    ("prefer", True, True, "channel binding negotiation error"),
])
def test_a_relay_that_terminates_tls_with_its_own_certificate_fails(
        loop, tmp_path, pg_tls, mitm_cert, tls, strip_plus, server_tls, why):
    fake = Fake(loop, relay, pg=pg_tls, cert=mitm_cert[0], key=mitm_cert[1],
                strip_plus=strip_plus, server_tls=server_tls)
    try:
        gate = Gate(loop, tmp_path, fake.port, f'tls = "{tls}"\nca = "{pg_tls.ca.pem}"')
        p = gate.psql("SELECT 'the relay owns this session'")
        assert p.returncode != 0 and why in p.stderr, p.stderr
        assert "owns" not in p.stdout
        (reason,) = gate.end_reasons()
        # ours name why; the server's own refusal reaches the client as it sent it
        assert why in reason or reason == "upstream refused the session", reason
        assert PASSWORD.encode() not in fake.got
        assert b"owns" not in fake.got
    finally:
        fake.close()


def test_prefer_does_not_stop_a_relay_that_reaches_the_server_without_tls(
        loop, tmp_path, pg_tls, mitm_cert):
    """What an explicit opt-out means: with tls = "prefer", a relay that strips PLUS and
    talks to the server in the clear gets the session (never the password: SCRAM). The
    default (verify-full) and require refuse it (above)."""
    fake = Fake(loop, relay, pg=pg_tls, cert=mitm_cert[0], key=mitm_cert[1],
                strip_plus=True, server_tls=False)
    try:
        gate = Gate(loop, tmp_path, fake.port, 'tls = "prefer"')
        p = gate.psql("SELECT 'relayed'")
        assert p.returncode == 0 and p.stdout.strip() == "relayed", p.stderr
        assert PASSWORD.encode() not in fake.got and b"relayed" in fake.got
        gate.close()
    finally:
        fake.close()


# ---------------------------------------------------------------- the configuration

def test_the_defaults_protect_the_credential_and_the_opt_ins_are_spelled_out(tmp_path):
    from agentgate.tomlconfig import ConfigError
    from hostagent.config import load_config
    cfg = tmp_path / "hostagent.toml"
    base = '[[targets]]\nname = "db"\nprotocol = "postgres"\naddress = "db.internal:5432"\n'
    cfg.write_text(base)
    (t,) = load_config(str(cfg)).targets
    assert t.options.tls == "verify-full" and t.options.weak_password_auth == "refuse"
    cfg.write_text(base + 'weak_password_auth = "yes"\n')
    with pytest.raises(ConfigError, match="'weak_password_auth' must be refuse or allow"):
        load_config(str(cfg))
    help_text = {o.name: o.help for o in registry.get("postgres").options}
    assert "verify-full (default)" in help_text["tls"]
    assert "allow" in help_text["weak_password_auth"]
