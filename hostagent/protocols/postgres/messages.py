"""Framing and the messages of PostgreSQL's protocol 3.0 that the proxy reads or writes.

Frames are (type, body): type is one byte, or b"" for the untyped first message a client
sends (startup, SSLRequest, GSSENCRequest, CancelRequest). Only ProtocolError escapes
on bad input; a cap bounds what one message may buffer (large INSERTs are legitimate,
so the default is well above the 16 MiB other gateways stop at).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hostagent.protocols import ProtocolError

DEFAULT_MAX_MESSAGE = 256 << 20
PROTOCOL_3 = 196608            # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")


class FrameReader:
    """Splits a byte stream into frames. `startup=True` for the client side, whose first
    message (and the one after a declined SSL/GSS request) has no type byte."""

    def __init__(self, *, startup: bool = False, max_message: int = DEFAULT_MAX_MESSAGE):
        self._buf = bytearray()
        self.expect_untyped = startup
        self.max_message = max_message

    def receive_data(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        frames = []
        while True:
            typed = not self.expect_untyped
            head = 5 if typed else 4
            if len(self._buf) < head:
                break
            (length,) = _I32.unpack_from(self._buf, head - 4)
            if length < 4:
                raise ProtocolError(f"message length {length} is impossible")
            if length > self.max_message:
                raise ProtocolError(f"message of {length} bytes exceeds the "
                                    f"{self.max_message}-byte cap")
            total = head - 4 + length
            if len(self._buf) < total:
                break
            kind = bytes(self._buf[:1]) if typed else b""
            body = bytes(self._buf[head:total])
            del self._buf[:total]
            frames.append((kind, body))
            if not typed:
                # After an SSL/GSS request the client sends another untyped message.
                code = _I32.unpack_from(body, 0)[0] if len(body) >= 4 else 0
                self.expect_untyped = code in (SSL_REQUEST, GSSENC_REQUEST)
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take(self, data: bytes) -> bytes | None:
        """`data` behind the partial message this reader holds, which it gives up (the
        fast path walks them together); None when `data` does not complete that message:
        then it is kept here, appended (a large message arriving in pieces is copied
        once, not once per piece)."""
        buf = self._buf
        if not buf:
            return data
        head = 4 if self.expect_untyped else 5
        if len(buf) >= head:   # (its length was checked when the header came)
            total = head - 4 + _I32.unpack_from(buf, head - 4)[0]
            if len(buf) + len(data) < total:
                buf += data
                return None
        joined = bytes(buf) + data
        buf.clear()
        return joined


def frame(kind: bytes, body: bytes = b"") -> bytes:
    return kind + _I32.pack(len(body) + 4) + body


def untyped(body: bytes) -> bytes:
    return _I32.pack(len(body) + 4) + body


# ---------------------------------------------------------------- field readers

class Cursor:
    """Reads a message body; any overrun or malformed field is a ProtocolError."""

    def __init__(self, body: bytes):
        self.body = body
        self.pos = 0

    def i32(self) -> int:
        if self.pos + 4 > len(self.body):
            raise ProtocolError("message truncated (int32)")
        (v,) = _I32.unpack_from(self.body, self.pos)
        self.pos += 4
        return v

    def i16(self) -> int:
        if self.pos + 2 > len(self.body):
            raise ProtocolError("message truncated (int16)")
        (v,) = _I16.unpack_from(self.body, self.pos)
        self.pos += 2
        return v

    def cstr(self) -> str:
        end = self.body.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("message truncated (string)")
        raw = self.body[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise ProtocolError("message truncated (bytes)")
        v = self.body[self.pos:self.pos + n]
        self.pos += n
        return v

    def done(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError(f"{len(self.body) - self.pos} unexpected trailing bytes")


# ---------------------------------------------------------------- frontend

@dataclass(frozen=True, slots=True)
class Startup:
    version: int
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class SpecialRequest:
    code: int               # SSL_REQUEST, GSSENC_REQUEST or CANCEL_REQUEST
    pid: int = 0            # CancelRequest's backend key
    secret: int = 0


def parse_untyped(body: bytes) -> Startup | SpecialRequest:
    c = Cursor(body)
    code = c.i32()
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        c.done()
        return SpecialRequest(code)
    if code == CANCEL_REQUEST:
        pid, secret = c.i32(), c.i32()
        c.done()
        return SpecialRequest(code, pid, secret)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
    params = {}
    while True:
        key = c.cstr()
        if not key:
            break
        params[key] = c.cstr()
    c.done()
    return Startup(code, params)


def startup_message(params: dict[str, str], version: int = PROTOCOL_3) -> bytes:
    body = _I32.pack(version) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                         for k, v in params.items()) + b"\0"
    return untyped(body)


def parse_query(body: bytes) -> str:
    c = Cursor(body)
    text = c.cstr()
    c.done()
    return text


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    c = Cursor(body)
    name, query = c.cstr(), c.cstr()
    n = c.i16()
    types = tuple(c.i32() for _ in range(max(n, 0)))
    c.done()
    return Parse(name, query, types)


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


def parse_bind(body: bytes) -> Bind:
    c = Cursor(body)
    portal, statement = c.cstr(), c.cstr()
    formats = tuple(c.i16() for _ in range(max(c.i16(), 0)))
    params = []
    for _ in range(max(c.i16(), 0)):
        n = c.i32()
        params.append(None if n == -1 else c.take(n))
    results = tuple(c.i16() for _ in range(max(c.i16(), 0)))
    c.done()
    return Bind(portal, statement, formats, tuple(params), results)


MAX_RECORDED_PARAM = 1024   # bytes of each Bind parameter a recording keeps


def bind_fields(data: bytes, pos: int, end: int) -> dict:
    """What a recording keeps of the Bind whose body is data[pos:end], read where it
    lies (both paths record Binds with it): parse_bind's checks and errors."""
    def cstr(at: int) -> tuple[str, int]:
        stop = data.find(b"\0", at, end)
        if stop < 0:
            raise ProtocolError("message truncated (string)")
        try:
            return data[at:stop].decode(), stop + 1
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def i16(at: int) -> int:
        if at + 2 > end:
            raise ProtocolError("message truncated (int16)")
        return _I16.unpack_from(data, at)[0]

    portal, pos = cstr(pos)
    statement, pos = cstr(pos)
    n = i16(pos)
    pos += 2
    formats = [i16(pos + 2 * i) for i in range(max(n, 0))]
    pos += 2 * max(n, 0)
    n = i16(pos)
    pos += 2
    params: list = []
    unpack = _I32.unpack_from
    for _ in range(max(n, 0)):
        if pos + 4 > end:
            raise ProtocolError("message truncated (int32)")
        size = unpack(data, pos)[0]
        pos += 4
        if size == -1:
            params.append(None)
            continue
        if size < 0 or pos + size > end:
            raise ProtocolError("message truncated (bytes)")
        params.append(data[pos:pos + min(size, MAX_RECORDED_PARAM)])
        pos += size
    n = i16(pos)
    pos += 2 + 2 * max(n, 0)
    if pos > end:
        raise ProtocolError("message truncated (int16)")
    if pos != end:
        raise ProtocolError(f"{end - pos} unexpected trailing bytes")
    return {"statement": statement, "portal": portal, "params": params, "formats": formats}


