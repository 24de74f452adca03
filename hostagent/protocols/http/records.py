"""What an exchange records: the request as the agent sent it (secrets redacted), the
decision, and the answer (status, headers, a bounded and masked body sample, counts)."""
from __future__ import annotations

import re

SECRET_HEADERS = frozenset(("authorization", "proxy-authorization", "cookie", "set-cookie",
                            "x-api-key", "x-auth-token", "x-amz-security-token",
                            "x-goog-api-key", "private-token", "x-vault-token"))
_SECRETISH = re.compile(r"token|secret|passw|api-?key|auth|credential|session", re.I)


def redact(headers, also: frozenset = frozenset()) -> list[list[str]]:
    """[name, value] pairs with the values of credential-bearing headers replaced by
    their length: a recording must not hold a usable secret."""
    out = []
    for n, v in headers:
        name = n.decode("latin-1")
        low = name.lower()
        if low in SECRET_HEADERS or low in also or _SECRETISH.search(low):
            out.append([name, f"(redacted, {len(v)} bytes)"])
        else:
            out.append([name, v.decode("latin-1")])
    return out


def sample(body: bytes, limit: int) -> str:
    """The first `limit` bytes of a body as text (undecodable bytes escaped)."""
    cut = body[:limit]
    text = cut.decode("utf-8", errors="backslashreplace")
    return text + (f"... ({len(body) - limit} more bytes)" if len(body) > limit else "")


def command_fields(*, method: str, path: str, query: str, host: str, version: str,
                   headers, body: bytes | None, limit: int, also=frozenset()) -> dict:
    text = f"{method} {host}{path}{'?' + query if query else ''}"
    f = {"text": text, "method": method, "host": host, "path": path, "query": query,
         "http_version": version, "headers": redact(headers, also)}
    if body is not None:
        f["body"] = sample(body, limit)
        f["body_bytes"] = len(body)
    return f


def output_fields(*, status: int, reason: str, headers, body: bytes | None, size: int,
                  mtype: str, limit: int, masked: dict, error: str = "") -> dict:
    summary = f"{status} {reason}".strip()
    if mtype:
        summary += f" {mtype}"
    summary += f" {size} bytes"
    f = {"summary": summary, "status": status, "headers": redact(headers), "bytes": size}
    if body is not None:
        f["sample"] = sample(body, limit)
    if masked:
        f["masked"] = masked
    if error:
        f["error"] = error
    return f
