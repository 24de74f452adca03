"""The layer's fast path (fastpath.py) and its general path are twins: fed the same
events, byte for byte, they record the same events and send the same bytes, refuse the
same input, and hold and defer alike. Whatever the steady state skips must make no
difference but speed."""
import re
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.masking import Masker, MaskRule
from hostagent.policy import Policy, Rule
from hostagent.protocols import (CLIENT, UPSTREAM, ApprovalDecided, DataReceived, OpenSide,
                                 ProtocolError, Record, ToClient, ToUpstream)
from hostagent.protocols.postgres import messages as m
from hostagent.recording.samples import SampleLimits
from tests.hostagent.protocols.postgres.test_layer import ready_layer

POLICY = Policy(rules=(Rule("no-drop", "deny", matchers=(("statements", ("DROP",)),)),
                       Rule("hold-delete", "review", matchers=(("statements", ("DELETE",)),))))
SQL = ["SELECT 1", "SELECT abalance FROM pgbench_accounts WHERE aid = 7", "DROP TABLE t",
       "DELETE FROM t WHERE id = 1", "BEGIN", "COMMIT", "SELECT $1::int", "not sql ((",
       "SET search_path = x", ""]
names = st.sampled_from(["", "P0_1", "s1", "é", "p\x01"])


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


@st.composite
def bind(draw) -> bytes:
    formats = draw(st.lists(st.sampled_from([0, 1]), max_size=3))
    params = draw(st.lists(st.one_of(st.none(), st.binary(max_size=20),
                                     st.just(b"x" * 1500)), max_size=3))
    results = draw(st.lists(st.sampled_from([0, 1]), max_size=2))
    body = cstr(draw(names)) + cstr(draw(names)) + struct.pack("!h", len(formats)) + \
        b"".join(struct.pack("!h", f) for f in formats) + struct.pack("!h", len(params)) + \
        b"".join(struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
                 for p in params) + struct.pack("!h", len(results)) + \
        b"".join(struct.pack("!h", f) for f in results)
    if draw(st.booleans()) and draw(st.integers(0, 5)) == 0:   # damaged now and then
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=4))
    return m.frame(b"B", body)


client_message = st.one_of(
    bind(),
    st.builds(lambda n: m.frame(b"E", cstr(n) + b"\0\0\0\0"), names),
    st.just(m.frame(b"S")), st.just(m.frame(b"H")),
    st.builds(lambda n: m.frame(b"D", b"S" + cstr(n)), names),
    st.builds(lambda n: m.frame(b"C", b"S" + cstr(n)), names),
    st.builds(lambda q: m.frame(b"Q", cstr(q)), st.sampled_from(SQL)),
    st.builds(lambda n, q: m.frame(b"P", cstr(n) + cstr(q) + b"\0\0"), names,
              st.sampled_from(SQL)),
    st.just(m.frame(b"F", b"\0\0\0\1\0\0\0\0\0\0")),
)
client_noise = st.one_of(
    st.builds(lambda k, b: m.frame(bytes([k]), b), st.integers(0, 255), st.binary(max_size=8)),
    st.builds(lambda b: b"B" + struct.pack("!i", 2) + b, st.binary(max_size=4)),  # bad length
)
ROW = m.frame(b"T", b"\0\1abalance\0\0\0\0\0\0\0\0\0\0\x17\0\4\xff\xff\xff\xff\0\0")
PEOPLE = m.row_description([m.Column("ssn", 0, 0, 25, -1, -1, 0),
                            m.Column("note", 0, 0, 25, -1, -1, 0)])
server_message = st.one_of(
    st.sampled_from([m.frame(b"1"), m.frame(b"2"), m.frame(b"3"), m.frame(b"n"), ROW, PEOPLE,
                     m.frame(b"I"), m.frame(b"s"), m.ready_for_query(b"I"),
                     m.ready_for_query(b"T"), m.ready_for_query(b"E"),
                     m.frame(b"C", b"SELECT 1\0"), m.frame(b"C", b"DELETE 3\0"),
                     m.frame(b"S", b"TimeZone\0UTC\0"), m.notice_response("hm"),
                     m.error_response("boom", "22000")]),
    st.builds(lambda vals: m.data_row(vals),
              st.lists(st.one_of(st.none(), st.binary(max_size=12)), max_size=4)),
    st.builds(lambda n, b: m.data_row([b]) * n, st.integers(1, 30), st.binary(max_size=5)),
    st.builds(lambda n, a, b: m.data_row([a, b]) * n, st.integers(1, 4),
              st.sampled_from([None, b"123-45-6789", b"\xff"]),
              st.sampled_from([None, b"bob@example.com", b"card 4111 1111 1111 1111", b"ok"])),
    st.builds(lambda n, b: m.frame(b"d", b) * n, st.integers(1, 5), st.binary(max_size=5)),
)
server_noise = st.one_of(
    st.builds(lambda b: m.frame(b"D", b), st.binary(max_size=10)),       # damaged rows
    st.builds(lambda k, b: m.frame(bytes([k]), b), st.integers(0, 255), st.binary(max_size=6)),
)


def mostly(good, noise):
    """Well-formed messages, with now and then one that is not (it ends the script)."""
    return st.integers(0, 1 << 20).flatmap(lambda i: noise if i % 16 == 7 else good)


