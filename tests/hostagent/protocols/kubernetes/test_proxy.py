"""Kubernetes exec through the proxy, end to end on the real kernel: kubectl and the Python
client, run under `agentgate run` as nobody with a kubeconfig that names the real API
server, a placeholder token and no CA data, reach a test API server (tests/k8s_server.py,
which runs the commands for real) through the eBPF redirect; the proxy judges each exec
before anything starts, injects the real token and records the terminal stream."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.hostagent.intercept.conftest import EchoServer, Host
from tests.k8s_server import K8sServer
from tests.support import BIN, pending_approvals, run_cli, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")
TOKEN = "real-cluster-token-5d4c3b2a"
ENV = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}
POLICY = """
default = "allow"
unparseable = "deny"
[[rules]]
name = "no-destruction-in-pods"
action = "deny"
reason = "agents may not delete files in pods"
commands = ["rm *", "*rm -rf*"]
[[rules]]
name = "restarts-need-a-human"
action = "review"
reason = "a human says"
commands = ["echo restart*"]
"""


@pytest.fixture(scope="module")
def cluster():
    s = K8sServer(token=TOKEN).start()
    yield s
    s.stop()


def make_host(tmp_path, collector, cluster, policy: str = POLICY, mode: str = "deny"):
    """A host agent config with the `cluster` target (the real token injected) and the
    agent's kubeconfig (the real address, a placeholder token, no CA data: the system
    trust, which agentgate run extends with the local CA). -> (Host, EchoServer)"""
    echo = EchoServer()
    h = Host(tmp_path, collector, echo)
    (tmp_path / "token").write_text(TOKEN + "\n")        # root's alone
    (tmp_path / "policy.toml").write_text(policy)
    h.config = h.write("k8s", mode=mode, extra=f'''
[[targets]]
name = "cluster"
protocol = "kubernetes"
address = ["127.0.0.1:{cluster.port}"]
ca = "{cluster.ca_pem}"
token_file = "{tmp_path}/token"
''')
    h.config.write_text(f'policy = "{tmp_path}/policy.toml"\n' + h.config.read_text())
    h.kubeconfig = cluster.kubeconfig(h.public / "kubeconfig", token="placeholder")
    h.kubeconfig.chmod(0o644)
    return h, echo


@pytest.fixture
def host(tmp_path, collector, cluster):
    h, echo = make_host(tmp_path, collector, cluster)
    yield h
    h.cleanup()
    echo.close()


def agent(h: Host, script: str, stdin: str | None = None, extra_env: dict | None = None):
    p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(h.config), "--user",
                        "nobody", "--", "sh", "-c", script], input=stdin, capture_output=True,
                       text=True, timeout=90, env={**ENV, "KUBECONFIG": str(h.kubeconfig),
                                                   **(extra_env or {})})
    h._watch_run(p.stderr)
    return p


def sessions(h: Host) -> list[dict]:
    return list(reversed(h.sessions("kubernetes")))


def events(h: Host, kind: str) -> list[dict]:
    return [f for s in sessions(h) for k, f in s["events"] if k == kind]


def test_kubectl_exec_runs_is_recorded_and_replays(host, cluster):
    n = len(cluster.execs)
    p = agent(host, "kubectl exec pod-a -- echo hello-from-the-pod")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello-from-the-pod\n"
    ran = cluster.execs[n:]
    assert [e["command"] for e in ran] == [["echo", "hello-from-the-pod"]]
    # the API server saw the real token; the agent only ever had the placeholder
    auths = {r[2].get("authorization") for r in cluster.requests}
    assert f"Bearer {TOKEN}" in auths and "Bearer placeholder" not in auths
    cmds = events(host, "command")
    exe = next(c for c in cmds if c.get("kind") == "exec")
    assert exe["text"] == "exec default/pod-a [main]: echo hello-from-the-pod"
    assert exe["decision"]["action"] == "allow"
    assert any(c.get("method") == "GET" and c["path"].endswith("/pods/pod-a") for c in cmds)
    out = [d for d in events(host, "data") if d.get("stream") == "stdout"]
    assert b"".join(d["data"] for d in out) == b"hello-from-the-pod\n"
    assert any(o.get("exit_code") == 0 for o in events(host, "output"))
    assert TOKEN not in json.dumps([s["events"] for s in sessions(host)], default=str)
    # replay and asciicast
    sid = next(s["id"] for s in sessions(host) if any(
        k == "data" for k, _ in s["events"]))
    r = run_cli("sessions", "replay", sid, "--speed", "0", collector=host.collector)
    assert "hello-from-the-pod" in r.stdout
    cast = host.tmp / "exec.cast"
    r = run_cli("sessions", "export", sid, "--format", "asciicast", "-o", str(cast),
                collector=host.collector)
    assert r.returncode == 0, r.stderr
    assert json.loads(cast.read_text().splitlines()[0])["version"] == 2
    if Path("/usr/bin/asciinema").exists():
        # (asciinema cat wants a terminal: script(1) gives it one)
        c = subprocess.run(["script", "-qec", f"asciinema cat {cast}", "/dev/null"],
                           capture_output=True, text=True, timeout=30)
        assert c.returncode == 0 and "hello-from-the-pod" in c.stdout, c.stderr


def test_a_destructive_command_is_refused_before_anything_runs(host, cluster, tmp_path):
    victim = Path("/tmp") / f"agentgate-k8s-victim-{os.getpid()}"
    victim.write_text("keep me")
    try:
        n = len(cluster.execs)
        for cmd in (f"kubectl exec pod-a -- rm -rf {victim}",
                    f"kubectl exec pod-a -- sh -c 'rm -rf {victim}'"):
            p = agent(host, cmd)
            assert p.returncode != 0
            assert "no-destruction-in-pods" in p.stderr, p.stderr
        assert victim.exists()
        assert cluster.execs[n:] == []                  # nothing started in the pod
        denied = [c for c in events(host, "command") if c.get("kind") == "exec"]
        assert {c["decision"]["action"] for c in denied} == {"deny"}
    finally:
        victim.unlink(missing_ok=True)


def test_exit_codes_and_stdin_pass_through(host, cluster):
    p = agent(host, "kubectl exec pod-a -- sh -c 'exit 3'")
    assert p.returncode == 3, p.stderr
    p = agent(host, "kubectl exec -i pod-a -- cat", stdin="typed line one\nline two\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "typed line one\nline two\n"
    typed = [c["text"] for c in events(host, "command") if c.get("via") == "stdin"]
    assert typed == ["typed line one", "line two"]
    assert 3 in [o.get("exit_code") for o in events(host, "output")]


def test_kubectl_over_spdy_is_judged_and_recorded_too(host, cluster):
    env = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
    p = agent(host, "kubectl exec -i pod-a -- cat", stdin="over spdy\n", extra_env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "over spdy\n"
    assert any(e.get("protocol", "").lower().startswith("spdy") or e.get("transport") == "spdy"
               for e in cluster.execs) or cluster.execs
    data = events(host, "data")
    assert b"over spdy\n" in b"".join(d["data"] for d in data if d.get("stream") == "stdout")
    assert "over spdy" in [c["text"] for c in events(host, "command") if c.get("via") == "stdin"]
    n = len(cluster.execs)
    p = agent(host, "kubectl exec pod-a -- rm -rf /tmp/nothing-here", extra_env=env)
    assert p.returncode != 0 and "no-destruction-in-pods" in p.stderr
    assert cluster.execs[n:] == []


def test_the_python_client_execs_through_the_proxy(host, cluster):
    script = host.public / "k8s_client.py"
    script.write_text('''
from kubernetes import client, config
from kubernetes.stream import stream
config.load_kube_config()
api = client.CoreV1Api()
print(stream(api.connect_get_namespaced_pod_exec, "pod-a", "default",
             command=["echo", "from-python"], container="main", stderr=True, stdin=False,
             stdout=True,
             tty=False), end="")
''')
    script.chmod(0o644)
    # the Python client's websocket trusts certifi's CAs (or the kubeconfig's), not
    # SSL_CERT_FILE: its kubeconfig carries the agentgate CA, as published for agents
    # (a path, read when the client starts: `agentgate run` publishes it then)
    kc = cluster.kubeconfig(host.public / "kubeconfig-py", token="placeholder",
                            ca_path=f"/run/agentgate/trust/{host.tree}/ca.pem")
    kc.chmod(0o644)
    p = agent(host, f"{BIN / 'python'} {script}", extra_env={"KUBECONFIG": str(kc)})
    assert p.returncode == 0, p.stderr
    assert "from-python" in p.stdout
    assert any(c.get("kind") == "exec" and "from-python" in c["text"]
               for c in events(host, "command"))


def test_a_client_certificate_is_injected_and_never_held_by_the_agent(tmp_path, collector):
    from tests.certs import CA
    users = CA(tmp_path / "users", name="k8s-users-ca")
    cert, key = users.issue("agentgate-bot")
    server = K8sServer(client_ca=users.pem).start()
    echo = EchoServer()
    h = Host(tmp_path, collector, echo)
    try:
        h.config = h.write("k8s-mtls", extra=f'''
[[targets]]
name = "cluster"
protocol = "kubernetes"
address = ["127.0.0.1:{server.port}"]
ca = "{server.ca_pem}"
client_cert = "{cert}"
client_key = "{key}"
''')
        h.kubeconfig = server.kubeconfig(h.public / "kubeconfig", token="placeholder")
        h.kubeconfig.chmod(0o644)
        p = agent(h, "kubectl exec pod-a -- echo with-a-certificate")
        assert p.returncode == 0, p.stderr
        assert p.stdout == "with-a-certificate\n"
        assert {r[2].get(":client-cn") for r in server.requests} == {"agentgate-bot"}
    finally:
        h.cleanup()
        echo.close()
        server.stop()



def pending(h) -> list[dict]:
    return pending_approvals(h.collector)


def test_a_held_exec_starts_only_once_approved(host, cluster):
    n = len(cluster.execs)
    args = [str(BIN / "agentgate"), "run", "--config", str(host.config), "--user", "nobody",
            "--", "sh", "-c", "kubectl exec pod-a -- echo restart-now"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "KUBECONFIG": str(host.kubeconfig)})
    try:
        (ap,) = wait_for(lambda: pending(host), what="the approval request")
        assert ap["rule"] == "restarts-need-a-human"
        assert "echo restart-now" in ap["command"]
        assert cluster.execs[n:] == []                 # nothing started while held
        r = run_cli("approvals", "approve", ap["id"], "--reason", "go", collector=host.collector)
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    host._watch_run(err)
    assert p.returncode == 0, err
    assert out == "restart-now\n"
    assert [e["command"] for e in cluster.execs[n:]] == [["echo", "restart-now"]]
