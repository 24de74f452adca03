"""The PostgreSQL layer on its own, through the contract (hostagent/protocols/api.py):
scripts of events in and commands out, and any bytes from a client end in a
ProtocolError at worst (the driver closes that session only), never another exception."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.policy import Policy, Rule, decide
from hostagent.protocols import (Aborted, ApprovalDecided, Close, DataReceived, Hold,
                                 HoldPending, ProtocolError, Record, Start, StartClientTls,
                                 StartUpstreamTls, TlsEstablished, TlsFailed, ToClient,
                                 ToUpstream)
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.layer import PostgresLayer
from tests.hostagent.protocols.playbook import (CLIENT, UPSTREAM, Match, Playbook, feed,
                                                record, sends, to_client, to_upstream)

SERVER = ("10.1.2.3", 5432)


def new_layer(policy: Policy | None = None, **kw) -> PostgresLayer:
    """A layer whose server leg is connected (plaintext unless `tls` says otherwise)."""
    policy = policy or Policy()
    layer = PostgresLayer(decide=lambda r: decide(policy, r), target="t", **kw)
    layer.handle(Start(SERVER))
    return layer


def ready_layer(policy: Policy | None = None, startup: dict | None = None,
                **kw) -> PostgresLayer:
    """A layer past start-up (injected credentials, the server's AuthenticationOk,
    BackendKeyData and ReadyForQuery), deciding by `policy`."""
    layer = new_layer(policy, user="app", password="pw", **kw)
    feed(layer, CLIENT, m.startup_message(startup or {"user": "x", "database": "d"}))
    feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.frame(b"K", b"\0\0\0\1\0\0\0\2")
         + m.ready_for_query())
    return layer


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(b"QPBDESHFXCdcfp"), st.binary(max_size=60)),
                max_size=6))
def test_malformed_client_messages_raise_only_protocol_errors(msgs):
    layer = ready_layer()
    data = b"".join(m.frame(bytes([k]), body) for k, body in msgs)
    try:
        feed(layer, CLIENT, data)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_truncated_or_garbage_startup_raises_only_protocol_errors(data):
    layer = new_layer()
    try:
        feed(layer, CLIENT, data)
    except ProtocolError:
        pass


def test_the_agent_gets_a_stand_in_backend_key():
    layer = ready_layer()
    (fake, real), = layer.cancel_keys.items()
    assert real == (1, 2) and fake != real
    layer.close()
    assert layer.cancel_keys == {}


def test_a_held_statement_keeps_the_pipeline_behind_it_in_order():
    policy = Policy(rules=(Rule(name="r", action="review", matchers=(("statements", ("DELETE",)),)),))
    parse = m.frame(b"P", b"\0DELETE FROM t WHERE id = 1\0\0\0")
    rest = m.frame(b"B", b"\0\0\0\0\0\0\0\0") + m.frame(b"E", b"\0\0\0\0\0") + m.frame(b"S")
    notice = sends(ToClient, lambda b: b.startswith(b"N") and b"held for approval ap-1" in b,
                   "a NoticeResponse naming the approval")
    assert (Playbook(ready_layer(policy))
            >> DataReceived(CLIENT, parse + rest)
            << record("command", text="DELETE FROM t WHERE id = 1", protocol="extended",
                      decision={"action": "review", "rule": "r", "reason": ""})
            << Hold(1, "DELETE FROM t WHERE id = 1", "r", "")
            >> HoldPending(1, "ap-1", "12:00:00")
            << notice
            >> ApprovalDecided(1, True, "ok")
            << ToUpstream(parse)                      # the statement, then the rest, in order
            << record("bind", statement="", portal="")
            << ToUpstream(m.frame(b"B", b"\0\0\0\0\0\0\0\0"))
            << ToUpstream(m.frame(b"E", b"\0\0\0\0\0"), (1,))
            << ToUpstream(m.frame(b"S")))
    denied = ready_layer(policy)
    (hold,) = [a for a in feed(denied, CLIENT, parse + rest) if isinstance(a, Hold)]
    sent = to_upstream(denied.handle(ApprovalDecided(hold.key, False, "no")))
    assert b"DELETE" not in sent and b"agentgate_denied_" in sent and sent.endswith(rest)
    # a decision for a key that is not held changes nothing
    assert denied.handle(ApprovalDecided(99, True, "")) == []


def test_an_aborted_session_gets_a_fatal_error_and_closes():
    layer = ready_layer()
    (close,) = layer.handle(Aborted("idle for 5 s: session closed"))
    assert isinstance(close, Close) and close.final.startswith(b"E")
    assert b"FATAL" in close.final and b"idle for 5 s" in close.final
    assert layer.cancel_keys == {}                 # its cancel key went with it


def test_detectors():
    from hostagent.masking import MaskRule, Masker
    every = Masker((MaskRule("all", detectors=("email", "credit_card", "us_ssn", "phone",
                                                "aws_access_key", "jwt", "pem_private_key",
                                                "bearer_token")),))
    text = ("a@b.io 4111-1111-1111-1111 4111 1111 1111 1112 078-05-1120 +1 415 555 0100 "
            "AKIAABCDEFGHIJKLMNOP eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl "
            "Authorization: Bearer abcdefghijklmnopqrstu "
            "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----")
    masked, hits = every.scan(text)
    assert "4111 1111 1111 1112" in masked          # fails the Luhn check: kept
    for secret in ("a@b.io", "4111-1111-1111-1111", "078-05-1120", "415 555 0100",
                   "AKIAABCDEFGHIJKLMNOP", "eyJhbGciOi", "abcdefghijklmnopqrstu", "MIIB"):
        assert secret not in masked, secret
    assert hits == 8


def masked_layer():
    from hostagent.masking import MaskRule, Masker
    return ready_layer(startup={"user": "x", "options": "-c search_path=evil"},
                       masker=Masker((MaskRule("pii", columns=("ssn",)),)))


def test_masking_follows_extended_cycles_one_after_another():
    layer = masked_layer()
    col = m.Column("ssn", 1234, 3, 25, -1, -1, 0)
    for _ in range(3):   # the same statement again and again
        feed(layer, CLIENT, m.frame(b"P", b"\0SELECT ssn FROM users\0\0\0")
             + m.frame(b"B", b"\0\0\0\0\0\0\0\0") + m.frame(b"D", b"P\0")
             + m.frame(b"E", b"\0\0\0\0\0") + m.frame(b"S"))
        sent = to_client(feed(layer, UPSTREAM, m.frame(b"1") + m.frame(b"2")
                              + m.row_description([col]) + m.data_row([b"123-45-6789"])
                              + m.frame(b"C", b"SELECT 1\0") + m.ready_for_query()))
        assert b"123-45-6789" not in sent and b"****" in sent


def test_startup_options_are_dropped_and_function_calls_refused():
    layer = new_layer()
    startup = m.startup_message({"user": "x", "options": "-c search_path=evil",
                                 "replication": "database"})
    assert (Playbook(layer)
            >> DataReceived(CLIENT, startup)
            << record("startup", user="x", dropped_params=["options", "replication"],
                      credentials="client's own")
            << ToUpstream(m.startup_message({"user": "x"})))
    feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query())
    assert (Playbook(layer)
            >> DataReceived(CLIENT, m.frame(b"F", b"\0\0\x04\xd2\0\0\0\0\0\0"))
            << record("command", text="<function call by OID>", decision={
                "action": "deny", "rule": "(function call)",
                "reason": "function calls by OID are not allowed"})
            << sends(ToUpstream, lambda b: b.startswith(b"Q") and b"agentgate_denied_" in b,
                     "a statement the server rejects, never the call"))


def ssl_request() -> bytes:
    return m.untyped(struct.pack("!i", m.SSL_REQUEST))


def test_ssl_request_is_terminated_when_offered_and_declined_otherwise():
    offered = new_layer(client_tls=True, client_names=("db.example", "10.1.2.3"))
    assert (Playbook(offered)
            >> DataReceived(CLIENT, ssl_request())
            << ToClient(b"S") << StartClientTls(("db.example", "10.1.2.3"))
            >> TlsEstablished(CLIENT, "TLSv1.3", None, "db.example")
            << record("tls", side="client", version="TLSv1.3", sni="db.example")
            # inside TLS the client goes on with its StartupMessage; a second request is declined
            >> DataReceived(CLIENT, ssl_request())
            << ToClient(b"N"))
    feed(offered, CLIENT, m.startup_message({"user": "x", "database": "d"}))
    assert offered.state == "auth"
    assert feed(new_layer(), CLIENT, ssl_request()) == [ToClient(b"N")]
    gss = m.untyped(struct.pack("!i", m.GSSENC_REQUEST))
    assert feed(new_layer(client_tls=True), CLIENT, gss) == [ToClient(b"N")]
    failed = new_layer(client_tls=True)
    feed(failed, CLIENT, ssl_request())
    (close,) = failed.handle(TlsFailed(CLIENT, "unknown ca"))
    assert isinstance(close, Close) and "unknown ca" in close.reason


def test_bytes_sent_in_the_clear_after_ssl_request_are_refused():
    startup = m.startup_message({"user": "x", "database": "d"})
    for extra in (startup, startup[:3]):   # a whole message, or part of one
        layer = new_layer(client_tls=True)
        with pytest.raises(ProtocolError, match="before the TLS handshake"):
            feed(layer, CLIENT, ssl_request() + extra)


# ---------------------------------------------------------------- the server's leg

STARTUP = m.startup_message({"user": "x", "database": "d"})


def fresh(tls: str, **kw) -> PostgresLayer:
    return PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", user="app",
                         password="pw", tls=tls, **kw)


@pytest.mark.parametrize("mode,verify", [("prefer", False), ("require", False),
                                         ("verify-full", True)])
def test_upstream_tls_is_asked_for_and_the_startup_waits_for_it(mode, verify):
    assert (Playbook(fresh(mode, ca="/etc/ca.pem"))
            >> Start(SERVER)
            << ToUpstream(ssl_request())
            >> DataReceived(CLIENT, STARTUP)            # the client speaks first: it waits
            << record("startup", user="x", upstream_user="app", credentials="injected")
            >> DataReceived(UPSTREAM, b"S")
            << StartUpstreamTls("10.1.2.3", verify=verify, ca="/etc/ca.pem")
            >> TlsEstablished(UPSTREAM, "TLSv1.3")
            << record("tls", side="upstream", version="TLSv1.3")
            << ToUpstream(m.startup_message({"user": "app", "database": "d"})))


def test_prefer_goes_on_in_the_clear_when_the_server_declines():
    assert (Playbook(fresh("prefer", server_name="db.example"))
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(UPSTREAM, b"N")
            >> DataReceived(CLIENT, STARTUP)
            << record("startup") << ToUpstream(m.startup_message({"user": "app",
                                                                  "database": "d"})))


@pytest.mark.parametrize("answer,why", [
    (b"N", "the server does not offer TLS"),
    (b"S" + STARTUP[:5], "the server sent data before the TLS handshake"),
    (b"X", "unexpected answer"),
])
def test_a_server_that_can_not_be_trusted_gets_nothing(answer, why):
    layer = fresh("require")
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(UPSTREAM, answer)
            >> DataReceived(CLIENT, STARTUP)            # never sent on: an error instead
            << closed_with(why))
    # the client asked for TLS first: it gets it, then the error
    layer = fresh("require", client_tls=True)
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(CLIENT, ssl_request()) << ToClient(b"S") << StartClientTls
            >> DataReceived(UPSTREAM, answer)
            >> TlsEstablished(CLIENT, "TLSv1.3") << record("tls", side="client")
            >> DataReceived(CLIENT, STARTUP) << closed_with(why))


def closed_with(why: str):
    """Close whose final bytes are a FATAL error saying `why`."""
    return Match(f"Close(final=FATAL {why!r})",
                 lambda c: isinstance(c, Close) and why in c.reason
                 and c.final.startswith(b"E") and why.encode() in c.final)


def test_a_failed_upstream_handshake_refuses_a_waiting_client():
    layer = fresh("verify-full")
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(CLIENT, STARTUP) << record("startup")
            >> DataReceived(UPSTREAM, b"S") << StartUpstreamTls
            >> TlsFailed(UPSTREAM, "certificate verify failed: self-signed certificate")
            << closed_with("certificate verify failed"))


def test_a_cancel_request_waits_for_the_server_leg_too():
    first = ready_layer()
    (fake, real), = first.cancel_keys.items()
    cancel = m.cancel_request(*fake)
    layer = fresh("prefer", cancel_keys=first.cancel_keys)
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(CLIENT, cancel) << record("cancel", matched=True)
            >> DataReceived(UPSTREAM, b"N")
            << ToUpstream(m.cancel_request(*real)) << Close)


def test_the_bytes_fast_path_masks_exactly_what_the_text_scan_masks():
    from hypothesis import given, settings, strategies as st
    from hostagent.masking import DETECTORS, MaskRule, Masker

    masker = Masker((MaskRule("pii", detectors=tuple(DETECTORS)),))
    samples = ["mail bob@example.com", "card 4111 1111 1111 1111", "ssn 123-45-6789",
               "call +1 415 555 0100", "key AKIAABCDEFGHIJKLMNOP", "Authorization: BeArEr "
               "abcdefghijklmnop123", "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "no secrets",
               "2026-11-24 03:00:00.123+00", "5d41402abc4b2a76b9719d911017c592", "é bob@x.org",
               "Bearer\x1fabcdefghijklmnopqrstu", "4111\x1c1111 1111 1111"]
    ascii_noise = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=12)

    @settings(max_examples=500)
    @given(st.sampled_from(samples), st.one_of(ascii_noise, st.text(max_size=12)),
           st.sampled_from(["", " ", "\x1f", "\t", "x", "-"]))
    def check(sample, noise, glue):
        text = noise + glue + sample + glue + noise
        try:
            raw = text.encode()
        except UnicodeEncodeError:
            return
        assert masker.scan_bytes(raw) == masker.scan(text)[0].encode()
    check()


def people_layer():
    from hostagent.masking import MaskRule, Masker
    return ready_layer(masker=Masker((MaskRule("pii", columns=("people.ssn",)),)))


def answer(layer, name: str, value: bytes, table_oid: int = 0) -> bytes:
    return to_client(feed(layer, UPSTREAM, m.row_description(
        [m.Column(name, table_oid, 3 if table_oid else 0, 25, -1, -1, 0)])
        + m.data_row([value]) + m.frame(b"C", b"SELECT 1\0")))


SECRET = b"123-45-6789"


def test_a_pipelined_statement_does_not_lend_its_shape_to_the_one_before():
    # simple queries: the second (harmless) text must not decide how the first is masked
    layer = people_layer()
    feed(layer, CLIENT, m.frame(b"Q", b"SELECT ssn AS s FROM people\0")
                      + m.frame(b"Q", b"SELECT 1\0"))
    assert SECRET not in answer(layer, "s", SECRET, table_oid=4242)
    # extended: the unnamed statement re-parsed before the server answered
    layer = people_layer()
    ext = b""
    for sql in (b"SELECT ssn AS s FROM people", b"SELECT 1"):
        ext += (m.frame(b"P", b"\0" + sql + b"\0\0\0") + m.frame(b"B", b"\0\0\0\0\0\0\0\0")
                + m.frame(b"D", b"P\0") + m.frame(b"E", b"\0\0\0\0\0"))
    feed(layer, CLIENT, ext + m.frame(b"S"))
    feed(layer, UPSTREAM, m.frame(b"1") + m.frame(b"2"))
    assert SECRET not in answer(layer, "s", SECRET, table_oid=4242)


@pytest.mark.parametrize("sql,name,oid", [
    ("SELECT CASE WHEN true THEN ssn END FROM people", "case", 0),
    ("SELECT coalesce(ssn, '') FROM people", "coalesce", 0),
    ("SELECT x.s::text FROM (SELECT ssn AS s FROM people) x", "s", 0),
    ("SELECT (SELECT ssn AS z FROM people LIMIT 1) AS q", "q", 0),
    ("SELECT row_to_json(p) FROM people p", "row_to_json", 0),
    ("SELECT p FROM people p", "p", 0),
    ("SELECT p.*::text FROM people p", "p", 0),
    ("SELECT * FROM (SELECT ssn FROM people) q(a)", "a", 4242),
    ("WITH c(a) AS (SELECT ssn FROM people) SELECT a FROM c", "a", 4242),
    ("SELECT v FROM people p, unnest(ARRAY[p.ssn]) v", "v", 0),
    ("UPDATE people SET id = id RETURNING ssn AS x", "x", 0),
    ("EXECUTE prepared_elsewhere", "anything", 0),
    ("FETCH 1 FROM some_cursor", "anything", 4242),
])
def test_shapes_whose_names_cannot_be_followed_are_masked(sql, name, oid):
    layer = people_layer()
    feed(layer, CLIENT, m.frame(b"Q", sql.encode() + b"\0"))
    assert SECRET not in answer(layer, name, SECRET, table_oid=oid), sql


@pytest.mark.parametrize("sql,name", [("SELECT id FROM people", "id"),
                                      ("SELECT lower(name) FROM people", "lower"),
                                      ("SELECT ssn FROM orders", "ssn")])
def test_clean_columns_stay_readable(sql, name):
    layer = people_layer()
    feed(layer, CLIENT, m.frame(b"Q", sql.encode() + b"\0"))
    assert b"visible" in answer(layer, name, b"visible", table_oid=4242 if name != "lower" else 0)


def test_the_agents_own_password_waits_for_the_servers_tls_too():
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", tls="verify-full")
    password = m.frame(b"p", b"agents-own-secret\0")
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(CLIENT, STARTUP + password)   # nothing leaves before TLS
            << record("startup", credentials="client's own")
            >> DataReceived(UPSTREAM, b"S") << StartUpstreamTls
            >> TlsEstablished(UPSTREAM, "TLSv1.3") << record("tls", side="upstream")
            << ToUpstream(STARTUP) << ToUpstream(password))


def test_a_client_gone_during_start_up_sends_nothing_later():
    from hostagent.protocols import EofReceived
    layer = fresh("require")
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(CLIENT, STARTUP) << record("startup")
            >> EofReceived(CLIENT) << Close("client closed during start-up")
            >> DataReceived(UPSTREAM, b"S") << StartUpstreamTls
            >> TlsEstablished(UPSTREAM, "TLSv1.3") << record("tls", side="upstream"))


def test_a_statement_too_long_to_judge_takes_the_unparseable_decision():
    from hostagent.protocols.postgres.layer import MAX_CLASSIFIED
    layer = ready_layer()
    text = "SELECT " + "1," * (MAX_CLASSIFIED // 2) + "1"
    out = feed(layer, CLIENT, m.frame(b"Q", text.encode() + b"\0"))
    decision = next(c.fields["decision"] for c in out
                    if isinstance(c, Record) and c.kind == "command")
    assert decision["rule"] == "(unparseable)" and decision["action"] == "deny"
    assert text.encode() not in to_upstream(out)


# ---------------------------------------------------------------- the server's authentication:
# the injected password goes only to the real server

def server_cert() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.example")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


CERT = server_cert()
UP_STARTUP = m.startup_message({"user": "app", "database": "d"})


def authenticating(tls: str = "disable", answer: bytes = b"S", cert: bytes = CERT,
                   **kw) -> PostgresLayer:
    """A layer with injected credentials (app / pw) whose start-up went to the server,
    over TLS unless `tls` is disable (or the server answered `answer` N): next, the
    server's authentication."""
    layer = fresh(tls, **kw)
    layer.handle(Start(SERVER))
    if tls != "disable":
        feed(layer, UPSTREAM, answer)
        if answer == b"S":
            layer.handle(TlsEstablished(UPSTREAM, "TLSv1.3", peer_cert=cert))
    assert to_upstream(feed(layer, CLIENT, STARTUP)) == UP_STARTUP
    return layer


