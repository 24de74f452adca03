"""The Kubernetes layer as scripts: exec judged before the upgrade, refused with a v1
Status, the upgraded stream recorded by channel."""
from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest
from wsproto.frame_protocol import FrameProtocol

from hostagent.policy import Policy, Rule, decide
from hostagent.protocols.api import (CLIENT, UPSTREAM, DataReceived, Handoff, Hold,
                                     ProtocolError, Record, ToClient, ToUpstream)
from hostagent.protocols.kubernetes.layer import KubernetesLayer
from hostagent.protocols.kubernetes.requests import Unjudgeable, parse_exec
from hostagent.protocols.kubernetes.spdy import DICTIONARY
from hostagent.protocols.kubernetes.stream import ExecStream

RULES = (
    Rule(name="no-rm", action="deny", reason="no deleting in pods",
         matchers=(("commands", ("rm *", "*rm -rf*")),)),
    Rule(name="prod-shells", action="review", reason="a shell in prod",
         matchers=(("namespaces", ("prod",)), ("flags", ("tty",)))),
    Rule(name="no-kube-system", action="deny", reason="system pods",
         matchers=(("namespaces", ("kube-system",)),)),
)


def layer() -> KubernetesLayer:
    policy = Policy(rules=RULES)
    return KubernetesLayer(decide=lambda r: decide(policy, r), target="k8s", identity={},
                           names=("127.0.0.1",), judge_json=True,
                           inject=((b"authorization", b"Bearer real-k8s-token-123"),))


def run(lay, *events):
    out = []
    for ev in events:
        out += lay.handle(ev)
    return out


def exec_request(query: str, ns: str = "default", pod: str = "web-1") -> bytes:
    return (f"GET /api/v1/namespaces/{ns}/pods/{pod}/exec?{query} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: v5.channel.k8s.io, v4.channel.k8s.io\r\n"
            f"Authorization: Bearer placeholder\r\n\r\n").encode()


def client_bytes(cmds) -> bytes:
    return b"".join(bytes(c.data) for c in cmds if isinstance(c, ToClient))


def test_parse_exec_reads_what_would_run():
    e = parse_exec("GET", "/api/v1/namespaces/ns/pods/p/exec",
                   "command=sh&command=-c&command=rm%20-rf%20/&container=main&stdin=true&tty=1",
                   None)
    assert (e.kind, e.namespace, e.pod, e.container, e.line, e.stdin, e.tty) == \
        ("exec", "ns", "p", "main", "sh -c rm -rf /", True, True)
    e = parse_exec("PATCH", "/api/v1/namespaces/ns/pods/p/ephemeralcontainers", "",
                   [("$.spec.ephemeralcontainers[0].command[0]", "sh"),
                    ("$.spec.ephemeralcontainers[0].args[0]", "-c")])
    assert (e.kind, e.line) == ("ephemeral", "sh -c")
    assert parse_exec("GET", "/api/v1/nodes/n1/proxy/logs/", "", None).kind == "nodeproxy"
    assert parse_exec("GET", "/api/v1/namespaces/ns/pods/p", "", None) is None


@pytest.mark.parametrize("query", ["command=rm&command=-rf&command=/data",
                                   "command=sh&command=-c&command=rm%20-rf%20/data"])
def test_a_denied_exec_never_reaches_the_api_server_and_gets_a_status(query):
    out = run(layer(), DataReceived(CLIENT, exec_request(query)))
    assert not any(isinstance(c, ToUpstream) for c in out)
    body = client_bytes(out).split(b"\r\n\r\n", 1)[1]
    status = json.loads(body)
    assert status["kind"] == "Status" and status["code"] == 403
    assert "no-rm" in status["message"]
    cmd = next(c for c in out if isinstance(c, Record) and c.kind == "command")
    assert cmd.fields["kind"] == "exec" and cmd.fields["decision"]["action"] == "deny"


def test_a_tty_in_prod_is_held():
    out = run(layer(), DataReceived(CLIENT, exec_request("command=bash&tty=true&stdin=true",
                                                         ns="prod")))
    assert any(isinstance(c, Hold) for c in out)
    assert not any(isinstance(c, ToUpstream) for c in out)


def test_other_api_calls_are_judged_by_namespace_too():
    req = b"GET /api/v1/namespaces/kube-system/pods HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    out = run(layer(), DataReceived(CLIENT, req))
    assert client_bytes(out).startswith(b"HTTP/1.1 403")


def spdy_headers(deflate, pairs: dict) -> bytes:
    raw = struct.pack("!I", len(pairs)) + b"".join(
        struct.pack("!I", len(k)) + k.encode() + struct.pack("!I", len(v)) + v.encode()
        for k, v in pairs.items())
    return deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)


