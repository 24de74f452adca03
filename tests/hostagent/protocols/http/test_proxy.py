"""HTTP and HTTPS through the proxy, end to end on the real kernel: agents (curl, python
requests and httpx, node, raw sockets) run under `agentgate run` as nobody reach a real
Node.js upstream (tests/http_server.js) through the eBPF redirect; the proxy judges each
request, injects the target's credentials, masks the answers and records every exchange."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.hostagent.intercept.conftest import EchoServer, Host
from tests.http_server import HttpServer
from tests.support import BIN, pending_approvals, run_cli, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")

VENV_PY = str(BIN / "python")
TOKEN = "tok-9f8e7d6c5b4a-secret"
API_KEY = "key-from-a-file-0123456789"
MASK = "****"
ENV = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}

# tests/http_server.js's /json document, masked by MASKS: the cards by the json path
# rule, the emails by the detector; the token and the phone number left alone
JSON_MASKED = {"users": [{"id": 1, "name": "ann", "email": MASK, "card": MASK},
                         {"id": 2, "name": "bob", "email": MASK, "card": MASK}],
               "token": "s3cr3t-token-value", "note": "call +1 (555) 123-4567"}

RULES = """
default = "allow"
unparseable = "deny"
review_ttl_seconds = 30
[[rules]]
name = "no-deletes"
action = "deny"
reason = "agents may not delete"
methods = ["DELETE"]
[[rules]]
name = "no-force"
action = "deny"
reason = "no forced writes"
json = { "$.force" = "true" }
[[rules]]
name = "no-admin"
action = "deny"
reason = "not the admin pages"
paths = ["/admin", "/admin/*"]
[[rules]]
name = "needs-a-human"
action = "review"
reason = "a human says"
paths = ["/status/201", "/status/202"]
"""
MASKS = """
[[masks]]
name = "pii"
detectors = ["email", "credit_card"]
json = ["$.users[*].card"]
"""


@pytest.fixture(scope="module")
def server():
    s = HttpServer().start()
    yield s
    s.stop()


@pytest.fixture
def make_host(tmp_path, collector, server):
    """make_host(policy) -> a host agent config with the targets below and `policy`:
    api (http, token and headers injected), secure (https, the upstream's own CA),
    nocafile (https to the h1tls listener, verified against the system store only) and
    raw (http, the close-delimited listener); `extra` adds targets."""
    made = []

    def make(policy: str = RULES, extra: str = "") -> Host:
        echo = EchoServer()
        h = Host(tmp_path, collector, echo)
        (tmp_path / "token").write_text(TOKEN + "\n")        # root's alone
        (tmp_path / "api-key").write_text(API_KEY + "\n")
        (tmp_path / "policy.toml").write_text(policy)
        h.config = h.write("http", extra=f'''
[[targets]]
name = "api"
protocol = "http"
address = ["127.0.0.1:{server.http_port}"]
token_file = "{tmp_path}/token"
[targets.set_headers]
"X-Team" = "blue"
"X-Api-Key" = {{ file = "{tmp_path}/api-key" }}

[[targets]]
name = "secure"
protocol = "https"
address = ["localhost:{server.https_port}"]
ca = "{server.ca_pem}"
token_file = "{tmp_path}/token"

[[targets]]
name = "nocafile"
protocol = "https"
address = ["localhost:{server.h1tls_port}"]

[[targets]]
name = "raw"
protocol = "http"
address = ["127.0.0.1:{server.raw_port}"]
{extra}''')
        # (the local CA stays in the root-only state dir: agents read the published copy)
        h.config.write_text(f'policy = "{tmp_path}/policy.toml"\n' + h.config.read_text())
        made.append((h, echo))
        return h

    yield make
    for h, echo in made:
        h.cleanup()
        echo.close()


def agent(h: Host, script: str, *, popen: bool = False, timeout: float = 60):
    """`sh -c script` under `agentgate run` as nobody."""
    args = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", "nobody", "--",
            "sh", "-c", script]
    if popen:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV)
        return p
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    h._watch_run(p.stderr)
    return p


def script_file(h: Host, name: str, text: str) -> Path:
    f = h.public / name
    f.write_text(text)
    f.chmod(0o644)
    return f


def sections(out: str) -> dict[str, str]:
    """The agent's output cut at its `@@ name` lines."""
    parts: dict[str, str] = {}
    name = ""
    for line in out.splitlines(keepends=True):
        if line.startswith("@@ "):
            name = line[3:].strip()
            parts[name] = ""
        else:
            parts[name] = parts.get(name, "") + line
    return parts


def body_and_trailer(text: str) -> tuple[str, str]:
    """Body and the last line (curl's -w '\\n...')."""
    body, _, trailer = text.rstrip("\n").rpartition("\n")
    return body, trailer


def events(h: Host, protocol: str = "http") -> list[tuple[str, dict]]:
    """Every event of the sessions of `protocol`, oldest session first."""
    return [(k, f) for s in reversed(h.sessions(protocol)) for k, f in s["events"]]


def ends(h: Host, protocol: str = "http") -> list:
    """Each session's end reason and what it recorded (for assertion messages)."""
    return [(s["end_reason"], [(k, f.get("summary") or f.get("text") or f.get("error"))
                               for k, f in s["events"] if k != "session_start"])
            for s in h.sessions(protocol)]


def exchanges(h: Host, protocol: str = "http") -> list[tuple[dict, dict | None]]:
    """(command, the output after it) over every session of `protocol`, in order."""
    out = []
    for s in reversed(h.sessions(protocol)):      # (listed newest first)
        cmd = None
        for k, f in s["events"]:
            if k == "command":
                cmd = f
                out.append([f, None])
            elif k == "output" and cmd is not None and out[-1][1] is None:
                out[-1][1] = f
    return [tuple(x) for x in out]


def curl(*args: str) -> str:
    return "curl -sS --max-time 20 " + " ".join(args)


# ------------------------------------------------------------------------ plain http


def test_allowed_get_injects_credentials_and_keeps_them_from_the_agent(make_host, server):
    h = make_host()
    url = server.http_url
    # (from a file: an argument would be recorded with the process that gave it)
    own = script_file(h, "own-auth", "Authorization: Bearer agent-own-credential\n"
                                     "X-Team: red\n")
    p = agent(h, "; ".join([
        "echo '@@ echo'",
        curl(f"-H @{own}", f"{url}/echo?a=1"),
        "echo; echo '@@ json'",
        curl("-w '\\n%{http_code}\\n'", f"{url}/json"),
    ]))
    assert p.returncode == 0, p.stderr
    out = sections(p.stdout)
    echo = json.loads(out["echo"])
    # what the server received: the target's token in the one Authorization header (the
    # agent's own dropped), the configured headers; echoed back, the secrets are blanked
    auth = [v for n, v in echo["raw_headers"] if n.lower() == "authorization"]
    assert auth == ["*" * len("Bearer " + TOKEN)]
    # an injected header replaces the agent's own of that name
    assert [v for n, v in echo["raw_headers"] if n.lower() == "x-team"] == ["blue"]
    assert echo["headers"]["x-api-key"] == "*" * len(API_KEY)
    assert echo["query"] == {"a": "1"}
    assert "agent-own-credential" not in p.stdout
    assert TOKEN not in p.stdout and API_KEY not in p.stdout
    body, status = body_and_trailer(out["json"])
    assert status == "200" and json.loads(body)["users"][0]["name"] == "ann"

    xs = exchanges(h)
    assert [(c["method"], c["path"], c["decision"]["action"]) for c, _ in xs] == \
        [("GET", "/echo", "allow"), ("GET", "/json", "allow")]
    (cmd, output), (cmd2, output2) = xs
    assert cmd["query"] == "a=1" and cmd["host"] == f"127.0.0.1:{server.http_port}"
    # the agent's Authorization header is recorded by its length only
    assert ["authorization", f"(redacted, {len('Bearer agent-own-credential')} bytes)"] in \
        cmd["headers"]
    assert output["status"] == 200 and output2["status"] == 200
    # the server echoed the injected secrets back: found (so it got them) and blanked
    assert output["masked"]["injected_secret"] >= 2
    assert output2["summary"].startswith("200 OK application/json")
    recording = repr(events(h))
    assert TOKEN not in recording and API_KEY not in recording
    assert "agent-own-credential" not in recording

    # replay prints the request line and the answer's status
    sid = next(s["id"] for s in h.sessions("http")
               if any(k == "command" and f["path"] == "/json" for k, f in s["events"]))
    r = run_cli("sessions", "replay", sid, "--speed", "0", collector=h.collector)
    assert r.returncode == 0, r.stderr
    assert f"GET 127.0.0.1:{server.http_port}/json" in r.stdout
    assert "200 OK" in r.stdout
    assert TOKEN not in r.stdout


def test_a_denied_request_gets_a_403_and_the_connection_goes_on(make_host, server):
    h = make_host()
    url = server.http_url
    w = "-w '\\n%{http_code} %{num_connects}\\n'"
    big = script_file(h, "big.bin", "x" * (1 << 20))
    reuse = script_file(h, "reuse.py", f'''
import requests
s = requests.Session()
r = s.delete("{url}/things/2")
print(r.status_code, r.json()["rule"])
r = s.get("{url}/echo?after=delete")
print(r.status_code, r.json()["query"]["after"])
''')
    p = agent(h, "; ".join([
        "echo '@@ curl'",
        curl(w, "-X DELETE", f"{url}/things/1", "--next", "-sS", w, f"{url}/echo?x=2"),
        # a refused request with a body (1 MiB, no Expect): the connection goes on
        "echo '@@ body'",
        curl(w, "-X DELETE -H 'Expect:'", f"--data-binary @{big}", f"{url}/things/3", "--next",
             "-sS", w, f"{url}/echo?x=3"),
        "echo '@@ requests'",
        f"{VENV_PY} {reuse}",
        # another name behind the same address is another site: not the target's
        "echo '@@ misdirected'",
        curl("-H 'Host: other.example'", "-w '\\n%{http_code}\\n'", f"{url}/misdirected"),
    ]))
    assert p.returncode == 0, p.stderr
    out = sections(p.stdout)
    lines = out["curl"].splitlines()
    denied = json.loads(lines[0])
    assert denied == {"error": "refused by agentgate", "rule": "no-deletes",
                      "reason": "agents may not delete"}
    assert lines[1] == "403 1"
    assert json.loads(lines[2])["query"] == {"x": "2"}
    assert lines[3] == "200 0"           # no new connection: the same one went on
    lines = out["body"].splitlines()
    assert json.loads(lines[0])["rule"] == "no-deletes" and lines[1] == "403 1"
    assert json.loads(lines[2])["query"] == {"x": "3"} and lines[3] == "200 0"
    assert out["requests"].split() == ["403", "no-deletes", "200", "delete"]
    body, status = body_and_trailer(out["misdirected"])
    assert status == "421" and "other.example" in json.loads(body)["reason"]
    stats = server.stats()
    assert not {"/things/1", "/things/2", "/things/3", "/misdirected"} & set(stats)
    # a connection per client, each DELETE and the GET after it on the same one
    per_session = [[(f["method"], f["decision"]["action"]) for k, f in s["events"]
                    if k == "command"] for s in h.sessions("http")]
    assert sorted(per_session) == [[("DELETE", "deny"), ("GET", "allow")]] * 3 + \
        [[("GET", "deny")]]
    outputs = [f for k, f in events(h) if k == "output" and f["status"] == 403]
    assert len(outputs) == 3 and all("no-deletes" in o["summary"] for o in outputs)


def test_paths_are_judged_as_the_server_will_read_them(make_host, server):
    h = make_host()
    url = server.http_url
    w = "-w '%{http_code}\\n'"
    p = agent(h, "; ".join(curl("--path-as-is -o /dev/null", w, f"'{url}{path}'") for path in
                           ("/public/../admin", "/%61dmin", "/./admin/./x", "/ADMIN",
                            "/public/%2e%2e/admin", "/admins")))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["403"] * 5 + ["404"]
    cmds = [c for c, _ in exchanges(h)]
    assert [c["path"] for c in cmds] == ["/admin", "/admin", "/admin/x", "/ADMIN",
                                         "/admin", "/admins"]
    stats = server.stats()
    assert not any(k.lower().startswith("/admin/") or k.lower() == "/admin" for k in stats)


def test_json_rules_judge_the_body(make_host, server):
    h = make_host()
    url = server.http_url
    gz = h.public / "force.json.gz"
    gz.write_bytes(gzip.compress(b'{"force": true}'))
    gz.chmod(0o644)
    w = "-w '\\n%{http_code}\\n'"
    js = "-H 'Content-Type: application/json'"
    bodies = {"force-true": '{"force": true}', "force-false": '{"force": false}',
              "duplicate": '{"force": false, "force": true}',
              "nested-other": '{"a": {"force": true}}'}
    parts = []
    for name, body in bodies.items():
        parts += [f"echo '@@ {name}'", curl(w, js, f"--data-binary '{body}'",
                                            f"{url}/echo?case={name}")]
    parts += ["echo '@@ gzip'", curl(w, js, "-H 'Content-Encoding: gzip'",
                                     f"--data-binary @{gz}", f"{url}/echo?case=gzip")]
    server.reset_stats()
    p = agent(h, "; ".join(parts))
    assert p.returncode == 0, p.stderr
    out = {k: body_and_trailer(v) for k, v in sections(p.stdout).items()}
    assert out["force-true"][1] == "403"
    assert json.loads(out["force-true"][0])["rule"] == "no-force"
    assert out["force-false"][1] == "200"
    assert json.loads(out["force-false"][0])["body"] == '{"force": false}'
    # parsers differ on which duplicate wins: unparseable, denied
    assert out["duplicate"][1] == "403"
    assert json.loads(out["duplicate"][0])["rule"] == "(unparseable)"
    assert out["nested-other"][1] == "200"          # $.a.force is not $.force
    assert out["gzip"][1] == "403"                  # decoded before it is judged
    assert json.loads(out["gzip"][0])["rule"] == "no-force"
    assert server.stats() == {"/echo": 2}            # the two allowed, alone
    cmds = [c for c, _ in exchanges(h)]
    assert [c["query"] for c in cmds if c["decision"]["action"] == "allow"] == \
        ["case=force-false", "case=nested-other"]
    forced = next(c for c in cmds if c["query"] == "case=force-true")
    assert forced["body"] == '{"force": true}' and forced["body_bytes"] == 15


def test_duplicate_keys_forms_and_queries_are_judged_whatever_the_content_type(
        make_host, server):
    h = make_host()
    url = server.http_url
    w = "-w '\\n%{http_code}\\n'"
    dup = "--data-binary '{\"force\": false, \"force\": true}'"
    parts = []
    for name, ctype in (("plain", "-H 'Content-Type: text/plain'"),
                        ("none", "-H 'Content-Type:'")):
        parts += [f"echo '@@ single-{name}'",
                  curl(w, ctype, "--data-binary '{\"force\": true}'", f"{url}/echo"),
                  f"echo '@@ dup-{name}'", curl(w, ctype, dup, f"{url}/echo")]
    parts += ["echo '@@ form'", curl(w, "--data 'a=1&force=true'", f"{url}/echo"),
              "echo '@@ form-ok'", curl(w, "--data 'a=1&force=false'", f"{url}/echo"),
              "echo '@@ query'", curl(w, f"'{url}/echo?a=1&force=true'")]
    server.reset_stats()
    p = agent(h, "; ".join(parts))
    assert p.returncode == 0, p.stderr
    got = {k: body_and_trailer(v) for k, v in sections(p.stdout).items()}
    # valid JSON is read as JSON whatever its type says, and JSON that does not parse
    # (servers differ on which duplicate wins; Go's takes the last, whatever the type)
    # is unparseable whatever its type says
    assert {k: status for k, (_, status) in got.items()} == {
        "single-plain": "403", "dup-plain": "403", "single-none": "403", "dup-none": "403",
        "form": "403", "form-ok": "200", "query": "403"}
    rules = {k: json.loads(body).get("rule") for k, (body, _) in got.items()}
    assert rules["dup-plain"] == rules["dup-none"] == "(unparseable)"
    assert rules["single-plain"] == rules["form"] == rules["query"] == "no-force"
    assert server.stats() == {"/echo": 1}


def pending(h) -> list[dict]:
    return pending_approvals(h.collector)


def test_review_holds_the_request_until_a_human_decides(make_host, server):
    h = make_host()
    url = server.http_url
    w = "-w '\\n%{http_code}\\n'"
    p = agent(h, "; ".join(["echo '@@ approved'", curl(w, "-X POST", f"{url}/status/201"),
                            "echo '@@ denied'", curl(w, "-X POST", f"{url}/status/202")]),
              popen=True)
    try:
        (first,) = wait_for(lambda: pending(h), what="the first approval request")
        assert first["command"] == "POST /status/201"
        assert first["rule"] == "needs-a-human" and first["requested_by"] == "nobody"
        assert "/status/201" not in server.stats()         # held, not sent
        r = run_cli("approvals", "approve", first["id"], "--reason", "fine",
                    collector=h.collector)
        assert r.returncode == 0, r.stderr
        (second,) = wait_for(lambda: [a for a in pending(h) if a["id"] != first["id"]],
                             what="the second approval request")
        assert second["command"] == "POST /status/202"
        r = run_cli("approvals", "deny", second["id"], "--reason", "not today",
                    collector=h.collector)
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    h._watch_run(err)
    assert p.returncode == 0, err
    got = {k: body_and_trailer(v) for k, v in sections(out).items()}
    assert got["approved"][1] == "201"
    assert got["denied"][1] == "403"
    refusal = json.loads(got["denied"][0])
    assert refusal["rule"] == "needs-a-human" and "not today" in refusal["reason"]
    stats = server.stats()
    assert stats.get("/status/201") == 1 and "/status/202" not in stats
    states = [f["state"] for k, f in events(h) if k == "approval"]
    assert states == ["pending", "approved", "pending", "denied"]


# ------------------------------------------------------------------------ masking


def test_answers_are_masked_whatever_their_coding_or_framing(make_host, server):
    h = make_host(RULES + MASKS)
    url = server.http_url
    req = script_file(h, "masked.py", f'''
import json, time, requests
r = requests.get("{url}/json")
print(json.dumps(r.json()))
r = requests.get("{url}/gzip", headers={{"Accept-Encoding": "gzip"}})
print(r.headers.get("content-encoding"), json.dumps(r.json()))
# an event stream goes out event by event, not once it has ended
t0 = time.monotonic()
lines = requests.get("{url}/sse?n=2&interval_ms=1000", stream=True).iter_lines()
first = next(ln for ln in lines if ln)
t1 = time.monotonic()
last = [ln for ln in lines if ln][-1]
print(first.decode(), last.decode(), time.monotonic() - t1 > 0.5, sep=" | ")
''')
    parts = ["echo '@@ json'", curl(f"{url}/json")]
    for coding in ("gzip", "deflate", "br"):
        # no --compressed: the client gets plain JSON whatever the server sent
        parts += [f"echo; echo '@@ {coding}'", curl("-i", f"{url}/{coding}")]
    parts += ["echo; echo '@@ chunked'", curl(f"{url}/chunked"),
              "echo '@@ sse'", curl("-N", f"'{url}/sse?n=3&interval_ms=10'"),
              "echo '@@ requests'", f"{VENV_PY} {req}"]
    p = agent(h, "; ".join(parts))
    assert p.returncode == 0, p.stderr
    out = sections(p.stdout)
    assert json.loads(out["json"]) == JSON_MASKED, (p.stdout, p.stderr)
    for coding in ("gzip", "deflate", "br"):
        head, _, body = out[coding].partition("\n\n")     # (text mode: \r\n read as \n)
        assert json.loads(body) == JSON_MASKED, coding
        assert "content-encoding" not in head.lower()
        assert f"content-length: {len(body.rstrip(chr(10)))}" in head.lower()
    assert out["chunked"].splitlines() == [f"part {n} {MASK}" for n in range(1, 6)]
    assert [e for e in out["sse"].split("\n\n") if e.strip()] == \
        [f'data: {{"i":{k},"email":"{MASK}"}}' for k in range(3)]
    lines = out["requests"].splitlines()
    assert json.loads(lines[0]) == JSON_MASKED
    coding, doc = lines[1].split(" ", 1)
    assert coding == "None" and json.loads(doc) == JSON_MASKED
    assert lines[2].split(" | ") == [f'data: {{"i":0,"email":"{MASK}"}}',
                                     f'data: {{"i":1,"email":"{MASK}"}}', "True"]
    assert "@example.com" not in p.stdout and "4111" not in p.stdout

    xs = {c["path"]: o for c, o in exchanges(h)}
    assert xs["/json"]["masked"] == {"pii:json": 2, "pii:email": 2}
    for path in ("/gzip", "/deflate", "/br"):
        assert xs[path]["masked"] == {"pii:json": 2, "pii:email": 2}, path
        assert xs[path]["status"] == 200
    assert xs["/chunked"]["masked"] == {"pii:email": 5}
    sse = [o["masked"] for c, o in exchanges(h) if c["path"] == "/sse"]
    assert sse == [{"pii:email": 3}, {"pii:email": 2}]
    recording = repr(events(h))
    assert "@example.com" not in recording and "4111 1111" not in recording


# ------------------------------------------------------------------------ https


def test_https_clients_trust_the_proxy_through_the_environment(make_host, server):
    h = make_host()
    url = f"https://localhost:{server.https_port}"
    py = script_file(h, "tls.py", f'''
import httpx, requests
r = requests.get("{url}/echo?via=requests")
print("requests", r.status_code, r.json()["query"]["via"])
r = httpx.get("{url}/echo?via=httpx")
print("httpx", r.status_code, r.json()["query"]["via"], r.http_version)
''')
    node = script_file(h, "tls.js", f'''
require('https').get('{url}/echo?via=node', (r) => {{
  let b = '';
  r.on('data', (d) => b += d);
  r.on('end', () => console.log('node', r.statusCode, JSON.parse(b).query.via));
}}).on('error', (e) => console.log('node error', e.message));
''')
    w = "-w '\\n%{http_code} %{http_version}\\n'"
    p = agent(h, "; ".join([
        "echo '@@ curl'", curl(w, f"{url}/echo?via=curl"),
        "echo '@@ http2'", curl("--http2", w, f"{url}/echo?via=curl-h2"),
        "echo '@@ python'", f"{VENV_PY} {py}",
        "echo '@@ node'", f"node {node}",
        "echo '@@ evil'", curl(f"--resolve evil.example:{server.https_port}:127.0.0.1",
                               f"https://evil.example:{server.https_port}/json"),
        "echo \"exit $?\"",
        "echo '@@ nocafile'", curl(w, f"https://localhost:{server.h1tls_port}/json"),
    ]))
    out = sections(p.stdout)
    body, trailer = body_and_trailer(out["curl"])
    assert trailer == "200 1.1", (p.stdout, p.stderr)
    echo = json.loads(body)
    assert echo["query"] == {"via": "curl"} and echo["listener"] == "https"
    assert [v for n, v in echo["raw_headers"] if n.lower() == "authorization"] == \
        ["*" * len("Bearer " + TOKEN)]
    # the proxy offers only http/1.1: an h2 client falls back by ALPN
    body, trailer = body_and_trailer(out["http2"])
    assert trailer == "200 1.1" and json.loads(body)["query"] == {"via": "curl-h2"}
    assert out["python"].splitlines() == ["requests 200 requests",
                                          "httpx 200 httpx HTTP/1.1"], \
        (p.stderr, ends(h, "https"))
    assert out["node"].strip() == "node 200 node"
    # a name outside the local CA's constraints: no certificate the client will take
    assert out["evil"].strip().splitlines()[-1] == "exit 60", (out["evil"], ends(h, "https"))
    # the server's certificate does not verify against the system store: a 502 that
    # says why
    body, trailer = body_and_trailer(out["nocafile"])
    assert trailer.split()[0] == "502"
    error = json.loads(body)["error"]
    assert "failed verification" in error and "unable to get local issuer certificate" in error
    assert TOKEN not in p.stdout

    secure = events(h, "https")
    tls = [f for k, f in secure if k == "tls"]
    assert any(t["side"] == "client" and t["alpn"] == "http/1.1" for t in tls)
    assert any(t.get("verified") is True and t["side"] != "client" for t in tls)
    assert any(t.get("verified") is False and "local issuer" in t["error"]
               for t in tls)
    paths = sorted(f["query"] for k, f in secure if k == "command" and f["path"] == "/echo")
    assert paths == sorted(f"via={v}" for v in ("curl", "curl-h2", "requests", "httpx",
                                                 "node"))
    assert all(o["status"] == 200 for c, o in exchanges(h, "https") if c["path"] == "/echo")
    assert TOKEN not in repr(secure)


# ------------------------------------------------------------------------ framing

RAW_CLIENT = '''
import re, socket, sys

HOST = b"127.0.0.1:{port}"


def ask(data, port={port}, half_close=False):
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out
'''


def test_requests_that_could_be_framed_two_ways_are_refused(make_host, server):
    h = make_host()
    py = script_file(h, "smuggle.py", RAW_CLIENT.format(port=server.http_port) + r'''
head = b"Host: " + HOST + b"\r\n"
cases = {
    "cl-te": b"POST /smuggle-cl-te HTTP/1.1\r\n" + head + b"Content-Length: 4\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST /smuggle-two-cl HTTP/1.1\r\n" + head + b"Content-Length: 3\r\n"
              b"Content-Length: 3\r\n\r\nabc",
    "obs-fold": b"GET /smuggle-fold HTTP/1.1\r\n" + head + b"X-Folded: one\r\n two\r\n\r\n",
}
for name, data in cases.items():
    answer = ask(data)
    print(name, answer.split(b"\r\n", 1)[0].decode() or "(closed without an answer)")
    sys.stdout.flush()
''')
    p = agent(h, f"{VENV_PY} {py}")
    assert p.returncode == 0, p.stderr
    got = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    stats = server.stats()
    assert not any(k.startswith("/smuggle") for k in stats), stats
    assert got == {"cl-te": "HTTP/1.1 400 Bad Request",
                   "two-cl": "HTTP/1.1 400 Bad Request",
                   "obs-fold": "HTTP/1.1 400 Bad Request"}, ends(h)
    refusals = sorted(f["error"] for k, f in events(h) if k == "output")
    assert len(refusals) == 3 and all("refused request framing" in e for e in refusals)
    assert any("Content-Length and Transfer-Encoding" in e for e in refusals)
    assert any("more than one Content-Length" in e for e in refusals)
    assert any("obs-fold" in e for e in refusals)


def test_expect_100_continue_is_the_servers_to_answer(make_host, server):
    h = make_host('default = "allow"\n')     # no json rule: heads go on before bodies
    big = h.public / "big.bin"
    data = os.urandom(3 << 20)
    big.write_bytes(data)
    big.chmod(0o644)
    url = server.http_url
    w = "-w '\\n%{http_code}\\n'"
    p = agent(h, "; ".join([
        "echo '@@ upload'", curl("-v", w, "-H 'Expect: 100-continue'",
                                 f"--data-binary @{big}", f"{url}/upload", "2>&1"),
        "echo '@@ chunked'", curl(w, "-H 'Transfer-Encoding: chunked'",
                                  f"--data-binary @{big}", f"{url}/upload"),
        "echo '@@ refused'", curl("-v", w, "-H 'Expect: 100-continue'",
                                  f"--data-binary @{big}", f"{url}/no-continue", "2>&1"),
    ]))
    assert p.returncode == 0, p.stderr
    out = sections(p.stdout)
    body, status = body_and_trailer(out["upload"])
    assert status == "200", out["upload"][-2000:]
    assert "< HTTP/1.1 100 Continue" in body            # the server's, relayed
    answer = json.loads(body.splitlines()[-1])
    assert answer == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    body, status = body_and_trailer(out["chunked"])
    assert status == "200" and json.loads(body) == answer
    body, status = body_and_trailer(out["refused"])
    assert status == "417", out["refused"][-2000:]
    assert "100 Continue" not in body                    # never invented by the proxy
    assert server.stats().get("/no-continue", 0) >= 1


def test_bodiless_answers_pipelining_and_close_delimited_answers(make_host, server):
    h = make_host(RULES + MASKS)
    url = server.http_url
    py = script_file(h, "pipeline.py", RAW_CLIENT.format(port=server.http_port) + r'''
reqs = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: %s\r\n%s\r\n"
                % (n, HOST, b"Connection: close\r\n" if n == 3 else b"") for n in (1, 2, 3))
answer = ask(reqs)
print(answer.count(b"HTTP/1.1 200 OK"),
      [answer.find(b'"url":"/echo?n=%d"' % n) for n in (1, 2, 3)])
# a refused one in the middle
reqs = b"".join(b"%s /echo?n=%d HTTP/1.1\r\nHost: %s\r\n%s\r\n"
                % (m, n, HOST, b"Connection: close\r\n" if n == 3 else b"")
                for m, n in ((b"GET", 1), (b"DELETE", 2), (b"GET", 3)))
answer = ask(reqs)
print([m.decode() for m in re.findall(rb"HTTP/1\.1 \d\d\d [A-Za-z ]+(?=\r\n)", answer)],
      answer.find(b'"url":"/echo?n=1"') < answer.find(b'"rule": "no-deletes"')
      < answer.find(b'"url":"/echo?n=3"'))
''')
    w = "-w '%{http_code} %{num_connects} %{size_download}\\n'"
    p = agent(h, "; ".join([
        "echo '@@ head'", curl("-I", f"{url}/json"),
        "echo '@@ bodiless'",
        curl("-o /dev/null", w, f"{url}/status/204", "--next", "-sS -o /dev/null", w,
             f"{url}/status/304", "--next", "-sS -o /dev/null", w, "-I", f"{url}/json",
             "--next", "-sS -o /dev/null", w, f"{url}/json"),
        "echo '@@ pipeline'", f"{VENV_PY} {py}",
        "echo '@@ raw'", curl("-w '%{http_code}\\n'", f"{server.raw_url}/close-delimited"),
    ]))
    assert p.returncode == 0, p.stderr
    out = sections(p.stdout)
    head = out["head"].lower()
    assert head.startswith("http/1.1 200 ok") and "content-type: application/json" in head
    assert "content-length: " in head
    lines = out["bodiless"].split()
    # 204, 304 and HEAD then a full answer, all on the one connection
    assert lines[0::3] == ["204", "304", "200", "200"]
    assert lines[1::3] == ["1", "0", "0", "0"]
    assert lines[2::3][:3] == ["0", "0", "0"] and int(lines[-1]) > 100
    first, second = out["pipeline"].splitlines()
    assert second == "['HTTP/1.1 200 OK', 'HTTP/1.1 403 Forbidden', 'HTTP/1.1 200 OK'] True", \
        (out["pipeline"], ends(h))
    count, positions = first.split(" ", 1)
    positions = json.loads(positions)
    assert count == "3" and -1 not in positions and positions == sorted(positions), \
        (out["pipeline"], ends(h))
    assert out["raw"] == f"closed-delimited body with {MASK}\n200\n"
    raw = [o for c, o in exchanges(h) if c["path"] == "/close-delimited"]
    assert raw and raw[0]["status"] == 200 and raw[0]["masked"] == {"pii:email": 1}


def test_pipelined_requests_are_all_answered_after_the_client_half_closes(make_host, server):
    """The client's EOF must not reach the server while requests it sent before it are
    still queued in the proxy (the server would answer the first and close)."""
    h = make_host()
    py = script_file(h, "halfclose.py", RAW_CLIENT.format(port=server.http_port) + r'''
reqs = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, HOST) for n in (1, 2, 3))
answer = ask(reqs, half_close=True)
print(answer.count(b"HTTP/1.1 200 OK"),
      [answer.find(b'"url":"/echo?n=%d"' % n) for n in (1, 2, 3)])
''')
    p = agent(h, f"{VENV_PY} {py}")
    assert p.returncode == 0, p.stderr
    count, positions = p.stdout.split(" ", 1)
    assert count == "3", (p.stdout, ends(h))
    positions = json.loads(positions)
    assert -1 not in positions and positions == sorted(positions)
    assert [c["query"] for c, _ in exchanges(h)] == ["n=1", "n=2", "n=3"]


class MuteServer:
    """Reads a request head, then closes without a word."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.heads += b"\r\n\r\n" in data

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # wakes the accept() of its thread
        except OSError:
            pass
        self.sock.close()


def test_a_server_that_closes_without_answering_gets_the_client_a_502(make_host):
    """Not a protocol error that just drops the client: an answer saying what happened."""
    mute = MuteServer()
    try:
        h = make_host(extra=f'''
[[targets]]
name = "mute"
protocol = "http"
address = ["127.0.0.1:{mute.port}"]
''')
        p = agent(h, curl("-w '\\n%{http_code}\\n'", f"http://127.0.0.1:{mute.port}/x") +
                  "; echo \"exit $?\"")
        assert mute.heads == 1
    finally:
        mute.close()
    body, status = body_and_trailer(p.stdout.rstrip("\n").rpartition("\n")[0])
    assert status == "502", (p.stdout, ends(h))
    assert "closed the connection before answering" in json.loads(body)["error"]
    outputs = [f for k, f in events(h) if k == "output"]
    assert [o["status"] for o in outputs] == [502]


def test_a_pinned_or_non_http_client_on_a_tls_target_fails_closed_and_is_recorded(
        make_host, server):
    h = make_host()
    pinned = h.public / "upstream-ca.pem"          # trusts the real server's CA alone
    pinned.write_bytes(server.ca_pem.read_bytes())
    pinned.chmod(0o644)
    py = script_file(h, "tls_odd.py", f'''
import socket, ssl
try:
    ctx = ssl.create_default_context(cafile="{pinned}")
    with socket.create_connection(("localhost", {server.https_port})) as s:
        ctx.wrap_socket(s, server_hostname="localhost")
    print("pinned: connected")
except ssl.SSLCertVerificationError as e:
    print("pinned: refused", e.verify_message)
ctx = ssl.create_default_context()                 # the environment's bundle
with socket.create_connection(("localhost", {server.https_port})) as s:
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.sendall(b"\\x00\\x01 not http at all\\r\\n\\r\\n")
    got = b""
    try:
        while d := t.recv(4096):
            got += d
    except (ssl.SSLError, OSError):
        pass
    print("garbage:", got[:12])
''')
    p = agent(h, f"{VENV_PY} {py}")
    assert "pinned: refused" in p.stdout, (p.stdout, p.stderr)
    assert "garbage:" in p.stdout and "200" not in p.stdout.split("garbage:")[1]
    reasons = [s["end_reason"] for s in h.sessions("https")]
    assert any("client TLS handshake failed" in r for r in reasons), reasons
    assert any("bad HTTP request" in r or "protocol error" in r or "400" in r
               for r in reasons), reasons
