"""Framing and the messages the layer reads and writes: split packets, round trips, and
only ProtocolError on bad input."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.protocols.api import ProtocolError
from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.packets import MAX_CHUNK, Cursor, PacketReader, frame, lenenc


def test_a_packet_of_exactly_16_mib_minus_1_is_followed_by_an_empty_one():
    payload = b"x" * MAX_CHUNK
    data, nxt = frame(payload, 3)
    assert nxt == 5 and len(data) == MAX_CHUNK + 8 and data[-4:] == b"\0\0\0\x04"
    (pkt,) = PacketReader().receive_data(data)
    assert pkt.payload == payload and pkt.seq == 3 and pkt.chunks == 2 and pkt.raw == data


def test_a_32_mib_packet_arriving_in_pieces_is_joined_once_complete():
    payload = bytes(range(256)) * (32 * 4096 + 3)
    data, nxt = frame(payload, 255)
    assert nxt == (255 + 3) & 0xFF
    reader = PacketReader()
    got = []
    for i in range(0, len(data), 1 << 20):
        got += reader.receive_data(data[i:i + (1 << 20)])
        if i + (1 << 20) < len(data):
            assert not got
    (pkt,) = got
    assert pkt.payload == payload and pkt.raw == data and reader.buffered == 0


def test_the_cap_bounds_a_split_packet():
    reader = PacketReader(max_packet=MAX_CHUNK + 10)
    data, _ = frame(b"y" * (MAX_CHUNK + 100), 0)
    with pytest.raises(ProtocolError):
        reader.receive_data(data)


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(0, 255),
       st.lists(st.integers(1, 97), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_packets_survive_any_split_of_the_stream(payloads, seq, cuts):
    stream, s = b"", seq
    for p in payloads:
        data, s = frame(p, s)
        stream += data
    reader, got, i, k = PacketReader(), [], 0, 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        got += reader.receive_data(stream[i:i + n])
        i, k = i + n, k + 1
    assert [p.payload for p in got] == payloads


@given(st.integers(0, (1 << 64) - 1))
def test_lenenc_round_trips(n):
    assert Cursor(lenenc(n)).lenenc() == n


@given(st.lists(st.one_of(st.none(), st.binary(max_size=70000)), max_size=6))
@settings(max_examples=50, deadline=None)
def test_text_rows_round_trip(values):
    assert m.parse_text_row(m.text_row(values), len(values)) == values


TYPES = [m.T_TINY, m.T_LONG, m.T_LONGLONG, m.T_DOUBLE, m.T_VAR_STRING, m.T_BLOB, m.T_DATETIME]


@given(st.lists(st.tuples(st.sampled_from(TYPES), st.booleans(), st.binary(max_size=40)),
                max_size=12))
def test_binary_rows_round_trip(cells):
    types, values = [], []
    for typ, null, raw in cells:
        types.append(typ)
        size = m.FIXED_SIZE.get(typ)
        values.append(None if null else (raw.ljust(size, b"\0")[:size] if size is not None
                                         else raw[:11] if typ in m.DATE_TYPES else raw))
    assert m.parse_binary_row(m.binary_row(values, types), types) == values


def test_greeting_and_response_round_trip():
    g = m.Greeting("10.11.19-MariaDB", 7, bytes(range(1, 21)), m.SUPPORTED | m.SSL, 45, 2,
                   "mysql_native_password")
    back = m.parse_greeting(m.greeting(g))
    assert (back.version, back.thread_id, back.nonce, back.capabilities, back.plugin) == \
        (g.version, 7, g.nonce, g.capabilities, g.plugin)
    r = m.HandshakeResponse(m.SUPPORTED | m.CONNECT_WITH_DB, 1 << 24, 45, "app", b"\x01" * 20,
                            "shop", "mysql_native_password", {"_client_name": "x"})
    assert m.parse_handshake_response(m.handshake_response(r)) == r


def test_execute_parameters_are_read_with_their_types_and_nulls():
    # two params: a signed LONGLONG -5 and a NULL string, types sent (new-params-bound)
    payload = (bytes((m.COM_STMT_EXECUTE,)) + (9).to_bytes(4, "little") + b"\0"
               + (1).to_bytes(4, "little") + bytes((0b10,)) + b"\x01"
               + bytes((m.T_LONGLONG, 0, m.T_VAR_STRING, 0)) + (-5).to_bytes(8, "little", signed=True))
    ex = m.parse_execute(payload, 2, ())
    assert ex.statement_id == 9 and ex.values == ("-5", None)
    # the next execute sends no types: the bound ones are used; unsigned bit honoured
    payload2 = (bytes((m.COM_STMT_EXECUTE,)) + (9).to_bytes(4, "little") + b"\0"
                + (1).to_bytes(4, "little") + b"\0" + b"\0"
                + (2 ** 64 - 1).to_bytes(8, "little") + b"\x03abc")
    assert m.parse_execute(payload2, 2, ((0x8000 | m.T_LONGLONG), m.T_VAR_STRING)).values == \
        (str(2 ** 64 - 1), "abc")
    with pytest.raises(ProtocolError):
        m.parse_execute(payload2, 2, ())


@given(st.binary(max_size=200))
def test_malformed_messages_raise_only_protocol_errors(data):
    for parse in (m.parse_greeting, m.parse_handshake_response, m.parse_ok, m.parse_err,
                  m.parse_column, m.parse_prepare_ok, lambda d: m.parse_text_row(d, 3),
                  lambda d: m.parse_binary_row(d, TYPES),
                  lambda d: m.parse_execute(d, 3, ()), lambda d: m.parse_change_user(d, m.SUPPORTED)):
        try:
            parse(data)
        except ProtocolError:
            pass
