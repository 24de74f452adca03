"""A small fake Kubernetes API server for the pod exec endpoints, for the proxy's tests.

kubectl and the official Python client talk to it unchanged; the commands they exec RUN FOR
REAL as local subprocesses (as root, cwd "/", the test process's environment).

    server = K8sServer(token="s3cret").start()   # token=None (default) accepts any request
    kc = server.kubeconfig(tmp / "kc", token="s3cret", ca=server.ca_pem)  # returns the Path
    subprocess.run(["kubectl", "--kubeconfig", kc, "exec", "pod-a", "--", "echo", "hi"])
    server.port, server.ca_pem    # HTTPS port on 127.0.0.1; Path of the CA that signed its cert
    server.url                    # https://127.0.0.1:PORT
    server.requests   # every request: [(method, path_with_query, {lowercase name: value})]
                      # (repeated headers joined with ", ")
    server.execs      # [{namespace, pod, container, command, stdin, stdout, stderr, tty,
                      #   transport: "websocket"|"spdy", method, protocol, exit_code (None until
                      #   it ends; 128+N if killed by signal N), error, resizes: [(w, h)]}]
    server.stop()

Listener: TLS on 127.0.0.1 (certificate for localhost and 127.0.0.1), ALPN http/1.1 only, HTTP/1.1
with keep-alive. It runs in a background thread with its own asyncio loop.

Endpoints (JSON, Kubernetes shapes; errors are v1 Status objects):
  GET /version, GET /api (APIVersions), GET /apis (APIGroupList, no groups), GET /api/v1
  (APIResourceList: namespaces, pods, pods/exec, pods/attach, pods/portforward),
  GET /api/v1/namespaces, GET /api/v1/namespaces/{ns}, GET /api/v1/pods,
  GET /api/v1/namespaces/{ns}/pods, GET /api/v1/namespaces/{ns}/pods/{name} (containers "main" and
  "sidecar", Running and ready; annotation kubectl.kubernetes.io/default-container=main, so kubectl
  does not print "Defaulted container ..."); an unknown pod is a 404 Status.
  GET|POST /api/v1/namespaces/{ns}/pods/{name}/exec?command=..&container=..&stdin=..&stdout=..
  &stderr=..&tty=..:
    * WebSocket (RFC 6455) with subprotocols v5.channel.k8s.io, v4.channel.k8s.io,
      v4.base64.channel.k8s.io, base64.channel.k8s.io, channel.k8s.io (the first one the client
      offers that is in this list; no Sec-WebSocket-Protocol at all means channel.k8s.io).
    * SPDY/3.1 (Upgrade: SPDY/3.1, X-Stream-Protocol-Version v4/v3/v2.channel.k8s.io or
      channel.k8s.io), streams selected by their "streamtype" header.
  attach and portforward answer 400 (not implemented).

Exec semantics follow the kubelet: an empty first message on the lowest writable channel (stdout,
else stderr, else error); with tty=true the command runs on a pty (stderr is then ignored) and
resize messages set its window size; stdin EOF is signalled by v5's close message [255, 0] or by
SPDY's FIN on the stdin stream (with a tty, EOF is delivered as ^D); v4 / base64 / channel.k8s.io
WebSockets cannot signal it. When the command exits the v4/v5 protocols get the v1 Status
{"metadata":{},"status":"Success"} or the NonZeroExitCode Status on the error channel (the older
protocols get only the failure message as text), then the connection closes. A command that
cannot be started gets an InternalError Status (code 500), like containerd's "executable file not
found in $PATH". If the client goes away first, the command's process group is killed.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import fcntl
import json
import os
import shutil
import signal
import ssl
import struct
import tempfile
import termios
import threading
import uuid
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping,
                            Request, TextMessage)

from tests.certs import CA

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE_SIGNAL = 255

V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"
V4_BASE64, BASE64, V1 = "v4.base64.channel.k8s.io", "base64.channel.k8s.io", "channel.k8s.io"
WS_PROTOCOLS = (V5, V4, V4_BASE64, BASE64, V1)
SPDY_PROTOCOLS = (V4, "v3.channel.k8s.io", "v2.channel.k8s.io", V1)
JSON_STATUS_PROTOCOLS = (V5, V4, V4_BASE64)

GIT_VERSION = "v1.32.0"

# The SPDY/3 header-compression dictionary (SPDY draft 3, section 2.6.10.1): length-prefixed
# words, then a run of plain text. 1423 bytes, sha256 51d27341...407f02.
_SPDY_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base "
    "content-encoding content-language content-length content-location content-md5 "
    "content-range content-type date etag expect expires from host if-match if-modified-since "
    "if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_SPDY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, "
    "Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
SPDY_DICTIONARY = (b"".join(struct.pack("!I", len(w)) + w.encode() for w in _SPDY_WORDS)
                   + _SPDY_TAIL.encode())
assert len(SPDY_DICTIONARY) == 1423

_TRUE = {"1", "t", "T", "true", "TRUE", "True"}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_failure(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
         "message": message, "reason": reason}
    if details is not None:
        s["details"] = details
    s["code"] = code
    return s


def exec_status(exit_code: int | None, command: list[str], error: str | None) -> dict:
    """The v1 Status the kubelet writes on the error channel (json.Marshal of metav1.Status:
    no kind/apiVersion, an empty metadata)."""
    if error is not None:
        msg = f"error executing command in container: {error}"
        return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {msg}",
                "reason": "InternalError", "details": {"causes": [{"message": msg}]}, "code": 500}
    if exit_code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(command)}], exit code {exit_code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}}


def _set_ctty() -> None:  # runs in the child, after setsid (start_new_session=True)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class _Headers:
    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self.raw = raw

    def all(self, name: str) -> list[str]:
        n = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.raw if k.lower() == n]

    def get(self, name: str, default: str | None = None) -> str | None:
        v = self.all(name)
        return ", ".join(v) if v else default

    def as_dict(self) -> dict[str, str]:
        d: dict[str, str] = {}
        for k, v in self.raw:
            key, val = k.decode("latin-1").lower(), v.decode("latin-1")
            d[key] = f"{d[key]}, {val}" if key in d else val
        return d

    def tokens(self, name: str) -> list[str]:
        return [t.strip() for v in self.all(name) for t in v.split(",") if t.strip()]


class _Exec:
    """One command run for an exec request, independent of the transport. The transport feeds
    stdin / resize / EOF into it and gets output through the async `send(channel, data)`."""

    def __init__(self, server: "K8sServer", record: dict, send):
        self.server, self.record, self.send = server, record, send
        self.tty, self.want_stdin = record["tty"], record["stdin"]
        self.want_stdout = record["stdout"]
        self.want_stderr = record["stderr"] and not record["tty"]
        self.stdin_q: asyncio.Queue = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None
        self.master: int | None = None
        self.size: tuple[int, int] | None = None
        self._resize_buf = ""
        self.killed = False

    # -- input from the transport --
    def feed_stdin(self, data: bytes) -> None:
        if self.want_stdin and data:
            self.stdin_q.put_nowait(data)

    def stdin_eof(self) -> None:
        if self.want_stdin:
            self.stdin_q.put_nowait(None)

    def feed_resize(self, data: bytes) -> None:
        """Resize channel/stream data: a sequence of JSON objects {"Width":..,"Height":..}."""
        self._resize_buf += data.decode("utf-8", "replace")
        dec = json.JSONDecoder()
        while True:
            s = self._resize_buf.lstrip()
            if not s:
                self._resize_buf = ""
                return
            try:
                obj, end = dec.raw_decode(s)
            except ValueError:
                self._resize_buf = s
                return
            self._resize_buf = s[end:]
            if isinstance(obj, dict):
                w, h = int(obj.get("Width", 0)), int(obj.get("Height", 0))
                self.record["resizes"].append((w, h))
                self.size = (w, h)
                self._apply_size()

    def _apply_size(self) -> None:
        if self.tty and self.master is not None and self.size is not None:
            w, h = self.size
            try:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", h, w, 0, 0))
            except OSError:
                pass

    def kill(self) -> None:
        self.killed = True  # also stops a process that is still being started
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    # -- running --
    async def run(self) -> tuple[int | None, str | None]:
        cmd = self.record["command"]
        env = dict(os.environ)
        slave = None
        try:
            if self.tty:
                env["TERM"] = "xterm"
                self.master, slave = os.openpty()
                self._apply_size()
                self.proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=slave, stdout=slave, stderr=slave, cwd=self.server.cwd, env=env,
                    start_new_session=True, preexec_fn=_set_ctty)
            else:
                pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
                self.proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=pipe if self.want_stdin else null,
                    stdout=pipe if self.want_stdout else null,
                    stderr=pipe if self.want_stderr else null,
                    cwd=self.server.cwd, env=env, start_new_session=True)
        except OSError as e:
            if self.master is not None:
                os.close(self.master)
                self.master = None
            what = (f'exec: "{cmd[0]}": executable file not found in $PATH'
                    if isinstance(e, FileNotFoundError) else f'exec: "{cmd[0]}": {e.strerror}')
            return None, ("failed to exec in container: failed to start exec "
                          f'"{uuid.uuid4().hex}": OCI runtime exec failed: exec failed: unable to '
                          f"start container process: {what}: unknown")
        finally:
            if slave is not None:
                os.close(slave)
        self.server._procs.add(self.proc)
        if self.killed:
            self.kill()
        pumps = []
        if self.tty:
            pumps.append(asyncio.create_task(self._pump_pty()))
        else:
            if self.want_stdout:
                pumps.append(asyncio.create_task(self._pump(self.proc.stdout, STDOUT)))
            if self.want_stderr:
                pumps.append(asyncio.create_task(self._pump(self.proc.stderr, STDERR)))
        writer = asyncio.create_task(self._stdin_writer())
        try:
            rc = await self.proc.wait()
            if pumps:  # output still buffered; a background child may hold the pipes: bounded
                _, pending = await asyncio.wait(pumps, timeout=2.0)
                for t in pending:
                    t.cancel()
        finally:
            self.kill()
            writer.cancel()
            for t in pumps:
                t.cancel()
            await asyncio.gather(writer, *pumps, return_exceptions=True)
            self.server._procs.discard(self.proc)
            if self.master is not None:
                os.close(self.master)
                self.master = None
        return (128 - rc if rc < 0 else rc), None

    async def _pump(self, stream: asyncio.StreamReader, channel: int) -> None:
        while True:
            data = await stream.read(32768)
            if not data:
                return
            await self.send(channel, data)

    async def _pump_pty(self) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        master = self.master

        def readable():
            try:
                data = os.read(master, 32768)
            except OSError:  # EIO: every slave fd is closed
                data = b""
            if not data:
                loop.remove_reader(master)
            q.put_nowait(data)

        loop.add_reader(master, readable)
        try:
            while True:
                data = await q.get()
                if not data:
                    return
                if self.want_stdout:
                    await self.send(STDOUT, data)
        finally:
            loop.remove_reader(master)

    async def _stdin_writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self.stdin_q.get()
            try:
                if self.tty:
                    await loop.run_in_executor(None, _write_all, self.master,
                                               b"\x04" if data is None else data)
                    if data is None:
                        return
                elif data is None:
                    self.proc.stdin.close()
                    return
                else:
                    self.proc.stdin.write(data)
                    await self.proc.stdin.drain()
            except (OSError, TypeError, RuntimeError):  # the process is gone / closed stdin
                if data is None:
                    return


class _SpdyFramer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)
        self.deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                        zlib.Z_DEFAULT_STRATEGY, SPDY_DICTIONARY)

    async def read(self):
        """→ ("control", type, flags, payload) or ("data", stream_id, flags, payload)."""
        head = await self.reader.readexactly(8)
        flags, length = head[4], int.from_bytes(head[5:8], "big")
        payload = await self.reader.readexactly(length) if length else b""
        if head[0] & 0x80:
            return "control", int.from_bytes(head[2:4], "big"), flags, payload
        return "data", int.from_bytes(head[0:4], "big") & 0x7FFFFFFF, flags, payload

    def headers(self, block: bytes) -> dict[str, list[str]]:
        raw = self.inflate.decompress(block)
        n, pos, out = struct.unpack_from("!I", raw)[0], 4, {}
        for _ in range(n):
            ln = struct.unpack_from("!I", raw, pos)[0]
            name = raw[pos + 4:pos + 4 + ln].decode("latin-1")
            pos += 4 + ln
            lv = struct.unpack_from("!I", raw, pos)[0]
            out[name] = raw[pos + 4:pos + 4 + lv].decode("latin-1").split("\x00")
            pos += 4 + lv
        return out

    def _control(self, ftype: int, flags: int, payload: bytes) -> None:
        self.writer.write(struct.pack("!HHI", 0x8003, ftype, (flags << 24) | len(payload))
                          + payload)

    def syn_reply(self, stream_id: int) -> None:
        block = self.deflate.compress(struct.pack("!I", 0)) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self._control(2, 0, struct.pack("!I", stream_id) + block)

    def ping(self, payload: bytes) -> None:
        self._control(6, 0, payload)

    def goaway(self, last_stream_id: int) -> None:
        self._control(7, 0, struct.pack("!II", last_stream_id, 0))

    def data(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        for i in range(0, max(len(data), 1), 32768):
            chunk = data[i:i + 32768]
            last = i + 32768 >= len(data)
            self.writer.write(struct.pack("!II", stream_id, ((1 if fin and last else 0) << 24)
                                          | len(chunk)) + chunk)


class K8sServer:
    def __init__(self, directory: Path | None = None, token: str | None = None,
                 pods=("default/pod-a", "default/pod-b"), cwd: str = "/",
                 client_ca: Path | None = None):
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="agentgate-k8s-server-")) if directory is None \
            else Path(directory)
        self.token = token
        # with a client CA: requests must come with a certificate it signed (the CN is
        # the user, as an API server reads it), else 401
        self.client_ca = client_ca
        self.cwd = cwd
        self.pods: dict[tuple[str, str], dict] = {}
        for p in pods:
            ns, _, name = p.rpartition("/")
            self.pods[(ns or "default", name)] = self._pod(ns or "default", name)
        self.port = 0
        self.ca_pem: Path | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.execs: list[dict] = []
        self._procs: set = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict = {}  # connection task → its StreamWriter

    # -- lifecycle --
    def start(self) -> "K8sServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        ca = CA(self.dir / "ca", name="k8s-test-ca")
        self.ca_pem = ca.pem
        cert, key = ca.issue("localhost", server=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        if self.client_ca is not None:
            ctx.load_verify_locations(cafile=str(self.client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="k8s-server",
                                        daemon=True)
        self._thread.start()

        async def listen():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
            return self._server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            for p in list(self._procs):
                if p.returncode is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except OSError:
                        pass
            tasks = list(self._conns)
            for t, w in list(self._conns.items()):
                w.transport.abort()
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "K8sServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def kubeconfig(self, path, server: str | None = None, token: str | None = "placeholder-token",
                   ca: Path | None = None) -> Path:
        """Writes a kubeconfig with one context "fake" (namespace default) and returns its path.
        certificate-authority-data is `ca`'s PEM when given, else absent."""
        path = Path(path)
        q = json.dumps
        lines = ["apiVersion: v1", "kind: Config", "clusters:", "- name: fake", "  cluster:",
                 f"    server: {q(server or self.url)}"]
        if ca is not None:
            lines.append("    certificate-authority-data: "
                         + q(base64.b64encode(Path(ca).read_bytes()).decode()))
        lines += ["users:", "- name: fake"]
        lines += ["  user:", f"    token: {q(token)}"] if token is not None else ["  user: {}"]
        lines += ["contexts:", "- name: fake", "  context:", "    cluster: fake", "    user: fake",
                  "    namespace: default", "current-context: fake", "preferences: {}", ""]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
        return path

    # -- objects --
    @staticmethod
    def _pod(ns: str, name: str) -> dict:
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"pod/{ns}/{name}"))
        t = _now()

        def container(c):
            return {"name": c, "image": "docker.io/library/busybox:1.36",
                    "command": ["sleep", "infinity"], "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}

        def cstatus(c):
            return {"name": c, "state": {"running": {"startedAt": t}}, "lastState": {},
                    "ready": True, "restartCount": 0, "image": "docker.io/library/busybox:1.36",
                    "imageID": "docker.io/library/busybox@sha256:" + "0" * 64,
                    "containerID": "containerd://" + uuid.uuid5(uuid.NAMESPACE_URL,
                                                                f"{uid}/{c}").hex * 2,
                    "started": True}

        names = ["main", "sidecar"]
        return {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "1",
                         "creationTimestamp": t, "labels": {"app": name},
                         "annotations": {"kubectl.kubernetes.io/default-container": "main"}},
            "spec": {"containers": [container(c) for c in names], "restartPolicy": "Always",
                     "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                     "serviceAccountName": "default", "serviceAccount": "default",
                     "nodeName": "fake-node", "schedulerName": "default-scheduler",
                     "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
                     "priority": 0},
            "status": {"phase": "Running",
                       "conditions": [{"type": k, "status": "True", "lastProbeTime": None,
                                       "lastTransitionTime": t}
                                      for k in ("Initialized", "Ready", "ContainersReady",
                                                "PodScheduled")],
                       "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                       "podIP": "10.244.0.10", "podIPs": [{"ip": "10.244.0.10"}],
                       "startTime": t, "containerStatuses": [cstatus(c) for c in names],
                       "qosClass": "BestEffort"}}

    def _namespaces(self) -> list[str]:
        return sorted({"default", "kube-system", *(ns for ns, _ in self.pods)})

    @staticmethod
    def _namespace(ns: str) -> dict:
        return {"kind": "Namespace", "apiVersion": "v1",
                "metadata": {"name": ns, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ns/{ns}")),
                             "resourceVersion": "1", "creationTimestamp": _now(),
                             "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}

    def _api_resources(self) -> dict:
        def sub(name, kind):
            return {"name": name, "singularName": "", "namespaced": True, "kind": kind,
                    "verbs": ["create", "get"]}
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": "namespaces", "singularName": "namespace", "namespaced": False,
             "kind": "Namespace", "verbs": ["create", "delete", "get", "list", "patch", "update",
                                            "watch"], "shortNames": ["ns"],
             "storageVersionHash": "Q3oi5N2YM8M="},
            {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
             "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                       "watch"], "shortNames": ["po"], "categories": ["all"],
             "storageVersionHash": "xPOwRZ+Yhw8="},
            sub("pods/attach", "PodAttachOptions"), sub("pods/exec", "PodExecOptions"),
            sub("pods/portforward", "PodPortForwardOptions")]}

    def _get(self, path: str):
        """(status, body) for a plain GET."""
        p = [x for x in path.split("/") if x]
        if path == "/version":
            return 200, {"major": "1", "minor": "32", "gitVersion": GIT_VERSION,
                         "gitCommit": "70d3cc986aa8221cd1dfb1121852688902d3bf53",
                         "gitTreeState": "clean", "buildDate": "2024-12-11T17:59:15Z",
                         "goVersion": "go1.23.3", "compiler": "gc", "platform": "linux/amd64"}
        if p == ["api"]:
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs":
                         [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]}
        if p == ["apis"]:
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if p == ["api", "v1"]:
            return 200, self._api_resources()
        if p == ["api", "v1", "namespaces"]:
            return 200, {"kind": "NamespaceList", "apiVersion": "v1",
                         "metadata": {"resourceVersion": "1"},
                         "items": [self._namespace(n) for n in self._namespaces()]}
        if len(p) == 4 and p[:3] == ["api", "v1", "namespaces"]:
            if p[3] in self._namespaces():
                return 200, self._namespace(p[3])
            return 404, status_failure(404, "NotFound", f'namespaces "{p[3]}" not found',
                                       {"name": p[3], "kind": "namespaces"})
        if p == ["api", "v1", "pods"] or (len(p) == 5 and p[:3] == ["api", "v1", "namespaces"]
                                           and p[4] == "pods"):
            items = [pod for (ns, _), pod in sorted(self.pods.items())
                     if len(p) == 3 or ns == p[3]]
            return 200, {"kind": "PodList", "apiVersion": "v1",
                         "metadata": {"resourceVersion": "1"}, "items": items}
        if len(p) == 6 and p[:3] == ["api", "v1", "namespaces"] and p[4] == "pods":
            pod = self.pods.get((p[3], p[5]))
            if pod is None:
                return 404, status_failure(404, "NotFound", f'pods "{p[5]}" not found',
                                           {"name": p[5], "kind": "pods"})
            return 200, pod
        return 404, status_failure(404, "NotFound",
                                   "the server could not find the requested resource", {})

    # -- HTTP --
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns[task] = writer
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await self._next_event(conn, reader)
                if not isinstance(req, h11.Request):
                    return
                while not isinstance(await self._next_event(conn, reader),
                                     (h11.EndOfMessage, h11.ConnectionClosed, type(None))):
                    pass
                method, target = req.method.decode(), req.target.decode("latin-1")
                headers = _Headers(list(req.headers))
                peer = writer.get_extra_info("peercert") or {}
                cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn
                           if k == "commonName"), None)
                self.requests.append((method, target, {**headers.as_dict(),
                                                       **({":client-cn": cn} if cn else {})}))
                if self.client_ca is not None and cn is None:
                    await self._respond(conn, writer, 401, status_failure(
                        401, "Unauthorized", "a client certificate is required"))
                    return
                if await self._route(conn, reader, writer, method, target, headers):
                    return  # upgraded; the connection is done
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (Exception, asyncio.CancelledError):
                pass
            self._conns.pop(task, None)

    @staticmethod
    async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader):
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if ev is h11.PAUSED:
                return None
            return ev

    async def _respond(self, conn, writer, status: int, body: dict | str, extra=()) -> None:
        if isinstance(body, dict):
            data, ctype = (json.dumps(body) + "\n").encode(), "application/json"
        else:
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        headers = [("Audit-Id", str(uuid.uuid4())), ("Cache-Control", "no-cache, private"),
                   ("Content-Type", ctype), ("Date", email.utils.formatdate(usegmt=True)),
                   ("Content-Length", str(len(data))), *extra]
        if conn.their_state is not h11.DONE:  # e.g. a refused upgrade: do not reuse
            headers.append(("Connection", "close"))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _route(self, conn, reader, writer, method, target, headers: _Headers) -> bool:
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            await self._respond(conn, writer, 401,
                                status_failure(401, "Unauthorized", "Unauthorized"))
            return False
        url = urlsplit(target)
        p = [x for x in url.path.split("/") if x]
        if len(p) == 7 and p[:3] == ["api", "v1", "namespaces"] and p[4] == "pods":
            if method not in ("GET", "POST"):
                await self._respond(conn, writer, 405, status_failure(
                    405, "MethodNotAllowed", "the server does not allow this method on the "
                    "requested resource", {}))
                return False
            if p[6] == "exec":
                return await self._exec(conn, reader, writer, method, target, p[3], p[5],
                                        parse_qs(url.query, keep_blank_values=True), headers)
            if p[6] in ("attach", "portforward") and (p[3], p[5]) in self.pods:
                await self._respond(conn, writer, 400, status_failure(
                    400, "BadRequest", f"pods/{p[6]} is not implemented by the fake K8sServer"))
                return False
        if method != "GET":
            code, body = self._get(url.path)
            if code == 200:
                code, body = 405, status_failure(405, "MethodNotAllowed", "the server does not "
                                                 "allow this method on the requested resource", {})
            await self._respond(conn, writer, code, body)
            return False
        code, body = self._get(url.path)
        await self._respond(conn, writer, code, body)
        return False

    # -- exec --
    async def _exec(self, conn, reader, writer, method, target, ns, name, q, headers) -> bool:
        def flag(k):
            return (q.get(k) or ["false"])[-1] in _TRUE

        async def bad(msg, code=400, reason="BadRequest"):
            await self._respond(conn, writer, code, status_failure(code, reason, msg))
            return False

        pod = self.pods.get((ns, name))
        if pod is None:
            await self._respond(conn, writer, 404, status_failure(
                404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}))
            return False
        names = [c["name"] for c in pod["spec"]["containers"]]
        container = (q.get("container") or [""])[-1]
        if not container:
            if len(names) != 1:
                return await bad(f"a container name must be specified for pod {name}, choose one "
                                 f"of: [{' '.join(names)}]")
            container = names[0]
        if container not in names:
            return await bad(f"container {container} is not valid for pod {name}")
        command = q.get("command") or []
        if not command:
            return await bad("you must specify at least one command for the container")
        record = {"namespace": ns, "pod": name, "container": container, "command": command,
                  "stdin": flag("stdin"), "stdout": flag("stdout"), "stderr": flag("stderr"),
                  "tty": flag("tty"), "method": method, "transport": None, "protocol": None,
                  "exit_code": None, "error": None, "resizes": []}
        if not (record["stdin"] or record["stdout"] or record["stderr"]):
            return await bad("you must specify at least 1 of stdin, stdout, stderr")
        upgrade = (headers.get("upgrade") or "").lower()
        if "connection" in headers.as_dict() and "upgrade" in headers.get("connection").lower():
            if "websocket" in upgrade:
                return await self._ws_exec(conn, reader, writer, target, headers, record)
            if "spdy/3.1" in upgrade:
                return await self._spdy_exec(conn, reader, writer, headers, record)
        return await bad("Upgrade request required")

    async def _ws_exec(self, conn, reader, writer, target, headers, record) -> bool:
        offered = headers.tokens("sec-websocket-protocol")
        if offered:
            chosen = next((p for p in offered if p in WS_PROTOCOLS), None)
            if chosen is None:  # x/net/websocket's handshake failure answer
                await self._respond(conn, writer, 403, f"requested protocol(s) are not supported:"
                                    f" {offered}; supports {list(WS_PROTOCOLS)}")
                return False
        else:
            chosen = None
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(headers.raw, target)
            events = list(ws.events())
            assert events and isinstance(events[0], Request)
        except Exception as e:  # noqa: BLE001 - a broken handshake
            await self._respond(conn, writer, 400, status_failure(
                400, "BadRequest", f"invalid WebSocket upgrade request: {e}"))
            return False
        record.update(transport="websocket", protocol=chosen or V1)
        protocol = chosen or V1
        base64_mode = protocol in (BASE64, V4_BASE64)
        self.execs.append(record)  # before the 101: the client may look as soon as it has it
        writer.write(ws.send(AcceptConnection(subprotocol=chosen)))
        leftover = conn.trailing_data[0]

        async def send(channel: int, data: bytes) -> None:
            if base64_mode:
                msg = TextMessage(data=chr(ord("0") + channel) + base64.b64encode(data).decode())
            else:
                msg = BytesMessage(data=bytes([channel]) + data)
            writer.write(ws.send(msg))
            await writer.drain()

        session = _Exec(self, record, send)

        def on_message(data: bytes | str) -> None:
            if isinstance(data, str):
                if not data:
                    return
                if base64_mode:
                    channel = ord(data[0]) - ord("0")
                    try:
                        payload = base64.b64decode(data[1:])
                    except ValueError:
                        return
                else:
                    data = data.encode()
                    channel, payload = data[0], data[1:]
            else:
                if not data:
                    return
                channel, payload = data[0], data[1:]
            if channel == CLOSE_SIGNAL and protocol == V5:
                if payload[:1] == bytes([STDIN]):
                    session.stdin_eof()
            elif channel == STDIN:
                session.feed_stdin(payload)
            elif channel == RESIZE:
                session.feed_resize(payload)

        async def read_loop() -> None:
            parts: list = []
            data = leftover or None
            while True:
                if data is None:
                    data = await reader.read(65536)
                ws.receive_data(data or None)
                for ev in ws.events():
                    if isinstance(ev, Message):
                        parts.append(ev.data)
                        if ev.message_finished:
                            msg = "".join(parts) if isinstance(ev, TextMessage) else b"".join(parts)
                            parts = []
                            on_message(msg)
                    elif isinstance(ev, Ping):
                        writer.write(ws.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        if ws.state is ConnectionState.REMOTE_CLOSING:
                            writer.write(ws.send(ev.response()))
                        return
                if not data:
                    return
                data = None

        # kubelet: an empty message on the lowest writable channel says "connection is up"
        first = STDOUT if record["stdout"] else STDERR if session.want_stderr else ERROR
        await send(first, b"")
        reader_task = asyncio.create_task(read_loop())
        run_task = asyncio.create_task(session.run())
        try:
            await asyncio.wait({reader_task, run_task}, return_when=asyncio.FIRST_COMPLETED)
            if not run_task.done():  # the client went away before the command ended
                session.kill()
                rc, err = await run_task
                record.update(exit_code=rc, error=err)
                return True
            rc, err = run_task.result()
            record.update(exit_code=rc, error=err)
            status = exec_status(rc, record["command"], err)
            if protocol in JSON_STATUS_PROTOCOLS:
                await send(ERROR, json.dumps(status, separators=(",", ":")).encode())
            elif status["status"] != "Success":
                await send(ERROR, status["message"].encode())
            if ws.state is ConnectionState.OPEN:
                writer.write(ws.send(CloseConnection(code=1000)))
                await writer.drain()
            try:
                await asyncio.wait_for(asyncio.shield(reader_task), 2)
            except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                pass
            return True
        finally:
            session.kill()
            for t in (reader_task, run_task):
                if not t.done():
                    t.cancel()
            await asyncio.gather(reader_task, run_task, return_exceptions=True)

    async def _spdy_exec(self, conn, reader, writer, headers, record) -> bool:
        offered = headers.tokens("x-stream-protocol-version")
        if not offered:
            await self._respond(conn, writer, 400, "unable to upgrade: X-Stream-Protocol-Version "
                                "is required\n")
            return False
        chosen = next((p for p in offered if p in SPDY_PROTOCOLS), None)
        if chosen is None:
            await self._respond(conn, writer, 403, f"unable to upgrade: unable to negotiate "
                                f"protocol: client supports {offered}, server accepts "
                                f"{list(SPDY_PROTOCOLS)}\n",
                                [("X-Accepted-Stream-Protocol-Versions", p)
                                 for p in SPDY_PROTOCOLS])
            return False
        record.update(transport="spdy", protocol=chosen)
        self.execs.append(record)
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                      f"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {chosen}\r\n"
                      f"Date: {email.utils.formatdate(usegmt=True)}\r\n\r\n").encode())
        framer = _SpdyFramer(reader, writer)
        leftover = conn.trailing_data[0]
        if leftover:  # frames that came with the request: put them back in front
            reader._buffer[0:0] = leftover  # noqa: SLF001 - asyncio.StreamReader internals

        streams: dict[str, int] = {}
        by_id: dict[int, str] = {}
        expected = {"error"}
        if record["stdin"]:
            expected.add("stdin")
        if record["stdout"]:
            expected.add("stdout")
        if record["stderr"] and not record["tty"]:
            expected.add("stderr")
        if record["tty"] and chosen in (V4, "v3.channel.k8s.io"):
            expected.add("resize")
        ready = asyncio.Event()
        session: _Exec | None = None
        early: list = []

        def deliver(kind, data):
            if session is None:
                early.append((kind, data))
            elif kind == "stdin":
                session.feed_stdin(data)
            elif kind == "eof":
                session.stdin_eof()
            elif kind == "resize":
                session.feed_resize(data)

        async def read_loop() -> None:
            while True:
                kind, a, flags, payload = await framer.read()
                if kind == "data":
                    stype = by_id.get(a)
                    if stype in ("stdin", "resize") and payload:
                        deliver(stype, payload)
                    if flags & 1 and stype == "stdin":
                        deliver("eof", b"")
                elif a == 1:  # SYN_STREAM
                    sid = struct.unpack_from("!I", payload)[0] & 0x7FFFFFFF
                    h = framer.headers(payload[10:])
                    stype = (h.get("streamtype") or [""])[0]
                    framer.syn_reply(sid)
                    await writer.drain()
                    streams[stype], by_id[sid] = sid, stype
                    if flags & 1 and stype == "stdin":
                        deliver("eof", b"")
                    if expected <= set(streams):
                        ready.set()
                elif a in (2, 8):  # SYN_REPLY / HEADERS: keep the zlib stream in step
                    framer.headers(payload[4:])
                elif a == 3:  # RST_STREAM
                    if by_id.get(struct.unpack_from("!I", payload)[0] & 0x7FFFFFFF) == "stdin":
                        deliver("eof", b"")
                elif a == 6:  # PING: answer the client's (odd) ones
                    if struct.unpack_from("!I", payload)[0] & 1:
                        framer.ping(payload)
                        await writer.drain()
                elif a == 7:  # GOAWAY
                    return

        reader_task = asyncio.create_task(read_loop())
        run_task = None
        try:
            ready_task = asyncio.create_task(ready.wait())
            await asyncio.wait({reader_task, ready_task}, timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            if not ready.is_set():
                ready_task.cancel()
                record["error"] = f"timed out waiting for client streams {sorted(expected)}"
                return True

            async def send(channel: int, data: bytes) -> None:
                framer.data(streams["stdout" if channel == STDOUT else "stderr"], data)
                await writer.drain()

            session = _Exec(self, record, send)
            for kind, data in early:
                deliver(kind, data)
            run_task = asyncio.create_task(session.run())
            await asyncio.wait({reader_task, run_task}, return_when=asyncio.FIRST_COMPLETED)
            if not run_task.done():
                session.kill()
                rc, err = await run_task
                record.update(exit_code=rc, error=err)
                return True
            rc, err = run_task.result()
            record.update(exit_code=rc, error=err)
            for k in ("stdout", "stderr"):
                if k in streams:
                    framer.data(streams[k], b"", fin=True)
            status = exec_status(rc, record["command"], err)
            if chosen == V4:
                framer.data(streams["error"], json.dumps(status, separators=(",", ":")).encode())
            elif status["status"] != "Success":
                framer.data(streams["error"], status["message"].encode())
            framer.data(streams["error"], b"", fin=True)
            framer.goaway(max(by_id, default=0))
            await writer.drain()
            return True
        finally:
            if session is not None:
                session.kill()
            for t in (reader_task, run_task):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(*(t for t in (reader_task, run_task) if t is not None),
                                 return_exceptions=True)
