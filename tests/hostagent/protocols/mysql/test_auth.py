"""MySQL/MariaDB authentication on both legs, sans-IO (hostagent/protocols/mysql/auth.py):

- the scrambles against known vectors and the servers' own checks;
- UpstreamAuth driven over a real socket against the fake MySQL 8 (caching_sha2_password
  fast and full paths, pinned and requested RSA keys, TLS) and a real MariaDB 10.11
  (mysql_native_password, client_ed25519);
- ClientAuth leading real clients (mysql.connector pure and C, PyMySQL, the mariadb CLI)
  to the OK, and the fake itself checked with those clients.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import mysql.connector
import pymysql
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from nacl import bindings, signing

from hostagent.protocols.api import ProtocolError
from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.auth import (AuthRefused, ClientAuth, UpstreamAuth,
                                            caching_sha2_scramble, ed25519_public,
                                            ed25519_sign, load_rsa_key, native_scramble,
                                            rsa_encrypt)
from hostagent.protocols.mysql.packets import frame
from tests.certs import CA
from tests.mysql_fake import FakeMySQL, command_reply
from tests.mysql_server import MariaDbServer
from tests.support import wait_for

APP_PW, ED_PW = "app-secret-pw", "ed-secret-pw"
VENDOR = Path(mysql.connector.__file__).parent.parent / "vendor"


# ---------------------------------------------------------------- vectors

def test_native_scramble_vector():
    # MariaDB stored this for IDENTIFIED BY 'app-secret-pw': "*" + SHA1(SHA1(pw))
    stored = bytes.fromhex("D24D00847F1E3FE6A5072CC110FCA2CACB864821")
    assert hashlib.sha1(hashlib.sha1(APP_PW.encode()).digest()).digest() == stored
    nonce = bytes(range(1, 21))
    got = native_scramble(APP_PW.encode(), nonce)
    stage1 = hashlib.sha1(APP_PW.encode()).digest()
    want = bytes(a ^ b for a, b in zip(stage1, hashlib.sha1(nonce + stored).digest()))
    assert got == want
    # the server's check: SHA1(scramble XOR SHA1(nonce + stored)) == stored
    back = bytes(a ^ b for a, b in zip(got, hashlib.sha1(nonce + stored).digest()))
    assert hashlib.sha1(back).digest() == stored
    assert native_scramble(b"", nonce) == b""
    assert got == pymysql._auth.scramble_native_password(APP_PW.encode(), nonce)


def test_caching_sha2_scramble_vector():
    pw, nonce = b"secret", b"abcdefghijklmnopqrst"
    p1 = hashlib.sha256(pw).digest()
    stored = hashlib.sha256(p1).digest()
    want = bytes(a ^ b for a, b in zip(p1, hashlib.sha256(stored + nonce).digest()))
    got = caching_sha2_scramble(pw, nonce + b"\0")   # a switch's trailing NUL is not nonce
    assert got == want
    assert got.hex() == pymysql._auth.scramble_caching_sha2(pw, nonce).hex()
    # MySQL's fast-path check: SHA256(scramble XOR SHA256(stored + nonce)) == stored
    back = bytes(a ^ b for a, b in zip(got, hashlib.sha256(stored + nonce).digest()))
    assert hashlib.sha256(back).digest() == stored
    assert caching_sha2_scramble(b"", nonce) == b""


RFC8032 = [  # (secret seed, public key, message, signature): RFC 8032 7.1, tests 1 and 2
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
]


@pytest.mark.parametrize("seed,public,msg,sig", RFC8032)
def test_ed25519_rfc8032(seed, public, msg, sig):
    # for a 32-byte password MariaDB's derivation is Ed25519's own from that seed
    assert ed25519_public(bytes.fromhex(seed)).hex() == public
    assert ed25519_sign(bytes.fromhex(seed), bytes.fromhex(msg)).hex() == sig


def test_ed25519_any_length_password_verifies():
    nonce = os.urandom(32)
    for pw in (b"", b"x", ED_PW.encode(), os.urandom(200)):
        sig = ed25519_sign(pw, nonce)
        # a standard verifier accepts it under the password's public key
        assert bindings.crypto_sign_open(sig + nonce, ed25519_public(pw)) == nonce
        assert sig == pymysql._auth.ed25519_password(pw, nonce)
    with pytest.raises(Exception):
        bindings.crypto_sign_open(ed25519_sign(b"other", nonce) + nonce,
                                  ed25519_public(ED_PW.encode()))
    assert signing.VerifyKey(ed25519_public(ED_PW.encode()))   # a valid point


def test_rsa_encrypt_roundtrip():
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    nonce = bytes(range(30, 50))
    cipher = rsa_encrypt(b"p" * 45, nonce, key.public_key())
    plain = key.decrypt(cipher, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert bytes(c ^ nonce[i % 20] for i, c in enumerate(plain)) == b"p" * 45 + b"\0"


# ---------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def mariadb():
    # the shared server: app (mysql_native_password), edu (ed25519); plus no password
    server = MariaDbServer().start()
    try:
        server.sql("CREATE USER nopw@'%'")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CA(tmp_path_factory.mktemp("pki"))
    cert, key = ca.issue("localhost", server=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    return ca, server_ctx


@pytest.fixture
def fake():
    with FakeMySQL({"app": APP_PW, "empty": ""}) as server:
        yield server


@pytest.fixture
def fake_tls(pki):
    with FakeMySQL({"app": APP_PW}, tls=pki[1]) as server:
        yield server


# ---------------------------------------------------------------- UpstreamAuth, driven

class Conn:
    """A blocking packet connection: sequence ids follow the last packet received. It
    reads no byte past a packet: after an SSLRequest come the TLS handshake's."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.seq = 0

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            data = self.sock.recv(n - len(buf))
            if not data:
                raise EOFError
            buf += data
        return buf

    def recv(self) -> bytes:
        head = self._exactly(4)
        assert int.from_bytes(head[:3], "little") < 0xFFFFFF   # nothing that big here
        self.seq = (head[3] + 1) & 0xFF
        return self._exactly(int.from_bytes(head[:3], "little"))

    def send(self, payload: bytes) -> None:
        data, self.seq = frame(payload, self.seq)
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def login(server, user: str, password: str, *, tls: ssl.SSLContext | None = None,
          verified: bool = False, **kw):
    """Greeting, HandshakeResponse, step() until OK (returns "ok") or ERR (returns the
    Err); a refusal propagates with the connection closed."""
    c = Conn(socket.create_connection((server.host, server.port), timeout=10))
    try:
        greeting = m.parse_greeting(c.recv())
        caps = greeting.capabilities & m.SUPPORTED & ~m.CONNECT_WITH_DB
        if tls is not None:
            assert greeting.capabilities & m.SSL
            c.send(m.handshake_response(m.HandshakeResponse(caps | m.SSL, 1 << 24, 45,
                                                            ssl_request=True)))
            c.sock = tls.wrap_socket(c.sock, server_hostname="localhost")
            caps |= m.SSL
        auth = UpstreamAuth(user, password, target="db1", tls=tls is not None,
                            verified=verified, **kw)
        plugin, data = auth.first(greeting)
        c.send(m.handshake_response(m.HandshakeResponse(caps, 1 << 24, 45, user, data,
                                                        plugin=plugin)))
        while True:
            payload = c.recv()
            if payload[0] == 0x00:
                c.seq = 0
                c.send(bytes((m.COM_QUIT,)))
                return "ok", auth
            if payload[0] == 0xFF:
                return m.parse_err(payload), auth
            reply = auth.step(payload)
            if reply is not None:
                c.send(reply)
    finally:
        c.close()


