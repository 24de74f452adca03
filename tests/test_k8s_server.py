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
