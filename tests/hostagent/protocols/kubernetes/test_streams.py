"""Kubernetes attach, port-forward and a terminal exec through the proxy, end to end: kubectl
under `agentgate run` as nobody reaches the test API server (tests/k8s_server.py: attach to
a container's main process, port-forward to this host's ports) through the eBPF redirect;
the proxy judges each before it starts and records the stream."""
from __future__ import annotations

import os
import socket

import pytest

from tests.hostagent.protocols.kubernetes.test_proxy import (  # noqa: F401 - fixtures
    agent, cluster, events, make_host)
from tests.support import BIN, raw_echo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")
POLICY = """
default = "allow"
unparseable = "deny"
[[rules]]
name = "no-ssh-forwarding"
action = "deny"
reason = "no tunnels to sshd"
commands = ["port 22"]
"""


@pytest.fixture
def host(tmp_path, collector, cluster):
    # mode "allow": the agent's own client must reach kubectl's local port-forward listener
    # (in "deny" mode that loopback connect, to no target, is refused with EPERM)
    h, echo = make_host(tmp_path, collector, cluster, POLICY, mode="allow")
    yield h
    h.cleanup()
    echo.close()


@pytest.fixture(scope="module")
def tcp_echo():
    with raw_echo() as port:
        yield port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kubectl_attach_types_a_line_and_it_is_recorded(host, cluster):
    n = len(cluster.attaches)
    # (stdin held open a moment: its EOF detaches)
    p = agent(host, "(echo 'echo typed-into-attach'; sleep 1.5) | "
                    "kubectl attach -i pod-a -c main")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "typed-into-attach\n"
    assert [(a["pod"], a["container"], a["detached"]) for a in cluster.attaches[n:]] == \
        [("pod-a", "main", True)]
    att = next(c for c in events(host, "command") if c.get("kind") == "attach")
    assert att["text"] == "attach default/pod-a [main]"
    assert att["decision"]["action"] == "allow" and att["stdin"] is True
    data = events(host, "data")
    assert b"echo typed-into-attach\n" in b"".join(
        d["data"] for d in data if d.get("stream") == "stdin")
    assert b"typed-into-attach\n" in b"".join(
        d["data"] for d in data if d.get("stream") == "stdout")
    assert "echo typed-into-attach" in [c["text"] for c in events(host, "command")
                                        if c.get("via") == "stdin"]


def _forward_script(local: int, remote: int) -> str:
    client = (f"import socket,time\n"
              f"for _ in range(200):\n"
              f"    try:\n"
              f"        c=socket.create_connection(('127.0.0.1',{local}),timeout=10); break\n"
              f"    except OSError: time.sleep(0.05)\n"
              f"c.sendall(b'bytes-through-the-tunnel'); c.shutdown(1)\n"
              f"got=b''\n"
              f"while d:=c.recv(100): got+=d\n"
              f"print('GOT', got.decode())\n")
    return (f"kubectl port-forward pod-a {local}:{remote} & pf=$!; "
            f"{BIN / 'python'} -c \"{client}\"; sleep 0.5; kill $pf; wait $pf")


@pytest.mark.parametrize("websockets", [True, False])
def test_kubectl_port_forward_is_recorded(host, cluster, tcp_echo, websockets):
    local = _free_port()
    env = {"KUBECTL_PORT_FORWARD_WEBSOCKETS": str(websockets).lower()}
    p = agent(host, _forward_script(local, tcp_echo), extra_env=env)
    assert "GOT bytes-through-the-tunnel" in p.stdout, p.stderr
    pf = cluster.portforwards[-1]
    assert [c["port"] for c in pf["connections"]] == [tcp_echo]
    pfc = next(c for c in events(host, "command") if c.get("kind") == "portforward")
    assert pfc["decision"]["action"] == "allow"
    data = events(host, "data")
    assert b"bytes-through-the-tunnel" in b"".join(d["data"] for d in data
                                                   if d.get("dir") == "in")
    assert b"bytes-through-the-tunnel" in b"".join(d["data"] for d in data
                                                   if d.get("dir") == "out")


@pytest.mark.log_allows(r"lost connection to pod|ConnectionResetError|Traceback|"
                        r"File \"<string>\"|an error occurred forwarding")
@pytest.mark.parametrize("websockets", [True, False])
def test_a_port_forward_to_port_22_is_refused_as_its_stream_names_it(host, cluster, websockets):
    # kubectl names the port only in the streams it opens after the upgrade: each is
    # judged as it is opened, and a refused one ends the session before it goes on
    n = len(cluster.portforwards)
    local = _free_port()
    p = agent(host, _forward_script(local, 22),
              extra_env={"KUBECTL_PORT_FORWARD_WEBSOCKETS": str(websockets).lower()})
    assert "GOT" not in p.stdout or "GOT \n" in p.stdout
    dialled = [c["port"] for pf in cluster.portforwards[n:] for c in pf.get("connections", [])]
    assert 22 not in dialled
    refused = [c for c in events(host, "command")
               if c.get("kind") == "portforward" and c.get("port") == "22"]
    assert refused and refused[0]["decision"]["rule"] == "no-ssh-forwarding"
    assert refused[0]["decision"]["action"] == "deny"


def test_kubectl_exec_tty_records_resize_and_exit_code(host, cluster):
    n = len(cluster.execs)
    p = agent(host, "(sleep 1; printf 'stty size; exit 3\\n'; sleep 3) | "
                    "script -qec 'stty cols 101 rows 31; kubectl exec -it pod-a -- sh' "
                    "/dev/null")
    assert "31 101" in p.stdout, (p.stdout, p.stderr)
    e = cluster.execs[n:]
    assert [(x["tty"], x["exit_code"]) for x in e] == [(True, 3)]
    assert (101, 31) in e[0]["resizes"]
    assert {"cols": 101, "rows": 31} in [{k: r.get(k) for k in ("cols", "rows")}
                                         for r in events(host, "resize")]
    assert 3 in [o.get("exit_code") for o in events(host, "output")]
    exe = next(c for c in events(host, "command") if c.get("kind") == "exec")
    assert exe["tty"] is True and exe["stdin"] is True


def test_kubectl_attach_over_spdy_is_recorded_too(host, cluster):
    p = agent(host, "(echo 'echo typed-over-spdy'; sleep 1.5) | kubectl attach -i pod-a -c main",
              extra_env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == "typed-over-spdy\n"
    assert "echo typed-over-spdy" in [c["text"] for c in events(host, "command")
                                      if c.get("via") == "stdin"]


def test_the_python_clients_port_forward_is_judged_before_it_starts_and_recorded(
        host, cluster, tcp_echo):
    script = host.public / "pf.py"
    script.write_text(f'''
from kubernetes import client, config
from kubernetes.stream import portforward
config.load_kube_config()
api = client.CoreV1Api()
pf = portforward(api.connect_get_namespaced_pod_portforward, "pod-a", "default",
                 ports="{tcp_echo}")
s = pf.socket({tcp_echo})
s.sendall(b"python-through-the-proxy")
got = b""
while len(got) < 24:
    got += s.recv(100)
print(got.decode())
s.close()
pf.close()
try:
    portforward(api.connect_get_namespaced_pod_portforward, "pod-a", "default", ports="22")
    print("port 22: forwarded")
except Exception as exc:
    print("port 22: refused", type(exc).__name__)
''')
    script.chmod(0o644)
    # (its websocket trusts the kubeconfig's CA, not SSL_CERT_FILE: see test_proxy)
    kc = cluster.kubeconfig(host.public / "kubeconfig-py", token="placeholder",
                            ca_path=f"/run/agentgate/trust/{host.tree}/ca.pem")
    kc.chmod(0o644)
    p = agent(host, f"{BIN / 'python'} {script}", extra_env={"KUBECONFIG": str(kc)})
    assert p.returncode == 0, p.stderr
    assert "python-through-the-proxy" in p.stdout
    assert "port 22: refused" in p.stdout
    cmds = [c for c in events(host, "command") if c.get("kind") == "portforward"]
    assert [(c["command"], c["decision"]["action"]) for c in cmds] == \
        [([f"port {tcp_echo}"], "allow"), (["port 22"], "deny")]
    data = events(host, "data")
    assert b"python-through-the-proxy" in b"".join(d["data"] for d in data
                                                   if d.get("dir") == "in")
