"""An exec, attach or port-forward stream after its websocket upgrade: the bytes pass as
they are, and a copy is read frame by frame (wsproto's frame parser) into the channels
of Kubernetes' remotecommand protocols, so the recording holds a terminal stream.

Channels (v4/v5.channel.k8s.io, binary messages whose first byte names the channel;
base64.channel.k8s.io, text messages of an ASCII digit and base64): 0 stdin, 1 stdout,
2 stderr, 3 the error channel (a v1 Status: the exit code), 4 resize; v5's 255 is the
close signal (stdin's EOF). Recorded: `data` events (dir in/out, stream, data), `resize`
events, lines typed on stdin as `command` events (split on CR and LF), and the exit
status as an `output` event. A port-forward stream's channels are its ports' data and
errors, recorded as data."""
from __future__ import annotations

import base64
import json

from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from agentgate.events import COMMAND, DATA, OUTPUT
from hostagent.protocols.api import (CLIENT, Aborted, Close, Command, DataReceived, Record,
                                     ToClient, ToUpstream)
from hostagent.protocols.api import ProtocolError

STREAMS = {0: "stdin", 1: "stdout", 2: "stderr", 3: "error", 4: "resize"}
KNOWN = frozenset(("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                   "v2.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io",
                   "v4.base64.channel.k8s.io", "portforward.k8s.io",
                   "v4.channel.k8s.io,portforward.k8s.io"))
MAX_MESSAGE = 1 << 20      # what is kept of one message to decode it (base64, status, resize)
MAX_LINE = 4096            # a typed line longer than this is recorded in pieces


class _Reader:
    """One direction's frames, as channel payload pieces."""

    def __init__(self, client: bool, b64: bool):
        self.frames = FrameProtocol(client=client, extensions=[])
        self.b64 = b64
        self.channel: int | None = None   # of the message in progress
        self.text = bytearray()           # a base64 message, until it ends

    def pieces(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        """(channel, payload piece, message ended) for what `data` completes."""
        out = []
        self.frames.receive_bytes(data)
        try:
            for f in self.frames.received_frames():
                if f.opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE):
                    continue
                payload = bytes(f.payload) if not isinstance(f.payload, str) \
                    else f.payload.encode()
                if self.b64:
                    self.text += payload
                    if len(self.text) > MAX_MESSAGE:
                        raise ProtocolError("a base64 channel message over 1 MiB")
                    if f.frame_finished:
                        text, self.text = bytes(self.text), bytearray()
                        if text:
                            try:
                                out.append((text[0] - 0x30, base64.b64decode(text[1:]), True))
                            except ValueError:
                                raise ProtocolError("a base64 channel message that does "
                                                    "not decode") from None
                    continue
                if self.channel is None:
                    if not payload:
                        continue
                    self.channel, payload = payload[0], payload[1:]
                # (the API server's websocket code reads each frame as a message of its
                # own, its first byte a channel: so does this, or a continuation frame
                # could carry stdin the recording would file elsewhere)
                out.append((self.channel, payload, f.frame_finished))
                if f.frame_finished:
                    self.channel = None
        except ParseFailed as exc:
            raise ProtocolError(f"bad websocket frame: {exc}") from None
        return out


