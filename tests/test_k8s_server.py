"""The fake Kubernetes API server (tests/k8s_server.py), driven directly by kubectl and the
official Python client, without the proxy."""
from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.support import raw_echo
from tests.k8s_server import K8sServer

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
TOKEN = "test-token-123"

pytestmark = pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl not installed")


@pytest.fixture(scope="module")
def k8s(tmp_path_factory):
    d = tmp_path_factory.mktemp("k8s")
    server = K8sServer(directory=d / "server", token=TOKEN).start()
    server.kc = server.kubeconfig(d / "kubeconfig", token=TOKEN, ca=server.ca_pem)
    server.home = d / "home"  # kubectl's discovery cache goes under $HOME/.kube
    server.home.mkdir()
    yield server
    server.stop()


def kubectl(k8s, *args, input=None, websockets=True, kubeconfig=None, timeout=15):
    env = dict(os.environ, HOME=str(k8s.home))
    env.pop("KUBECONFIG", None)
    if not websockets:
        env["KUBECTL_REMOTE_COMMAND_WEBSOCKETS"] = "false"
    return subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig or k8s.kc), *args],
                          input=input, capture_output=True, timeout=timeout, env=env)


def get(k8s, path, token=TOKEN):
    ctx = ssl.create_default_context(cafile=str(k8s.ca_pem))
    req = urllib.request.Request(k8s.url + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def api(k8s):
    from kubernetes import client, config
    api_client = config.new_client_from_config(config_file=str(k8s.kc))
    yield client.CoreV1Api(api_client)
    api_client.close()


# -- kubectl over WebSocket (the default in kubectl 1.32) --

def test_kubectl_exec_echo(k8s):
    n = len(k8s.requests)
    r = kubectl(k8s, "exec", "pod-a", "--", "echo", "hi")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hi\n", b"")
    e = k8s.execs[-1]
    assert e["command"] == ["echo", "hi"] and e["container"] == "main"
    assert (e["pod"], e["namespace"], e["exit_code"], e["tty"], e["stdin"]) == \
        ("pod-a", "default", 0, False, False)
    assert (e["transport"], e["protocol"], e["method"]) == ("websocket", "v5.channel.k8s.io", "GET")
    reqs = k8s.requests[n:]
    assert ("GET", "/api/v1/namespaces/default/pods/pod-a") in [(m, p) for m, p, _ in reqs]
    m, path, headers = reqs[-1]
    assert m == "GET" and path.startswith("/api/v1/namespaces/default/pods/pod-a/exec?")
    assert "command=echo&command=hi" in path and "container=main" in path
    assert headers["upgrade"].lower() == "websocket"
    assert headers["sec-websocket-protocol"] == "v5.channel.k8s.io"
    assert headers["authorization"] == f"Bearer {TOKEN}"


def test_kubectl_exec_exit_code(k8s):
    r = kubectl(k8s, "exec", "pod-a", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3
    assert r.stdout == b"out\n"
    assert b"err\n" in r.stderr and b"command terminated with exit code 3" in r.stderr
    assert k8s.execs[-1]["exit_code"] == 3


def test_kubectl_exec_stdin(k8s):
    r = kubectl(k8s, "exec", "-i", "pod-a", "--", "cat", input=b"data\n")
    assert (r.returncode, r.stdout) == (0, b"data\n")
    assert k8s.execs[-1]["stdin"] is True and k8s.execs[-1]["exit_code"] == 0


def test_kubectl_exec_big_streams(k8s):
    payload = os.urandom(200_000)
    r = kubectl(k8s, "exec", "-i", "pod-a", "--", "cat", input=payload)
    assert r.returncode == 0 and r.stdout == payload


def test_kubectl_exec_sidecar(k8s):
    r = kubectl(k8s, "exec", "-c", "sidecar", "pod-a", "--", "echo", "side")
    assert (r.returncode, r.stdout) == (0, b"side\n")
    assert k8s.execs[-1]["container"] == "sidecar"


def test_kubectl_exec_really_runs(k8s, tmp_path):
    victim = tmp_path / "somefile"
    victim.write_text("x")
    r = kubectl(k8s, "exec", "pod-b", "--", "rm", "-rf", str(victim))
    assert r.returncode == 0 and not victim.exists()
    assert k8s.execs[-1]["pod"] == "pod-b"


def test_kubectl_exec_errors(k8s):
    r = kubectl(k8s, "exec", "no-such-pod", "--", "true")
    assert r.returncode == 1 and b'pods "no-such-pod" not found' in r.stderr
    r = kubectl(k8s, "exec", "pod-a", "--", "no-such-command-xyz")
    assert r.returncode == 1
    assert b'exec: "no-such-command-xyz": executable file not found in $PATH' in r.stderr
    n = len(k8s.requests)
    r = kubectl(k8s, "exec", "-c", "nope", "pod-a", "--", "true")
    assert r.returncode == 1
    assert r.stderr == \
        b"Error from server (BadRequest): container nope is not valid for pod pod-a\n"
    # a refused WebSocket upgrade makes kubectl retry the exec over SPDY (POST)
    execs = [(m, h.get("upgrade")) for m, p, h in k8s.requests[n:] if "/exec?" in p]
    assert execs == [("GET", "websocket"), ("POST", "SPDY/3.1")]


# -- kubectl over SPDY/3.1 --

def test_kubectl_spdy(k8s):
    r = kubectl(k8s, "exec", "pod-a", "--", "sh", "-c", "echo spdy; exit 5", websockets=False)
    assert (r.returncode, r.stdout) == (5, b"spdy\n")
    e = k8s.execs[-1]
    assert (e["transport"], e["protocol"], e["method"], e["exit_code"]) == \
        ("spdy", "v4.channel.k8s.io", "POST", 5)
    _, _, headers = k8s.requests[-1]
    assert headers["upgrade"] == "SPDY/3.1"
    assert headers["x-stream-protocol-version"].startswith("v5.channel.k8s.io, v4.channel.k8s.io")
    r = kubectl(k8s, "exec", "-i", "pod-a", "--", "wc", "-c", input=b"x" * 100_000,
                websockets=False)
    assert (r.returncode, r.stdout.strip()) == (0, b"100000")


# -- the official Python client --

def test_python_client_exec(k8s, api):
    from kubernetes.stream import stream
    out = stream(api.connect_get_namespaced_pod_exec, "pod-a", "default",
                 command=["sh", "-c", "echo hello"], container="main",
                 stderr=True, stdin=False, stdout=True, tty=False)
    assert out == "hello\n"
    resp = stream(api.connect_get_namespaced_pod_exec, "pod-a", "default", command=["cat"],
                  container="sidecar", stderr=True, stdin=True, stdout=True, tty=False,
                  _preload_content=False)
    resp.write_stdin("abc\n")
    resp.close_channel(0)  # v5 close signal: cat sees EOF
    resp.run_forever(timeout=5)
    assert (resp.read_stdout(), resp.returncode) == ("abc\n", 0)
    resp.close()
    assert k8s.execs[-1]["container"] == "sidecar"


def test_python_client_tty_and_resize(k8s, api):
    from kubernetes.stream import stream
    resp = stream(api.connect_get_namespaced_pod_exec, "pod-a", "default", command=["sh"],
                  container="main", stderr=True, stdin=True, stdout=True, tty=True,
                  _preload_content=False)
    resp.write_channel(4, json.dumps({"Width": 100, "Height": 40}))
    resp.write_stdin("stty size; exit 6\n")
    resp.run_forever(timeout=5)
    assert "40 100" in resp.read_stdout()
    assert resp.returncode == 6
    resp.close()
    e = k8s.execs[-1]
    assert e["tty"] is True and e["resizes"] == [(100, 40)] and e["exit_code"] == 6


def test_client_going_away_kills_the_command(k8s, api):
    from kubernetes.stream import stream
    resp = stream(api.connect_get_namespaced_pod_exec, "pod-a", "default",
                  command=["sleep", "30"], container="main", stderr=True, stdout=True,
                  _preload_content=False)
    e = k8s.execs[-1]
    resp.close()
    deadline = time.monotonic() + 5
    while e["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert e["command"] == ["sleep", "30"] and e["exit_code"] == 128 + 9


# -- raw WebSocket: the older subprotocols --

@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "base64.channel.k8s.io"])
def test_raw_websocket_protocols(k8s, protocol):
    import websocket
    ws = websocket.WebSocket(sslopt={"ca_certs": str(k8s.ca_pem)})
    ws.connect(f"wss://127.0.0.1:{k8s.port}/api/v1/namespaces/default/pods/pod-a/exec"
               "?command=sh&command=-c&command=echo+x%3B+exit+2&container=main&stdout=true",
               header=[f"Authorization: Bearer {TOKEN}",
                       f"Sec-WebSocket-Protocol: foo, {protocol}, v4.channel.k8s.io"],
               subprotocols=["foo", protocol, "v4.channel.k8s.io"])
    assert ws.subprotocol == protocol
    messages = []
    while True:
        op, data = ws.recv_data()
        if op == websocket.ABNF.OPCODE_CLOSE:
            break
        messages.append((op, data))
    ws.close()
    if protocol == "v4.channel.k8s.io":
        assert [m[1][:1] for m in messages] == [b"\x01", b"\x01", b"\x03"]
        assert messages[1][1] == b"\x01x\n"
        status = json.loads(messages[2][1][1:])
        assert status["reason"] == "NonZeroExitCode"
        assert status["details"] == {"causes": [{"reason": "ExitCode", "message": "2"}]}
    else:
        assert all(op == websocket.ABNF.OPCODE_TEXT for op, _ in messages)
        assert [d for _, d in messages[:2]] == [b"1", b"1eAo="]  # "x\n" in base64
        assert messages[2][1][:1] == b"3"  # the failure message (text) on the error channel


# -- auth and discovery --

def test_token_required(k8s, tmp_path):
    status, body = get(k8s, "/api/v1/namespaces/default/pods/pod-a", token=None)
    assert status == 401
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    assert get(k8s, "/api/v1/namespaces/default/pods/pod-a", token="wrong")[0] == 401
    n = len(k8s.execs)
    wrong = k8s.kubeconfig(tmp_path / "wrong", token="wrong", ca=k8s.ca_pem)
    r = kubectl(k8s, "exec", "pod-a", "--", "echo", "hi", kubeconfig=wrong)
    assert r.returncode == 1 and b"Unauthorized" in r.stderr
    assert len(k8s.execs) == n  # nothing ran


def test_discovery_and_pods(k8s):
    assert get(k8s, "/version")[1]["gitVersion"].startswith("v1.")
    assert get(k8s, "/api")[1]["versions"] == ["v1"]
    assert get(k8s, "/apis")[1] == {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
    names = {r["name"] for r in get(k8s, "/api/v1")[1]["resources"]}
    assert {"pods", "pods/exec", "pods/attach", "pods/portforward"} <= names
    status, pod = get(k8s, "/api/v1/namespaces/default/pods/pod-a")
    assert status == 200 and pod["kind"] == "Pod" and pod["status"]["phase"] == "Running"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["main", "sidecar"]
    assert all(c["ready"] for c in pod["status"]["containerStatuses"])
    status, body = get(k8s, "/api/v1/namespaces/default/pods/nope")
    assert status == 404 and body["reason"] == "NotFound" and body["code"] == 404
    r = kubectl(k8s, "get", "pods", "-o", "name")
    assert (r.returncode, r.stdout) == (0, b"pod/pod-a\npod/pod-b\n")


# -- attach (the container's main process: pod-a's main is `sh` with stdin open) --

def test_kubectl_attach(k8s):
    for websockets in (True, False):
        p = subprocess.Popen([KUBECTL, "--kubeconfig", str(k8s.kc), "attach", "-i", "pod-a",
                              "-c", "main"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(
                                 os.environ, HOME=str(k8s.home),
                                 KUBECTL_REMOTE_COMMAND_WEBSOCKETS=str(websockets).lower()))
        p.stdin.write(b"echo typed-line\n")
        p.stdin.flush()
        time.sleep(1)
        p.stdin.close()    # stdin's EOF detaches: the shell keeps running
        out, err = p.stdout.read(), p.stderr.read()
        assert p.wait(10) == 0, err
        assert out == b"typed-line\n"
        assert err == b"If you don't see a command prompt, try pressing enter.\n"
        a = k8s.attaches[-1]
        assert (a["container"], a["stdin"], a["tty"], a["detached"]) == ("main", True, False, True)
        assert (a["transport"], a["method"]) == \
            (("websocket", "GET") if websockets else ("spdy", "POST"))
    # the same process, still running: an exit ends it, and the attach, with Success
    # (stdin stays open: its EOF would detach first)
    p = subprocess.Popen([KUBECTL, "--kubeconfig", str(k8s.kc), "attach", "-i", "pod-a", "-c",
                          "main"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, HOME=str(k8s.home)))
    p.stdin.write(b"exit 4\n")
    p.stdin.flush()
    assert p.wait(10) == 0     # (attach reports no exit code: Success)
    p.stdin.close()
    p.stdout.read(), p.stderr.read()
    assert k8s.attaches[-1]["detached"] is False and k8s.attaches[-1]["exit_code"] == 4
    _, path, headers = k8s.requests[-1]
    assert path == ("/api/v1/namespaces/default/pods/pod-a/attach?container=main&stderr=true"
                    "&stdin=true&stdout=true")


def test_attach_tty_and_raw_websocket(k8s):
    import websocket
    ws = websocket.WebSocket(sslopt={"ca_certs": str(k8s.ca_pem)})
    ws.connect(f"wss://127.0.0.1:{k8s.port}/api/v1/namespaces/default/pods/pod-b/attach"
               "?container=main&stdin=true&stdout=true&tty=true",
               header=[f"Authorization: Bearer {TOKEN}"],
               subprotocols=["v5.channel.k8s.io"])
    assert ws.recv() == b"\x01"     # the empty first message on stdout
    ws.send_binary(b"\x04" + json.dumps({"Width": 91, "Height": 23}).encode())
    ws.send_binary(b"\x00stty size; exit 0\n")
    out = b""
    while True:
        op, data = ws.recv_data()
        if op == websocket.ABNF.OPCODE_CLOSE:
            break
        out += data[1:] if data[:1] == b"\x01" else b""
        if data[:1] == b"\x03":
            assert json.loads(data[1:]) == {"metadata": {}, "status": "Success"}
    ws.close()
    assert b"23 91" in out
    assert k8s.attaches[-1]["tty"] is True and k8s.attaches[-1]["resizes"] == [(91, 23)]
    restarts = [s["restartCount"] for s in
                get(k8s, "/api/v1/namespaces/default/pods/pod-b")[1]["status"]
                ["containerStatuses"]]
    assert restarts == [0, 0]
    # the shell exited: the next attach starts it again (restartCount goes up)
    p = subprocess.Popen([KUBECTL, "--kubeconfig", str(k8s.kc), "attach", "-i", "pod-b", "-c",
                          "main"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, HOME=str(k8s.home)))
    p.stdin.write(b"exit\n")
    p.stdin.flush()
    assert p.wait(10) == 0
    p.stdin.close()
    p.stdout.read(), p.stderr.read()
    assert get(k8s, "/api/v1/namespaces/default/pods/pod-b")[1]["status"][
        "containerStatuses"][0]["restartCount"] == 1


# -- port-forward (to 127.0.0.1:PORT on this host: the "pod" is this machine) --

@pytest.fixture(scope="module")
def tcp_echo():
    with raw_echo() as port:
        yield port


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_port():
    return _free_port()   # (nothing listens there)


def _port_forward(k8s, remote, websockets):
    import socket
    local = _free_port()
    env = dict(os.environ, HOME=str(k8s.home),
               KUBECTL_PORT_FORWARD_WEBSOCKETS=str(websockets).lower())
    p = subprocess.Popen([KUBECTL, "--kubeconfig", str(k8s.kc), "port-forward", "pod-a",
                          f"{local}:{remote}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    deadline = time.monotonic() + 10
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", local), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
            time.sleep(0.05)
    return p, c


@pytest.mark.parametrize("websockets", [True, False])
def test_kubectl_port_forward(k8s, tcp_echo, websockets):
    p, c = _port_forward(k8s, tcp_echo, websockets)
    try:
        payload = b"ping " * 1000
        c.sendall(payload)
        c.shutdown(1)
        got = b""
        while d := c.recv(65536):
            got += d
        assert got == payload
        c.close()
        pf = k8s.portforwards[-1]
        assert pf["ports"] == []           # kubectl names the port in the SPDY streams alone
        assert (pf["transport"], pf["protocol"], pf["method"]) == (
            ("websocket", "SPDY/3.1+portforward.k8s.io", "GET") if websockets else
            ("spdy", "portforward.k8s.io", "POST"))
        deadline = time.monotonic() + 5
        while not pf["connections"] or pf["connections"][0]["sent"] != payload:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pf["connections"][0]["port"] == tcp_echo
        assert pf["connections"][0]["received"] == payload
        assert p.poll() is None            # still forwarding
    finally:
        p.terminate()
        p.communicate(timeout=5)
    _, path, headers = [r for r in k8s.requests if "/portforward" in r[1]][-1]
    assert path == "/api/v1/namespaces/default/pods/pod-a/portforward"
    if websockets:
        assert headers["sec-websocket-protocol"] == "SPDY/3.1+portforward.k8s.io"
    else:
        assert (headers["upgrade"], headers["x-stream-protocol-version"]) == \
            ("SPDY/3.1", "portforward.k8s.io")


@pytest.mark.parametrize("websockets", [True, False])
def test_kubectl_port_forward_to_a_closed_port(k8s, websockets):
    port = _closed_port()
    p, c = _port_forward(k8s, port, websockets)
    assert c.recv(10) == b""
    c.close()
    _, err = p.communicate(timeout=10)
    assert p.returncode == 1
    assert f"an error occurred forwarding".encode() in err
    assert f"error forwarding port {port} to pod ".encode() in err
    assert f"dial tcp4 127.0.0.1:{port}: connect: connection refused".encode() in err
    assert err.endswith(b"error: lost connection to pod\n")


def test_python_client_port_forward(k8s, api, tcp_echo):
    from kubernetes.stream import portforward
    closed = _closed_port()
    pf = portforward(api.connect_get_namespaced_pod_portforward, "pod-a", "default",
                     ports=f"{tcp_echo},{closed}")
    s = pf.socket(tcp_echo)
    s.sendall(b"over the websocket")
    got = b""
    while len(got) < 18:
        got += s.recv(100)
    assert got == b"over the websocket"
    deadline = time.monotonic() + 5
    while pf.error(closed) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"error forwarding port {closed}" in pf.error(closed)
    s.close()
    pf.close()
    rec = k8s.portforwards[-1]
    assert (rec["transport"], rec["protocol"], rec["ports"]) == \
        ("websocket", "v4.channel.k8s.io", [tcp_echo, closed])
