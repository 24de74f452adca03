"""Framing of the MySQL client/server protocol, and the field codecs every message uses.

A packet is a 3-byte little-endian length, a sequence id and a payload; a payload of
16 MiB - 1 or more is split into chunks of exactly 0xFFFFFF bytes followed by a shorter
one (an empty one if need be), each with the next sequence id. The reader joins them
into one logical packet and keeps the raw bytes, so a packet the layer passes on
unchanged leaves as it came. Only ProtocolError escapes on bad input; a cap bounds what
one logical packet may buffer.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from hostagent.protocols.api import ProtocolError

MAX_CHUNK = 0xFFFFFF
DEFAULT_MAX_PACKET = 256 << 20     # MySQL's max_allowed_packet tops out at 1 GiB

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Packet(NamedTuple):
    seq: int          # the sequence id of its first chunk
    payload: bytes
    raw: bytes        # every chunk with its header, as received
    chunks: int


class PacketReader:
    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET):
        self._buf = bytearray()
        self._parts: list[bytes] = []     # payload chunks of a split packet so far
        self._raw_start = 0               # where that packet's raw bytes start in _buf
        self.max_packet = max_packet

    def receive_data(self, data: bytes) -> list[Packet]:
        buf = self._buf
        buf += data
        out: list[Packet] = []
        pos = self._raw_start
        parts = self._parts
        start = 0          # _buf starts with the packet being read
        while len(buf) - pos >= 4:
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            if sum(map(len, parts)) + length > self.max_packet:
                raise ProtocolError(f"packet of more than {self.max_packet} bytes exceeds "
                                    f"the cap")
            end = pos + 4 + length
            if len(buf) < end:
                break
            parts.append(bytes(buf[pos + 4:end]))
            pos = end
            if length < MAX_CHUNK:
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                out.append(Packet(buf[start + 3], payload, bytes(buf[start:end]), len(parts)))
                parts.clear()
                start = pos
        if parts:
            # a split packet continues: keep its raw bytes from its first chunk
            del buf[:start]
            self._raw_start = pos - start
        else:
            del buf[:pos]
            self._raw_start = 0
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf) + sum(map(len, self._parts))

    def take_rest(self) -> bytes:
        """The bytes not yet read as a packet, given up (the start of a TLS handshake)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._parts.clear()
        self._raw_start = 0
        return rest


def frame(payload: bytes, seq: int) -> tuple[bytes, int]:
    """The packet(s) carrying `payload` from sequence id `seq`, and the next id."""
    if len(payload) < MAX_CHUNK:
        n = len(payload)
        return bytes((n & 0xFF, n >> 8 & 0xFF, n >> 16, seq & 0xFF)) + payload, (seq + 1) & 0xFF
    out = []
    view = memoryview(payload)
    for i in range(0, len(payload) + 1, MAX_CHUNK):
        chunk = view[i:i + MAX_CHUNK]
        n = len(chunk)
        out.append(bytes((n & 0xFF, n >> 8 & 0xFF, n >> 16, seq & 0xFF)))
        out.append(chunk)
        seq = (seq + 1) & 0xFF
        if n < MAX_CHUNK:
            break
    return b"".join(out), seq


# ---------------------------------------------------------------- field codecs

class Cursor:
    """Reads a payload; any overrun or malformed field is a ProtocolError."""
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise ProtocolError("packet truncated")
        v = self.data[self.pos:end]
        self.pos = end
        return bytes(v)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolError("packet truncated")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return _U16.unpack(self._take(2))[0]

    def u24(self) -> int:
        return int.from_bytes(self._take(3), "little")

    def u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def fixed(self, n: int) -> bytes:
        return self._take(n)

    def lenenc(self) -> int | None:
        """A length-encoded integer; None for 0xFB (NULL in a row)."""
        first = self.u8()
        if first < 0xFB:
            return first
        if first == 0xFB:
            return None
        if first == 0xFC:
            return self.u16()
        if first == 0xFD:
            return self.u24()
        if first == 0xFE:
            return self.u64()
        raise ProtocolError("bad length-encoded integer 0xff")

    def lenenc_bytes(self) -> bytes | None:
        n = self.lenenc()
        return None if n is None else self._take(n)

    def lenenc_str(self) -> str:
        v = self.lenenc_bytes()
        if v is None:
            raise ProtocolError("NULL where a string was expected")
        return v.decode("utf-8", "replace")

    def cstr(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        v = self.data[self.pos:end]
        self.pos = end + 1
        return bytes(v)

    def rest(self) -> bytes:
        v = self.data[self.pos:]
        self.pos = len(self.data)
        return bytes(v)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes((n,))
    if n < 1 << 16:
        return b"\xfc" + _U16.pack(n)
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + _U64.pack(n)


def lenenc_bytes(v: bytes | None) -> bytes:
    return b"\xfb" if v is None else lenenc(len(v)) + v


u16 = _U16.pack
u32 = _U32.pack
