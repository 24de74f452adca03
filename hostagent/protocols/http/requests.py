"""An HTTP request as a protocol-neutral policy request.

Matchers: `methods`, `hosts` (the Host header, with and without its port), `paths`
(globs on the path, normalized as the server will read it), `headers` ("name: value",
name lowercased) and `json` (body fields as "path=value", see flatten). The path is
normalized before it is judged and the normalized form is what goes upstream, so
`/public/../admin` or `/%61dmin` is judged as `/admin`, and is `/admin` to the server.
"""
from __future__ import annotations

import json
import re
import unicodedata

from hostagent.policy import Request

MAX_FIELDS = 10_000          # JSON leaves judged per body; more: unparseable
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")


class BadTarget(Exception):
    pass


def _unquote_unreserved(segment: bytes) -> bytes:
    # only unreserved characters are decoded: %2F stays a byte of a segment, not a slash
    def one(m: re.Match) -> bytes:
        b = int(m.group(1), 16)
        return bytes((b,)) if b in _UNRESERVED else b"%" + m.group(1).upper()
    return _PCT.sub(one, segment)


def normalize_target(target: bytes) -> tuple[str, str]:
    """(path, query) of an origin-form request target: unreserved characters decoded,
    dot segments removed (RFC 3986 5.2.4), empty segments merged (as nginx and Spring
    read them), percent-escapes upper-cased."""
    if not target.startswith(b"/"):
        raise BadTarget("the request target must be a path (origin-form)")
    path, sep, query = target.partition(b"?")
    if b"#" in path:
        raise BadTarget("a fragment in the request target")
    if b"%00" in path or b"\\" in path:
        raise BadTarget("a NUL or backslash in the path")
    out: list[bytes] = []
    segments = [_unquote_unreserved(s) for s in path.split(b"/")[1:]]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == b"" and not last:
            continue
        # ".;x" and "..;x" are dot segments to Tomcat, Jetty and Spring (parameters go
        # first): as such they go upstream, as such they are judged
        dot = seg.split(b";", 1)[0]
        if dot in (b".", b".."):
            seg = dot
        if seg == b".":
            if last:
                out.append(b"")
            continue
        if seg == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
            continue
        out.append(seg)
    norm = b"/" + b"/".join(out)
    try:
        return norm.decode("ascii"), query.decode("ascii") if sep else ""
    except UnicodeDecodeError:
        raise BadTarget("a request target must be ASCII") from None


def path_readings(path: str) -> tuple[str, ...]:
    """The paths a server may take `path` (normalized) for: as it is, without `;`
    parameters (Tomcat, Spring), and with encoded slashes decoded (Go before 1.22, some
    proxies). Policy judges every reading; more than one is flagged `ambiguous_path`."""
    out = [path]
    if ";" in path:
        try:
            out.append(normalize_target("/".join(seg.split(";", 1)[0]
                                                 for seg in path.split("/")).encode())[0])
        except BadTarget:
            pass
    if "%2F" in path or "%5C" in path:
        decoded = path.replace("%2F", "/").replace("%5C", "/")
        try:
            out.append(normalize_target(decoded.encode())[0])
        except BadTarget:
            pass
    return tuple(dict.fromkeys(out))


def host_values(host: bytes) -> tuple[str, ...]:
    h = host.decode("latin-1").strip().lower()
    name = h
    if h.startswith("["):
        name = h[:h.find("]") + 1] if "]" in h else h
    elif h.count(":") == 1:
        name = h.split(":")[0]
    name = name.rstrip(".")
    return tuple(dict.fromkeys((name, h)))


class DuplicateKey(ValueError):
    pass


def _pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:        # parsers differ on which one wins: refuse to guess
            raise DuplicateKey(f"duplicate JSON key {k!r}")
        d[k] = v
    return d


def parse_json(body: bytes):
    """The body as JSON (no duplicate keys, bounded size), or ValueError."""
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    # (counted before parsing: a few MB of "[{},{}...]" is a GB of Python objects)
    if body.count(b",") + body.count(b"{") + body.count(b"[") > 2 * MAX_FIELDS:
        raise ValueError(f"more than {MAX_FIELDS} JSON fields")
    return json.loads(body, object_pairs_hook=_pairs)


def looks_like_json(body: bytes) -> bool:
    return body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")


def _key(k: str) -> str:
    # keys as the most lenient binder reads them: Go's encoding/json folds case (ſ is s,
    # the Kelvin sign k); rules are matched case-insensitively anyway
    return unicodedata.normalize("NFKC", k).casefold()