@st.composite
def script(draw) -> list[tuple[str, bytes]]:
    """Both sides' messages, interleaved and cut into arrivals at random points."""
    events = []
    for _ in range(draw(st.integers(1, 12))):
        side = draw(st.sampled_from([CLIENT, UPSTREAM]))
        stream = b"".join(draw(st.lists(
            mostly(client_message, client_noise) if side == CLIENT
            else mostly(server_message, server_noise), min_size=1, max_size=6)))
        cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=2)))
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            if b > a:
                events.append((side, stream[a:b]))
        if draw(st.integers(0, 4)) == 0:
            events.append(("decide", draw(st.booleans())))
    return events


def normal(commands) -> tuple:
    """What the driver does with one event's commands: records stored, then the bytes
    out per side, in order; other commands as they are."""
    records, up, down, starts, other = [], [], [], [], []
    for c in commands:
        if type(c) is Record:
            records.append((c.kind, c.fields, c.stop))
        elif type(c) is ToUpstream:
            up.append(bytes(c.data))
            starts += c.starts
        elif type(c) is ToClient:
            down.append(bytes(c.data))
        else:
            other.append(c)
    token = re.compile(rb"agentgate_denied_[0-9a-f]{16}")   # a denial's, random
    return records, token.sub(b"T", b"".join(up)), b"".join(down), starts, other


def run(layer, events) -> list:
    seen = []
    for side, data in events:
        try:
            if side == "decide":
                key = layer.enforcer._key
                out = layer.handle(ApprovalDecided(key, data, "ok"))
            else:
                out = layer.handle(DataReceived(side, data))
        except ProtocolError as exc:
            seen.append(("error", str(exc)[:0]))   # (which message first may differ)
            break
        seen.append(normal(out))
    return seen


def twins(masker=lambda: None):
    # (a sample of two rows: past it, rows are counted without being read)
    fast, general = (ready_layer(POLICY, samples=SampleLimits(rows=2), masker=masker())
                     for _ in range(2))
    general.lean = False
    return fast, general


@settings(max_examples=400, deadline=None)
@given(script())
def test_the_fast_path_and_the_general_path_are_twins(events):
    fast, general = twins()
    assert run(fast, events) == run(general, events)


@settings(max_examples=400, deadline=None)
@given(script())
def test_the_fast_path_and_the_general_path_mask_alike(events):
    fast, general = twins(lambda: Masker((MaskRule("pii", columns=("ssn",),
                                                   detectors=("email", "credit_card")),)))
    assert run(fast, events) == run(general, events)
    assert fast.masker.counts == general.masker.counts


def test_the_fast_path_forwards_what_it_read_unchanged():
    layer = ready_layer(POLICY)
    data = (m.frame(b"B", b"\0P0_1\0\0\0\0\1\0\0\0\x0212\0\0") + m.frame(b"E", b"\0\0\0\0\0")
            + m.frame(b"S"))
    out = layer.handle(DataReceived(CLIENT, data))
    assert [type(c) for c in out] == [Record, ToUpstream]
    assert out[0].fields == {"statement": "P0_1", "portal": "", "params": [b"12"],
                             "formats": []}
    assert out[1].data is data              # the very bytes: nothing rebuilt
    answer = m.frame(b"2") + m.data_row([b"3"]) + m.frame(b"C", b"SELECT 1\0") + \
        m.ready_for_query()
    out = layer.handle(DataReceived(UPSTREAM, answer))
    assert [type(c) for c in out] == [Record, ToClient] and out[1].data is answer
    assert out[0].fields["rows_returned"] == 1 and out[0].stop == 1


def test_a_large_message_arriving_in_pieces_is_appended_not_copied_again():
    # (red team: joining what the reader held with each piece copied a 200 MiB message
    # per 1-byte arrival, stalling every session on the loop)
    layer = ready_layer(POLICY)
    big = m.frame(b"Q", b"SELECT '" + b"x" * (1 << 19) + b"'\0")
    assert layer.handle(DataReceived(CLIENT, big[:1000])) == []
    held = layer.client._buf
    for i in range(1000, 1100):
        assert layer.handle(DataReceived(CLIENT, big[i:i + 1])) == []
    assert layer.client._buf is held and layer.client.buffered == 1100   # appended in place
    out = layer.handle(DataReceived(CLIENT, big[1100:]))
    assert [c.kind for c in out if type(c) is Record] == ["command"]
    assert b"".join(c.data for c in out if type(c) is ToUpstream) == big
    assert layer.client.buffered == 0


def test_rows_behind_a_result_the_catalog_must_explain_wait_for_it_on_both_paths():
    outs = []
    for fast in twins(lambda: Masker((MaskRule("pii", columns=("ssn",)),))):
        # as if the RowDescription named a relation the catalog snapshot doesn't know
        fast._catalog_needed = lambda body: True
        fast._fetch_catalog = lambda: [OpenSide(7, None)]
        fast.handle(DataReceived(CLIENT, m.frame(b"Q", b"SELECT ssn, note FROM people\0")))
        out = fast.handle(DataReceived(UPSTREAM, PEOPLE + m.data_row([b"123-45-6789", b"x"])
                                       + m.frame(b"C", b"SELECT 1\0") + m.ready_for_query()))
        assert out == [OpenSide(7, None)]     # nothing passed on meanwhile
        outs.append([kind for kind, _ in fast._stalled])
    assert outs[0] == outs[1] == [b"T", b"D", b"C", b"Z"]