def _last(server):
    wait_for(lambda: server.logins and server.logins[-1].closed, timeout=10,
             what="the fake server's connection to end")
    return server.logins[-1]


def test_fake_full_path_with_pinned_key_then_fast(fake):
    result, auth = login(fake, "app", APP_PW, server_key=fake.public_pem)
    assert result == "ok"
    assert auth.summary() == {"method": "caching_sha2_password", "path": "rsa",
                              "switched": False, "server_key": "pinned"}
    done = _last(fake)
    assert (done.path, done.key_requested, done.ok) == ("full-rsa", False, True)
    assert done.commands == [bytes((m.COM_QUIT,))]
    # MySQL caches the account after a full login: the next one takes the fast path
    result, auth = login(fake, "app", APP_PW, server_key=fake.public_pem)
    assert result == "ok" and auth.summary()["path"] == "fast"
    assert _last(fake).path == "fast"
    # without a key: the fast path needs none
    assert login(fake, "app", APP_PW)[0] == "ok"


def test_fake_requested_key_refused(fake):
    with pytest.raises(AuthRefused) as e:
        login(fake, "app", APP_PW)
    msg = str(e.value)
    assert msg.startswith('target "db1": caching_sha2_password full authentication')
    assert "server_key" in msg and 'weak_password_auth = "allow"' in msg and "\n" not in msg
    done = _last(fake)
    assert not done.key_requested and not done.ok   # nothing sent after the 0x04


