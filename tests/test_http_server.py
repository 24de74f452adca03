"""The upstream test server (tests/http_server.js) talked to directly, without the proxy."""
from __future__ import annotations

import hashlib
import http.client
import json
import socket
import subprocess
import time

import pytest

from tests.http_server import HttpServer

CURL = "/usr/bin/curl"
JSON_DOC = {"users": [{"id": 1, "name": "ann", "email": "ann@example.com",
                       "card": "4111 1111 1111 1111"},
                      {"id": 2, "name": "bob", "email": "bob@example.com",
                       "card": "5500 0000 0000 0004"}],
            "token": "s3cr3t-token-value", "note": "call +1 (555) 123-4567"}


@pytest.fixture(scope="module")
def server():
    s = HttpServer().start()
    yield s
    s.stop()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "-sS", "--max-time", str(timeout), *args],
                          capture_output=True, timeout=timeout + 5)


def curl_ok(*args: str) -> subprocess.CompletedProcess:
    r = curl(*args)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def split_w(out: bytes) -> tuple[bytes, str]:
    """Body and the -w '\\n%{...}' trailer."""
    body, _, trailer = out.rpartition(b"\n")
    return body, trailer.decode()


def test_plain_http_json(server):
    r = curl_ok("-i", f"{server.http_url}/json")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert json.loads(body) == JSON_DOC
    assert f"content-length: {len(body)}".encode() in head.lower()
    assert b"content-type: application/json" in head.lower()


def test_https_speaks_http2(server):
    r = curl_ok("--cacert", str(server.ca_pem), "--http2", "-w", "\n%{http_version}",
                "--data-binary", "héllo", f"{server.https_url}/echo?a=1&b=2&b=3")
    body, version = split_w(r.stdout)
    assert version == "2"
    echo = json.loads(body)
    assert echo["http_version"] == "2.0"
    assert echo["method"] == "POST" and echo["path"] == "/echo"
    assert echo["query"] == {"a": "1", "b": ["2", "3"]}
    assert echo["body"] == "héllo" and echo["body_length"] == len("héllo".encode())
    assert echo["body_sha256"] == hashlib.sha256("héllo".encode()).hexdigest()
    assert echo["pseudo_headers"][":authority"] == f"localhost:{server.https_port}"
    assert "user-agent" in echo["headers"]


def test_https_listener_also_speaks_http11(server):
    r = curl_ok("--cacert", str(server.ca_pem), "--http1.1", "-w", "\n%{http_version}",
                f"{server.https_url}/echo")
    body, version = split_w(r.stdout)
    assert version == "1.1" and json.loads(body)["http_version"] == "1.1"


def test_h1tls(server):
    r = curl_ok("--cacert", str(server.ca_pem), "--http1.1", "-w", "\n%{http_version}",
                "-H", "X-Test: One", f"{server.h1tls_url}/echo")
    body, version = split_w(r.stdout)
    echo = json.loads(body)
    assert version == "1.1" and echo["http_version"] == "1.1"
    assert echo["headers"]["x-test"] == "One"
    assert ["X-Test", "One"] in echo["raw_headers"]
    assert echo["listener"] == "h1tls"
    # ALPN offers only http/1.1: asking for h2 still gets 1.1.
    r = curl_ok("--cacert", str(server.ca_pem), "--http2", "-w", "\n%{http_version}",
                f"{server.h1tls_url}/json")
    assert split_w(r.stdout)[1] == "1.1"


def test_chunked(server):
    r = curl_ok("-v", f"{server.http_url}/chunked")
    assert b"< Transfer-Encoding: chunked" in r.stderr
    assert r.stdout.decode().splitlines() == [f"part {n} carol@example.com" for n in range(1, 6)]
    # and on the wire: five chunks
    raw = curl_ok("--raw", f"{server.http_url}/chunked").stdout
    assert raw.count(b"carol@example.com\n\r\n") == 5 and raw.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("path,encoding", [("gzip", "gzip"), ("deflate", "deflate"),
                                           ("br", "br")])
def test_compressed(server, path, encoding):
    r = curl_ok("-i", f"{server.http_url}/{path}")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert f"content-encoding: {encoding}".encode() in head.lower()
    assert body[:1] != b"{"
    r = curl_ok("--compressed", f"{server.http_url}/{path}")
    assert json.loads(r.stdout) == JSON_DOC


def test_sse_yields_n_events(server):
    r = curl_ok("-N", "-v", f"{server.http_url}/sse?n=4&interval_ms=10")
    assert b"< content-type: text/event-stream" in r.stderr
    events = [e for e in r.stdout.decode().split("\n\n") if e]
    assert events == [f'data: {{"i":{k},"email":"dave@example.com"}}' for k in range(4)]
    r = curl_ok("-N", "--cacert", str(server.ca_pem), "--http2",
                f"{server.https_url}/sse?n=3&interval_ms=10")
    assert r.stdout.count(b"data: ") == 3


