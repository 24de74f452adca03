"""Human output (aligned tables, times) and --json output for the CLI."""
from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time

import click

from agentgate.events import Event, SESSION_END, SESSION_START, unpack_payload


def fmt_time(ns: int) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(ns: int) -> str | None:
    if not ns:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="microseconds")


def fmt_ago(ns: int) -> str:
    if not ns:
        return "never"
    secs = max(0, int(time.time() - ns / 1e9))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def clip(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    click.echo(line(headers))
    for r in cells:
        click.echo(line(r))


def jsonable(value):
    """Payload values to JSON: bytes become {"$b64": ...} so nothing is lost."""
    if isinstance(value, bytes):
        try:
            text = value.decode()
            if text.isprintable() or text == "":
                return {"$text": text}
        except UnicodeDecodeError:
            pass
        return {"$b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, sort_keys=False))


def event_json(ev: Event) -> dict:
    try:
        fields = jsonable(unpack_payload(ev.payload))
    except Exception:  # an undecodable payload is still exported, raw
        fields = None
    return {
        "session_id": ev.session_id, "seq": ev.seq, "time": iso_time(ev.wall_time_ns),
        "wall_time_ns": ev.wall_time_ns, "mono_ns": ev.mono_ns, "kind": ev.kind,
        "fields": fields, "payload_b64": base64.b64encode(ev.payload).decode(),
        "prev_hash": ev.prev_hash.hex(), "hash": ev.hash.hex(),
    }


_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def summarize(ev: Event) -> str:
    """One line saying what an event was, for tables, replay and tail."""
    try:
        f = unpack_payload(ev.payload)
    except Exception:
        return f"({len(ev.payload)} bytes, undecodable payload)"
    if ev.kind == SESSION_START:
        proc = f.get("process") or {}
        who = f.get("agent") or " ".join(str(proc.get(k)) for k in ("user", "exe") if proc.get(k))
        return f"{f.get('protocol', '?')} to {f.get('target', '?')} by {who or '?'} on {f.get('host', '?')}"
    if ev.kind == SESSION_END:
        parts = [str(f.get("reason", ""))]
        for key in ("bytes_in", "bytes_out"):
            if key in f:
                parts.append(f"{key}={f[key]}")
        return " ".join(p for p in parts if p)
    if "text" in f:
        text = _CTRL.sub(" ", str(f["text"]))
        d = f.get("decision")
        if isinstance(d, dict) and d.get("action") not in (None, "allow"):
            text += f"  [{d['action']}: rule {d.get('rule') or 'default'}]"
        return text
    if ev.kind == "decision":
        return f"{f.get('action', '?')} (rule {f.get('rule') or 'default'}) {f.get('reason', '')}".strip()
    if ev.kind == "data":
        return f"{f.get('dir', '')} {len(f.get('data', b''))} bytes".strip()
    if ev.kind == "output" and "summary" in f:
        notes = []
        if isinstance(f.get("duration_us"), int):
            notes.append(f"{f['duration_us'] / 1000:.2f} ms")
        if f.get("masked"):
            notes.append("masked " + ", ".join(f"{k}={v}" for k, v in f["masked"].items()))
        return _CTRL.sub(" ", str(f["summary"])) + (f" ({'; '.join(notes)})" if notes else "")
    if "summary" in f:
        return str(f["summary"])
    return clip(json.dumps(jsonable(f), ensure_ascii=False), 100)


def sample_lines(ev: Event, width: int = 40) -> list[str]:
    """A recorded result sample (already masked by the host agent) as a small table."""
    if ev.kind != "output":
        return []
    try:
        f = unpack_payload(ev.payload)
    except Exception:
        return []
    columns, rows = f.get("columns"), f.get("sample")
    if isinstance(rows, str):     # a body (HTTP): its first lines
        lines = [clip(_CTRL.sub(" ", ln), 2 * width) for ln in rows.splitlines()[:10]]
        more = len(rows.splitlines()) - len(lines)
        return lines + ([f"... {more} more line(s)"] if more > 0 else [])
    if not columns or not isinstance(rows, list):
        return ["(sample not kept: the session's sample budget was spent)"] \
            if f.get("sample_capped") else []
    cells = [[clip(_CTRL.sub(" ", str(c)), width) for c in columns]] + [
        [clip(_CTRL.sub(" ", "NULL" if v is None else str(v)), width) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(columns))]
    out = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    out.insert(1, "-+-".join("-" * w for w in widths))
    more = int(f.get("rows_returned", len(rows))) - len(rows)
    if more > 0:
        out.append(f"... {more} more row(s) not kept")
    return out