def spdy_control(ftype: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("!HHI", 0x8003, ftype, (flags << 24) | len(payload)) + payload


def spdy_data(stream: int, data: bytes, flags: int = 0) -> bytes:
    return struct.pack("!II", stream, (flags << 24) | len(data)) + data


def test_a_spdy_stream_is_recorded_by_channel_like_a_websocket_one():
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                               zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
    syns = b"".join(spdy_control(1, struct.pack("!IIH", sid, 0, 0) + spdy_headers(
        deflate, {"streamtype": kind})) for sid, kind in ((1, "error"), (3, "stdin"),
                                                         (5, "stdout"), (7, "resize")))
    s = ExecStream("v4.channel.k8s.io", spdy=True)
    sent = syns + spdy_data(3, b"whoami\n") + spdy_data(7, b'{"Width":90,"Height":30}')
    out = []
    for i in range(0, len(sent), 7):
        out += s.handle(DataReceived(CLIENT, sent[i:i + 7]))
    assert b"".join(c.data for c in out if isinstance(c, ToUpstream)) == sent
    assert [c["text"] for c in records(out, "command")] == ["whoami"]
    assert records(out, "resize") == [{"cols": 90, "rows": 30}]
    out = s.handle(DataReceived(UPSTREAM, spdy_data(5, b"root\n") + spdy_data(
        1, b'{"metadata":{},"status":"Success"}', flags=1)))
    assert [d["data"] for d in records(out, "data")] == [b"root\n"]
    assert records(out, "output")[0]["exit_code"] == 0


def test_an_allowed_exec_is_upgraded_into_a_recorded_stream():
    lay = layer()
    out = run(lay, DataReceived(CLIENT, exec_request("command=cat&stdin=true")))
    up = b"".join(c.data for c in out if isinstance(c, ToUpstream))
    assert b"Bearer real-k8s-token-123" in up and b"placeholder" not in up
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 101 Switching Protocols\r\n"
                                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                b"Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"))
    handoff = out[-1]
    assert isinstance(handoff, Handoff) and isinstance(handoff.layer, ExecStream)


def frames(client: bool, *messages: bytes, text: bool = False) -> bytes:
    fp = FrameProtocol(client=client, extensions=[])
    return b"".join(fp.send_data(m.decode() if text else m, fin=True) for m in messages)


def records(cmds, kind):
    return [c.fields for c in cmds if isinstance(c, Record) and c.kind == kind]


