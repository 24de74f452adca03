"""The HTTP layer as scripts of events in and commands out (no sockets)."""
from __future__ import annotations

import gzip
import json
import zlib

import pytest

from hostagent.masking import Masker, MaskRule
from hostagent.policy import Policy, Rule, decide
from hostagent.protocols.api import (CLIENT, UPSTREAM, ApprovalDecided, Close, DataReceived,
                                     EofReceived, Hold, ProtocolError, Record, Start,
                                     StartClientTls, StartUpstreamTls, TlsEstablished,
                                     TlsFailed, ToClient, ToUpstream)
from hostagent.protocols.http.bodies import BodyMasker
from hostagent.protocols.http.layer import MAX_PIPELINED, HttpLayer
from hostagent.protocols.http.requests import json_patterns
from tests.hostagent.protocols.playbook import Playbook, record, sends

RULES = (
    Rule(name="no-delete", action="deny", reason="no deletes", matchers=(("methods", ("DELETE",)),)),
    Rule(name="hold-deploy", action="review", reason="deploys", matchers=(("paths", ("/deploy*",)),)),
    Rule(name="no-admin", action="deny", reason="admin", matchers=(("paths", ("/admin*",)),)),
    Rule(name="no-force", action="deny", reason="force",
         matchers=tuple(("json", (p,)) for p in json_patterns({"$.force": "true"}))),
)
TOKEN = b"real-token-0123456789"


def layer(*, masks=(), json_paths=(), tls=False, judge_json=True, **kw) -> HttpLayer:
    policy = Policy(rules=RULES)
    masker = BodyMasker(Masker(tuple(masks)), tuple(json_paths))
    return HttpLayer(decide=lambda r: decide(policy, r), target="api", identity={"user": "bot"},
                     masker=masker, inject=((b"authorization", b"Bearer " + TOKEN),),
                     judge_json=judge_json, tls=tls, names=("api.example", "127.0.0.1"), **kw)


