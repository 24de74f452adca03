"""SPDY/3.1 as kubectl's remotecommand uses it (the fallback when websockets are refused or
turned off): a copy of each direction is read frame by frame so the same channels as the
websocket protocols can be recorded. The client opens one stream per channel, named by
its SYN_STREAM's `streamtype` header (error, stdin, stdout, stderr, resize); header
blocks are zlib-compressed with SPDY/3's dictionary, one compression context per
direction, so every header block is inflated to keep in step."""
from __future__ import annotations

import struct
import zlib

from hostagent.protocols.api import ProtocolError

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base "
    "content-encoding content-language content-length content-location content-md5 "
    "content-range content-type date etag expect expires from host if-match if-modified-since "
    "if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, "
    "Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
# the SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1)
DICTIONARY = b"".join(struct.pack("!I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()
CHANNELS = {"stdin": 0, "stdout": 1, "stderr": 2, "error": 3, "resize": 4}
SYN_STREAM, SYN_REPLY, HEADERS = 1, 2, 8
FIN = 0x01
MAX_HEADERS = 64 << 10        # an inflated header block


class SpdyReader:
    """One direction's frames as (channel, payload, message ended) pieces; `streams`
    (stream id -> channel) is shared by both directions: the client names them."""

    def __init__(self, client: bool, streams: dict[int, int]):
        self.client = client
        self.streams = streams
        self.buf = bytearray()
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.opened: list[tuple[int, dict]] = []   # streams the client opened, to judge

    @property
    def text(self) -> bytearray:     # (what ExecStream counts as buffered)
        return self.buf

    def pieces(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        self.buf += data
        out = []
        while len(self.buf) >= 8:
            length = int.from_bytes(self.buf[5:8], "big")
            if len(self.buf) < 8 + length:
                break
            head, payload = bytes(self.buf[:8]), bytes(self.buf[8:8 + length])
            del self.buf[:8 + length]
            flags = head[4]
            if head[0] & 0x80:
                self._control(int.from_bytes(head[2:4], "big"), payload)
                continue
            stream = int.from_bytes(head[:4], "big") & 0x7FFFFFFF
            channel = self.streams.get(stream)
            if channel is None and self.client and payload:
                # (data on a stream no SYN_STREAM named: what it carries can't be filed)
                raise ProtocolError(f"SPDY data on stream {stream}, which was not opened")
            if channel is not None:
                ended = bool(flags & FIN) if channel == 3 else True
                out.append((channel, payload, ended))
        return out

    def _control(self, ftype: int, payload: bytes) -> None:
        if ftype == SYN_STREAM and len(payload) >= 10:
            headers = self._headers(payload[10:])
            if self.client:
                stream = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                # (unknown stream types, e.g. port-forward's data and error streams, are
                # recorded by number)
                self.streams[stream] = CHANNELS.get(headers.get("streamtype", ""), 100 + stream)
                self.opened.append((stream, headers))
        elif ftype in (SYN_REPLY, HEADERS) and len(payload) >= 4:
            self._headers(payload[4:])     # (the compression context moves on)

    def _headers(self, block: bytes) -> dict[str, str]:
        try:
            raw = self.inflate.decompress(block, MAX_HEADERS)
            if self.inflate.unconsumed_tail:
                raise ProtocolError("a SPDY header block inflates past 64 KiB")
            out, n, pos = {}, struct.unpack_from("!I", raw)[0], 4
            for _ in range(n):
                ln = struct.unpack_from("!I", raw, pos)[0]
                name = raw[pos + 4:pos + 4 + ln].decode("latin-1").lower()
                pos += 4 + ln
                lv = struct.unpack_from("!I", raw, pos)[0]
                # as Go's spdystream reads it: values split at NUL, the first one counts
                value = raw[pos + 4:pos + 4 + lv].decode("latin-1").split("\x00")[0]
                out.setdefault(name, value)
                pos += 4 + lv
                if pos > len(raw):
                    raise struct.error("a header past the block's end")
            if pos != len(raw):
                # (spdystream reads one continuous stream: bytes past this list would
                # start the next frame's headers there, unseen here)
                raise ProtocolError("trailing bytes in a SPDY header block")
            return out
        except (zlib.error, struct.error) as exc:
            raise ProtocolError(f"a SPDY header block that does not decode: {exc}") from None
