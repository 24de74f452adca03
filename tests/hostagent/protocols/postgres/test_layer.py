"""The PostgreSQL layer on its own: any bytes from a client end in a ProtocolError at
worst (the driver closes that session only), never another exception."""
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.policy import Policy, decide
from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.layer import PostgresLayer


def ready_layer(policy: Policy | None = None, startup: dict | None = None,
                **kw) -> PostgresLayer:
    """A layer past start-up (injected credentials, the server's AuthenticationOk,
    BackendKeyData and ReadyForQuery), deciding by `policy`."""
    policy = policy or Policy()
    layer = PostgresLayer(decide=lambda r: decide(policy, r), target="t", user="app",
                          password="pw", **kw)
    layer.client_data(m.startup_message(startup or {"user": "x", "database": "d"}))
    layer.upstream_data(m.authentication(m.AUTH_OK) + m.frame(b"K", b"\0\0\0\1\0\0\0\2")
                        + m.ready_for_query())
    return layer


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(b"QPBDESHFXCdcfp"), st.binary(max_size=60)),
                max_size=6))
def test_malformed_client_messages_raise_only_protocol_errors(msgs):
    layer = ready_layer()
    data = b"".join(m.frame(bytes([k]), body) for k, body in msgs)
    try:
        layer.client_data(data)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_truncated_or_garbage_startup_raises_only_protocol_errors(data):
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t")
    try:
        layer.client_data(data)
    except ProtocolError:
        pass


def test_the_agent_gets_a_stand_in_backend_key():
    layer = ready_layer()
    (fake, real), = layer.cancel_keys.items()
    assert real == (1, 2) and fake != real
    layer.close()
    assert layer.cancel_keys == {}


def test_a_held_statement_keeps_the_pipeline_behind_it_in_order():
    from hostagent.policy import Rule
    from hostagent.protocols import Hold, ToUpstream
    policy = Policy(rules=(Rule(name="r", action="review", statements=("DELETE",)),))
    layer = ready_layer(policy)
    parse = m.frame(b"P", b"\0DELETE FROM t WHERE id = 1\0\0\0")
    rest = m.frame(b"B", b"\0\0\0\0\0\0\0\0") + m.frame(b"E", b"\0\0\0\0\0") + m.frame(b"S")
    actions = layer.client_data(parse + rest)
    holds = [a for a in actions if isinstance(a, Hold)]
    assert len(holds) == 1 and not any(isinstance(a, ToUpstream) for a in actions)
    after = layer.decided(holds[0].key, True, "ok")
    sent = b"".join(a.data for a in after if isinstance(a, ToUpstream))
    assert sent == parse + rest                      # the statement, then the rest, in order
    denied = ready_layer(policy)
    (hold,) = [a for a in denied.client_data(parse + rest) if isinstance(a, Hold)]
    sent = b"".join(a.data for a in denied.decided(hold.key, False, "no")
                    if isinstance(a, ToUpstream))
    assert b"DELETE" not in sent and b"agentgate_denied_" in sent and sent.endswith(rest)


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
    from hostagent.protocols import ToClient
    layer = masked_layer()
    col = m.Column("ssn", 1234, 3, 25, -1, -1, 0)
    for _ in range(3):   # the same statement again and again
        layer.client_data(m.frame(b"P", b"\0SELECT ssn FROM users\0\0\0")
                          + m.frame(b"B", b"\0\0\0\0\0\0\0\0") + m.frame(b"D", b"P\0")
                          + m.frame(b"E", b"\0\0\0\0\0") + m.frame(b"S"))
        out = layer.upstream_data(m.frame(b"1") + m.frame(b"2") + m.row_description([col])
                                  + m.data_row([b"123-45-6789"]) + m.frame(b"C", b"SELECT 1\0")
                                  + m.ready_for_query())
        sent = b"".join(a.data for a in out if isinstance(a, ToClient))
        assert b"123-45-6789" not in sent and b"****" in sent


