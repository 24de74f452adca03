"""A small fake Kubernetes API server for the pod exec, attach and port-forward endpoints, for the proxy's tests.

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
  GET|POST .../pods/{name}/attach?container=..&stdin=..&stdout=..&stderr=..&tty=..: the same
    transports and channels as exec, attached to the container's main process (its spec's
    command: main is `sh` with stdin open, on a pty in pod-b (tty: true); sidecar `sleep`),
    started on the first attach and shared; output from then on; stdin EOF or the client going
    away detaches (the process keeps running); the attach ends with a Success Status (kubelet's
    ServeAttach: no exit code) when it detaches or the process exits; the next attach restarts
    it (restartCount + 1). server.attaches: records like execs' without command, plus detached.
  GET|POST .../pods/{name}/portforward: SPDY/3.1 (X-Stream-Protocol-Version portforward.k8s.io;
    per forwarded connection an error and a data stream, headers streamtype/port/requestid),
    the same SPDY tunnelled in binary websocket messages (subprotocol
    SPDY/3.1+portforward.k8s.io: kubectl 1.31+, no ports= in the query), or the kubelet's
    websocket protocol (v4.channel.k8s.io / v4.base64.channel.k8s.io / none, ports= required:
    channels 2i data, 2i+1 error, each opened with the port, 2 bytes little-endian). Each
    forward dials 127.0.0.1:PORT (then [::1]) on this host; a failure is the kubelet's
    "error forwarding port N to pod ..." on the error stream. server.portforwards: [{namespace,
    pod, method, ports, transport, protocol, connections: [{port, error, sent, received}],
    ended}].

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
import socket
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


class _MainProcess:
    """A container's main process (its spec's command), as attach sees it: started on the first
    attach (the fake's stand-in for the container starting), shared by every attach to it, its
    output broadcast to those attached at the time (none is kept: containerd's attach has no
    history), its stdin the container's (`stdin: true` in the spec; else attach's stdin is
    dropped), on a pty if the spec says `tty: true`. When it exits the container "restarts":
    the next attach starts it again and the pod's restartCount goes up."""

    def __init__(self, server: "K8sServer", spec: dict):
        self.server, self.spec = server, spec
        self.tty, self.stdin = bool(spec.get("tty")), bool(spec.get("stdin"))
        self.proc: asyncio.subprocess.Process | None = None
        self.master: int | None = None
        self.subscribers: set[asyncio.Queue] = set()
        self.exit_code: int | None = None
        self.ended = asyncio.Event()
        self._in: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        cmd = self.spec["command"]
        env = dict(os.environ)
        if self.tty:
            env["TERM"] = "xterm"
            self.master, slave = os.openpty()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=slave, stdout=slave, stderr=slave, cwd=self.server.cwd, env=env,
                    start_new_session=True, preexec_fn=_set_ctty)
            except OSError:
                os.close(self.master)
                self.master = None
                raise
            finally:
                os.close(slave)
            readers = [asyncio.create_task(self._pump_pty())]
        else:
            pipe = asyncio.subprocess.PIPE
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=pipe if self.stdin else asyncio.subprocess.DEVNULL, stdout=pipe,
                stderr=pipe, cwd=self.server.cwd, env=env, start_new_session=True)
            readers = [asyncio.create_task(self._pump(self.proc.stdout, STDOUT)),
                       asyncio.create_task(self._pump(self.proc.stderr, STDERR))]
        self.server._procs.add(self.proc)
        self._tasks = readers + [asyncio.create_task(self._writer()),
                                 asyncio.create_task(self._reap(readers))]

    def _broadcast(self, item) -> None:
        for q in list(self.subscribers):
            q.put_nowait(item)

    async def _pump(self, stream: asyncio.StreamReader, channel: int) -> None:
        while data := await stream.read(32768):
            self._broadcast((channel, data))

    async def _pump_pty(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        master = self.master

        def readable():
            try:
                data = os.read(master, 32768)
            except OSError:
                data = b""
            if data:
                self._broadcast((STDOUT, data))
            else:
                loop.remove_reader(master)
                if not done.done():
                    done.set_result(None)

        loop.add_reader(master, readable)
        try:
            await done
        finally:
            loop.remove_reader(master)

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._in.get()
            try:
                if self.tty:
                    await loop.run_in_executor(None, _write_all, self.master, data)
                else:
                    self.proc.stdin.write(data)
                    await self.proc.stdin.drain()
            except (OSError, RuntimeError, AttributeError):
                pass

    async def _reap(self, readers) -> None:
        rc = await self.proc.wait()
        _, pending = await asyncio.wait(readers, timeout=2.0)
        for t in pending:
            t.cancel()
        self.exit_code = 128 - rc if rc < 0 else rc
        self.server._procs.discard(self.proc)
        if self.master is not None:
            os.close(self.master)
            self.master = None
        self.ended.set()
        self._broadcast(None)
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()

    def write(self, data: bytes) -> None:
        if self.stdin and not self.ended.is_set():
            self._in.put_nowait(data)

    def resize(self, w: int, h: int) -> None:
        if self.tty and self.master is not None:
            try:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", h, w, 0, 0))
            except OSError:
                pass


class _Attach(_Exec):
    """One attach to a container's main process (the kubelet's and containerd's behaviour):
    output from then on; stdin (if the container has one) goes to the process; the client's
    stdin EOF detaches (the pods here are not StdinOnce), as does the client going away: the
    process keeps running. The attach ends with a Success Status on the error channel when
    the client detaches or the process exits (the exit code is not reported: attach has
    none); an InternalError Status if the process cannot be started."""

    def __init__(self, server: "K8sServer", record: dict, send):
        super().__init__(server, record, send)
        self.main: _MainProcess | None = None
        self.early: list[bytes] = []
        self.detached = asyncio.Event()

    def feed_stdin(self, data: bytes) -> None:
        if self.want_stdin and data:
            if self.main is None:
                self.early.append(data)
            else:
                self.main.write(data)

    def stdin_eof(self) -> None:
        if self.want_stdin:
            self.detached.set()

    def _apply_size(self) -> None:
        if self.main is not None and self.size is not None:
            self.main.resize(*self.size)

    def kill(self) -> None:
        self.killed = True
        self.detached.set()

    async def run(self) -> tuple[int | None, str | None]:
        r = self.record
        try:
            self.main = await self.server._main_process(r["namespace"], r["pod"], r["container"])
        except OSError as e:
            return None, f"failed to start container process: {e}"
        q: asyncio.Queue = asyncio.Queue()
        self.main.subscribers.add(q)
        for data in self.early:
            self.main.write(data)
        self.early.clear()
        self._apply_size()

        async def pump():
            while (item := await q.get()) is not None:
                channel, data = item
                if (channel == STDOUT and self.want_stdout) or \
                        (channel == STDERR and self.want_stderr):
                    await self.send(channel, data)

        pump_task = asyncio.create_task(pump())
        detach_task = asyncio.create_task(self.detached.wait())
        try:
            await asyncio.wait({pump_task, detach_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.main.subscribers.discard(q)
            for t in (pump_task, detach_task):
                t.cancel()
            await asyncio.gather(pump_task, detach_task, return_exceptions=True)
        r["detached"] = not self.main.ended.is_set()
        return (None if r["detached"] else self.main.exit_code), None


def attach_status(error: str | None) -> dict:
    """What the kubelet's ServeAttach writes on the error channel: Success whenever the attach
    ends (the process's exit code is not reported), else an InternalError."""
    if error is None:
        return {"metadata": {}, "status": "Success"}
    msg = f"error attaching to container: {error}"
    return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {msg}",
            "reason": "InternalError", "details": {"causes": [{"message": msg}]}, "code": 500}


class _WsWriter:
    """A StreamWriter look-alike whose writes go out as binary websocket messages (the
    SPDY-over-websocket tunnel of kubectl's port-forward)."""

    def __init__(self, ws: WSConnection, writer: asyncio.StreamWriter):
        self.ws, self.writer = ws, writer

    def write(self, data: bytes) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self.writer.write(self.ws.send(BytesMessage(data=data)))

    async def drain(self) -> None:
        await self.writer.drain()


async def _ws_messages(ws: WSConnection, reader, writer, leftover: bytes, on_message) -> None:
    """Reads websocket messages until the close (answered) or EOF."""
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


async def _dial(port: int):
    """Connects to the "pod's" port (this host's) as containerd's port-forward does: localhost
    over IPv4, then IPv6; → (reader, writer) or raises OSError with containerd's message."""
    errors = []
    for family, host, net in ((socket.AF_INET, "127.0.0.1", "tcp4"),
                              (socket.AF_INET6, "::1", "tcp6")):
        try:
            return await asyncio.open_connection(host, port, family=family)
        except OSError as e:
            hp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            why = os.strerror(e.errno).lower() if e.errno else str(e)
            errors.append(f"dial {net} {hp}: connect: {why}")
    raise OSError(f"IPv4: {errors[0]} IPv6 {errors[1]} ")


def portforward_error(pod: dict, port: int, why: str) -> str:
    """The kubelet's message on a port's error stream when the dial fails (the pod is its
    sandbox id, the uid empty; containerd's text after it)."""
    sandbox = uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox/{pod['metadata']['uid']}").hex * 2
    netns = f"/var/run/netns/cni-{uuid.uuid5(uuid.NAMESPACE_URL, sandbox)}"
    return (f"error forwarding port {port} to pod {sandbox}, uid : failed to execute portforward "
            f'in network namespace "{netns}": failed to connect to localhost:{port} inside '
            f'namespace "{sandbox}", {why}')


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
        self.attaches: list[dict] = []
        self.portforwards: list[dict] = []
        self._mains: dict = {}   # (ns, pod, container) → _MainProcess
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
            for m in self._mains.values():
                for t in m._tasks:
                    t.cancel()
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
                   ca: Path | None = None, ca_path: str | None = None) -> Path:
        """Writes a kubeconfig with one context "fake" (namespace default) and returns its path.
        certificate-authority-data is `ca`'s PEM when given, else absent."""
        path = Path(path)
        q = json.dumps
        lines = ["apiVersion: v1", "kind: Config", "clusters:", "- name: fake", "  cluster:",
                 f"    server: {q(server or self.url)}"]
        if ca is not None:
            lines.append("    certificate-authority-data: "
                         + q(base64.b64encode(Path(ca).read_bytes()).decode()))
        if ca_path is not None:   # a file the client reads when it starts, not now
            lines.append(f"    certificate-authority: {q(ca_path)}")
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
            # main: an interactive shell (stdin open; pod-b's on a terminal, as `kubectl run
            # -it` makes it); sidecar: sleeps, no stdin
            extra = {"stdin": True, **({"tty": True} if name == "pod-b" else {})} \
                if c == "main" else {}
            return {"name": c, "image": "docker.io/library/busybox:1.36",
                    "command": ["sh"] if c == "main" else ["sleep", "infinity"], **extra,
                    "resources": {},
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
            if p[6] == "attach":
                return await self._attach(conn, reader, writer, method, target, p[3], p[5],
                                          parse_qs(url.query, keep_blank_values=True), headers)
            if p[6] == "portforward":
                return await self._portforward(conn, reader, writer, method, target, p[3], p[5],
                                               parse_qs(url.query, keep_blank_values=True),
                                               headers)
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

    async def _ws_exec(self, conn, reader, writer, target, headers, record,
                       make=None, status_of=None, records=None) -> bool:
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
        make = make or _Exec
        status_of = status_of or (lambda rc, err: exec_status(rc, record["command"], err))
        # before the 101: the client may look as soon as it has it
        (self.execs if records is None else records).append(record)
        writer.write(ws.send(AcceptConnection(subprotocol=chosen)))
        leftover = conn.trailing_data[0]

        async def send(channel: int, data: bytes) -> None:
            if base64_mode:
                msg = TextMessage(data=chr(ord("0") + channel) + base64.b64encode(data).decode())
            else:
                msg = BytesMessage(data=bytes([channel]) + data)
            writer.write(ws.send(msg))
            await writer.drain()

        session = make(self, record, send)

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
            status = status_of(rc, err)
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

    async def _spdy_exec(self, conn, reader, writer, headers, record,
                         make=None, status_of=None, records=None) -> bool:
        make = make or _Exec
        status_of = status_of or (lambda rc, err: exec_status(rc, record["command"], err))
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
        (self.execs if records is None else records).append(record)
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

            session = make(self, record, send)
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
            status = status_of(rc, err)
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

    # -- attach --
    async def _main_process(self, ns: str, pod: str, container: str) -> _MainProcess:
        key = (ns, pod, container)
        main = self._mains.get(key)
        if main is not None and not main.ended.is_set():
            return main
        spec = next(c for c in self.pods[(ns, pod)]["spec"]["containers"]
                    if c["name"] == container)
        if main is not None:  # it exited: the container restarted
            for st in self.pods[(ns, pod)]["status"]["containerStatuses"]:
                if st["name"] == container:
                    st["restartCount"] += 1
        main = _MainProcess(self, spec)
        await main.start()
        self._mains[key] = main
        return main

    async def _attach(self, conn, reader, writer, method, target, ns, name, q, headers) -> bool:
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
        record = {"namespace": ns, "pod": name, "container": container,
                  "stdin": flag("stdin"), "stdout": flag("stdout"), "stderr": flag("stderr"),
                  "tty": flag("tty"), "method": method, "transport": None, "protocol": None,
                  "exit_code": None, "error": None, "resizes": [], "detached": None}
        if not (record["stdin"] or record["stdout"] or record["stderr"]):
            return await bad("you must specify at least 1 of stdin, stdout, stderr")
        upgrade = (headers.get("upgrade") or "").lower()
        kw = dict(make=_Attach, status_of=lambda rc, err: attach_status(err),
                  records=self.attaches)
        if "upgrade" in (headers.get("connection") or "").lower():
            if "websocket" in upgrade:
                return await self._ws_exec(conn, reader, writer, target, headers, record, **kw)
            if "spdy/3.1" in upgrade:
                return await self._spdy_exec(conn, reader, writer, headers, record, **kw)
        return await bad("Upgrade request required")

    # -- port-forward --
    async def _portforward(self, conn, reader, writer, method, target, ns, name, q,
                           headers) -> bool:
        async def bad(msg, code=400, reason="BadRequest"):
            await self._respond(conn, writer, code, status_failure(code, reason, msg))
            return False

        pod = self.pods.get((ns, name))
        if pod is None:
            await self._respond(conn, writer, 404, status_failure(
                404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}))
            return False
        ports: list[int] = []
        for v in q.get("ports", []):
            for s in v.split(","):
                try:
                    port = int(s)
                except ValueError:
                    return await bad(f'unable to parse port "{s}"')
                if not 0 < port < 65536:
                    return await bad(f"port {port} must be in the range 1 to 65535")
                ports.append(port)
        record = {"namespace": ns, "pod": name, "method": method, "ports": ports,
                  "transport": None, "protocol": None, "connections": [], "ended": False}
        upgrade = (headers.get("upgrade") or "").lower()
        if "upgrade" not in (headers.get("connection") or "").lower() or not (
                "websocket" in upgrade or "spdy/3.1" in upgrade):
            return await bad("Upgrade request required")
        try:
            if "spdy/3.1" in upgrade:
                offered = headers.tokens("x-stream-protocol-version")
                if "portforward.k8s.io" not in offered:
                    await self._respond(conn, writer, 403, f"unable to upgrade: unable to "
                                        f"negotiate protocol: client supports {offered}, server "
                                        f"accepts [portforward.k8s.io]\n",
                                        [("X-Accepted-Stream-Protocol-Versions",
                                          "portforward.k8s.io")])
                    return False
                record.update(transport="spdy", protocol="portforward.k8s.io")
                self.portforwards.append(record)
                writer.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                              "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io"
                              f"\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n\r\n").encode())
                leftover = conn.trailing_data[0]
                if leftover:
                    reader._buffer[0:0] = leftover  # noqa: SLF001
                await self._spdy_portforward(_SpdyFramer(reader, writer), writer, pod, record)
                return True
            offered = headers.tokens("sec-websocket-protocol")
            tunnel = [p for p in offered if p.startswith("SPDY/3.1+")]
            if tunnel:  # the API server's SPDY-over-websocket tunnel (kubectl 1.31+)
                if "SPDY/3.1+portforward.k8s.io" not in tunnel:
                    await self._respond(conn, writer, 403, f"unable to upgrade: unable to "
                                        f"negotiate protocol: client supports "
                                        f"{[p[9:] for p in tunnel]}, server accepts "
                                        f"[portforward.k8s.io]\n")
                    return False
                chosen = "SPDY/3.1+portforward.k8s.io"
            else:  # the kubelet's own websocket protocol (the Python client's)
                chosen = next((p for p in offered if p in (V4, V4_BASE64)), None)
                if offered and chosen is None:
                    await self._respond(conn, writer, 403, f"requested protocol(s) are not "
                                        f"supported: {offered}; supports "
                                        f"{['', V4, V4_BASE64]}")
                    return False
                if not ports:
                    await self._respond(conn, writer, 400,
                                        'query parameter "port" is required\n')
                    return False
            ws = WSConnection(ConnectionType.SERVER)
            try:
                ws.initiate_upgrade_connection(headers.raw, target)
                assert isinstance(next(iter(ws.events()), None), Request)
            except Exception as e:  # noqa: BLE001
                return await bad(f"invalid WebSocket upgrade request: {e}")
            record.update(transport="websocket", protocol=chosen or "")
            self.portforwards.append(record)
            writer.write(ws.send(AcceptConnection(subprotocol=chosen)))
            leftover = conn.trailing_data[0]
            if tunnel:
                tun = asyncio.StreamReader()

                def on_message(msg):
                    if isinstance(msg, bytes):
                        tun.feed_data(msg)

                async def pump():
                    try:
                        await _ws_messages(ws, reader, writer, leftover, on_message)
                    finally:
                        tun.feed_eof()

                pump_task = asyncio.create_task(pump())
                try:
                    await self._spdy_portforward(_SpdyFramer(tun, _WsWriter(ws, writer)),
                                                 writer, pod, record)
                    if ws.state is ConnectionState.OPEN:
                        writer.write(ws.send(CloseConnection(code=1000)))
                        await writer.drain()
                finally:
                    pump_task.cancel()
                    await asyncio.gather(pump_task, return_exceptions=True)
                return True
            await self._ws_portforward(ws, reader, writer, leftover, pod, record,
                                       chosen == V4_BASE64)
            return True
        finally:
            record["ended"] = True

    async def _forward(self, pod, port, record, inbound: asyncio.Queue, send_data, send_error):
        """One forwarded connection: dial the port, copy both ways (inbound: bytes, None for
        the client's EOF); as containerd, once one direction ends the other gets a second."""
        entry = {"port": port, "error": None, "sent": b"", "received": b""}
        record["connections"].append(entry)
        try:
            r, w = await _dial(port)
        except OSError as e:
            entry["error"] = portforward_error(pod, port, str(e))
            await send_error(entry["error"].encode())
            return

        async def to_pod():
            while (data := await inbound.get()) is not None:
                entry["received"] += data
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()

        async def from_pod():
            while data := await r.read(32768):
                entry["sent"] += data
                await send_data(data)

        tasks = {asyncio.create_task(to_pod()), asyncio.create_task(from_pod())}
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            w.close()

    async def _ws_portforward(self, ws, reader, writer, leftover, pod, record, b64) -> None:
        """The kubelet's websocket port-forward: channels 2i (data) and 2i+1 (error) for the
        i-th of `ports`, each opened with the port (2 bytes, little-endian); every port is
        dialled at once; the websocket closes when every forward has ended."""
        async def send(channel: int, data: bytes) -> None:
            if ws.state is not ConnectionState.OPEN:
                return
            if b64:
                msg = TextMessage(data=chr(ord("0") + channel) + base64.b64encode(data).decode())
            else:
                msg = BytesMessage(data=bytes([channel]) + data)
            writer.write(ws.send(msg))
            await writer.drain()

        ports = record["ports"]
        inbound = [asyncio.Queue() for _ in ports]

        def on_message(msg):
            if isinstance(msg, str):
                if not msg:
                    return
                if b64:
                    try:
                        channel, payload = ord(msg[0]) - ord("0"), base64.b64decode(msg[1:])
                    except ValueError:
                        return
                else:
                    channel, payload = ord(msg[0]), msg[1:].encode()
            else:
                if not msg:
                    return
                channel, payload = msg[0], msg[1:]
            if channel % 2 == 0 and channel // 2 < len(ports) and payload:
                inbound[channel // 2].put_nowait(payload)

        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            await send(2 * i, prefix)
            await send(2 * i + 1, prefix)

        async def reading():
            try:
                await _ws_messages(ws, reader, writer, leftover, on_message)
            finally:
                for qq in inbound:
                    qq.put_nowait(None)

        read_task = asyncio.create_task(reading())
        forwards = [asyncio.create_task(self._forward(
            pod, port, record, inbound[i],
            lambda d, c=2 * i: send(c, d), lambda d, c=2 * i + 1: send(c, d)))
            for i, port in enumerate(ports)]
        try:
            await asyncio.gather(*forwards, return_exceptions=True)
            if ws.state is ConnectionState.OPEN:
                writer.write(ws.send(CloseConnection(code=1000)))
                await writer.drain()
            try:
                await asyncio.wait_for(asyncio.shield(read_task), 2)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        finally:
            for t in (read_task, *forwards):
                t.cancel()
            await asyncio.gather(read_task, *forwards, return_exceptions=True)

    async def _spdy_portforward(self, framer: "_SpdyFramer", writer, pod, record) -> None:
        """The kubelet's SPDY port-forward: the client opens an error and a data stream per
        forwarded connection (headers streamtype, port, requestid); the pair dials the port;
        a dial failure is written on the error stream; both streams end with the forward."""
        pairs: dict[str, dict] = {}
        by_id: dict[int, dict] = {}
        tasks: set[asyncio.Task] = set()

        async def run_pair(pair):
            async def send_data(data):
                framer.data(pair["data"], data)
                await framer.writer.drain()

            async def send_error(data):
                framer.data(pair["error"], data)
                await framer.writer.drain()

            try:
                await self._forward(pod, pair["port"], record, pair["in"], send_data, send_error)
            finally:
                framer.data(pair["data"], b"", fin=True)
                framer.data(pair["error"], b"", fin=True)
                await framer.writer.drain()

        while True:
            try:
                kind, a, flags, payload = await framer.read()
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if kind == "data":
                info = by_id.get(a)
                if info is not None and info["type"] == "data":
                    if payload:
                        info["pair"]["in"].put_nowait(payload)
                    if flags & 1:
                        info["pair"]["in"].put_nowait(None)
            elif a == 1:  # SYN_STREAM
                sid = struct.unpack_from("!I", payload)[0] & 0x7FFFFFFF
                h = {k.lower(): v[0] for k, v in framer.headers(payload[10:]).items()}
                framer.syn_reply(sid)
                await framer.writer.drain()
                stype = h.get("streamtype", "")
                rid = h.get("requestid") or str(sid if stype == "error" else sid - 2)
                try:
                    port = int(h.get("port", ""))
                except ValueError:
                    port = 0
                pair = pairs.setdefault(rid, {"in": asyncio.Queue(), "port": port})
                if stype in ("data", "error"):
                    pair[stype] = sid
                    by_id[sid] = {"type": stype, "pair": pair}
                    if flags & 1 and stype == "data":
                        pair["in"].put_nowait(None)
                if "data" in pair and "error" in pair and "task" not in pair:
                    pair["task"] = asyncio.create_task(run_pair(pair))
                    tasks.add(pair["task"])
            elif a in (2, 8):
                framer.headers(payload[4:])
            elif a == 3:  # RST_STREAM
                info = by_id.get(struct.unpack_from("!I", payload)[0] & 0x7FFFFFFF)
                if info is not None and info["type"] == "data":
                    info["pair"]["in"].put_nowait(None)
            elif a == 6:
                if struct.unpack_from("!I", payload)[0] & 1:
                    framer.ping(payload)
                    await framer.writer.drain()
            elif a == 7:  # GOAWAY
                break
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