def test_the_stream_records_stdin_lines_output_resizes_and_the_exit_code():
    s = ExecStream("v5.channel.k8s.io")
    typed = frames(True, b"\x00ls -l\r", b"\x00echo hi\n", b'\x04{"Width":120,"Height":40}',
                   b"\xff\x00")
    out = []
    for i in range(0, len(typed), 3):           # in pieces
        out += s.handle(DataReceived(CLIENT, typed[i:i + 3]))
    assert [c["text"] for c in records(out, "command")] == ["ls -l", "echo hi"]
    assert records(out, "resize") == [{"cols": 120, "rows": 40}]
    assert b"".join(c.data for c in out if isinstance(c, ToUpstream)) == typed   # as sent
    status = json.dumps({"metadata": {}, "status": "Failure", "message": "exit code 3",
                         "reason": "NonZeroExitCode",
                         "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}})
    answer = frames(False, b"\x01total 0\n", b"\x02oops\n", b"\x03" + status.encode())
    out = s.handle(DataReceived(UPSTREAM, answer))
    data = records(out, "data")
    assert [(d["stream"], d["data"]) for d in data] == [("stdout", b"total 0\n"),
                                                        ("stderr", b"oops\n")]
    assert records(out, "output")[0]["exit_code"] == 3


def test_the_base64_protocol_is_decoded():
    s = ExecStream("base64.channel.k8s.io")
    msg = b"1" + base64.b64encode(b"hello\n")
    out = s.handle(DataReceived(UPSTREAM, frames(False, msg, text=True)))
    assert records(out, "data")[0]["data"] == b"hello\n"


@pytest.mark.parametrize("path", ["/api/v1/namespaces/default/pods/web-1/exec/",
                                  "/api/v1/namespaces/default/pods/web-1//exec",
                                  "/api/v1/namespaces//default/pods/web-1/exec/."])
def test_paths_the_api_server_routes_to_exec_are_judged_as_exec(path):
    req = exec_request("command=rm&command=-rf&command=/x").replace(
        b"/api/v1/namespaces/default/pods/web-1/exec", path.encode())
    out = run(layer(), DataReceived(CLIENT, req))
    assert not any(isinstance(c, ToUpstream) for c in out), path


def test_flags_are_read_as_the_api_server_converts_them():
    for q in ("stdin=t", "stdin=on", "stdin=", "stdin", "stdin=TRUE&stdin=false"):
        assert parse_exec("GET", "/api/v1/namespaces/n/pods/p/exec", "command=sh&" + q,
                          None).stdin, q
    for q in ("stdin=0", "stdin=False", "stdin=false&stdin=true", ""):
        assert not parse_exec("GET", "/api/v1/namespaces/n/pods/p/exec", "command=sh&" + q,
                              None).stdin, q


@pytest.mark.parametrize("query", ["command=%zz&command=rm&command=-rf&command=/x",
                                   "command=rm;command=-rf&command=/x",
                                   "container=x;y&container=db&command=ls"])
def test_queries_go_reads_otherwise_are_unparseable(query):
    with pytest.raises(Unjudgeable):
        parse_exec("GET", "/api/v1/namespaces/n/pods/p/exec", query, None)
    out = run(layer(), DataReceived(CLIENT, exec_request(query)))
    assert not any(isinstance(c, ToUpstream) for c in out)


def test_ephemeral_containers_are_read_as_they_will_run_or_refused():
    e = parse_exec("PATCH", "/api/v1/namespaces/ns/pods/p/ephemeralcontainers", "",
                   [("$.spec.ephemeralcontainers[0].args[0]", "-rf"),
                    ("$.spec.ephemeralcontainers[0].command[0]", "rm")],
                   content_type="application/strategic-merge-patch+json")
    assert e.line == "rm -rf"
    for ctype in ("application/json-patch+json", "application/apply-patch+yaml",
                  "application/vnd.kubernetes.protobuf"):
        with pytest.raises(Unjudgeable):
            parse_exec("PATCH", "/api/v1/namespaces/ns/pods/p/ephemeralcontainers", "", [],
                       content_type=ctype)
    with pytest.raises(Unjudgeable):
        parse_exec("PATCH", "/api/v1/namespaces/ns/pods/p/ephemeralcontainers", "",
                   [("$.spec.ephemeralcontainers[0].command[0]", "$(CMD)")],
                   content_type="application/json")


def test_the_kubelets_exec_behind_a_nodes_proxy_is_judged_by_its_command():
    e = parse_exec("GET", "/api/v1/nodes/n1/proxy/exec/prod/web/c",
                   "command=rm&command=-rf&command=/", None)
    assert (e.kind, e.namespace, e.pod, e.container, e.line) == \
        ("nodeproxy", "prod", "web", "c", "rm -rf /")


def test_the_v4_base64_protocol_is_decoded_and_unknown_ones_refused():
    s = ExecStream("v4.base64.channel.k8s.io")
    out = s.handle(DataReceived(UPSTREAM, frames(False, b"1" + base64.b64encode(b"out\n"),
                                                 text=True)))
    assert records(out, "data")[0]["data"] == b"out\n"
    with pytest.raises(ProtocolError):
        ExecStream("v9.mystery.k8s.io")


def test_each_frame_is_a_channel_message_as_the_api_server_reads_it():
    fp = FrameProtocol(client=True, extensions=[])
    # a fragmented message: the continuation frame starts with its own channel byte
    data = fp.send_data(b"\x04" + b" " * 300, fin=False) + fp.send_data(b"\x00rm -rf /x\n",
                                                                        fin=True)
    out = ExecStream("v5.channel.k8s.io").handle(DataReceived(CLIENT, data))
    assert [c["text"] for c in records(out, "command")] == ["rm -rf /x"]


def test_spdy_data_on_a_stream_nobody_opened_ends_the_session():
    s = ExecStream("v4.channel.k8s.io", spdy=True)
    with pytest.raises(ProtocolError):
        s.handle(DataReceived(CLIENT, spdy_data(9, b"whoami\n")))


def test_ports_are_read_as_the_kubelet_reads_them():
    e = parse_exec("GET", "/api/v1/namespaces/n/pods/p/portforward", "ports=022,80&ports=8080",
                   None)
    assert e.lines == ("port 22", "port 80", "port 8080")
    for bad in ("ports=%2B22", "ports=22abc", "ports=0x16"):
        with pytest.raises(Unjudgeable):
            parse_exec("GET", "/api/v1/namespaces/n/pods/p/portforward", bad, None)


def test_a_spdy_header_block_with_bytes_past_its_list_is_refused():
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                               zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
    raw = struct.pack("!I", 1) + struct.pack("!I", 10) + b"streamtype" + \
        struct.pack("!I", 4) + b"data" + b"\x00\x00\x00\x04next"     # trailing bytes
    block = deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)
    s = ExecStream("portforward.k8s.io", "portforward", spdy=True,
                   judge_port=lambda port: (None, {}))
    with pytest.raises(ProtocolError):
        s.handle(DataReceived(CLIENT, spdy_control(1, struct.pack("!IIH", 1, 0, 0) + block)))


def test_a_port_forward_behind_a_nodes_proxy_is_judged_by_its_ports():
    e = parse_exec("GET", "/api/v1/nodes/n1/proxy/portForward/default/web", "port=22", None)
    assert (e.kind, e.namespace, e.pod, e.lines) == ("portforward", "default", "web",
                                                     ("port 22",))
