"""The SQLite storage on its own: idempotent ingest, contiguous acks, approval rules."""
import pytest

from agentgate.events import GENESIS, make_event, pack_payload
from collector.storage import ApprovalRow, Conflict, Forbidden, NotFound, SessionFilter
from collector.storage.sqlite import SqliteStorage


def events(sid, n, kinds=None):
    prev, out = GENESIS, []
    for i in range(1, n + 1):
        kind = (kinds or {}).get(i, "command")
        ev = make_event(sid, i, i * 1000, i, kind, pack_payload({"text": f"q{i}", "host": "h"}), prev)
        out.append(ev)
        prev = ev.hash
    return out


@pytest.fixture
def store(tmp_path):
    s = SqliteStorage(tmp_path / "db.sqlite")
    yield s
    s.close()


def test_resent_events_are_stored_once(store):
    evs = events("s", 10, {1: "session_start"})
    acks, fresh = store.ingest(evs)
    assert acks == {"s": 10} and len(fresh) == 10
    acks, fresh = store.ingest(evs[3:])
    assert acks == {"s": 10} and fresh == []
    assert [e.seq for e in store.events("s")] == list(range(1, 11))
    assert store.get_session("s").command_count == 9


def test_ack_is_the_contiguous_watermark(store):
    evs = events("s", 6)
    acks, fresh = store.ingest(evs[:2] + evs[4:])   # 3 and 4 missing
    assert acks == {"s": 2}
    assert [e.seq for e in fresh] == [1, 2]         # only what is contiguous is "new"
    acks, fresh = store.ingest(evs[2:4])            # the gap fills: 5, 6 connect
    assert acks == {"s": 6} and [e.seq for e in fresh] == [3, 4, 5, 6]
    assert store.get_session("s").command_count == 6


def test_session_summary_and_text_search(store):
    start = make_event("a", 1, 5, 0, "session_start", pack_payload(
        {"host": "h1", "target": "db", "protocol": "postgres",
         "process": {"user": "alice", "exe": "/usr/bin/psql", "pid": 7}}), GENESIS)
    cmd = make_event("a", 2, 6, 1, "command", pack_payload({"text": "DELETE FROM users"}), start.hash)
    store.ingest([start, cmd])
    row = store.get_session("a")
    assert (row.host, row.target, row.protocol, row.agent) == ("h1", "db", "postgres",
                                                               "alice /usr/bin/psql (pid 7)")
    assert [s.id for s in store.list_sessions(SessionFilter(text="FROM users"))] == ["a"]
    assert store.list_sessions(SessionFilter(text="DROP")) == []
    with pytest.raises(NotFound):
        store.get_session("b")


def test_approval_transitions(store):
    row = store.create_approval(ApprovalRow(id="", state="pending", command="DROP", requested_by="al",
                                            created_by="host-1", created_ns=1, expires_ns=100))

    def refuse(cur):
        assert cur.id == row.id and cur.state == "pending"
        raise Forbidden("no")
    with pytest.raises(Forbidden):
        store.decide_approval(row.id, True, "", "al", 50, refuse)
    with pytest.raises(Forbidden):
        store.cancel_approval(row.id, "host-2", 50, refuse)
    assert store.get_approval(row.id).state == "pending"
    done = store.decide_approval(row.id, False, "no", "bob", 50)
    assert (done.state, done.decided_by, done.decision_reason) == ("denied", "bob", "no")
    with pytest.raises(Conflict, match="already denied"):
        store.decide_approval(row.id, True, "", "carol", 60)
    late = store.create_approval(ApprovalRow(id="", state="pending", command="X", created_ns=1,
                                             expires_ns=100))
    with pytest.raises(Conflict, match="expired"):
        store.decide_approval(late.id, True, "", "bob", 100)
    # left for expire_approvals(), which reports it so watchers hear of it
    soon = store.create_approval(ApprovalRow(id="", state="pending", command="Y", created_ns=1,
                                             expires_ns=200))
    assert store.next_expiry_ns() == 100
    assert [r.id for r in store.expire_approvals(100)] == [late.id]
    assert store.get_approval(late.id).state == "expired"
    assert [r.id for r in store.expire_approvals(200)] == [soon.id]
    assert store.next_expiry_ns() is None


def test_undecodable_payloads_are_stored_not_fatal(store):
    bad = make_event("s", 1, 1, 0, "session_start", b"\xc1\xc1garbage", GENESIS)
    worse = make_event("s", 2, 2, 1, "command", b"\x81\x91\x01\x01", bad.hash)  # {[1]: 1}
    acks, fresh = store.ingest([bad, worse])
    assert acks == {"s": 2} and len(fresh) == 2


def test_duplicates_inside_one_batch_count_once(store):
    evs = events("s", 3)
    acks, fresh = store.ingest(evs + evs[1:])
    assert acks == {"s": 3} and len(fresh) == 3
    assert store.get_session("s").command_count == 3


def test_a_session_belongs_to_the_host_agent_that_started_it(store):
    evs = events("s", 4)
    assert store.ingest(evs[:2], owner="host-1")[0] == {"s": 2}
    with pytest.raises(Forbidden, match="belongs to host-1"):
        store.ingest(evs[2:], owner="host-2")     # e.g. claiming seqs ahead of host-1
    assert store.ingest(evs[2:], owner="host-1")[0] == {"s": 4}