def sasl(*mechanisms: str) -> bytes:
    return m.authentication(m.AUTH_SASL, b"".join(x.encode() + b"\0" for x in mechanisms) + b"\0")


def refused_with(why: str):
    """Close whose final bytes are a FATAL (28000) saying `why`: nothing else goes out."""
    return Match(f"Close(final=FATAL 28000 {why!r})",
                 lambda c: isinstance(c, Close) and why in c.reason
                 and c.final.startswith(b"E") and b"FATAL" in c.final
                 and b"C28000" in c.final and why.encode() in c.final)


def scram_exchange(layer, server_cert: bytes | None = None, mechanisms=("SCRAM-SHA-256",)):
    """The server's first two SCRAM steps, played by an independent SCRAM server:
    (the server, the client-first body, the server-final message it would send)."""
    from tests.hostagent.protocols.postgres.test_auth import ScramServer
    server = ScramServer("pw", server_cert)
    (initial,) = feed(layer, UPSTREAM, sasl(*mechanisms))
    assert isinstance(initial, ToUpstream) and initial.data[:1] == b"p"
    server_first = server.first(bytes(initial.data[5:]))
    (final,) = feed(layer, UPSTREAM, m.authentication(m.AUTH_SASL_CONTINUE, server_first))
    return server, server.final(bytes(final.data[5:]))


