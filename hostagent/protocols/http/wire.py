"""HTTP/1.1 framing on h11, one h11 connection per request/response cycle.

A fresh h11 connection each cycle starts at a message boundary, so the head of every
request is at the start of what it is fed: that lets us read the head as the client
wrote it (h11 quietly merges duplicate Content-Length headers and prefers chunked when
both framings are given, and a server behind us might not agree) and refuse what could
frame differently for another parser. What a client sends past the end of its request
(pipelining) is taken out of the cycle (`trailing_data`) and kept by the layer, bounded,
until the answer is out.

Towards the server, messages are written by h11 from the parsed fields: framing headers
and hop-by-hop headers are never copied, so the server only ever sees framing h11 made.
"""
from __future__ import annotations

import h11

from hostagent.protocols.api import ProtocolError

MAX_HEAD = 64 << 10          # a request or response head (h11's incomplete-event cap)
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"content-length",
                        b"proxy-authenticate", b"proxy-authorization", b"http2-settings"))


class HeadError(Exception):
    """A request head that could frame differently for another parser: refused (400)."""


def check_head(raw: bytes) -> None:
    """The framing headers of a request head as written: one length or chunked, never
    both, never two lengths, and no header folded onto the previous line."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    lines = raw[:end if end >= 0 else len(raw)].split(b"\n")[1:]
    lengths = chunked = 0
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HeadError("a folded header line (obs-fold)")
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            chunked += 1
    if lengths > 1:
        raise HeadError("more than one Content-Length header")
    if lengths and chunked:
        raise HeadError("both Content-Length and Transfer-Encoding")


class ClientSide:
    """The agent's side of one cycle: h11 as the server."""

    def __init__(self, data: bytes = b""):
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.head_raw = bytearray()
        self.request: h11.Request | None = None
        self.ended = False           # the request's EndOfMessage was read
        self.later = bytearray()     # read past the request (the next one, pipelined)
        if data:
            self.feed(data)

    def feed(self, data: bytes) -> None:
        if self.ended:
            self.later += data
            return
        if self.request is None and len(self.head_raw) <= MAX_HEAD:
            self.head_raw += data
        self.conn.receive_data(data)

    def eof(self) -> None:
        if not self.ended:
            self.conn.receive_data(b"")

    def events(self) -> list:
        """What h11 makes of what it was fed: Request, Data, EndOfMessage,
        ConnectionClosed. HeadError or ProtocolError on bad input."""
        out = []
        while not self.ended:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"bad HTTP request: {exc}") from None
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            if type(ev) is h11.Request:
                check_head(bytes(self.head_raw))
                self.head_raw = bytearray()
                self.request = ev
            elif type(ev) is h11.EndOfMessage:
                self.ended = True
                trailing, _closed = self.conn.trailing_data
                self.later += trailing
            out.append(ev)
            if type(ev) is h11.ConnectionClosed:
                break
        return out

    @property
    def buffered(self) -> int:
        return len(self.later) + len(self.head_raw)

    def send(self, event) -> bytes:
        try:
            return self.conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise ProtocolError(f"cannot answer the client: {exc}") from None

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    @property
    def waits_for_100(self) -> bool:
        return self.conn.they_are_waiting_for_100_continue


class ServerSide:
    """The server's side of one cycle: h11 as the client."""

    def __init__(self):
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.ended = False
        self.later = b""

    def send(self, event) -> bytes:
        try:
            return self.conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise ProtocolError(f"cannot send the request upstream: {exc}") from None

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def events(self) -> list:
        out = []
        while not self.ended:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"bad HTTP response from the server: {exc}") from None
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            out.append(ev)
            if type(ev) is h11.EndOfMessage or type(ev) is h11.ConnectionClosed:
                self.ended = True
                self.later = bytes(self.conn.trailing_data[0])
        return out

    @property
    def switched(self) -> bool:
        return self.conn.our_state is h11.SWITCHED_PROTOCOL

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


def end_to_end(headers, drop: frozenset = frozenset()) -> list[tuple[bytes, bytes]]:
    """Headers without framing and hop-by-hop ones (and those the Connection header
    names), nor `drop` (lowercase names)."""
    items = list(headers.raw_items()) if hasattr(headers, "raw_items") else list(headers)
    named = set()
    for name, value in items:
        if name.lower() == b"connection":
            named.update(v.strip().lower() for v in value.split(b","))
    return [(n, v) for n, v in items
            if n.lower() not in HOP_BY_HOP and n.lower() not in named and n.lower() not in drop]


def header(headers, name: bytes) -> bytes | None:
    """The first value of a header (h11 lowercases names)."""
    for n, v in headers:
        if n == name:
            return v
    return None


def tokens(headers, name: bytes) -> list[bytes]:
    """A comma-separated header's tokens, lowercased, over every line of it."""
    out = []
    for n, v in headers:
        if n == name:
            out += [t.strip().lower() for t in v.split(b",") if t.strip()]
    return out