def test_sse_is_not_buffered(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.request("GET", "/sse?n=2&interval_ms=1500")
        t0 = time.monotonic()
        resp = conn.getresponse()
        first = resp.fp.readline()  # chunk size line of the first event
        assert first.strip() and time.monotonic() - t0 < 1.0
        assert b"dave@example.com" in resp.fp.readline()
    finally:
        conn.close()


def test_status(server):
    r = curl_ok("-v", "-w", "%{http_code} %{size_download}", f"{server.http_url}/status/204")
    assert r.stdout == b"204 0"
    assert b"content-length" not in r.stderr.lower()
    r = curl_ok("-v", "-w", "%{http_code} %{size_download}", f"{server.http_url}/status/503")
    assert r.stdout == b"503 0" and b"< content-length: 0" in r.stderr.lower()
    r = curl_ok("-w", "%{http_code} %{redirect_url}", "-o", "/dev/null",
                f"{server.http_url}/redirect")
    assert r.stdout.decode() == f"302 {server.http_url}/json"
    r = curl_ok("-w", "\n%{http_code}", f"{server.http_url}/nope")
    assert split_w(r.stdout) == (b'{"error":"not found"}', "404")


@pytest.mark.parametrize("chunked", [False, True])
def test_big(server, chunked):
    n = 1_000_003
    q = f"bytes={n}" + ("&chunked=1" if chunked else "")
    r = curl_ok("-v", f"{server.http_url}/big?{q}")
    assert r.stdout == b"x" * n
    assert (b"< Transfer-Encoding: chunked" in r.stderr) == chunked
    assert (f"< content-length: {n}".encode() in r.stderr.lower()) == (not chunked)
    r = curl_ok("--cacert", str(server.ca_pem), "--http2", f"{server.https_url}/big?{q}")
    assert r.stdout == b"x" * n


def test_upload(server, tmp_path):
    data = bytes(range(256)) * 4000
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    want = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    r = curl_ok("--data-binary", f"@{f}", f"{server.http_url}/upload")
    assert json.loads(r.stdout) == want
    r = curl_ok("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
                f"{server.http_url}/upload")
    assert json.loads(r.stdout) == want
    r = curl_ok("--cacert", str(server.ca_pem), "--http2", "--data-binary", f"@{f}",
                f"{server.https_url}/upload")
    assert json.loads(r.stdout) == want


def test_expect_100_continue(server, tmp_path):
    f = tmp_path / "body.txt"
    f.write_bytes(b"expect me\n" * 100)
    r = curl_ok("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{f}",
                f"{server.http_url}/echo")
    err = r.stderr.decode()
    assert "< HTTP/1.1 100 Continue" in err and "< HTTP/1.1 200 OK" in err
    assert err.index("100 Continue") < err.index("200 OK")
    echo = json.loads(r.stdout)
    assert echo["body_length"] == 1000 and echo["headers"]["expect"] == "100-continue"

    r = curl_ok("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{f}",
                "-w", "%{http_code}", f"{server.http_url}/no-continue")
    err = r.stderr.decode()
    assert r.stdout == b"417"
    assert "100 Continue" not in err and "< HTTP/1.1 417 Expectation Failed" in err

    r = curl_ok("-v", "--cacert", str(server.ca_pem), "--http1.1", "-H", "Expect: 100-continue",
                "--data-binary", f"@{f}", f"{server.h1tls_url}/echo")
    assert b"< HTTP/1.1 100 Continue" in r.stderr and json.loads(r.stdout)["body_length"] == 1000


def test_raw_listener(server):
    r = curl_ok("-v", f"{server.raw_url}/anything")
    assert r.stdout == b"closed-delimited body with bob@example.com\n"
    assert b"< Connection: close" in r.stderr
    assert b"content-length" not in r.stderr.lower()
    # with a raw socket: read until EOF
    with socket.create_connection(("127.0.0.1", server.raw_port), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"\r\n\r\nclosed-delimited body with bob@example.com\n")


def test_stats(server):
    server.reset_stats()
    assert server.stats() == {}
    curl_ok(f"{server.http_url}/json")
    curl_ok(f"{server.http_url}/json?x=1")
    curl_ok("--cacert", str(server.ca_pem), "--http2", f"{server.https_url}/json")
    curl_ok("--cacert", str(server.ca_pem), f"{server.h1tls_url}/status/201")
    curl_ok(f"{server.raw_url}/rawpath")
    assert server.stats() == {"/json": 3, "/status/201": 1, "/rawpath": 1}
    server.reset_stats()
    assert server.stats() == {}