AUTH_OK = m.authentication(m.AUTH_OK)


def test_authentication_ok_before_the_servers_scram_proof_is_refused():
    layer = authenticating()
    scram_exchange(layer)           # the server never sends SASLFinal: a man in the middle
    assert (Playbook(layer)
            >> DataReceived(UPSTREAM, AUTH_OK)
            << refused_with("accepted the login without proving it knows the password"))
    assert layer.refusing and "never came" in layer.refusing
    # with the rest of its start-up in the same read: the Close comes first (the driver
    # performs nothing after a Close)
    layer = authenticating()
    scram_exchange(layer)
    out = feed(layer, UPSTREAM, AUTH_OK + m.frame(b"K", b"\0\0\0\1\0\0\0\2")
               + m.ready_for_query())
    assert isinstance(out[0], Close) and "without proving" in out[0].reason
    # right after the SCRAM exchange started
    layer = authenticating()
    out = feed(layer, UPSTREAM, sasl("SCRAM-SHA-256") + AUTH_OK)
    assert isinstance(out[-1], Close) and "never finished" in out[-1].reason
    assert to_client(out) == b""
    # no exchange at all (trust) over a leg the target chose not to protect: nothing
    # of the credential was sent
    assert feed(authenticating(), UPSTREAM, AUTH_OK)[-1] == ToClient(AUTH_OK)


