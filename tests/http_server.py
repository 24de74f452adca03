"""A real upstream HTTP server (tests/http_server.js on Node.js) for the proxy's tests.

    server = HttpServer().start()
    server.http_port, server.https_port, server.h1tls_port, server.raw_port
    server.ca_pem          # Path of the CA that signed the TLS listeners' certificate
    server.stats()         # {path: count} of the requests it received
    server.reset_stats()
    server.stop()

Listeners (all on 127.0.0.1): http = plain HTTP/1.1; https = TLS with HTTP/2 and HTTP/1.1
by ALPN; h1tls = TLS, HTTP/1.1 only; raw = a close-delimited HTTP/1.1 200 for any request.
The certificate is for localhost and 127.0.0.1. See tests/http_server.js for the endpoints.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.certs import CA

NODE = shutil.which("node") or "/usr/bin/node"
SCRIPT = Path(__file__).resolve().with_name("http_server.js")


class HttpServer:
    def __init__(self, directory: Path | None = None, start_timeout: float = 20.0):
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="agentgate-http-server-")) if directory is None \
            else Path(directory)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.http_port = self.https_port = self.h1tls_port = self.raw_port = 0
        self.ca_pem: Path | None = None
        self.cert: Path | None = None
        self.key: Path | None = None
        self.stderr_path = self.dir / "http_server.stderr"

    # -- lifecycle --
    def start(self) -> "HttpServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        ca = CA(self.dir / "ca", name="upstream-test-ca")
        self.ca_pem = ca.pem
        self.cert, self.key = ca.issue("localhost", server=True)
        config = json.dumps({"cert": str(self.cert), "key": str(self.key)})
        # stdin is a pipe we never write: when this process dies, node sees EOF and exits.
        self.proc = subprocess.Popen([NODE, str(SCRIPT), config], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"))
        try:
            ports = json.loads(self._read_line())
        except Exception as e:
            self.stop()
            raise RuntimeError(f"tests/http_server.js did not start ({e}); stderr:\n"
                               f"{self.stderr()}") from None
        self.http_port, self.https_port = ports["http"], ports["https"]
        self.h1tls_port, self.raw_port = ports["h1tls"], ports["raw"]
        return self

    def _read_line(self) -> str:
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = b""
        deadline = time.monotonic() + self.start_timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no ports line after {self.start_timeout}s")
                if sel.select(left):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        raise EOFError(f"node exited with {self.proc.wait(5)}")
                    buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                if f:
                    f.close()
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- addresses --
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def h1tls_url(self) -> str:
        return f"https://localhost:{self.h1tls_port}"

    @property
    def raw_url(self) -> str:
        return f"http://127.0.0.1:{self.raw_port}"

    # -- request counts --
    def stats(self) -> dict[str, int]:
        """{path: count} of every request received on any listener since start or the
        last reset (requests to /stats and /stats/reset are not counted)."""
        with urllib.request.urlopen(f"{self.http_url}/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        req = urllib.request.Request(f"{self.http_url}/stats/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
