"""Bodies: content codings decoded within a bound, and masking of JSON, text and
line-delimited streams (SSE, NDJSON) with the shared detectors and `json` path rules.

Masking fails closed: a body that claims a coding we can't decode, decodes past the
bound, or claims JSON that JSON path rules must see but doesn't parse, is refused
(the layer answers 502) rather than passed unmasked.
"""
from __future__ import annotations

import fnmatch
import json
import re
import zlib

from hostagent.masking import MASK, Masker
from hostagent.protocols.http.requests import path_glob

try:
    import brotli
except ImportError:     # (then br is not offered upstream, and refused if it comes)
    brotli = None

CODINGS = ("gzip", "deflate", "br") if brotli else ("gzip", "deflate")
# media types that can't hold text a detector could find: passed without inspection
OPAQUE = ("image/", "audio/", "video/", "font/")
STREAMING = ("text/event-stream", "application/x-ndjson", "application/jsonl",
             "application/json-seq")


class MaskRefused(Exception):
    """The body can't be masked: the answer is refused, never passed unmasked."""


def decode(body: bytes, codings: list[bytes], limit: int) -> bytes:
    """Undo Content-Encoding (listed in the order applied), at most `limit` bytes out:
    past it, refused (a few hundred bytes of brotli or gzip can claim gigabytes)."""
    for coding in reversed(codings):
        c = coding.decode("latin-1")
        if c in ("identity", ""):
            continue
        if c in ("gzip", "x-gzip"):
            body = _zlib(body, 47, limit, c, members=True)
        elif c == "deflate":
            try:
                body = _zlib(body, 15, limit, c)
            except MaskRefused:
                body = _zlib(body, -15, limit, c)    # raw deflate, as some servers send
        elif c == "br" and brotli is not None:
            body = _brotli(body, limit)
        else:
            raise MaskRefused(f"a body in content coding {c!r}, which can't be inspected")
    return body


MAX_MEMBERS = 64     # gzip members in one body (each costs a new decoder)


def _zlib(data: bytes, wbits: int, limit: int, name: str, members: bool = False) -> bytes:
    out = bytearray()
    for _ in range(MAX_MEMBERS):
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise MaskRefused(f"the {name} body does not decode") from None
        if len(out) > limit or d.unconsumed_tail:
            raise MaskRefused(f"the body decodes past {limit} bytes")
        # gzip allows several members one after another: each is part of the body
        data = d.unused_data if members and d.eof else b""
        if not data:
            return bytes(out)
    raise MaskRefused(f"a {name} body of more than {MAX_MEMBERS} members")


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = bytearray()
    try:
        out += d.process(data, output_buffer_limit=limit + 1)
        while len(out) <= limit and not d.can_accept_more_data():
            out += d.process(b"", output_buffer_limit=limit + 1 - len(out))
    except brotli.error:
        raise MaskRefused("the br body does not decode") from None
    if len(out) > limit:
        raise MaskRefused(f"the body decodes past {limit} bytes")
    return bytes(out)


def media_type(content_type: bytes | None) -> str:
    return (content_type or b"").split(b";")[0].strip().lower().decode("latin-1")


def inspected(mtype: str) -> bool:
    return not mtype.startswith(OPAQUE)


def is_json(mtype: str) -> bool:
    return mtype in ("application/json", "text/json") or mtype.endswith("+json")


def streaming(mtype: str) -> bool:
    return mtype in STREAMING