def test_a_wrong_server_signature_is_refused():
    layer = authenticating()
    scram_exchange(layer)
    wrong = m.authentication(m.AUTH_SASL_FINAL, b"v=" + base64_of(b"\0" * 32))
    assert (Playbook(layer)
            >> DataReceived(UPSTREAM, wrong + AUTH_OK)
            << refused_with("signature is wrong: not the real server"))


def base64_of(data: bytes) -> bytes:
    import base64
    return base64.b64encode(data)


def test_a_verified_scram_exchange_lets_authentication_ok_through():
    layer = authenticating()
    _, server_final = scram_exchange(layer)
    assert (Playbook(layer)
            >> DataReceived(UPSTREAM, m.authentication(m.AUTH_SASL_FINAL, server_final))
            >> DataReceived(UPSTREAM, AUTH_OK)
            << record("auth", method="SCRAM-SHA-256", server_verified="scram")
            << ToClient(AUTH_OK))
    assert layer.upstream_auth.summary() == {"method": "SCRAM-SHA-256", "channel_binding": "",
                                             "server_verified": "scram"}
    # a second exchange, or AuthenticationOk again, is not the server's to start
    assert isinstance(feed(layer, UPSTREAM, sasl("SCRAM-SHA-256"))[-1], Close)


@pytest.mark.parametrize("tls", ["verify-full", "require", "prefer"])
def test_scram_sha_256_plus_binds_to_the_certificate_tls_ended_at(tls):
    layer = authenticating(tls)
    server, server_final = scram_exchange(layer, CERT, ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"))
    assert server.mechanism == "SCRAM-SHA-256-PLUS"
    assert server.gs2 == "p=tls-server-end-point,,"
    feed(layer, UPSTREAM, m.authentication(m.AUTH_SASL_FINAL, server_final))
    assert feed(layer, UPSTREAM, AUTH_OK)[-1] == ToClient(AUTH_OK)
    assert layer.upstream_auth.channel_binding == "tls-server-end-point"
    # relayed by someone whose TLS presented another certificate: the server's check fails
    relayed = authenticating(tls, cert=server_cert())
    with pytest.raises(AssertionError, match="channel binding check failed"):
        scram_exchange(relayed, CERT, ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"))


def test_without_plus_the_gs2_flag_tells_a_real_server_about_the_downgrade():
    over_tls = authenticating("verify-full")
    server, _ = scram_exchange(over_tls)
    assert server.gs2 == "y,," and server.mechanism == "SCRAM-SHA-256"
    plaintext = authenticating("disable")
    server, _ = scram_exchange(plaintext, mechanisms=("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"))
    assert server.gs2 == "n,,"     # nothing to bind to without TLS
    # unverified TLS: channel binding is what shows the server is real, or nothing goes
    layer = authenticating("require")
    assert (Playbook(layer)
            >> DataReceived(UPSTREAM, sasl("SCRAM-SHA-256"))
            << refused_with('tls = "require" does not verify'))
    assert 'tls = "verify-full"' in layer.refusing
    trust = authenticating("require")
    assert (Playbook(trust) >> DataReceived(UPSTREAM, AUTH_OK)
            << refused_with("asked for no password"))


@pytest.mark.parametrize("code,kind", [(m.AUTH_CLEARTEXT, "cleartext"), (m.AUTH_MD5, "md5")])
@pytest.mark.parametrize("tls,answer,over", [
    ("disable", b"S", 'a connection without TLS (tls = "disable")'),
    ("prefer", b"N", 'a connection without TLS (tls = "prefer")'),
    ("prefer", b"S", 'TLS that does not verify the server (tls = "prefer")'),
    ("require", b"S", 'TLS that does not verify the server (tls = "require")'),
])
def test_cleartext_and_md5_go_only_to_a_verified_server(code, kind, tls, answer, over):
    request = m.authentication(code, b"salt" if code == m.AUTH_MD5 else b"")
    layer = authenticating(tls, answer)
    assert (Playbook(layer)
            >> DataReceived(UPSTREAM, request)
            << refused_with(f"asked for a {kind} password over {over}"))
    assert 'weak_password_auth = "allow"' in layer.refusing
    assert "\n" not in layer.refusing
    # verified by its certificate, or the target opted in: answered
    for ok in (authenticating("verify-full"),
               authenticating(tls, answer, weak_password_auth="allow")):
        (sent,) = feed(ok, UPSTREAM, request)
        assert isinstance(sent, ToUpstream) and sent.data[:1] == b"p"
        assert (b"pw\0" if kind == "cleartext" else b"md5") in sent.data
        assert feed(ok, UPSTREAM, AUTH_OK)[-1] == ToClient(AUTH_OK)
        assert ok.upstream_auth.method == kind


def test_a_server_without_tls_is_an_explicit_opt_out():
    layer = fresh("verify-full")
    assert (Playbook(layer)
            >> Start(SERVER) << ToUpstream(ssl_request())
            >> DataReceived(UPSTREAM, b"N")
            >> DataReceived(CLIENT, STARTUP)
            << closed_with('the server does not offer TLS; for a server without TLS set '
                           'tls = "disable" on target "t"'))


def test_the_upstream_tls_record_says_whether_the_server_was_verified():
    for tls, verified in (("verify-full", True), ("require", False)):
        layer = fresh(tls)
        layer.handle(Start(SERVER))
        feed(layer, UPSTREAM, b"S")
        (rec,) = layer.handle(TlsEstablished(UPSTREAM, "TLSv1.3", peer_cert=CERT))
        assert rec.fields == {"side": "upstream", "version": "TLSv1.3", "verified": verified}


def test_the_agents_own_authentication_still_passes_through():
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t")
    layer.handle(Start(SERVER))
    feed(layer, CLIENT, STARTUP)
    md5 = m.authentication(m.AUTH_MD5, b"salt")
    assert feed(layer, UPSTREAM, md5) == [ToClient(md5)]


def test_a_server_that_skips_authentication_gets_no_session():
    # injected credentials: ReadyForQuery (or anything but an answer, an error, a notice)
    # before AuthenticationOk is a relay that never proved it knows the password
    layer = new_layer(user="app", password="pw")
    feed(layer, CLIENT, m.startup_message({"user": "x", "database": "d"}))
    out = feed(layer, UPSTREAM, m.frame(b"S", b"a\0b\0") + m.ready_for_query()
               + m.frame(b"K", b"\0\0\0\1\0\0\0\2"))
    assert isinstance(out[-1], Close) and "before authenticating" in out[-1].reason
    assert m.ready_for_query() not in to_client(out) and layer.cancel_keys == {}


@pytest.mark.parametrize("encoding", ["SJIS", "sjis", "Shift_JIS", "WIN932", "BIG5", "GBK",
                                      "gb18030", "UHC", "JOHAB"])
def test_client_encodings_the_parser_can_not_follow_are_refused(encoding):
    # in SJIS, 0x95 0x5c is one character: the server would end a string at the quote the
    # parser (reading UTF-8) sees escaped, and run what follows
    layer = new_layer(user="app", password="pw")
    out = feed(layer, CLIENT, m.startup_message({"user": "x", "client_encoding": encoding}))
    assert isinstance(out[-1], Close) and b"client_encoding" in out[-1].final
    assert not to_upstream(out)


@pytest.mark.parametrize("name,value", [("client_encoding", "SJIS"),
                                        ("standard_conforming_strings", "off")])
def test_a_server_reading_statements_otherwise_ends_the_session(name, value):
    # a role or database default, or a SET the server reports: fail closed
    layer = ready_layer()
    out = feed(layer, UPSTREAM, m.frame(b"S", name.encode() + b"\0" + value.encode() + b"\0"))
    assert isinstance(out[-1], Close) and name.encode() in out[-1].final


def test_safe_encodings_pass():
    for enc in ("UTF8", "LATIN1", "SQL_ASCII", "EUC_JP"):
        layer = new_layer(user="app", password="pw")
        out = feed(layer, CLIENT, m.startup_message({"user": "x", "client_encoding": enc}))
        assert b"client_encoding" in to_upstream(out), enc