def test_fake_requested_key_allowed(fake):
    result, auth = login(fake, "app", APP_PW, weak_password_auth="allow")
    assert result == "ok"
    assert auth.summary()["server_key"] == "requested"
    assert _last(fake).key_requested


def test_fake_wrong_password_gets_the_servers_err(fake):
    result, _ = login(fake, "app", "not-it", server_key=fake.public_pem)
    assert (result.code, result.state) == (1045, "28000")
    assert result.message.startswith("Access denied for user 'app'@'127.0.0.1'")
    # a pinned key that is not the server's: it cannot read the password, login fails
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    from cryptography.hazmat.primitives import serialization
    pem = other.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo)
    assert login(fake, "app", APP_PW, server_key=pem)[0].code == 1045


def test_fake_empty_password(fake):
    result, auth = login(fake, "empty", "")
    assert result == "ok" and _last(fake).path == "empty"


def test_fake_full_path_over_tls(fake_tls, pki):
    ca, _ = pki
    client = ssl.create_default_context(cafile=str(ca.pem))
    with pytest.raises(AuthRefused, match="TLS that did not verify the server"):
        login(fake_tls, "app", APP_PW, tls=client, verified=False)
    result, auth = login(fake_tls, "app", APP_PW, tls=client, verified=True)
    assert result == "ok" and auth.summary()["path"] == "cleartext"
    assert _last(fake_tls).path == "full-tls"
    fake_tls.cached.clear()
    assert login(fake_tls, "app", APP_PW, tls=client, weak_password_auth="allow")[0] == "ok"


def test_mariadb_native_and_ed25519(mariadb):
    result, auth = login(mariadb, "app", APP_PW)
    assert result == "ok"
    assert auth.summary() == {"method": "mysql_native_password", "path": "scramble",
                              "switched": False}
    result, auth = login(mariadb, "edu", ED_PW)
    assert result == "ok"
    assert auth.summary() == {"method": "client_ed25519", "path": "scramble",
                              "switched": True}
    assert login(mariadb, "nopw", "")[0] == "ok"
    for user in ("app", "edu"):
        err = login(mariadb, user, "wrong")[0]
        assert (err.code, err.state) == (1045, "28000"), err


def test_ed25519_public_key_is_mariadbs(mariadb):
    stored = mariadb.sql("SELECT json_value(priv, '$.authentication_string') "
                         "FROM mysql.global_priv WHERE user = 'edu'").strip()
    assert base64.b64decode(stored + "=") == ed25519_public(ED_PW.encode())


# ---------------------------------------------------------------- UpstreamAuth, unit

def greeting(plugin: str = "caching_sha2_password") -> m.Greeting:
    return m.Greeting("8.0.36", 1, b"N" * 20, m.SUPPORTED, 45, 2, plugin)


def test_first_answers_only_challenge_response_plugins():
    for announced, used in [("mysql_native_password", "mysql_native_password"),
                            ("caching_sha2_password", "caching_sha2_password"),
                            ("sha256_password", "mysql_native_password"),
                            ("client_ed25519", "mysql_native_password"),
                            ("mysql_clear_password", "mysql_native_password"),
                            ("dialog", "mysql_native_password")]:
        auth = UpstreamAuth("u", "pw", target="t", tls=False, verified=False)
        plugin, data = auth.first(greeting(announced))
        assert plugin == used and len(data) in (20, 32)
    auth = UpstreamAuth("u", "", target="t", tls=False, verified=False)
    assert auth.first(greeting()) == ("caching_sha2_password", b"")


def _switched(plugin: str, data: bytes, **kw):
    kw.setdefault("tls", False)
    kw.setdefault("verified", False)
    auth = UpstreamAuth("u", "pw", target="t", **kw)
    auth.first(greeting("mysql_native_password"))
    return auth, auth.step(m.auth_switch(plugin, data))


def test_clear_password_only_to_a_verified_server():
    with pytest.raises(AuthRefused, match='^target "t": .*mysql_clear_password.*without TLS.*'
                                          'weak_password_auth = "allow"'):
        _switched("mysql_clear_password", b"")
    with pytest.raises(AuthRefused, match="TLS that did not verify"):
        _switched("mysql_clear_password", b"", tls=True)
    assert _switched("mysql_clear_password", b"", tls=True, verified=True)[1] == b"pw\0"
    assert _switched("mysql_clear_password", b"", weak_password_auth="allow")[1] == b"pw\0"


def test_sha256_password_paths():
    nonce = b"s" * 20
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    from cryptography.hazmat.primitives import serialization
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.PKCS1)

    def decrypt(cipher):
        plain = key.decrypt(cipher, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(),
                                                 None))
        return bytes(c ^ nonce[i % 20] for i, c in enumerate(plain))

    auth, out = _switched("sha256_password", nonce + b"\0", server_key=pem)
    assert decrypt(out) == b"pw\0" and auth.summary()["server_key"] == "pinned"
    with pytest.raises(AuthRefused, match="none is pinned"):
        _switched("sha256_password", nonce + b"\0")
    auth, out = _switched("sha256_password", nonce + b"\0", weak_password_auth="allow")
    assert out == b"\x01"   # sha256_password's key request
    assert decrypt(auth.step(b"\x01" + pem)) == b"pw\0"
    assert _switched("sha256_password", nonce + b"\0", tls=True, verified=True)[1] == b"pw\0"


def test_caching_sha2_after_a_switch_and_second_switch_refused():
    auth, out = _switched("caching_sha2_password", b"c" * 20 + b"\0", tls=True, verified=True)
    assert out == caching_sha2_scramble(b"pw", b"c" * 20)
    assert auth.step(b"\x01\x04") == b"pw\0"
    with pytest.raises(AuthRefused, match="a second time"):
        auth.step(m.auth_switch("mysql_native_password", b"n" * 20 + b"\0"))


def test_refusals_name_the_plugin():
    for plugin in ("dialog", "auth_gssapi_client", "sspi"):
        with pytest.raises(AuthRefused, match=f"plugin {plugin},"):
            _switched(plugin, b"x" * 20)
    auth = UpstreamAuth("u", "pw", target="t", tls=False, verified=False)
    auth.first(greeting())
    with pytest.raises(AuthRefused, match="mysql_old_password"):
        auth.step(b"\xfe")
    with pytest.raises(AuthRefused, match="server_key is not an RSA public key"):
        UpstreamAuth("u", "pw", target="t", tls=False, verified=False, server_key=b"junk")


@pytest.mark.parametrize("packets", [
    [b"\xfemysql_native_pass"],                   # switch without its NUL
    [b"\xfemysql_native_password\0short"],         # nonce too short
    [b"\xfeclient_ed25519\0" + b"e" * 20],         # ed25519 wants 32 bytes
    [b"\x01\x07"],                                 # unknown AuthMoreData
    [b"\x01"],                                     # AuthMoreData without data
    [b""],                                         # empty packet
    [b"\x05hello"],                                # neither switch nor more data
    [b"\x01\x03", b"\x01\x03"],                    # fast path twice
    [b"\x01\x04", b"\x01not a pem"],               # (allow) a key that does not parse
    [b"\xfemysql_native_password\0" + b"n" * 21, b"\x01\x04"],   # more data in native
])
def test_malformed_upstream_input(packets):
    auth = UpstreamAuth("u", "pw", target="t", tls=False, verified=False,
                        weak_password_auth="allow")
    auth.first(greeting())
    with pytest.raises((AuthRefused, ProtocolError)):
        for p in packets:
            auth.step(p)


def test_bounded_exchange():
    auth = UpstreamAuth("u", "pw", target="t", tls=False, verified=False)
    auth.first(greeting())
    auth.step(b"\x01\x03")
    with pytest.raises(AuthRefused):
        for _ in range(10):
            auth.step(b"\x01\x03")


# ---------------------------------------------------------------- ClientAuth

def test_client_auth_flows_unit():
    ca = ClientAuth(tls=False)
    assert len(ca.nonce) == 20 and b"\0" not in ca.nonce and ca.plugin == "mysql_native_password"
    assert ClientAuth(tls=False).response("mysql_native_password", b"x" * 20) == ([], True)
    assert ClientAuth(tls=False).response("", b"") == ([], True)
    assert ClientAuth(tls=False).response("caching_sha2_password", b"\0") == ([], True)
    assert ClientAuth(tls=False).response("caching_sha2_password", b"s" * 32) == (
        [b"\x01\x03"], True)
    # an empty first response may be a dummy one: the client gets its plugin's nonce
    for plugin in ("caching_sha2_password", "sha256_password"):
        ca = ClientAuth(tls=False)
        assert ca.response(plugin, b"") == ([m.auth_switch(plugin, ca.nonce + b"\0")], False)
        assert ca.response("", b"") == ([], True)   # an empty password after all
    ca = ClientAuth(tls=False)
    ca.response("caching_sha2_password", b"")
    assert ca.response("", b"s" * 32) == ([b"\x01\x03"], True)
    ca = ClientAuth(tls=False)
    out, done = ca.response("sha256_password", b"\x01")
    assert not done and load_rsa_key(out[0][1:]).key_size == 2048
    assert out[0][1:] == ClientAuth(tls=False).response("sha256_password", b"\x01")[0][0][1:]
    assert ca.response("", b"c" * 256) == ([], True)
    ca = ClientAuth(tls=True)
    assert ca.response("sha256_password", b"pw\0") == ([], True)
    ca = ClientAuth(tls=False)
    out, done = ca.response("client_ed25519", b"sig" * 20)
    assert out == [m.auth_switch("mysql_native_password", ca.nonce + b"\0")] and not done
    assert ca.response("", b"r" * 20) == ([], True)
    with pytest.raises(AuthRefused):
        ca.response("", b"more")


def test_client_auth_longest_flow_then_refuses_more():
    # sha256_password's dummy response, our switch, its key request, our key, its
    # ciphertext: three packets, the most any flow takes (the bound is 4)
    ca = ClientAuth(tls=False)
    assert ca.response("sha256_password", b"")[1] is False
    out, done = ca.response("", b"\x01")
    assert not done and out[0].startswith(b"\x01-----BEGIN PUBLIC KEY-----")
    assert ca.response("", b"c" * 256) == ([], True)
    with pytest.raises(AuthRefused):
        ca.response("", b"again")


def test_random_input_raises_only_refusals():
    rng = random.Random(1)
    prefixes = [b"\x01", b"\xfe", b"\xfecaching_sha2_password\0", b"\xfesha256_password\0",
                b"\xfeclient_ed25519\0", b"\x01\x04", b""]
    for i in range(600):
        auth = UpstreamAuth("u", "pw", target="t", tls=bool(i & 1), verified=bool(i & 2),
                            weak_password_auth="allow" if i & 4 else "refuse")
        auth.first(greeting(rng.choice(["caching_sha2_password", "mysql_native_password"])))
        ca = ClientAuth(tls=bool(i & 1))
        try:
            ca.response(rng.choice(["", "caching_sha2_password", "sha256_password", "x"]),
                        rng.randbytes(rng.randrange(4)))
            for _ in range(3):
                payload = rng.choice(prefixes) + rng.randbytes(rng.randrange(40))
                auth.step(payload)
                ca.response("", payload)
        except (AuthRefused, ProtocolError):
            pass


class ClientAuthServer:
    """Greets like the proxy (ClientAuth's plugin and nonce), leads the client through
    ClientAuth, sends OK when done, then answers commands as the fake does."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self.listener.getsockname()[1]
        self.sessions: list[dict] = []
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, sock):
        s = {"steps": [], "commands": [], "ok": False, "closed": False, "error": None}
        self.sessions.append(s)
        c = Conn(sock)
        sock.settimeout(20)
        try:
            ca = ClientAuth(tls=self.tls is not None)
            caps = m.SUPPORTED | (m.SSL if self.tls else 0)
            c.send(m.greeting(m.Greeting("8.0.36-proxy", 7, ca.nonce, caps, 45,
                                         m.STATUS_AUTOCOMMIT, ca.plugin)))
            resp = m.parse_handshake_response(c.recv())
            s["tls"] = resp.ssl_request
            if resp.ssl_request:
                c.sock = self.tls.wrap_socket(sock, server_side=True)
                resp = m.parse_handshake_response(c.recv())
            s["plugin"] = resp.plugin
            out, done = ca.response(resp.plugin, resp.auth)
            s["steps"].append((resp.auth, out))
            while True:
                for p in out:
                    c.send(p)
                if done:
                    break
                data = c.recv()
                out, done = ca.response("", data)
                s["steps"].append((data, out))
            c.send(m.ok())
            s["ok"] = True
            while True:
                payload = c.recv()
                s["commands"].append(payload)
                reply = command_reply(payload, caps & resp.capabilities)
                if reply is None:
                    break
                for p in reply:
                    c.send(p)
        except EOFError:
            pass
        except Exception as exc:   # shown by the test's assertion
            s["error"] = repr(exc)
        finally:
            s["closed"] = True
            c.sock.close()

    def done(self) -> dict:
        wait_for(lambda: self.sessions and self.sessions[-1]["closed"], timeout=20,
                 what="the client's session to end")
        return self.sessions[-1]

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
        self.listener.close()
        self.accepting.join(10)
        for t in self.threads:
            t.join(10)


@pytest.fixture
def proxy_server():
    server = ClientAuthServer()
    yield server
    server.close()


@pytest.fixture
def proxy_server_tls(pki):
    server = ClientAuthServer(tls=pki[1])
    yield server
    server.close()


def _connector(port: int, pure: bool, **kw) -> str:
    """mysql.connector, pure or its C extension. The C extension runs in a child: its
    libmysqlclient wants the OpenSSL 3.2+ bundled in mysql/vendor, and this process
    already loaded the system's 3.0 (same soname), so it needs LD_LIBRARY_PATH."""
    code = ("import json, sys, mysql.connector\n"
            "c = mysql.connector.connect(**json.loads(sys.argv[1]))\n"
            "cur = c.cursor(); cur.execute('SELECT 1')\n"
            "print(type(c).__name__, cur.fetchall()); c.ping(); c.close()\n")
    args = dict(host="127.0.0.1", port=port, user=kw.pop("user", "agent"),
                password=kw.pop("password", "whatever"), use_pure=pure,
                connection_timeout=10, **kw)
    args.setdefault("ssl_disabled", True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(VENDOR)}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    cls, rows = p.stdout.strip().split(" ", 1)
    assert cls == ("MySQLConnection" if pure else "CMySQLConnection")
    return rows


@pytest.mark.parametrize("pure,kw,plugin,steps", [
    (True, {}, "mysql_native_password", 1),
    # insists on caching_sha2_password: answers the native greeting's nonce with it
    (True, {"auth_plugin": "caching_sha2_password"}, "caching_sha2_password", 1),
    # libmysqlclient 9 follows the greeting's plugin (with an explicit auth_plugin the
    # C extension refuses a leg without TLS before connecting: see the TLS test)
    (False, {}, "mysql_native_password", 1),
], ids=["pure", "pure-caching_sha2", "cext"])
def test_client_auth_mysql_connector(proxy_server, pure, kw, plugin, steps):
    assert _connector(proxy_server.port, pure, **kw) == "[(1,)]"
    s = proxy_server.done()
    assert s["error"] is None and s["ok"] and s["plugin"] == plugin
    assert len(s["steps"]) == steps, s["steps"]
    if plugin == "caching_sha2_password":
        assert s["steps"][-1][1] == [b"\x01\x03"]
    assert bytes((m.COM_QUERY,)) + b"SELECT 1" in s["commands"]


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "cext"])
@pytest.mark.parametrize("plugin", ["sha256_password", "caching_sha2_password"])
def test_client_auth_mysql_connector_tls(proxy_server_tls, pki, pure, plugin):
    # mysql.connector speaks sha256_password only over TLS: the password in cleartext
    assert _connector(proxy_server_tls.port, pure, auth_plugin=plugin, ssl_disabled=False,
                      ssl_ca=str(pki[0].pem)) == "[(1,)]"
    s = proxy_server_tls.done()
    assert s["error"] is None and s["ok"] and s["tls"] and s["plugin"] == plugin


def test_client_auth_pymysql(proxy_server):
    c = pymysql.connect(host=proxy_server.host, port=proxy_server.port, user="agent",
                        password="whatever", connect_timeout=10)
    with c.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchall() == ((1,),)
    c.close()
    s = proxy_server.done()
    assert s["error"] is None and s["plugin"] == "mysql_native_password"


@pytest.mark.parametrize("plugin,steps", [
    ("", 1), ("mysql_native_password", 1),
    # Connector/C sends a dummy empty response for a plugin other than the greeting's
    ("caching_sha2_password", 2),   # switched to itself, with our nonce
    ("sha256_password", 3),         # the same, then it asks for our RSA key
    ("client_ed25519", 2),          # switched to mysql_native_password
])
def test_client_auth_mariadb_cli(proxy_server, plugin, steps):
    args = ["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(proxy_server.port),
            "-u", "agent", "-pwhatever", "--skip-ssl", "-N", "-B", "-e", "select 1"]
    if plugin:
        args.insert(2, f"--default-auth={plugin}")
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    s = proxy_server.done()
    assert p.returncode == 0, (p.stderr, s)
    assert p.stdout.strip() == "1"
    assert s["error"] is None and s["plugin"] == (plugin or "mysql_native_password")
    assert len(s["steps"]) == steps


# ---------------------------------------------------------------- the fake, with real clients

def _pymysql_select(server, password=APP_PW, **kw):
    c = pymysql.connect(host=server.host, port=server.port, user="app", password=password,
                        connect_timeout=10, **kw)
    with c.cursor() as cur:
        cur.execute("SELECT 1")
        rows = cur.fetchall()
    c.ping()
    c.close()
    return rows


def test_fake_with_pymysql(fake):
    assert _pymysql_select(fake) == ((1,),)
    assert (_last(fake).path, _last(fake).key_requested) == ("full-rsa", True)
    assert _pymysql_select(fake) == ((1,),)
    assert _last(fake).path == "fast"
    fake.cached.clear()
    with pytest.raises(pymysql.err.OperationalError) as e:
        _pymysql_select(fake, password="wrong")
    assert e.value.args[0] == 1045


def test_fake_tls_with_pymysql(fake_tls, pki):
    assert _pymysql_select(fake_tls, ssl={"ca": str(pki[0].pem)}) == ((1,),)
    assert (_last(fake_tls).tls, _last(fake_tls).path) == (True, "full-tls")
    assert _pymysql_select(fake_tls, ssl={"ca": str(pki[0].pem)}) == ((1,),)
    assert _last(fake_tls).path == "fast"


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "cext"])
def test_fake_tls_with_mysql_connector(fake_tls, pki, pure):
    # the full path needs TLS for both: pure Python sends the password in cleartext
    # whatever the leg, the C extension cannot be told to fetch the server's key
    for path in ("full-tls", "fast"):
        assert _connector(fake_tls.port, pure, user="app", password=APP_PW,
                          ssl_disabled=False, ssl_ca=str(pki[0].pem)) == "[(1,)]"
        assert (_last(fake_tls).path, _last(fake_tls).tls) == (path, True)


def test_fake_without_tls_mysql_connector_pure_full_path_denied(fake):
    # as with a real MySQL 8: over plain TCP it sends the password in cleartext, which
    # the server reads as an RSA ciphertext that does not decrypt
    with pytest.raises(mysql.connector.errors.ProgrammingError, match="1045"):
        mysql.connector.connect(host=fake.host, port=fake.port, user="app", password=APP_PW,
                                use_pure=True, ssl_disabled=True, connection_timeout=10)
    assert _last(fake).path == "full-rsa" and not _last(fake).ok
