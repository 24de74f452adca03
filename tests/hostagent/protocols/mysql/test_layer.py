"""The MySQL layer as scripts of events in and commands out: start-up with injected
credentials, judging (allow, deny with an ERR whose sequence id the client expects,
hold), answers followed packet by packet, and bad input from either side ending the
session with a ProtocolError only."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.policy import Decision
from hostagent.protocols.api import (CLIENT, UPSTREAM, ApprovalDecided, Close, DataReceived,
                                     Hold, ProtocolError, Record, Start, ToClient, ToUpstream)
from hostagent.protocols.mysql import messages as m
from hostagent.protocols.mysql.auth import native_scramble
from hostagent.protocols.mysql.layer import MysqlLayer
from hostagent.protocols.mysql.packets import PacketReader, frame
from tests.hostagent.protocols.playbook import Playbook, record, to_client, to_upstream

NONCE = bytes(range(1, 21))
GREETING = m.Greeting("5.5.5-10.11.19-MariaDB", 77, NONCE, m.SUPPORTED | m.SSL, 45, 2,
                      "mysql_native_password")


def decide(req):
    if not req.parsed or req.unknown:   # (as policy does without an allow rule naming them)
        return Decision("deny", "(unparseable)", "the statement could not be parsed")
    kinds = req.attributes.get("statements", ())
    if "DROP" in kinds:
        return Decision("deny", "no-ddl", "no schema changes")
    if "DELETE" in kinds:
        return Decision("review", "ask", "deletes need a human")
    return Decision("allow", "(default)", "no rule matched")


def packets(data: bytes):
    return PacketReader().receive_data(data)


def logged_in(mode: str = "STRICT_TRANS_TABLES", charset: str = "utf8mb4", **kw) -> MysqlLayer:
    """A layer past start-up: the server greeted, the agent answered, the server said OK."""
    layer = MysqlLayer(decide=decide, target="db", identity={"uid": 1000}, user="app",
                       password="pw", **kw)
    layer.handle(Start(("127.0.0.1", 3306)))
    out = layer.handle(DataReceived(UPSTREAM, frame(m.greeting(GREETING), 0)[0]))
    (greeting,) = packets(to_client(out))
    g = m.parse_greeting(greeting.payload)
    response = m.HandshakeResponse(g.capabilities & ~m.SSL, 1 << 24, 45, "agent", b"x" * 20,
                                   "shop", "mysql_native_password")
    out = layer.handle(DataReceived(CLIENT, frame(m.handshake_response(response), 1)[0]))
    (up,) = packets(to_upstream(out))
    sent = m.parse_handshake_response(up.payload)
    assert (sent.user, sent.database, up.seq) == ("app", "shop", 1)
    assert sent.auth == native_scramble(b"pw", NONCE)            # the injected password
    out = layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 2)[0]))
    (probe,) = packets(to_upstream(out))              # the session's settings, first
    assert probe.payload.startswith(b"\x03SELECT @@SESSION.sql_mode") and not to_client(out)
    out = layer.handle(DataReceived(UPSTREAM, probe_answer(mode, charset)))
    (ok,) = packets(to_client(out))
    assert ok.payload[:1] == b"\0" and ok.seq == 2
    return layer


def probe_answer(mode: str, charset: str = "utf8mb4") -> bytes:
    """The server's answer to the layer's settings probe (DEPRECATE_EOF: no EOFs)."""
    col = m.Column("", "", "", "m", "", 45, 64, m.T_VAR_STRING, 0, 0)
    data, seq = b"", 1
    for p in (b"\x02", m.column(col), m.column(col), m.text_row([mode.encode(), charset.encode()]),
              m.ok(2, header=0xFE)):
        chunk, seq = frame(p, seq)
        data += chunk
    return data


def query(text: str, seq: int = 0) -> bytes:
    return frame(bytes((m.COM_QUERY,)) + text.encode(), seq)[0]


def test_the_agent_is_greeted_with_the_servers_version_and_a_stand_in_thread_id():
    keys: dict = {}
    layer = MysqlLayer(decide=decide, target="db", user="app", password="pw", thread_ids=keys)
    layer.handle(Start(("127.0.0.1", 3306)))
    out = layer.handle(DataReceived(UPSTREAM, frame(m.greeting(GREETING), 0)[0]))
    g = m.parse_greeting(packets(to_client(out))[0].payload)
    assert g.version == GREETING.version and g.nonce != NONCE
    assert g.thread_id != 77 and keys[g.thread_id][0] == 77
    assert not g.capabilities & m.SSL                  # no local CA: TLS not offered
    assert not g.capabilities & (m.COMPRESS | m.IGNORE_SPACE)


def test_an_allowed_statement_is_recorded_before_it_goes_upstream():
    layer = logged_in()
    q = query("SELECT id FROM orders")
    assert (Playbook(layer)
            >> DataReceived(CLIENT, q)
            << record("command", text="SELECT id FROM orders", tables=["orders"])
            << ToUpstream(q, (1,)))


def test_a_denied_statement_gets_an_err_with_the_sequence_id_the_client_expects():
    layer = logged_in()
    out = layer.handle(DataReceived(CLIENT, query("SELECT 1; DROP TABLE t")))
    assert not to_upstream(out)
    (err,) = packets(to_client(out))
    e = m.parse_err(err.payload)
    assert err.seq == 1 and (e.code, e.state) == (1142, "42000")
    assert 'rule "no-ddl"' in e.message
    # the session goes on: the next command is judged and sent
    assert to_upstream(layer.handle(DataReceived(CLIENT, query("SELECT 2")))) == query("SELECT 2")


def test_a_split_command_is_answered_after_its_last_chunk():
    layer = logged_in()
    text = "DROP TABLE t /* " + "x" * (1 << 24) + " */"
    out = layer.handle(DataReceived(CLIENT, query(text)))
    (err,) = packets(to_client(out))
    assert err.seq == 2                                  # two chunks: 0 and 1


def test_a_held_statement_waits_and_what_follows_waits_behind_it():
    layer = logged_in()
    out = layer.handle(DataReceived(CLIENT, query("DELETE FROM t")))
    hold = out[-1]
    assert isinstance(hold, Hold) and not to_upstream(out)
    assert layer.handle(DataReceived(CLIENT, query("SELECT 9"))) == []
    out = layer.handle(ApprovalDecided(hold.key, True, "ok"))
    assert to_upstream(out) == query("DELETE FROM t")
    # its answer comes, then the deferred statement is judged and sent
    out = layer.handle(DataReceived(UPSTREAM, frame(m.ok(affected=3), 1)[0]))
    assert any(isinstance(c, Record) and c.fields.get("rows_affected") == 3 for c in out)
    assert to_upstream(out) == query("SELECT 9")


def test_a_denied_hold_is_an_err():
    layer = logged_in()
    hold = layer.handle(DataReceived(CLIENT, query("DELETE FROM t")))[-1]
    out = layer.handle(ApprovalDecided(hold.key, False, "not today"))
    assert m.parse_err(packets(to_client(out))[0].payload).message.endswith("not today")


def result_set(rows, seq=1, status=2):
    """A text result set as a server sends it under DEPRECATE_EOF (the test client's)."""
    col = m.Column("shop", "c", "customers", "email", "email", 45, 320, m.T_VAR_STRING, 0, 0)
    payloads = [b"\x01", m.column(col)] + [m.text_row(r) for r in rows] + \
        [m.ok(status, header=0xFE)]
    data = b""
    for p in payloads:
        chunk, seq = frame(p, seq)
        data += chunk
    return data


def test_rows_are_masked_by_the_column_their_definition_names():
    from hostagent.masking import MaskRule, Masker
    layer = logged_in(masker=Masker((MaskRule("pii", columns=("customers.email",)),)))
    layer.handle(DataReceived(CLIENT, query("SELECT * FROM customers")))
    out = layer.handle(DataReceived(UPSTREAM, result_set([[b"ann@example.com"], [None]])))
    got = packets(to_client(out))
    assert [p.seq for p in got] == [1, 2, 3, 4, 5]
    assert m.parse_text_row(got[2].payload, 1) == [b"****"]
    assert m.parse_text_row(got[3].payload, 1) == [None]
    (rec,) = [c for c in out if isinstance(c, Record) and c.kind == "output"]
    assert rec.fields["masked"] == {"pii:column": 1} and rec.fields["sample"] == [["****"], [None]]


def test_local_infile_is_refused_unless_policy_allows_that_file():
    layer = logged_in()
    layer.handle(DataReceived(CLIENT, query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t")))
    out = layer.handle(DataReceived(UPSTREAM, frame(b"\xfb/etc/shadow", 1)[0]))
    assert any(isinstance(c, Record) and c.kind == "local_file" for c in out)
    assert packets(to_upstream(out))[0].payload == b""     # the server gets an empty file
    e = m.parse_err(packets(to_client(out))[0].payload)
    assert e.code == 1148 and "/etc/shadow" in e.message
    # the server's answer to the empty file is not passed on; the session goes on
    assert layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 3)[0])) == []
    assert to_upstream(layer.handle(DataReceived(CLIENT, query("SELECT 1")))) == query("SELECT 1")