# ---------------------------------------------------------------- backend

def authentication(code: int, data: bytes = b"") -> bytes:
    return frame(b"R", _I32.pack(code) + data)


AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12


def ready_for_query(status: bytes = b"I") -> bytes:
    return frame(b"Z", status)


def error_response(message: str, code: str = "42501", severity: str = "ERROR",
                   detail: str = "", hint: str = "") -> bytes:
    fields = [(b"S", severity), (b"V", severity), (b"C", code), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    body = b"".join(k + v.encode() + b"\0" for k, v in fields) + b"\0"
    return frame(b"E", body)


def notice_response(message: str, code: str = "00000", severity: str = "NOTICE") -> bytes:
    return frame(b"N", b"".join(k + v.encode() + b"\0" for k, v in
                                ((b"S", severity), (b"V", severity), (b"C", code),
                                 (b"M", message))) + b"\0")


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by their one-letter codes."""
    c = Cursor(body)
    out = {}
    while True:
        if c.pos >= len(body):
            raise ProtocolError("error fields not terminated")
        code = body[c.pos:c.pos + 1]
        c.pos += 1
        if code == b"\0":
            break
        out[code.decode(errors="replace")] = c.cstr()
    c.done()
    return out


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    c = Cursor(body)
    return c.i32(), body[4:]


def sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode() for m in data.split(b"\0") if m]


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", mechanism.encode() + b"\0" + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def password_message(password: str) -> bytes:
    return frame(b"p", password.encode() + b"\0")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_mod: int
    format: int


def parse_row_description(body: bytes) -> list[Column]:
    c = Cursor(body)
    cols = [Column(c.cstr(), c.i32(), c.i16(), c.i32(), c.i16(), c.i32(), c.i16())
            for _ in range(max(c.i16(), 0))]
    c.done()
    return cols


def row_description(cols: list[Column]) -> bytes:
    body = _I16.pack(len(cols)) + b"".join(
        col.name.encode() + b"\0" + struct.pack("!ihihih", col.table_oid, col.column,
                                                col.type_oid, col.type_size, col.type_mod,
                                                col.format)
        for col in cols)
    return frame(b"T", body)


def py_parse_data_row(body: bytes) -> list[bytes | None]:
    # the hottest parser (every row of every masked result): a flat loop, no Cursor;
    # compiled in _walk.pyx (its twin, below)
    end = len(body)
    if end < 2:
        raise ProtocolError("DataRow: truncated")
    count = _I16.unpack_from(body, 0)[0]
    pos, values = 2, []
    unpack = _I32.unpack_from
    for _ in range(max(count, 0)):
        if pos + 4 > end:
            raise ProtocolError("DataRow: truncated")
        n = unpack(body, pos)[0]
        pos += 4
        if n == -1:
            values.append(None)
            continue
        if n < 0 or pos + n > end:
            raise ProtocolError(f"DataRow: bad value length {n}")
        values.append(body[pos:pos + n])
        pos += n
    if pos != end:
        raise ProtocolError("DataRow: trailing bytes")
    return values


_NULL = _I32.pack(-1)


def py_data_row(values: list[bytes | None]) -> bytes:
    pack = _I32.pack
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_NULL)
        else:
            parts.append(pack(len(v)))
            parts.append(v)
    body = b"".join(parts)
    return b"D" + pack(len(body) + 4) + body


try:   # the compiled twins (tests/hostagent/protocols/postgres/test_walk.py)
    from hostagent.protocols.postgres._walk import data_row, parse_data_row
except ImportError:   # not built (a source checkout without `make setup`)
    data_row, parse_data_row = py_data_row, py_parse_data_row


def backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", _I32.pack(pid) + _I32.pack(secret))


def cancel_request(pid: int, secret: int) -> bytes:
    return untyped(_I32.pack(CANCEL_REQUEST) + _I32.pack(pid) + _I32.pack(secret))


def parse_backend_key(body: bytes) -> tuple[int, int]:
    c = Cursor(body)
    pid, secret = c.i32(), c.i32()
    c.done()
    return pid, secret
