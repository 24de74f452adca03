"""Upstream authentication with injected credentials, against a real PostgreSQL 15:
SCRAM-SHA-256, md5 and cleartext, driven through the sans-IO codec."""
import base64
import hashlib
import hmac
import os
import socket
import ssl
import subprocess

import pytest

from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.auth import (MAX_ITERATIONS, AuthRefused, ScramSha256,
                                               UpstreamAuth, md5_password,
                                               tls_server_end_point)
from tests.pg import PgServer


@pytest.fixture(scope="module")
def pg():
    server = PgServer().start()
    yield server
    server.stop()


class Conn:
    def __init__(self, pg):
        self.sock = socket.create_connection((pg.host, pg.port), timeout=10)
        self.reader = m.FrameReader()
        self.pending = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self) -> tuple[bytes, bytes]:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.pending += self.reader.receive_data(data)
        return self.pending.pop(0)

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            frame = self.next()
            out.append(frame)
            if frame[0] == b"Z":
                return out


def login(pg, user: str, password: str, database: str = "postgres", scram_cls=ScramSha256):
    c = Conn(pg)
    c.send(m.startup_message({"user": user, "database": database}))
    scram = None
    while True:
        kind, body = c.next()
        if kind == b"E":
            return c, m.parse_fields(body)
        assert kind == b"R", kind
        code, data = m.parse_authentication(body)
        if code == m.AUTH_OK:
            break
        if code == m.AUTH_SASL:
            assert "SCRAM-SHA-256" in m.sasl_mechanisms(data)
            scram = scram_cls(password)
            c.send(m.sasl_initial_response(scram.mechanism, scram.client_first()))
        elif code == m.AUTH_SASL_CONTINUE:
            c.send(m.sasl_response(scram.client_final(data)))
        elif code == m.AUTH_SASL_FINAL:
            scram.verify_server_final(data)
        elif code == m.AUTH_MD5:
            c.send(m.password_message(md5_password(user, password, data)))
        elif code == m.AUTH_CLEARTEXT:
            c.send(m.password_message(password))
    frames = c.until_ready()
    kinds = [k for k, _ in frames]
    assert b"K" in kinds and b"S" in kinds and kinds[-1] == b"Z"
    return c, None


@pytest.mark.parametrize("user,password", [("app", "app-secret-pw"),
                                           ("legacy", "legacy-secret-pw"),
                                           ("plain", "plain-secret-pw")])
def test_each_method_logs_in_and_queries(pg, user, password):
    c, err = login(pg, user, password)
    assert err is None
    c.send(m.frame(b"Q", b"SELECT current_user, 1 + 1\0"))
    frames = c.until_ready()
    cols = m.parse_row_description(frames[0][1])
    assert [col.name for col in cols] == ["current_user", "?column?"]
    assert m.parse_data_row(frames[1][1]) == [user.encode(), b"2"]
    assert frames[2][0] == b"C" and frames[-1] == (b"Z", b"I")


def test_a_wrong_password_is_refused_by_the_server(pg):
    _, err = login(pg, "app", "not-the-password")
    assert err["C"] == "28P01"


def test_a_server_that_does_not_know_the_password_is_caught(pg):
    scram = ScramSha256("app-secret-pw")
    scram.client_final(b"r=" + scram.nonce.encode() + b"xyz,s=c2FsdA==,i=4096")
    with pytest.raises(ProtocolError, match="not the real server"):
        scram.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(ProtocolError, match="does not extend"):
        ScramSha256("pw").client_final(b"r=someone-elses-nonce,s=c2FsdA==,i=4096")


def test_errors_keep_the_session_usable(pg):
    c, _ = login(pg, "app", "app-secret-pw", "shop")
    c.send(m.frame(b"Q", b"SELECT * FROM no_such_table\0"))
    frames = c.until_ready()
    assert m.parse_fields(frames[0][1])["C"] == "42P01"
    c.send(m.frame(b"Q", b"SELECT 1\0"))
    assert m.parse_data_row(c.until_ready()[1][1]) == [b"1"]