@given(st.binary(min_size=1, max_size=64))
@settings(max_examples=300, deadline=None)
def test_malformed_input_from_the_agent_is_a_protocol_error_or_an_answer(data):
    layer = logged_in()
    try:
        out = layer.handle(DataReceived(CLIENT, frame(data, 0)[0]))
    except ProtocolError:
        return
    assert all(isinstance(c, (Record, ToUpstream, ToClient, Hold, Close)) for c in out)


@given(st.lists(st.binary(max_size=48), min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_malformed_answers_from_the_server_are_protocol_errors_only(payloads):
    layer = logged_in()
    layer.handle(DataReceived(CLIENT, query("SELECT 1")))
    data, seq = b"", 1
    for p in payloads:
        chunk, seq = frame(p, seq)
        data += chunk
    try:
        layer.handle(DataReceived(UPSTREAM, data))
    except ProtocolError:
        pass


@pytest.mark.parametrize("charset", [28, 1])   # gbk, big5
def test_a_client_character_set_that_can_hide_a_backslash_is_refused(charset):
    layer = MysqlLayer(decide=decide, target="db", user="app", password="pw")
    layer.handle(Start(("127.0.0.1", 3306)))
    layer.handle(DataReceived(UPSTREAM, frame(m.greeting(GREETING), 0)[0]))
    response = m.HandshakeResponse(m.SUPPORTED, 1 << 24, charset, "a", b"", None,
                                   "mysql_native_password")
    out = layer.handle(DataReceived(CLIENT, frame(m.handshake_response(response), 1)[0]))
    assert isinstance(out[-1], Close) and b"character set" in out[-1].final


@pytest.mark.parametrize("mode", ["ANSI_QUOTES", "STRICT_ALL_TABLES,NO_BACKSLASH_ESCAPES", "ORACLE"])
def test_a_session_whose_sql_mode_reads_text_otherwise_is_refused(mode):
    layer = MysqlLayer(decide=decide, target="db", user="app", password="pw")
    layer.handle(Start(("127.0.0.1", 3306)))
    layer.handle(DataReceived(UPSTREAM, frame(m.greeting(GREETING), 0)[0]))
    response = m.HandshakeResponse(m.SUPPORTED, 1 << 24, 45, "a", b"", None,
                                   "mysql_native_password")
    layer.handle(DataReceived(CLIENT, frame(m.handshake_response(response), 1)[0]))
    layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 2)[0]))
    out = layer.handle(DataReceived(UPSTREAM, probe_answer(mode)))
    assert isinstance(out[-1], Close) and b"sql_mode" in out[-1].final


def test_a_latin1_session_may_send_ascii_only_until_it_sets_utf8():
    layer = logged_in(charset="latin1")     # (libmysqlclient logs in with latin1)
    # 0xA0 is a space to latin1, a letter to a UTF-8 reader: the server would run a UNION
    hidden = frame(b"\x03SELECT item\xa0FROM\xa0orders\xa0UNION\xa0SELECT\xa0card\xa0FROM\xa0c", 0)[0]
    out = layer.handle(DataReceived(CLIENT, hidden))
    assert not to_upstream(out) and m.parse_err(packets(to_client(out))[0].payload).code == 1142
    assert to_upstream(layer.handle(DataReceived(CLIENT, query("SET NAMES utf8mb4"))))
    layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 1)[0]))
    out = layer.handle(DataReceived(CLIENT, query("SELECT 'café'")))
    assert to_upstream(out) == query("SELECT 'café'")


def test_no_cursor_is_read_without_the_columns_that_say_how_to_mask_it():
    layer = logged_in()
    # FETCH from a cursor the proxy never saw opened; EXECUTE of MariaDB's "last
    # prepared" id (-1) asking for a cursor
    fetch = frame(bytes((m.COM_STMT_FETCH,)) + (5).to_bytes(4, "little") + (100).to_bytes(4, "little"), 0)[0]
    execute = frame(bytes((m.COM_STMT_EXECUTE,)) + b"\xff\xff\xff\xff" + b"\x01" + (1).to_bytes(4, "little"), 0)[0]
    for data, code in ((fetch, 1421), (execute, 1243)):
        out = layer.handle(DataReceived(CLIENT, data))
        assert not to_upstream(out) and m.parse_err(packets(to_client(out))[0].payload).code == code


def test_what_a_failed_multi_statement_never_ran_changes_nothing():
    from hostagent.masking import MaskRule, Masker
    layer = logged_in(masker=Masker((MaskRule("pii", columns=("customers.card",)),)))
    layer.handle(DataReceived(CLIENT, query("PREPARE s FROM 'SELECT CONCAT(card, 1) x FROM customers'")))
    layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 1)[0]))
    assert layer.sql_prepared["s"].masked
    layer.handle(DataReceived(CLIENT, query("SELECT * FROM nosuch; PREPARE s FROM 'SELECT 1'; USE other")))
    layer.handle(DataReceived(UPSTREAM, frame(m.err(1146, "42S02", "no such table"), 1)[0]))
    assert layer.sql_prepared["s"].masked and layer.database == "shop"
    layer.handle(DataReceived(CLIENT, query("USE other")))
    layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 1)[0]))
    assert layer.database == "other"


def test_reset_connection_brings_back_the_logins_character_set():
    layer = logged_in(charset="latin1")
    layer.handle(DataReceived(CLIENT, query("SET NAMES utf8mb4")))
    layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 1)[0]))
    assert not layer.ascii_only
    layer.handle(DataReceived(CLIENT, frame(bytes((m.COM_RESET_CONNECTION,)), 0)[0]))
    layer.handle(DataReceived(UPSTREAM, frame(m.ok(), 1)[0]))
    out = layer.handle(DataReceived(CLIENT, frame(b"\x03SELECT 1 --\xa0/*\n;DROP TABLE t; -- */", 0)[0]))
    assert not to_upstream(out)            # latin1 again: not ASCII, so not judged as UTF-8
    # a prepared SET NAMES does not count
    layer.handle(DataReceived(CLIENT, frame(bytes((m.COM_STMT_PREPARE,)) + b"SET NAMES utf8mb4", 0)[0]))
    assert not layer._to_utf8
