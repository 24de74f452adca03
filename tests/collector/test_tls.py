"""TLS for admins, mTLS for host agents: only a certificate from the right CA gets in."""
import json

import grpc
import pytest

from agentgate.client import CollectorAddress, open_channel
from agentgate.wire import pb, rpc
from tests.certs import CA
from tests.support import run_cli

ADMIN = "admin-token-0123456789"


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path / "pki")
    server = ca.issue("collector.test", server=True)
    return ca, server


@pytest.fixture
def tls_collector(collector_factory, pki):
    ca, (cert, key) = pki
    c = collector_factory(f"""
agent_listen = "127.0.0.1:0"
[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca.pem}"
[[tokens]]
name = "root"
role = "admin"
token = "{ADMIN}"
""")
    return c.start()


def register(address: CollectorAddress):
    chan = open_channel(address)
    try:
        return rpc.AgentsStub(chan).Register(pb.RegisterRequest(host="h1", version="t"), timeout=5,
                                             metadata=address.metadata())
    finally:
        chan.close()


def test_host_agent_with_a_valid_client_certificate_is_admitted(tls_collector, pki):
    ca, _ = pki
    cert, key = ca.issue("host-17")
    resp = register(CollectorAddress(tls_collector.addresses[1], ca=str(ca.pem), cert=str(cert),
                                     key=str(key)))
    assert resp.agent_id
    r = run_cli("--ca", str(ca.pem), "agents", "list", "--json", collector=tls_collector,
                token=ADMIN)
    assert r.returncode == 0, r.stderr
    (agent,) = json.loads(r.stdout)
    assert agent["principal"] == "host-17" and agent["host"] == "h1"


def test_host_agent_without_a_valid_client_certificate_is_refused(tls_collector, pki, tmp_path):
    ca, _ = pki
    agents_port = tls_collector.addresses[1]
    with pytest.raises(grpc.RpcError) as err:          # no client certificate at all
        register(CollectorAddress(agents_port, ca=str(ca.pem)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rogue = CA(tmp_path / "rogue", "rogue-ca")
    cert, key = rogue.issue("host-17")                 # right name, wrong CA
    with pytest.raises(grpc.RpcError) as err:
        register(CollectorAddress(agents_port, ca=str(ca.pem), cert=str(cert), key=str(key)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:          # the admin port wants a token instead
        register(CollectorAddress(tls_collector.address, ca=str(ca.pem)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_over_tls(tls_collector, pki, tmp_path):
    ca, _ = pki
    r = run_cli("--ca", str(ca.pem), "sessions", "list", collector=tls_collector, token=ADMIN)
    assert r.returncode == 0, r.stderr
    other = CA(tmp_path / "other", "other-ca")         # a CA that didn't sign the server
    r = run_cli("--ca", str(other.pem), "sessions", "list", collector=tls_collector, token=ADMIN)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    r = run_cli("sessions", "list", collector=tls_collector, token=ADMIN)   # plaintext to TLS
    assert r.returncode == 3


def test_cli_refuses_to_send_a_token_in_clear_to_a_remote_host():
    r = run_cli("sessions", "list", collector="192.0.2.10:7421", token=ADMIN)
    assert r.returncode == 2 and "clear text" in r.stderr
