"""The PostgreSQL codec: framing under any split, only ProtocolError on bad bytes, and
messages that round-trip."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m


def client_stream() -> tuple[bytes, list]:
    frames = [
        m.untyped(struct.pack("!i", m.SSL_REQUEST)),
        m.startup_message({"user": "app", "database": "shop", "application_name": "psql"}),
        m.frame(b"Q", b"SELECT 1; DROP TABLE t\0"),
        m.frame(b"P", b"s1\0SELECT $1::int\0\0\x01\0\0\0\x17"),
        m.frame(b"S"),
    ]
    return b"".join(frames), frames


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_frames_are_the_same_however_the_bytes_arrive(cuts):
    data, _ = client_stream()
    reader = m.FrameReader(startup=True)
    got, pos = [], 0
    for cut in cuts:
        got += reader.receive_data(data[pos:pos + cut])
        pos += cut
    got += reader.receive_data(data[pos:])
    assert [k for k, _ in got] == [b"", b"", b"Q", b"P", b"S"]
    assert m.parse_untyped(got[0][1]) == m.SpecialRequest(m.SSL_REQUEST)
    startup = m.parse_untyped(got[1][1])
    assert startup.params == {"user": "app", "database": "shop", "application_name": "psql"}
    assert m.parse_query(got[2][1]) == "SELECT 1; DROP TABLE t"
    assert m.parse_parse(got[3][1]) == m.Parse("s1", "SELECT $1::int", (23,))
    assert reader.buffered == 0


@settings(max_examples=300)
@given(st.binary(max_size=200), st.booleans())
def test_garbage_raises_only_protocol_errors(data, startup):
    reader = m.FrameReader(startup=startup, max_message=1 << 16)
    try:
        for kind, body in reader.receive_data(data):
            for parse in (m.parse_untyped, m.parse_query, m.parse_parse, m.parse_bind,
                          m.parse_fields, m.parse_row_description, m.parse_data_row):
                try:
                    parse(body)
                except ProtocolError:
                    pass
    except ProtocolError:
        pass


def test_a_message_over_the_cap_is_refused_before_it_is_buffered():
    reader = m.FrameReader(max_message=1 << 20)
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.receive_data(b"Q" + struct.pack("!i", (1 << 20) + 5))
    assert m.FrameReader().max_message > 16 << 20   # big INSERTs are legitimate


def test_impossible_length_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="impossible"):
        m.FrameReader().receive_data(b"Q\0\0\0\x02")


def test_bind_row_and_cancel_round_trips():
    body = (b"p1\0s1\0" + struct.pack("!hh", 1, 1) + struct.pack("!h", 2)
            + struct.pack("!i", 3) + b"abc" + struct.pack("!i", -1) + struct.pack("!hh", 1, 0))
    assert m.parse_bind(body) == m.Bind("p1", "s1", (1,), (b"abc", None), (0,))
    row = m.data_row([b"x", None, b""])
    assert m.parse_data_row(row[5:]) == [b"x", None, b""]
    cols = [m.Column("email", 16384, 2, 25, -1, -1, 0)]
    assert m.parse_row_description(m.row_description(cols)[5:]) == cols
    cancel = m.parse_untyped(struct.pack("!iii", m.CANCEL_REQUEST, 42, 7))
    assert cancel == m.SpecialRequest(m.CANCEL_REQUEST, 42, 7)
    err = m.parse_fields(m.error_response("denied by rule no-ddl", "42501")[5:])
    assert err["C"] == "42501" and err["M"] == "denied by rule no-ddl" and err["S"] == "ERROR"


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=40), st.builds(
    lambda names, params, tail: names + struct.pack("!h", 0) + struct.pack("!h", len(params))
    + b"".join(struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
               for p in params) + tail,
    st.sampled_from([b"\0\0", b"p\0s1\0", b"\xff\0\0"]),
    st.lists(st.one_of(st.none(), st.binary(max_size=8), st.just(b"x" * 1100)), max_size=3),
    st.sampled_from([b"\0\0", b"\0\1\0\1", b"\0\1", b"\0\0\0"]))))
def test_a_binds_record_has_what_parse_bind_reads(body):
    """bind_fields (what both paths record of a Bind) accepts what parse_bind accepts
    and reads the same values, each parameter cut at MAX_RECORDED_PARAM."""
    try:
        b = m.parse_bind(body)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            m.bind_fields(body, 0, len(body))
        return
    assert m.bind_fields(b"xx" + body + b"yy", 2, 2 + len(body)) == {
        "statement": b.statement, "portal": b.portal,
        "params": [None if p is None else p[:m.MAX_RECORDED_PARAM] for p in b.params],
        "formats": list(b.param_formats)}