def test_startup_options_are_dropped_and_function_calls_refused():
    from hostagent.protocols import Record, ToUpstream
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t")
    actions = layer.client_data(m.startup_message({"user": "x", "options": "-c search_path=evil",
                                                   "replication": "database"}))
    startup = next(a for a in actions if isinstance(a, Record))
    assert startup.fields["dropped_params"] == ["options", "replication"]
    sent = next(a for a in actions if isinstance(a, ToUpstream)).data
    assert b"search_path" not in sent and b"replication" not in sent
    layer.upstream_data(m.authentication(m.AUTH_OK) + m.ready_for_query())
    out = layer.client_data(m.frame(b"F", b"\0\0\x04\xd2\0\0\0\0\0\0"))
    sent = b"".join(a.data for a in out if isinstance(a, ToUpstream))
    assert sent.startswith(b"Q") and b"agentgate_denied_" in sent   # never the call


def ssl_request() -> bytes:
    import struct
    return m.untyped(struct.pack("!i", m.SSL_REQUEST))


def test_ssl_request_is_terminated_when_offered_and_declined_otherwise():
    from hostagent.protocols import StartTls, ToClient
    offered = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", client_tls=True)
    assert offered.client_data(ssl_request()) == [ToClient(b"S"), StartTls()]
    # inside TLS the client goes on with its StartupMessage; a second request is declined
    assert offered.client_data(ssl_request()) == [ToClient(b"N")]
    offered.client_data(m.startup_message({"user": "x", "database": "d"}))
    assert offered.state == "auth"
    declined = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t")
    assert declined.client_data(ssl_request()) == [ToClient(b"N")]
    gss = m.untyped(__import__("struct").pack("!i", m.GSSENC_REQUEST))
    assert PostgresLayer(decide=lambda r: decide(Policy(), r), target="t",
                         client_tls=True).client_data(gss) == [ToClient(b"N")]


def test_bytes_sent_in_the_clear_after_ssl_request_are_refused():
    import pytest
    startup = m.startup_message({"user": "x", "database": "d"})
    for extra in (startup, startup[:3]):   # a whole message, or part of one
        layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", client_tls=True)
        with pytest.raises(ProtocolError, match="before the TLS handshake"):
            layer.client_data(ssl_request() + extra)


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
    from hostagent.protocols import ToClient
    out = layer.upstream_data(m.row_description([m.Column(name, table_oid, 3 if table_oid else 0,
                                                          25, -1, -1, 0)])
                              + m.data_row([value]) + m.frame(b"C", b"SELECT 1\0"))
    return b"".join(a.data for a in out if isinstance(a, ToClient))


SECRET = b"123-45-6789"


def test_a_pipelined_statement_does_not_lend_its_shape_to_the_one_before():
    # simple queries: the second (harmless) text must not decide how the first is masked
    layer = people_layer()
    layer.client_data(m.frame(b"Q", b"SELECT ssn AS s FROM people\0")
                      + m.frame(b"Q", b"SELECT 1\0"))
    assert SECRET not in answer(layer, "s", SECRET, table_oid=4242)
    # extended: the unnamed statement re-parsed before the server answered
    layer = people_layer()
    ext = b""
    for sql in (b"SELECT ssn AS s FROM people", b"SELECT 1"):
        ext += (m.frame(b"P", b"\0" + sql + b"\0\0\0") + m.frame(b"B", b"\0\0\0\0\0\0\0\0")
                + m.frame(b"D", b"P\0") + m.frame(b"E", b"\0\0\0\0\0"))
    layer.client_data(ext + m.frame(b"S"))
    layer.upstream_data(m.frame(b"1") + m.frame(b"2"))
    assert SECRET not in answer(layer, "s", SECRET, table_oid=4242)


import pytest  # noqa: E402


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
    layer.client_data(m.frame(b"Q", sql.encode() + b"\0"))
    assert SECRET not in answer(layer, name, SECRET, table_oid=oid), sql


@pytest.mark.parametrize("sql,name", [("SELECT id FROM people", "id"),
                                      ("SELECT lower(name) FROM people", "lower"),
                                      ("SELECT ssn FROM orders", "ssn")])
def test_clean_columns_stay_readable(sql, name):
    layer = people_layer()
    layer.client_data(m.frame(b"Q", sql.encode() + b"\0"))
    assert b"visible" in answer(layer, name, b"visible", table_oid=4242 if name != "lower" else 0)