class BodyMasker:
    """Masking for one session's responses: `json` path rules and detectors."""

    def __init__(self, masker: Masker, json_paths: tuple[tuple[str, str], ...]):
        self.masker = masker
        # (rule name, glob on flatten()-style paths)
        self.paths = tuple((rule, path_glob(p).lower()) for rule, p in json_paths)
        self.detectors = masker.has_detectors

    @property
    def active(self) -> bool:
        return bool(self.paths) or self.detectors

    def counts(self) -> dict[str, int]:
        return dict(self.masker.counts)

    def _hit(self, rule: str, what: str) -> None:
        key = f"{rule}:{what}"
        self.masker.counts[key] = self.masker.counts.get(key, 0) + 1

    def mask_json(self, doc):
        """The document with path rules applied, then detectors on every string."""
        def walk(path: str, node):
            low = path.lower()
            for rule, glob in self.paths:
                if fnmatch.fnmatchcase(low, glob):
                    self._hit(rule, "json")
                    return MASK
            if isinstance(node, dict):
                return {k: walk(f"{path}.{k}", v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(f"{path}[{i}]", v) for i, v in enumerate(node)]
            if isinstance(node, str) and self.detectors:
                return self.masker.scan(node)[0]
            return node
        return walk("$", doc)

    def mask_text(self, text: str) -> str:
        return self.masker.scan(text)[0] if self.detectors else text

    def mask_body(self, body: bytes, mtype: str) -> bytes:
        """A whole body (already decoded). JSON in the wrappers servers put around it
        (a BOM, a json-seq separator, an XSSI guard, a JSONP callback) is found too."""
        doc = None
        prefix, text, suffix = unwrap(body)
        if is_json(mtype) or text.lstrip()[:1] in (b"{", b"["):
            try:
                doc = _parse(text)
            except (ValueError, RecursionError):
                if self.paths:
                    # fields a rule names could be in it: not passed unmasked
                    raise MaskRefused("a JSON body that does not parse can't have its "
                                      "fields masked") from None
        if isinstance(doc, (dict, list)):
            return prefix + self._json(doc) + suffix
        return self._text(body)

    def _json(self, doc) -> bytes:
        try:
            return json.dumps(self.mask_json(doc), ensure_ascii=False,
                              separators=(",", ":")).encode()
        except RecursionError:
            raise MaskRefused("JSON nested too deep to mask") from None

    def _text(self, body: bytes) -> bytes:
        if not self.detectors:
            return body
        try:
            return self.mask_text(body.decode()).encode()
        except UnicodeDecodeError:
            # not UTF-8: latin-1 keeps every byte, and the detectors look for ASCII
            return self.mask_text(body.decode("latin-1")).encode("latin-1")

    def mask_line(self, line: bytes) -> bytes:
        """One line of a stream (NDJSON lines may be JSON)."""
        stripped = line.rstrip(b"\r\n")
        end = line[len(stripped):]
        return self._payload(stripped) + end

    def _payload(self, payload: bytes) -> bytes:
        prefix, text, suffix = unwrap(payload)
        if self.paths and text.lstrip()[:1] in (b"{", b"["):
            try:
                doc = _parse(text)
            except (ValueError, RecursionError):
                return MASK.encode()      # can't find the fields: all of it
            if isinstance(doc, (dict, list)):
                try:
                    return prefix + self._json(doc) + suffix
                except MaskRefused:
                    return MASK.encode()
        return self._text(payload)

    def mask_event(self, event: bytes) -> bytes:
        """One server-sent event (its lines up to the blank line): its `data:` lines
        are one value (JSON may be split over them), masked as one."""
        lines = event.split(b"\n")
        data = [ln[6:] if ln.startswith(b"data: ") else ln[5:]
                for ln in (x.rstrip(b"\r") for x in lines) if ln.startswith(b"data:")]
        if not data:
            return b"\n".join(self._text(ln) for ln in lines)
        masked = self._payload(b"\n".join(data))
        out, done = [], False
        for ln in lines:
            if ln.rstrip(b"\r").startswith(b"data:"):
                if not done:
                    out += [b"data: " + part for part in masked.split(b"\n")]
                    done = True
            else:
                out.append(self._text(ln))
        return b"\n".join(out)


# JSON as servers wrap it: XSSI guards before it, a JSONP callback around it
_GUARDS = (b")]}',", b")]}'", b"while(1);", b"for(;;);", b"{}&&")
_JSONP = re.compile(rb"\A(\s*[A-Za-z_$][\w$.]*\s*\()(.*)(\)\s*;?\s*)\Z", re.S)
MAX_MASKED_NODES = 500_000     # containers and values in an answer masked as JSON


def unwrap(body: bytes) -> tuple[bytes, bytes, bytes]:
    """(prefix, JSON text, suffix) of a body that may carry JSON inside a wrapper."""
    start = 0
    if body.startswith(b"\xef\xbb\xbf"):
        start = 3
    if body[start:start + 1] == b"\x1e":            # application/json-seq
        start += 1
    rest = body[start:].lstrip()
    for guard in _GUARDS:
        if rest.startswith(guard):
            start = len(body) - len(rest) + len(guard)
            rest = body[start:].lstrip()
            break
    while rest.startswith(b"//"):                      # comment lines before it
        nl = rest.find(b"\n")
        if nl < 0:
            break
        rest = rest[nl + 1:].lstrip()
    start = len(body) - len(rest)
    m = _JSONP.match(body, start)
    if m and m.group(2).lstrip()[:1] in (b"{", b"["):
        return body[:m.start(2)], m.group(2), m.group(3)
    return body[:start], body[start:], b""


def _parse(text: bytes):
    # (counted before parsing: megabytes of "[{},{}...]" are a GB of Python objects)
    if text.count(b",") + text.count(b"{") + text.count(b"[") > MAX_MASKED_NODES:
        raise ValueError("too many JSON values to mask")
    return json.loads(text)


class Scrubber:
    """The target's injected secrets (a token, header values) blanked out of what the
    server sends back (an echo endpoint would hand them to the agent), byte for byte so
    lengths hold, across chunk boundaries: the last len(longest)-1 bytes wait for the
    next chunk."""

    def __init__(self, secrets: tuple[bytes, ...]):
        self.secrets = tuple(sorted(set(secrets), key=len, reverse=True))
        self.keep = max((len(s) for s in self.secrets), default=1) - 1
        self.tail = b""
        self.hits = 0

    def whole(self, data: bytes) -> bytes:
        for s in self.secrets:
            if s in data:
                self.hits += data.count(s)
                data = data.replace(s, b"*" * len(s))
        return data

    def feed(self, data: bytes) -> bytes:
        data = self.whole(self.tail + data)
        if len(data) <= self.keep:
            self.tail = data
            return b""
        cut = len(data) - self.keep
        self.tail = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail
