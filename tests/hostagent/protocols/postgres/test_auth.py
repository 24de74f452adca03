"""Upstream authentication with injected credentials, against a real PostgreSQL 15:
SCRAM-SHA-256, md5 and cleartext, driven through the sans-IO codec."""
import socket

import pytest

from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.auth import ScramSha256, md5_password
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