class _Tunnel:
    """SPDY/3.1 carried in binary websocket messages (`SPDY/3.1+portforward.k8s.io`,
    kubectl's port-forward since 1.31)."""

    def __init__(self, client: bool, streams: dict[int, int]):
        from hostagent.protocols.kubernetes.spdy import SpdyReader
        self.frames = FrameProtocol(client=not client, extensions=[])
        self.spdy = SpdyReader(client, streams)

    @property
    def text(self) -> bytearray:
        return self.spdy.buf

    @property
    def opened(self) -> list:
        return self.spdy.opened

    def pieces(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        out = []
        self.frames.receive_bytes(data)
        try:
            for f in self.frames.received_frames():
                if f.opcode in (Opcode.BINARY, Opcode.CONTINUATION):
                    out += self.spdy.pieces(bytes(f.payload))
        except ParseFailed as exc:
            raise ProtocolError(f"bad websocket frame: {exc}") from None
        return out


class ExecStream:
    name = "kubernetes-stream"

    def __init__(self, subprotocol: str, kind: str = "exec", spdy: bool = False,
                 judge_port=None):
        # judge_port(port) -> (Decision, command fields): a port-forward's ports are
        # named only in its SPDY streams' headers, judged as each is opened
        self.judge_port = judge_port
        if subprotocol.upper().startswith("SPDY/3.1+"):
            streams: dict[int, int] = {}
            self.client, self.server = _Tunnel(True, streams), _Tunnel(False, streams)
            self.kind, self.subprotocol = kind, subprotocol
            self.line, self.status, self.resize = bytearray(), bytearray(), bytearray()
            return
        if not spdy and subprotocol not in KNOWN:
            # (a stream whose framing is not known can't be recorded: fail closed)
            raise ProtocolError(f"an exec stream in an unknown subprotocol {subprotocol!r}")
        b64 = "base64." in subprotocol
        if spdy:     # (the same channels, over SPDY/3.1 streams)
            from hostagent.protocols.kubernetes.spdy import SpdyReader
            streams: dict[int, int] = {}
            self.client, self.server = SpdyReader(True, streams), SpdyReader(False, streams)
        else:
            self.client = _Reader(client=False, b64=b64)    # frames the agent sends
            self.server = _Reader(client=True, b64=b64)
        self.kind = kind
        self.subprotocol = subprotocol
        self.line = bytearray()
        self.status = bytearray()
        self.resize = bytearray()

    def buffered(self) -> int:
        return (len(self.line) + len(self.status) + len(self.resize) + len(self.client.text)
                + len(self.server.text))

    def handle(self, event) -> list[Command]:
        t = type(event)
        if t is DataReceived:
            if event.side == CLIENT:
                return self._from_client(event.data)
            return self._from_server(event.data)
        if t is Aborted:
            return [Close(event.reason)]
        return []

    def _from_client(self, data: bytes) -> list[Command]:
        out: list[Command] = []
        pieces = self.client.pieces(data)
        for _stream, headers in _take(getattr(self.client, "opened", None)):
            port = headers.get("port")
            if self.judge_port is not None and port is None:
                return out + [Close("a port-forward stream without a port")]
            if port is not None and self.judge_port is not None:
                decision, fields = self.judge_port(port)
                out.append(Record(COMMAND, {**fields, "decision": decision.as_dict()}))
                if decision.action != "allow":
                    # (nothing of the stream has gone on: the session ends here)
                    return out + [Close(f"port-forward to port {port} refused by rule "
                                        f"{decision.rule}: {decision.reason}")]
        for channel, piece, ended in pieces:
            if channel == 0 and self.kind != "portforward":
                out.append(Record(DATA, {"dir": "in", "stream": "stdin", "data": piece}))
                out += self._typed(piece)
            elif channel == 4:
                self.resize += piece[:MAX_MESSAGE - len(self.resize)]
                if ended:
                    out.append(self._resized(bytes(self.resize)))
                    self.resize = bytearray()
            elif channel == 255:
                out.append(Record(DATA, {"dir": "in", "stream": "close", "data": piece}))
            else:
                out.append(Record(DATA, {"dir": "in", "stream": f"channel {channel}",
                                         "data": piece}))
        return out + [ToUpstream(data)]

    def _typed(self, piece: bytes) -> list[Command]:
        """Lines typed on stdin, as commands (best effort: what a shell does with them,
        e.g. its line editing, is not known here)."""
        out = []
        self.line += piece
        while True:
            cut = min((i for i in (self.line.find(b"\r"), self.line.find(b"\n")) if i >= 0),
                      default=-1)
            if cut < 0:
                if len(self.line) > MAX_LINE:
                    cut = MAX_LINE
                else:
                    break
            text, self.line = bytes(self.line[:cut]), self.line[cut + 1:]
            if text.strip():
                out.append(Record(COMMAND, {"text": text.decode("utf-8", "replace"),
                                            "via": "stdin"}))
        return out

    def _resized(self, raw: bytes) -> Record:
        try:
            size = json.loads(raw)
            return Record("resize", {"cols": int(size.get("Width", 0)),
                                     "rows": int(size.get("Height", 0))})
        except (ValueError, AttributeError, TypeError):
            return Record("resize", {"error": "not a size", "data": raw[:256]})

    def _from_server(self, data: bytes) -> list[Command]:
        out: list[Command] = []
        for channel, piece, ended in self.server.pieces(data):
            if channel in (1, 2) or self.kind == "portforward":
                out.append(Record(DATA, {"dir": "out", "stream": STREAMS.get(channel, str(channel)),
                                         "data": piece}))
            elif channel == 3:
                self.status += piece[:MAX_MESSAGE - len(self.status)]
                if ended:
                    out.append(self._exited(bytes(self.status)))
                    self.status = bytearray()
        return out + [ToClient(data)]

    def _exited(self, raw: bytes) -> Record:
        """The error channel's v1 Status: the command's exit code (kubelet's shape)."""
        try:
            st = json.loads(raw)
        except ValueError:
            return Record(OUTPUT, {"summary": "error channel: not a Status",
                                   "error": raw[:512].decode("utf-8", "replace")})
        code = 0 if st.get("status") == "Success" else None
        for cause in (st.get("details") or {}).get("causes") or ():
            if cause.get("reason") == "ExitCode":
                try:
                    code = int(cause.get("message"))
                except (TypeError, ValueError):
                    pass
        f = {"summary": f"exit {code}" if code is not None else
             f"failed: {st.get('message', '')}"[:200], "exit_code": code,
             "status": st.get("status")}
        if st.get("message"):
            f["error"] = str(st["message"])[:1024]
        return Record(OUTPUT, f)


def _take(items: list | None) -> list:
    if not items:
        return []
    out = list(items)
    items.clear()
    return out