def _value(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e18:
        return str(int(v))     # 1e6 and 1000000.0 are 1000000 to JavaScript, Jackson, Go
    return json.dumps(v)


def form_fields(data: str) -> list[tuple[str, str]]:
    """`a=1&b=x` as fields (`$.a`, "1"), (`$.b`, "x"): form bodies and query strings,
    which web frameworks bind into the same objects JSON bodies go to. `;` separates
    too (Rack, old Go), and bracket keys nest (`user[admin]` is `$.user.admin`, `a[]`
    indexes: Rails, PHP, qs)."""
    from urllib.parse import unquote_plus
    out: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for part in re.split(r"[&;]", data):
        if not part:
            continue
        k, _, v = part.partition("=")
        k, v = unquote_plus(k, errors="replace"), unquote_plus(v, errors="replace")
        head, *rest = k.split("[")
        path = "$." + _key(head)
        for r in rest:
            name = r.rstrip("]")
            if name == "":
                n = counts[path] = counts.get(path, -1) + 1
                path += f"[{n}]"
            else:
                path += "." + _key(name)
        out.append((path, v))
        if len(out) > MAX_FIELDS:
            raise ValueError(f"more than {MAX_FIELDS} form fields")
    return out


def flatten(doc, limit: int = MAX_FIELDS) -> list[tuple[str, str]]:
    """Leaves as (path, value): (`$.a.b`, "x"), (`$.items[0].name`, "y"); strings as they
    are, other scalars as JSON (true, 42, null). ValueError past `limit` leaves."""
    out: list[tuple[str, str]] = []
    stack = [("$", doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack += [(f"{path}.{_key(k)}", v) for k, v in reversed(list(node.items()))]
        elif isinstance(node, list):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node)))]
        else:
            out.append((path, _value(node)))
            if len(out) > limit:
                raise ValueError(f"more than {limit} JSON fields")
    return out


def field_strings(fields: list[tuple[str, str]]) -> list[str]:
    """Fields as the `json` matcher sees them, "path=value"; ValueError if a path comes
    twice (keys differing in case only, a form key repeated, a query key also in the
    body): binders differ on which one wins, so none is guessed."""
    seen: set[str] = set()
    for path, _ in fields:
        if path in seen:
            raise DuplicateKey(f"the field {path} is given twice")
        seen.add(path)
    return [f"{p}={v}" for p, v in fields]


def path_glob(path: str) -> str:
    """A rule's JSON path as a glob on flatten()'s paths: `[*]` is any index, `..` any
    depth, other brackets literal."""
    out = []
    i = 0
    while i < len(path):
        if path.startswith("[*]", i):
            out.append("[[]*[]]")
            i += 3
        elif path.startswith("..", i):
            out.append("*.")
            i += 2
        elif path[i] == "[":
            out.append("[[]")
            i += 1
        elif path[i] == "]":
            out.append("[]]")
            i += 1
        elif path[i] in "?":
            out.append("[?]")
            i += 1
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def json_patterns(table: dict) -> list[str]:
    """A rule's `json = {"$.path" = "glob"}` as patterns on flatten()'s output."""
    return [f"{path_glob(p)}={g}" for p, g in table.items()]


def request_for(*, target: str, identity: dict, method: str, host: bytes | None, path: str,
                query: str, headers, body_fields: list[tuple[str, str]] | None,
                parsed: bool = True, protocol: str = "http",
                query_fields: bool = True) -> Request:
    text = f"{method} {path}{'?' + query if query else ''}"
    hosts = host_values(host) if host else ()
    paths = path_readings(path)
    # encoded slashes: servers differ on where the path's segments are (see path_readings)
    ambiguous = ("ambiguous_path",) if "%2F" in path or "%5C" in path else ()
    fields: list[str] = []
    methods = [method]
    try:
        pairs = list(body_fields or ()) + (form_fields(query) if query and query_fields
                                           else [])
        fields = field_strings(pairs)
        # (Rails and Laravel take a form's or query's _method as the method)
        methods += [v.upper() for p, v in pairs if p == "$._method"]
    except ValueError:
        parsed = False
    return Request(target=target, protocol=protocol, identity=identity, action=method,
                   resources=(path,), text=text, parsed=parsed, unknown=ambiguous,
                   readings=("paths", "methods"),
                   attributes={"methods": tuple(dict.fromkeys(methods)), "hosts": hosts,
                               "paths": paths, "flags": ambiguous,
                               "headers": tuple(f"{n.decode('latin-1')}: "
                                                f"{v.decode('latin-1')}" for n, v in headers),
                               "json": tuple(fields)})
