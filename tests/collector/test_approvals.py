"""The approval workflow with real tokens and roles: create, watch, decide, expire."""
import json
import queue
import subprocess
import threading

import grpc
import pytest

from agentgate.client import open_channel
from agentgate.wire import pb, rpc
from tests.collector.test_server import one_line_error, start
from tests.support import BIN, run_cli

TOKENS = {   # name: (role, token, unix_users)
    "root-admin": ("admin", "admin-token-0123456789", []),
    "bob": ("approver", "bob-token-0123456789", []),
    "carol": ("auditor", "carol-token-0123456789", []),
    "host-1": ("hostagent", "host1-token-0123456789", []),
    "host-2": ("hostagent", "host2-token-0123456789", []),
    "alice-ops": ("approver", "alice-token-0123456789", ["alice"]),
    "dana-ops": ("approver", "dana-token-0123456789", ["dana@h1"]),
}
CONFIG = "approval_ttl_seconds = 60\n" + "".join(
    f'[[tokens]]\nname = "{name}"\nrole = "{role}"\ntoken = "{tok}"\n'
    f'unix_users = {json.dumps(links)}\n'
    for name, (role, tok, links) in TOKENS.items())


def tok(name):
    return TOKENS[name][1]


@pytest.fixture
def secured(collector_factory):
    return collector_factory(CONFIG).start()


def approvals_stub(c, principal="host-1"):
    md = (("authorization", f"Bearer {tok(principal)}"),) if principal else ()
    return rpc.ApprovalsStub(open_channel(c.addr())), md


def hostagent_stub(c):
    return approvals_stub(c, "host-1")


def create(c, requested_by="alice", ttl=0, command="DROP TABLE orders", host="build-1",
           agent="host-1"):
    stub, md = approvals_stub(c, agent)
    return stub.Create(pb.CreateApprovalRequest(
        session_id="s-1", host=host, target="orders-db", protocol="postgres",
        command=command, requested_by=requested_by, rule="no-ddl", reason="schema change",
        ttl_seconds=ttl), metadata=md, timeout=10)


def watch(c, approval_id, agent="host-1"):
    """Collect the states a host agent's Watch stream reports, in a thread."""
    stub, md = approvals_stub(c, agent)
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


def approve(c, approval_id, principal):
    return run_cli("approvals", "approve", approval_id, collector=c, token=tok(principal))


def refused_as_own(r):
    return r.returncode == 4 and "you cannot decide your own request" in r.stderr


def test_a_token_linked_to_a_unix_user_cannot_decide_that_users_requests(secured):
    mine = [create(secured, requested_by="alice"),
            create(secured, requested_by="alice", host="h7", agent="host-2")]  # any host
    for a in mine:
        assert refused_as_own(approve(secured, a.id, "alice-ops"))
        r = run_cli("approvals", "deny", a.id, "--reason", "x", collector=secured,
                    token=tok("alice-ops"))
        assert refused_as_own(r)
        assert len(r.stderr.strip().splitlines()) == 1
    stub, md = hostagent_stub(secured)
    assert stub.Get(pb.ApprovalRef(id=mine[0].id), metadata=md).state == pb.PENDING
    theirs = create(secured, requested_by="bob")
    r = approve(secured, theirs.id, "alice-ops")
    assert r.returncode == 0 and "approved by alice-ops" in r.stdout
    assert approve(secured, mine[1].id, "bob").returncode == 0   # someone else decides


def test_a_user_at_host_link_covers_that_host_only(secured):
    on_h1 = create(secured, requested_by="dana", host="h1")
    assert refused_as_own(approve(secured, on_h1.id, "dana-ops"))
    elsewhere = create(secured, requested_by="dana", host="build-1")
    assert approve(secured, elsewhere.id, "dana-ops").returncode == 0


def test_a_token_named_like_a_unix_user_is_not_that_user(secured):
    # Token names and Unix user names are different namespaces: only unix_users links them.
    a = create(secured, requested_by="bob")
    r = approve(secured, a.id, "bob")
    assert r.returncode == 0 and "approved by bob" in r.stdout


def test_the_principal_that_filed_a_request_cannot_decide_it(secured):
    a = create(secured, requested_by="svc", agent="root-admin")   # admins may file too
    assert refused_as_own(approve(secured, a.id, "root-admin"))
    assert approve(secured, a.id, "bob").returncode == 0


def test_in_open_mode_the_local_admin_decides_what_the_local_host_agent_filed(collector):
    for user in ("ci-bot", "local"):   # "local" is the open-mode principal's name, not a user
        a = create(collector, requested_by=user, agent=None)
        assert a.created_by == "local"
        r = run_cli("approvals", "approve", a.id, collector=collector)
        assert r.returncode == 0 and "approved by local" in r.stdout, r.stderr


def test_a_host_agent_watches_and_cancels_only_its_own_requests(secured):
    a = create(secured)                       # filed by host-1
    other, md = approvals_stub(secured, "host-2")
    for call in (other.Cancel, other.Get):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.ApprovalRef(id=a.id), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == f"approval request {a.id} was filed by another host agent"
    with pytest.raises(grpc.RpcError) as err:
        list(other.Watch(pb.ApprovalRef(id=a.id), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # the request is untouched, and its own host agent follows and cancels it
    states = watch(secured, a.id)
    assert states.get(timeout=10) == pb.PENDING
    stub, md = hostagent_stub(secured)
    assert stub.Cancel(pb.ApprovalRef(id=a.id), metadata=md, timeout=10).state == pb.CANCELLED
    assert states.get(timeout=10) == pb.CANCELLED and states.get(timeout=10) is None
    # the other roles are not bound: readers follow any request, admins cancel any
    b = create(secured, agent="host-2")
    reader, md = approvals_stub(secured, "carol")
    assert next(iter(reader.Watch(pb.ApprovalRef(id=b.id), metadata=md, timeout=10))).id == b.id
    admin, md = approvals_stub(secured, "root-admin")
    done = admin.Cancel(pb.ApprovalRef(id=b.id), metadata=md, timeout=10)
    assert done.state == pb.CANCELLED and done.decided_by == "root-admin"


TOKEN_A = '[[tokens]]\nname = "a"\ntoken = "0123456789abcdefg"\n'


@pytest.mark.parametrize("links, fragment", [
    ('["alice", ""]', "not ''"),
    ('["al ice"]', "not 'al ice'"),
    ('["alice@"]', "not 'alice@'"),
    ('["@h1"]', "not '@h1'"),
    ('["a@b@c"]', "not 'a@b@c'"),
    ("[42]", "not 42"),
    ('"alice"', "'unix_users' must be list"),
])
def test_bad_unix_users_are_one_line_config_errors(tmp_path, links, fragment):
    text = f'{TOKEN_A}role = "approver"\nunix_users = {links}\n'
    one_line_error(start(tmp_path, text), "[[tokens]] #1", fragment)


def test_unix_users_only_on_roles_that_decide(tmp_path):
    text = f'{TOKEN_A}role = "hostagent"\nunix_users = ["root"]\n'
    one_line_error(start(tmp_path, text), "'unix_users' is for roles that decide", "not hostagent")


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