# ---------------------------------------------------------------- the credential goes
# only to the real server: channel binding, the server's proof, weak methods


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ScramServer:
    """The server's side of SCRAM-SHA-256(-PLUS), written from RFC 5802/5929 as a test
    oracle (and for fake upstreams): it checks the client's proof and channel binding
    against `cert_der` (the certificate *it* presented), as PostgreSQL does."""

    def __init__(self, password: str, cert_der: bytes | None = None, iterations: int = 4096):
        self.salt = os.urandom(16)
        self.iterations = iterations
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, iterations)
        self.stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.cert_der = cert_der
        self.mechanism = ""
        self.gs2 = ""

    def first(self, initial_response: bytes) -> bytes:
        """From the body of a SASLInitialResponse message: the server-first message."""
        mech, _, rest = initial_response.partition(b"\0")
        self.mechanism = mech.decode()
        message = rest[4:].decode()
        flag, authzid, bare = message.split(",", 2)
        self.gs2 = f"{flag},{authzid},"
        self.bare = bare
        nonce = dict(p.split("=", 1) for p in bare.split(","))["r"]
        self.server_first = f"r={nonce}server-part,s={_b64(self.salt)},i={self.iterations}"
        return self.server_first.encode()

    def final(self, response: bytes) -> bytes:
        """From the body of the client's final SASLResponse: the server-final message,
        or AssertionError naming what did not check."""
        text = response.decode()
        without_proof, _, proof = text.rpartition(",p=")
        attrs = dict(p.split("=", 1) for p in without_proof.split(","))
        binding = b""
        if self.gs2.startswith("p=tls-server-end-point"):
            binding = tls_server_end_point(self.cert_der)
        assert attrs["c"] == _b64(self.gs2.encode() + binding), "channel binding check failed"
        auth_message = f"{self.bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(self.stored_key, auth_message, "sha256")
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))
        assert hashlib.sha256(client_key).digest() == self.stored_key, "wrong proof"
        return ("v=" + _b64(hmac.digest(self.server_key, auth_message, "sha256"))).encode()


def self_signed(tmp_path, digest: str, key: str = "rsa:2048") -> bytes:
    """A certificate signed with `digest` (openssl: cryptography won't sign with SHA-1)."""
    pem, keyfile = tmp_path / f"{digest}.pem", tmp_path / f"{digest}.key"
    args = ["openssl", "req", "-x509", "-newkey", key, "-nodes", "-subj", "/CN=db",
            "-days", "1", "-keyout", str(keyfile), "-out", str(pem)]
    if digest:
        args.insert(3, f"-{digest}")
    subprocess.run(args, check=True, capture_output=True)
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_tls_server_end_point_hashes_the_certificate_with_its_signature_hash(tmp_path):
    sha1 = self_signed(tmp_path, "sha1")
    assert tls_server_end_point(sha1) == hashlib.sha256(sha1).digest()    # RFC 5929 4.1
    sha384 = self_signed(tmp_path, "sha384")
    assert tls_server_end_point(sha384) == hashlib.sha384(sha384).digest()
    sha512 = self_signed(tmp_path, "sha512", "ec:" + str(_ec_params(tmp_path)))
    assert tls_server_end_point(sha512) == hashlib.sha512(sha512).digest()
    ed25519 = self_signed(tmp_path, "", "ed25519")
    with pytest.raises(AuthRefused, match="without a hash algorithm"):
        tls_server_end_point(ed25519)
    with pytest.raises(AuthRefused, match="cannot read"):
        tls_server_end_point(b"not a certificate")


def _ec_params(tmp_path):
    path = tmp_path / "ec.param"
    subprocess.run(["openssl", "ecparam", "-name", "secp384r1", "-out", str(path)], check=True,
                   capture_output=True)
    return path


def test_the_gs2_header_says_what_the_client_can_bind_to():
    plain = ScramSha256("pw")
    assert plain.client_first().startswith(b"n,,n=,r=") and plain.mechanism == "SCRAM-SHA-256"
    downgraded = ScramSha256("pw", client_supports_binding=True)
    assert downgraded.client_first().startswith(b"y,,")
    bound = ScramSha256("pw", binding=("tls-server-end-point", b"\1" * 32))
    assert bound.mechanism == "SCRAM-SHA-256-PLUS"
    assert bound.client_first().startswith(b"p=tls-server-end-point,,n=,r=")
    final = bound.client_final(b"r=" + bound.nonce.encode() + b"x,s=c2FsdA==,i=4096")
    cbind = final.split(b",")[0][2:]
    assert base64.b64decode(cbind) == b"p=tls-server-end-point,," + b"\1" * 32
    assert plain.client_final(b"r=" + plain.nonce.encode() + b"x,s=c2FsdA==,i=4096") \
        .startswith(b"c=biws,")                                   # base64("n,,")


@pytest.fixture(scope="module")
def pg_tls():
    server = PgServer(tls=True).start()
    yield server
    server.stop()