def get(path: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: api.example\r\n" + extra + b"\r\n"


def ok(body: bytes = b"hi", ctype: bytes = b"text/plain", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


def upstream_head(c) -> bool:
    return isinstance(c, ToUpstream) and c.starts


def run(lay, *events):
    out = []
    for ev in events:
        out += lay.handle(ev)
    return out


def client_bytes(cmds) -> bytes:
    return b"".join(bytes(c.data) for c in cmds if isinstance(c, ToClient)) + b"".join(
        c.final for c in cmds if isinstance(c, Close))


def upstream_bytes(cmds) -> bytes:
    return b"".join(bytes(c.data) for c in cmds if isinstance(c, ToUpstream))


# ------------------------------------------------------------------ allowed, recorded, injected

def test_an_allowed_request_is_recorded_before_it_goes_upstream_with_the_token():
    lay = layer()
    assert (Playbook(lay)
            >> DataReceived(CLIENT, get(b"/x/../users?a=1", b"Authorization: Bearer agent\r\n"))
            << record("command", text="GET api.example/users?a=1", path="/users", query="a=1")
            << sends(ToUpstream, lambda b: b.startswith(b"GET /users?a=1 HTTP/1.1\r\n")
                     and b"Bearer " + TOKEN in b and b"Bearer agent" not in b, "injected")
            >> DataReceived(UPSTREAM, ok())
            << sends(ToClient, lambda b: b.startswith(b"HTTP/1.1 200 OK"), "the head")
            # (the body's last bytes wait until no injected secret can be cut in them)
            << record("output", status=200, bytes=2)
            << sends(ToClient, lambda b: b == b"hi", "the body")
            )


def test_the_agents_authorization_is_redacted_in_the_record():
    out = run(layer(), DataReceived(CLIENT, get(b"/", b"Authorization: Bearer agent-secret\r\n")))
    rec = out[0]
    assert rec.kind == "command"
    assert "agent-secret" not in json.dumps(rec.fields)
    assert ["authorization", "(redacted, 19 bytes)"] in rec.fields["headers"]


def test_the_injected_token_echoed_back_is_blanked_across_chunk_boundaries():
    lay = layer()
    run(lay, DataReceived(CLIENT, get(b"/echo")))
    body = b'{"auth": "Bearer ' + TOKEN + b'"}'
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nX-Echo: " + TOKEN + b"\r\n\r\n")
    out = run(lay, DataReceived(UPSTREAM, head))
    for i in range(len(body)):      # one byte at a time
        out += lay.handle(DataReceived(UPSTREAM, body[i:i + 1]))
    got = client_bytes(out)
    assert TOKEN not in got and got.endswith(b'"}')
    assert len(got.split(b"\r\n\r\n", 1)[1]) == len(body)      # Content-Length holds
    rec = next(c for c in out if isinstance(c, Record) and c.kind == "output")
    assert rec.fields["masked"]["injected_secret"] >= 1


# ------------------------------------------------------------------ refusals

def test_a_denied_request_gets_a_403_naming_the_rule_and_the_connection_goes_on():
    lay = layer()
    out = run(lay, DataReceived(CLIENT, b"DELETE /users/1 HTTP/1.1\r\nHost: api.example\r\n\r\n" + get(b"/next")))
    assert not any(isinstance(c, ToUpstream) and b"DELETE" in c.data for c in out)
    answer = client_bytes(out)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["rule"] == "no-delete"
    # the pipelined request behind it is served
    assert any(isinstance(c, ToUpstream) and c.data.startswith(b"GET /next ") for c in out)
    assert not any(isinstance(c, Close) for c in out)


@pytest.mark.parametrize("path", [b"/admin", b"/public/../admin", b"/%61dmin/x", b"/./admin",
                                  b"/public/%2e%2e/admin"])
def test_disguised_paths_are_judged_as_the_server_reads_them(path):
    out = run(layer(), DataReceived(CLIENT, get(path)))
    assert client_bytes(out).startswith(b"HTTP/1.1 403")
    assert not any(isinstance(c, ToUpstream) for c in out)


def test_json_body_fields_are_judged_and_duplicate_keys_are_unparseable():
    def post(body: bytes, ctype=b"application/json"):
        lay = layer()
        return run(lay, DataReceived(CLIENT, b"POST /push HTTP/1.1\r\nHost: api.example\r\nContent-Type: "
                                     + ctype + b"\r\nContent-Length: " + str(len(body)).encode()
                                     + b"\r\n\r\n" + body))
    assert client_bytes(post(b'{"force": true}')).startswith(b"HTTP/1.1 403")
    # what the agent claims the body is does not matter
    assert client_bytes(post(b'{"force": true}', b"text/plain")).startswith(b"HTTP/1.1 403")
    assert client_bytes(post(b'{"force": false, "force": true}')).startswith(b"HTTP/1.1 403")
    assert client_bytes(post(b'{"force": tru')).startswith(b"HTTP/1.1 403")    # unparseable
    allowed = post(b'{"force": false}')
    assert upstream_bytes(allowed).endswith(b'{"force": false}')
    gz = gzip.compress(b'{"force": true}')
    out = run(layer(), DataReceived(CLIENT, b"POST /p HTTP/1.1\r\nHost: api.example\r\nContent-Encoding: gzip"
                                    b"\r\nContent-Length: " + str(len(gz)).encode() + b"\r\n\r\n" + gz))
    assert client_bytes(out).startswith(b"HTTP/1.1 403")


def test_a_chunked_json_body_is_judged_once_whole():
    lay = layer()
    out = run(lay, DataReceived(CLIENT, b"POST /p HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: chunked"
                                b"\r\n\r\n5\r\n{\"for\r\n"))
    assert out == []
    out = run(lay, DataReceived(CLIENT, b"a\r\nce\": true}\r\n0\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 403")


def test_a_body_too_big_to_judge_is_refused():
    lay = layer(max_body=1024)
    out = run(lay, DataReceived(CLIENT, b"POST /p HTTP/1.1\r\nHost: api.example\r\nContent-Length: 5000\r\n\r\n"
                                + b"x" * 2000))
    assert client_bytes(out).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: api.example\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: api.example\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: api.example\r\nX-A: 1\r\n folded\r\n\r\n",
])
def test_smuggling_heads_are_refused_with_400_and_the_connection_closed(head):
    out = run(layer(), DataReceived(CLIENT, head))
    assert not any(isinstance(c, ToUpstream) for c in out)
    assert isinstance(out[-1], Close) and out[-1].final.startswith(b"HTTP/1.1 400")


def test_unknown_transfer_codings_and_http2_preface_end_the_session():
    with pytest.raises(ProtocolError):
        run(layer(), DataReceived(CLIENT, b"POST / HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"))
    out = run(layer(), DataReceived(CLIENT, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    assert isinstance(out[-1], Close) and b"505" in out[-1].final


def test_connect_is_refused_and_recorded():
    out = run(layer(), DataReceived(CLIENT, b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n"))
    assert any(isinstance(c, Record) and c.kind == "command"
               and c.fields["decision"]["action"] == "deny" for c in out)
    assert not any(isinstance(c, ToUpstream) for c in out)


# ------------------------------------------------------------------ review

def test_a_held_request_waits_then_goes_on_when_approved():
    lay = layer()
    out = run(lay, DataReceived(CLIENT, b"POST /deploy HTTP/1.1\r\nHost: api.example\r\nContent-Length: 2\r\n\r\n{}"))
    hold = next(c for c in out if isinstance(c, Hold))
    assert not any(isinstance(c, ToUpstream) for c in out)
    out = run(lay, ApprovalDecided(hold.key, True, "ok"))
    assert upstream_bytes(out).endswith(b"\r\n\r\n{}")


def test_a_held_request_refused_by_a_human_gets_a_403():
    lay = layer()
    out = run(lay, DataReceived(CLIENT, get(b"/deploy")))
    hold = next(c for c in out if isinstance(c, Hold))
    out = run(lay, ApprovalDecided(hold.key, False, "not today"))
    assert client_bytes(out).startswith(b"HTTP/1.1 403") and b"not today" in client_bytes(out)
    assert not any(isinstance(c, ToUpstream) for c in out)


# ------------------------------------------------------------------ framing of answers

def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    lay = layer()
    out = run(lay, DataReceived(CLIENT, get(b"/1") + get(b"/2") + get(b"/3")))
    assert [c.data.split(b" ")[1] for c in out if upstream_head(c)] == [b"/1"]
    seen = []
    for n in (b"1", b"2", b"3"):
        out = run(lay, DataReceived(UPSTREAM, ok(n)))
        seen.append(client_bytes(out).rsplit(b"\r\n", 1)[1])
    assert seen == [b"1", b"2", b"3"]


def test_pipelining_is_bounded():
    lay = layer()
    run(lay, DataReceived(CLIENT, get(b"/slow")))
    with pytest.raises(ProtocolError):
        for _ in range(MAX_PIPELINED // 4000 + 2):
            lay.handle(DataReceived(CLIENT, get(b"/x" * 2000)))


def test_head_204_and_close_delimited_answers():
    lay = layer()
    run(lay, DataReceived(CLIENT, b"HEAD /h HTTP/1.1\r\nHost: api.example\r\n\r\n"))
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n"))
    assert b"content-length: 123" in client_bytes(out).lower()
    run(lay, DataReceived(CLIENT, get(b"/n")))
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 204 No Content\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 204")
    run(lay, DataReceived(CLIENT, get(b"/c")))
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one "))
    out += run(lay, DataReceived(UPSTREAM, b"and two"), EofReceived(UPSTREAM))
    body = client_bytes(out)
    assert b"part one " in body and b"and two" in body      # relayed as it came, to the end
    assert isinstance(out[-1], Close)


def test_100_continue_is_relayed_never_invented():
    lay = layer(judge_json=False)
    out = run(lay, DataReceived(CLIENT, b"PUT /u HTTP/1.1\r\nHost: api.example\r\nContent-Length: 5000\r\n"
                                b"Expect: 100-continue\r\n\r\n"))
    assert not any(isinstance(c, ToClient) for c in out)      # nothing invented
    assert b"expect: 100-continue" in upstream_bytes(out).lower()
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 100")


# ------------------------------------------------------------------ masking

PII = MaskRule("pii", detectors=("email",), json=("$.users[*].card",))
DOC = {"users": [{"email": "ann@example.com", "card": "4111 1111 1111 1111", "id": 1}]}


def masked_layer():
    return layer(masks=(PII,), json_paths=(("pii", "$.users[*].card"),))


@pytest.mark.parametrize("coding", [b"", b"gzip", b"deflate", b"br"])
def test_json_answers_are_masked_whatever_their_coding(coding):
    raw = json.dumps(DOC).encode()
    body = {b"": raw, b"gzip": gzip.compress(raw), b"deflate": zlib.compress(raw)}.get(coding)
    if coding == b"br":
        import brotli
        body = brotli.compress(raw)
    lay = masked_layer()
    out = run(lay, DataReceived(CLIENT, get(b"/j")))
    assert b"accept-encoding: identity" in upstream_bytes(out)
    extra = b"Content-Encoding: " + coding + b"\r\n" if coding else b""
    out = run(lay, DataReceived(UPSTREAM, ok(body, b"application/json", extra)))
    got = client_bytes(out)
    head, payload = got.split(b"\r\n\r\n", 1)
    assert json.loads(payload) == {"users": [{"email": "****", "card": "****", "id": 1}]}
    assert b"content-encoding" not in head.lower()
    assert f"content-length: {len(payload)}".encode() in head.lower()
    rec = next(c for c in out if isinstance(c, Record) and c.kind == "output")
    assert rec.fields["masked"] == {"pii:email": 1, "pii:json": 1}


def test_an_unknown_coding_or_unparseable_json_is_refused_not_passed():
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/z")))
    out = run(lay, DataReceived(UPSTREAM, ok(b"xx", b"application/json", b"Content-Encoding: zstd\r\n")))
    assert client_bytes(out).startswith(b"HTTP/1.1 502")
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/z")))
    out = run(lay, DataReceived(UPSTREAM, ok(b'{"users": [', b"application/json")))
    assert client_bytes(out).startswith(b"HTTP/1.1 502") and b"ann" not in client_bytes(out)


def test_a_zip_bomb_is_refused():
    bomb = gzip.compress(b"a" * (4 << 20))
    lay = layer(masks=(PII,), max_body=1 << 20)
    run(lay, DataReceived(CLIENT, get(b"/b")))
    out = run(lay, DataReceived(UPSTREAM, ok(bomb, b"text/plain", b"Content-Encoding: gzip\r\n")))
    assert client_bytes(out).startswith(b"HTTP/1.1 502")


def test_event_streams_are_masked_line_by_line_as_they_arrive():
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/sse")))
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 200")        # the head goes at once
    ev = b'data: {"email": "x@y.com"}\n\n'
    out = run(lay, DataReceived(UPSTREAM, b"%x\r\n" % len(ev) + ev + b"\r\n"))
    assert b"****" in client_bytes(out) and b"x@y.com" not in client_bytes(out)


def test_text_split_across_reads_is_masked_whole():
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/t")))
    body = b"mail ann@example.com now"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
    out = run(lay, DataReceived(UPSTREAM, head + body[:9]), DataReceived(UPSTREAM, body[9:]))
    assert client_bytes(out).endswith(b"mail **** now")


def test_range_requests_are_not_passed_when_masking():
    out = run(masked_layer(), DataReceived(CLIENT, get(b"/t", b"Range: bytes=0-3\r\n")))
    assert b"range" not in upstream_bytes(out).lower()


# ------------------------------------------------------------------ TLS

def test_https_terminates_then_verifies_the_server_by_the_name_asked_for():
    lay = layer(tls=True)
    assert run(lay, Start(("127.0.0.1", 443))) == [StartClientTls(("api.example", "127.0.0.1"),
                                                                   ("http/1.1",))]
    out = run(lay, TlsEstablished(CLIENT, "TLSv1.3", "http/1.1", "api.example"))
    assert out[-1] == StartUpstreamTls("api.example", verify=True, ca=None, alpn=("http/1.1",))
    out = run(lay, TlsEstablished(CLIENT, "TLSv1.3", None, "evil.example"))
    assert out[-1].server_name == "api.example"     # not a name the client chose


def test_an_upstream_verification_failure_is_a_502_with_the_reason():
    lay = layer(tls=True)
    run(lay, DataReceived(CLIENT, get(b"/x")))
    out = run(lay, TlsFailed(UPSTREAM, "certificate verify failed: self-signed certificate"))
    assert client_bytes(out).startswith(b"HTTP/1.1 502") and b"self-signed" in client_bytes(out)


# ------------------------------------------------------------------ the parts


def test_an_allowed_websocket_upgrade_is_handed_to_the_raw_relay_with_what_followed():
    from hostagent.protocols.api import Handoff
    lay = layer()
    out = run(lay, DataReceived(CLIENT, get(b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                                        b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n")
                                + b"\x81\x02hi"))
    assert b"upgrade: websocket" in upstream_bytes(out).lower()
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                b"Upgrade: websocket\r\n\r\n\x81\x02yo"))
    assert client_bytes(out).startswith(b"HTTP/1.1 101")
    handoff = out[-1]
    assert isinstance(handoff, Handoff)
    assert handoff.client_data == b"\x81\x02hi" and handoff.upstream_data == b"\x81\x02yo"


@pytest.mark.parametrize("host", [b"evil.example", b"api.example.evil", b"127.0.0.2:80"])
def test_a_host_that_is_not_the_targets_is_refused_before_credentials_go_anywhere(host):
    out = run(layer(), DataReceived(CLIENT, b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 421")
    assert not any(isinstance(c, ToUpstream) for c in out)
    for ok_host in (b"API.example.", b"127.0.0.1:8080"):
        out = run(layer(), DataReceived(CLIENT, b"GET / HTTP/1.1\r\nHost: " + ok_host + b"\r\n\r\n"))
        assert any(isinstance(c, ToUpstream) for c in out)


def test_bodies_a_server_may_read_as_json_are_judged_or_unparseable():
    def post(body: bytes, ctype: bytes, target=b"/push"):
        return client_bytes(run(layer(), DataReceived(
            CLIENT, b"POST " + target + b" HTTP/1.1\r\nHost: api.example\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)))
    for body, ctype in ((b'{"force":true} x', b"text/plain"), (b'{"force":true}\n{"x":1}', b""),
                        (b'{"force":true,"a":"\xff"}', b"text/plain"),
                        (b'{"force":true} /*c*/', b"text/json"),
                        (b"force=true", b"application/x-www-form-urlencoded"),
                        (b"[{}" + b",{}" * 30000 + b"]", b"application/json")):
        assert post(body, ctype).startswith(b"HTTP/1.1 403"), body[:40]
    assert post(b"", b"", target=b"/push?force=true").startswith(b"HTTP/1.1 403")
    assert not post(b"just text", b"text/plain").startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("path", [b"//admin", b"/;/admin", b"/admin;x=1", b"/x/..%2Fadmin",
                                  b"/admin%2Fsecret"])
def test_paths_servers_read_differently_are_judged_by_every_reading(path):
    out = run(layer(), DataReceived(CLIENT, get(path)))
    assert client_bytes(out).startswith(b"HTTP/1.1 403"), path


def test_a_secret_a_detector_would_cut_apart_is_still_blanked_whole():
    token = b"xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
    policy = Policy(rules=RULES)
    lay = HttpLayer(decide=lambda r: decide(policy, r), target="api", identity={},
                    masker=BodyMasker(Masker((MaskRule("p", detectors=("phone", "email")),)), ()),
                    inject=((b"x-api-key", token),), names=("api.example",))
    run(lay, DataReceived(CLIENT, get(b"/echo")))
    out = run(lay, DataReceived(UPSTREAM, ok(b'{"key": "' + token + b'"}', b"application/json",
                                             b"X-Echo: " + token + b" ann@example.com\r\n")))
    got = client_bytes(out)
    assert b"AbCdEfGhIjKlMnOpQrStUvWx" not in got and b"ann@example.com" not in got


def test_a_half_close_waits_for_the_pipelined_requests_before_it():
    lay = layer()
    assert lay.relays_eof is False      # the driver must not pass the EOF on by itself
    out = run(lay, DataReceived(CLIENT, get(b"/1") + get(b"/2")), EofReceived(CLIENT))
    assert not any(isinstance(c, Close) for c in out)
    out = run(lay, DataReceived(UPSTREAM, ok(b"one")))
    assert any(isinstance(c, ToUpstream) and c.data.startswith(b"GET /2 ") for c in out)
    assert not any(isinstance(c, Close) for c in out)
    out = run(lay, DataReceived(UPSTREAM, ok(b"two")))
    assert client_bytes(out).endswith(b"two") and isinstance(out[-1], Close)


def test_a_server_that_closes_without_answering_gets_the_client_a_502():
    lay = layer()
    run(lay, DataReceived(CLIENT, get(b"/x")))
    out = run(lay, EofReceived(UPSTREAM))
    assert isinstance(out[-1], Close) and out[-1].final.startswith(b"HTTP/1.1 502")
    assert b"before answering" in out[-1].final


def allow_only(**matchers):
    rules = (Rule(name="ok", action="allow", matchers=tuple(matchers.items())),)
    policy = Policy(default="deny", rules=rules)
    return HttpLayer(decide=lambda r: decide(policy, r), target="api", identity={},
                     names=("api.example",), judge_json=True)


@pytest.mark.parametrize("path", [b"/public/..;/admin", b"/public/%2e%2e;/admin",
                                  b"/public/x/..;/..;/admin", b"/public/..%2Fadmin"])
def test_an_allow_rule_must_hold_for_every_reading_of_the_path(path):
    out = run(allow_only(paths=("/public/*",)), DataReceived(CLIENT, get(path)))
    assert client_bytes(out).startswith(b"HTTP/1.1 403"), path
    out = run(allow_only(paths=("/public/*",)), DataReceived(CLIENT, get(b"/public/x")))
    assert any(isinstance(c, ToUpstream) for c in out)


def test_an_allow_rule_on_a_field_can_not_be_met_by_one_harmless_copy():
    lay = allow_only(json=json_patterns({"$.env": "staging"}))
    for body, ctype in ((b"env=staging&env=prod", b"application/x-www-form-urlencoded"),
                        (b'{"env":"staging","Env":"prod"}', b"application/json"),
                        (b"--XX\r\nContent-Disposition: form-data; name=\"env\"\r\n\r\nprod"
                         b"\r\n--XX--\r\n", b"multipart/form-data; boundary=XX")):
        out = run(allow_only(json=json_patterns({"$.env": "staging"})), DataReceived(
            CLIENT, b"POST /d HTTP/1.1\r\nHost: api.example\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body))
        assert client_bytes(out).startswith(b"HTTP/1.1 403"), body
    out = run(lay, DataReceived(CLIENT, b"POST /d?env=prod HTTP/1.1\r\nHost: api.example\r\n"
                                b"Content-Type: application/json\r\nContent-Length: 17\r\n\r\n"
                                b'{"env":"staging"}'))
    assert client_bytes(out).startswith(b"HTTP/1.1 403")


def test_method_overrides_are_judged_or_dropped():
    out = run(layer(), DataReceived(CLIENT, get(b"/x", b"X-HTTP-Method-Override: DELETE\r\n")))
    assert b"override" not in upstream_bytes(out).lower()
    out = run(layer(), DataReceived(CLIENT, b"POST /x?_method=delete HTTP/1.1\r\nHost: api.example"
                                    b"\r\nContent-Length: 0\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("host", [b"api.example:80@x.evil.com", b"api.example:evil.com",
                                  b"api.example:", b"[api.example]:443", b""])
def test_hosts_a_url_parser_reads_otherwise_are_refused(host):
    out = run(layer(), DataReceived(CLIENT, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"))
    assert client_bytes(out).startswith(b"HTTP/1.1 421"), host


def test_an_http10_request_without_host_gets_the_targets_name_upstream():
    out = run(layer(), DataReceived(CLIENT, b"GET /x HTTP/1.0\r\n\r\n"))
    assert b"host: api.example" in upstream_bytes(out).lower()


def test_digests_that_would_confirm_a_guess_are_dropped_when_masking():
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, b"HEAD /j HTTP/1.1\r\nHost: api.example\r\nWant-Repr-Digest: sha-256=1\r\n\r\n"))
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nRepr-Digest: sha-256=:x:\r\n"
                                b"x-amz-checksum-sha256: y\r\nContent-Length: 5\r\n\r\n"))
    head = client_bytes(out).lower()
    assert b"etag" not in head and b"digest" not in head and b"checksum" not in head


@pytest.mark.parametrize("body, ctype", [
    (b'\x1e{"users":[{"card":"4111 1111 1111 1111"}]}', b"application/json-seq"),
    (b'cb({"users":[{"card":"4111 1111 1111 1111"}]});', b"application/javascript"),
    (b")]}'\n{\"users\":[{\"card\":\"4111 1111 1111 1111\"}]}", b"text/plain"),
    (b'// x\n{"users":[{"card":"4111 1111 1111 1111"}]}', b"text/plain"),
])
def test_json_in_the_wrappers_servers_put_around_it_is_masked(body, ctype):
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/j")))
    out = run(lay, DataReceived(UPSTREAM, ok(body, ctype)))
    assert b"4111" not in client_bytes(out)


def test_json_split_over_an_events_data_lines_is_masked_as_one():
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/sse")))
    out = run(lay, DataReceived(UPSTREAM, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                b"Content-Length: 200\r\n\r\n"))
    ev = b'id: 7\r\ndata: {"users":[{"name":"ann",\r\ndata: "card":"4111 1111 1111 1111"}]}\r\n\r\n'
    out = run(lay, DataReceived(UPSTREAM, ev[:30]), DataReceived(UPSTREAM, ev[30:]))
    got = client_bytes(out)
    assert b"4111" not in got and b"id: 7" in got and got.endswith(b"\r\n\r\n")


def test_deeply_nested_answers_are_refused_not_crashing():
    lay = masked_layer()
    run(lay, DataReceived(CLIENT, get(b"/deep")))
    out = run(lay, DataReceived(UPSTREAM, ok(b"[" * 900 + b"]" * 900, b"application/json")))
    assert client_bytes(out).startswith(b"HTTP/1.1 502")
