"""The approval workflow with real tokens and roles: create, watch, decide, expire."""
import json
import queue
import subprocess
import threading

import grpc
import pytest

from agentgate.client import open_channel
from agentgate.wire import pb, rpc
from tests.support import BIN, run_cli

TOKENS = {
    "root-admin": ("admin", "admin-token-0123456789"),
    "bob": ("approver", "bob-token-0123456789"),
    "carol": ("auditor", "carol-token-0123456789"),
    "host-1": ("hostagent", "host1-token-0123456789"),
}
CONFIG = "approval_ttl_seconds = 60\n" + "".join(
    f'[[tokens]]\nname = "{name}"\nrole = "{role}"\ntoken = "{tok}"\n'
    for name, (role, tok) in TOKENS.items())


def tok(name):
    return TOKENS[name][1]


@pytest.fixture
def secured(collector_factory):
    return collector_factory(CONFIG).start()


def hostagent_stub(c):
    return rpc.ApprovalsStub(open_channel(c.addr())), (("authorization", f"Bearer {tok('host-1')}"),)


def create(c, requested_by="alice", ttl=0, command="DROP TABLE orders"):
    stub, md = hostagent_stub(c)
    return stub.Create(pb.CreateApprovalRequest(
        session_id="s-1", host="build-1", target="orders-db", protocol="postgres",
        command=command, requested_by=requested_by, rule="no-ddl", reason="schema change",
        ttl_seconds=ttl), metadata=md, timeout=10)


def watch(c, approval_id):
    """Collect the states a host agent's Watch stream reports, in a thread."""
    stub, md = hostagent_stub(c)
    states = queue.Queue()

    def run():
        for a in stub.Watch(pb.ApprovalRef(id=approval_id), metadata=md, timeout=60):
            states.put(a.state)
        states.put(None)
    threading.Thread(target=run, daemon=True).start()
    return states


def test_approve_by_an_approver_reaches_the_waiting_host_agent(secured):
    a = create(secured)
    assert a.state == pb.PENDING and a.created_by == "host-1" and len(a.id) >= 8
    states = watch(secured, a.id)
    assert states.get(timeout=10) == pb.PENDING

    r = run_cli("approvals", "list", "--pending", collector=secured, token=tok("carol"))
    assert r.returncode == 0 and a.id in r.stdout and "DROP TABLE orders" in r.stdout

    r = run_cli("approvals", "approve", a.id, "--reason", "planned migration",
                collector=secured, token=tok("bob"))
    assert r.returncode == 0, r.stderr
    assert f"{a.id}: approved by bob" in r.stdout
    assert states.get(timeout=10) == pb.APPROVED and states.get(timeout=10) is None

    items = json.loads(run_cli("approvals", "list", "--json", collector=secured,
                               token=tok("carol")).stdout)
    (item,) = [x for x in items if x["id"] == a.id]
    assert item["state"] == "approved" and item["decided_by"] == "bob"
    assert item["decision_reason"] == "planned migration"
    # decided once: a second decision is refused
    r = run_cli("approvals", "deny", a.id, "--reason", "late", collector=secured, token=tok("root-admin"))
    assert r.returncode == 1 and "already approved" in r.stderr


def test_deny_needs_a_reason_and_reaches_the_host_agent(secured):
    a = create(secured)
    states = watch(secured, a.id)
    assert states.get(timeout=10) == pb.PENDING
    r = run_cli("approvals", "deny", a.id, collector=secured, token=tok("bob"))
    assert r.returncode == 2 and "--reason" in r.stderr
    r = run_cli("approvals", "deny", a.id, "--reason", "not today", collector=secured, token=tok("bob"))
    assert r.returncode == 0 and "denied by bob" in r.stdout
    assert states.get(timeout=10) == pb.DENIED


def test_nobody_decides_their_own_request(secured):
    a = create(secured, requested_by="bob")
    r = run_cli("approvals", "approve", a.id, collector=secured, token=tok("bob"))
    assert r.returncode == 4 and "own request" in r.stderr
    stub, md = hostagent_stub(secured)
    assert stub.Get(pb.ApprovalRef(id=a.id), metadata=md).state == pb.PENDING


def test_expired_requests_cannot_be_approved(secured):
    a = create(secured, ttl=1)
    states = watch(secured, a.id)
    assert states.get(timeout=10) == pb.PENDING
    assert states.get(timeout=10) == pb.EXPIRED   # pushed by the collector, nobody polled
    r = run_cli("approvals", "approve", a.id, collector=secured, token=tok("bob"))
    assert r.returncode == 1 and "expired" in r.stderr


def test_cancel_by_the_host_agent(secured):
    a = create(secured)
    stub, md = hostagent_stub(secured)
    assert stub.Cancel(pb.ApprovalRef(id=a.id), metadata=md).state == pb.CANCELLED
    r = run_cli("approvals", "approve", a.id, collector=secured, token=tok("bob"))
    assert r.returncode == 1 and "already cancelled" in r.stderr


def test_roles_and_authentication(secured):
    a = create(secured)
    r = run_cli("approvals", "approve", a.id, collector=secured, token=tok("carol"))
    assert r.returncode == 4 and "not allowed" in r.stderr and "auditor" in r.stderr
    r = run_cli("approvals", "list", collector=secured)
    assert r.returncode == 4 and "not authenticated" in r.stderr
    r = run_cli("approvals", "list", collector=secured, token="wrong-token-0123456789")
    assert r.returncode == 4 and "not authenticated" in r.stderr
    # a host agent token can't read sessions or decide; an auditor can't ingest
    r = run_cli("sessions", "list", collector=secured, token=tok("host-1"))
    assert r.returncode == 4
    chan = open_channel(secured.addr())
    with pytest.raises(grpc.RpcError) as err:
        rpc.ApprovalsStub(chan).Create(pb.CreateApprovalRequest(command="x"), timeout=5,
                                       metadata=(("authorization", f"Bearer {tok('carol')}"),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        rpc.ApprovalsStub(chan).List(pb.ListApprovalsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_watch_prints_requests_as_they_arrive(secured):
    old = create(secured, command="TRUNCATE audit_log")
    p = subprocess.Popen([str(BIN / "agentgate"), "--collector", secured.address, "--token",
                          tok("carol"), "approvals", "watch", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(p.stdout.readline())
        assert first["id"] == old.id and first["state"] == "pending"   # existing ones first
        new = create(secured, command="DELETE FROM users")
        seen = json.loads(p.stdout.readline())
        assert seen["id"] == new.id and seen["command"] == "DELETE FROM users"
        assert run_cli("approvals", "approve", new.id, collector=secured, token=tok("bob")).returncode == 0
        decided = json.loads(p.stdout.readline())
        assert decided["id"] == new.id and decided["state"] == "approved"
    finally:
        p.terminate()
        p.wait(10)