def tls_conn(pg) -> tuple[Conn, bytes]:
    """A connection to `pg` over TLS verified with its CA; the server's certificate."""
    c = Conn(pg)
    c.send(m.untyped(m._I32.pack(m.SSL_REQUEST)))
    assert c.sock.recv(1) == b"S"
    ctx = ssl.create_default_context(cafile=str(pg.ca.pem))
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    return c, c.sock.getpeercert(binary_form=True)


def login_through(c: Conn, auth: UpstreamAuth, user: str, offered: list | None = None):
    """Drive UpstreamAuth against a real server; returns its error fields, or None."""
    c.send(m.startup_message({"user": user, "database": "postgres"}))
    while True:
        kind, body = c.next()
        if kind == b"E":
            return m.parse_fields(body)
        code, data = m.parse_authentication(body)
        if offered is not None and code == m.AUTH_SASL:
            offered.extend(m.sasl_mechanisms(data))
        if code == m.AUTH_OK:
            auth.authenticated()
            c.until_ready()
            return None
        reply = auth.answer(code, data, user)
        if reply is not None:
            c.send(reply)


def test_scram_sha_256_plus_against_postgresql_over_tls(pg_tls):
    c, cert = tls_conn(pg_tls)
    auth = UpstreamAuth("app-secret-pw", tls="verify-full")
    auth.tls_up(cert, verified=True)
    offered: list = []
    assert login_through(c, auth, "app", offered) is None
    assert "SCRAM-SHA-256-PLUS" in offered                  # PostgreSQL offers it over TLS
    assert auth.summary() == {"method": "SCRAM-SHA-256-PLUS",
                              "channel_binding": "tls-server-end-point",
                              "server_verified": "certificate, scram+channel binding"}
    # tls = "require": the same, channel binding being what shows it is the real server
    c, cert = tls_conn(pg_tls)
    auth = UpstreamAuth("app-secret-pw", tls="require")
    auth.tls_up(cert, verified=False)
    assert login_through(c, auth, "app") is None and auth.channel_binding


def test_postgresql_checks_the_binding_we_send(pg_tls):
    """The binding is real: a certificate other than the one this TLS ended at (what a
    man in the middle's TLS gives us) fails the server's check, and 'y' (our PLUS
    stripped from its list) fails its downgrade check."""
    c, cert = tls_conn(pg_tls)
    auth = UpstreamAuth("app-secret-pw", tls="require")
    auth.tls_up(cert[:-1] + bytes([cert[-1] ^ 1]), verified=False)   # another certificate
    err = login_through(c, auth, "app")
    assert err is not None and "channel binding check failed" in err["M"], err
    c, _ = tls_conn(pg_tls)
    scram = ScramSha256("app-secret-pw", client_supports_binding=True)
    c.send(m.startup_message({"user": "app", "database": "postgres"}))
    kind, body = c.next()
    assert m.parse_authentication(body)[0] == m.AUTH_SASL
    c.send(m.sasl_initial_response(scram.mechanism, scram.client_first()))
    kind, body = c.next()
    assert kind == b"E" and "channel binding negotiation error" in m.parse_fields(body)["M"]


@pytest.mark.parametrize("user,password,method", [("legacy", "legacy-secret-pw", "md5"),
                                                  ("plain", "plain-secret-pw", "cleartext")])
def test_weak_methods_go_to_a_verified_server_and_nowhere_else(pg, pg_tls, user, password,
                                                               method):
    c, cert = tls_conn(pg_tls)
    auth = UpstreamAuth(password, tls="verify-full")
    auth.tls_up(cert, verified=True)
    assert login_through(c, auth, user) is None and auth.method == method
    for tls in ("disable", "prefer", "require"):   # not verified: refused, nothing sent
        c = Conn(pg)
        auth = UpstreamAuth(password, target="orders-db", tls=tls)
        with pytest.raises(AuthRefused, match=f'a {method} password over a connection '
                           f'without TLS .tls = "{tls}".*weak_password_auth = "allow"'):
            login_through(c, auth, user)
    c = Conn(pg)
    assert login_through(c, UpstreamAuth(password, tls="disable",
                                         weak_password_auth="allow"), user) is None


def test_a_server_asking_for_too_many_pbkdf2_rounds_is_refused():
    # PBKDF2 runs on the proxy's loop: millions of rounds would stall every session
    scram = ScramSha256("pw")
    first = f"r={scram.nonce}xyz,s={_b64(b'salt')},i={MAX_ITERATIONS + 1}".encode()
    with pytest.raises(ProtocolError, match="out of range"):
        scram.client_final(first)
    ok = f"r={scram.nonce}xyz,s={_b64(b'salt')},i=4096".encode()
    assert ScramSha256("pw", scram.nonce).client_final(ok) == scram.client_final(ok)
