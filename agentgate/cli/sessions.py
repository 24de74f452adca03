"""`agentgate sessions ...`: list, show, replay, export, verify."""
from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time

import click

from agentgate.cli.main import EXIT_FAILED, Ctx, Failure, cli
from agentgate.cli.output import (clip, emit_json, event_json, fmt_time, iso_time, jsonable,
                                  sample_lines, summarize, table)
from agentgate.events import DATA, SESSION_END, unpack_payload, verify_chain
from agentgate.wire import event_from_pb, pb, rpc

pass_ctx = click.make_pass_decorator(Ctx)
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_when(value: str | None) -> int:
    """'90s', '15m', '2h', '7d' (ago) or an ISO date/time -> ns since the epoch."""
    if not value:
        return 0
    m = _DURATION.match(value.strip())
    if m:
        secs = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return max(1, time.time_ns() - secs * 1_000_000_000)
    try:
        return int(dt.datetime.fromisoformat(value).timestamp() * 1e9)
    except (ValueError, OverflowError, OSError):
        raise click.BadParameter(f"{value!r}: use a duration like 15m, 2h, 7d or an ISO time")


def session_json(s: "pb.Session") -> dict:
    start = unpack_payload(s.start_payload) if s.start_payload else {}
    return {
        "id": s.id, "host": s.host, "agent": s.agent, "target": s.target,
        "protocol": s.protocol, "started": iso_time(s.started_ns),
        "ended": iso_time(s.ended_ns), "end_reason": s.end_reason or None,
        "events": s.event_count, "commands": s.command_count,
        "process": jsonable(start.get("process")) if start else None,
    }


def _status(s: "pb.Session") -> str:
    return f"ended: {s.end_reason}" if s.ended_ns else "open"


@cli.group()
def sessions():
    """Recorded sessions: list, show, replay, export, verify."""


@sessions.command("list")
@click.option("--host", help="Only sessions from this host.")
@click.option("--agent", help="Only sessions whose agent identity contains this text.")
@click.option("--target", help="Only sessions to this target.")
@click.option("--protocol", help="Only this protocol (postgres, mysql, ssh, http, k8s, tcp).")
@click.option("--since", help="Started at or after: 15m, 2h, 7d ago, or an ISO time.")
@click.option("--until", help="Started before: a duration ago or an ISO time.")
@click.option("--text", help="Only sessions with a command containing this text.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of sessions.")
@pass_ctx
def list_(ctx: Ctx, host, agent, target, protocol, since, until, text, limit, as_json):
    """List recorded sessions, newest first."""
    req = pb.ListSessionsRequest(host=host or "", agent=agent or "", target=target or "",
                                 protocol=protocol or "", since_ns=parse_when(since),
                                 until_ns=parse_when(until), text=text or "", limit=limit)
    resp = ctx.call(ctx.stub(rpc.SessionsStub).List, req)
    if as_json:
        emit_json([session_json(s) for s in resp.sessions])
        return
    if not resp.sessions:
        click.echo("no sessions", err=True)
        return
    table(["ID", "STARTED", "HOST", "AGENT", "TARGET", "PROTOCOL", "CMDS", "EVENTS", "STATUS"],
          [[s.id, fmt_time(s.started_ns), s.host, clip(s.agent, 40), s.target, s.protocol,
            s.command_count, s.event_count, _status(s)] for s in resp.sessions])


def _events(ctx: Ctx, session_id: str, follow: bool = False):
    stub = ctx.stub(rpc.SessionsStub)
    req = pb.StreamEventsRequest(session_id=session_id, follow=follow)
    for m in ctx.stream(stub.StreamEvents, req):
        yield event_from_pb(m)


@sessions.command()
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="The session and its events as JSON.")
@pass_ctx
def show(ctx: Ctx, session_id, as_json):
    """Show one session: who, what target, and every event in it."""
    s = ctx.call(ctx.stub(rpc.SessionsStub).Get, pb.GetSessionRequest(id=session_id))
    events = list(_events(ctx, session_id))
    if as_json:
        emit_json({"session": session_json(s), "events": [event_json(e) for e in events]})
        return
    info = {**session_json(s), "started": fmt_time(s.started_ns), "ended": fmt_time(s.ended_ns)}
    for key in ("id", "host", "agent", "target", "protocol", "started", "ended", "end_reason",
                "events", "commands"):
        click.echo(f"{key + ':':<12}{info[key] if info[key] is not None else '-'}")
    click.echo()
    table(["SEQ", "OFFSET", "KIND", "WHAT"],
          [[e.seq, f"+{e.mono_ns / 1e9:.3f}s", e.kind, clip(summarize(e), 100)] for e in events])


@sessions.command()
@click.argument("session_id")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Time scale: 2 is twice as fast; 0 prints everything at once.")
@click.option("--follow", is_flag=True, help="Keep going with new events of a live session.")
@pass_ctx
def replay(ctx: Ctx, session_id, speed, follow):
    """Replay a session with its original timing (scaled by --speed).

    Terminal output (data events) is written as it was; other events print as
    one annotated line each.
    """
    out = sys.stdout.buffer
    last = None
    for ev in _events(ctx, session_id, follow):
        if speed and last is not None and ev.mono_ns > last:
            time.sleep((ev.mono_ns - last) / 1e9 / speed)
        last = ev.mono_ns
        if ev.kind == DATA:
            try:
                f = unpack_payload(ev.payload)
            except Exception:
                f = {}
            if f.get("dir", "out") == "out" and isinstance(f.get("data"), bytes):
                out.write(f["data"])
                out.flush()
            continue
        out.write(f"[+{ev.mono_ns / 1e9:8.3f}s] {ev.kind}: {summarize(ev)}\n".encode())
        for line in sample_lines(ev):
            out.write(f"             {line}\n".encode())
        out.flush()


@sessions.command()
@click.argument("session_id")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "asciicast"]), default="jsonl",
              show_default=True, help="jsonl: every event; asciicast: the terminal stream "
                                      "as asciicast v2 (asciinema play/cat)")
@click.option("-o", "--output", type=click.File("w"), default="-", help="File to write [stdout].")
@pass_ctx
def export(ctx: Ctx, session_id, fmt, output):
    """Export every event of a session, one JSON object per line.

    Each line has the decoded fields and the exact payload (payload_b64) and hashes,
    so the chain can be re-verified from the export alone. With --format asciicast, the
    session's terminal stream (what was written to it, typed and resized) instead.
    """
    if fmt == "asciicast":
        n = _asciicast(_events(ctx, session_id), output)
    else:
        n = 0
        for ev in _events(ctx, session_id):
            output.write(json.dumps(event_json(ev), ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        ctx.call(ctx.stub(rpc.SessionsStub).Get, pb.GetSessionRequest(id=session_id))
    click.echo(f"exported {n} events", err=True)


@sessions.command()
@click.argument("session_id")
@pass_ctx
def verify(ctx: Ctx, session_id):
    """Check a session's hash chain: no event missing, reordered or altered.

    Verification happens here, in the CLI, over the events as stored. Exits 1 if
    the chain is broken.
    """
    s = ctx.call(ctx.stub(rpc.SessionsStub).Get, pb.GetSessionRequest(id=session_id))
    events = list(_events(ctx, session_id))
    report = verify_chain(events)
    if not report.ok:
        raise Failure(f"session {session_id}: chain BROKEN at seq {report.broken_seq}: "
                      f"{report.problem}", EXIT_FAILED)
    if report.count < s.event_count:
        raise Failure(f"session {session_id}: chain BROKEN: the collector committed "
                      f"{s.event_count} events, {report.count} remain (the tail was removed)",
                      EXIT_FAILED)
    if s.ended_ns and events[-1].kind != SESSION_END:
        raise Failure(f"session {session_id}: chain BROKEN: the session ended but its "
                      f"session_end event is missing (the tail was removed)", EXIT_FAILED)
    state = "complete" if s.ended_ns else "still open (or its end not yet received)"
    click.echo(f"ok: session {session_id}: {report.count} events, chain intact, {state}; "
               f"head {report.head.hex()}")


def _asciicast(events, output) -> int:
    """asciicast v2: a header line, then [seconds, "o"|"i"|"r", text] per event."""
    n = 0
    start = None
    width, height = 80, 24
    lines = []
    for ev in events:
        if start is None:
            start = ev.mono_ns
            wall = ev.wall_time_ns
        try:
            f = unpack_payload(ev.payload)
        except Exception:
            continue
        t = round((ev.mono_ns - start) / 1e9, 6)
        if ev.kind == DATA and isinstance(f.get("data"), bytes):
            if f.get("stream") == "close":
                continue
            code = "o" if f.get("dir", "out") == "out" else "i"
            lines.append([t, code, f["data"].decode("utf-8", "replace")])
        elif ev.kind == "resize" and f.get("cols"):
            if not any(x[1] in ("o", "i") for x in lines):
                width, height = int(f["cols"]), int(f.get("rows") or height)
            lines.append([t, "r", f"{int(f['cols'])}x{int(f.get('rows') or 0)}"])
        n += 1
    header = {"version": 2, "width": width, "height": height,
              "timestamp": int((wall if start is not None else 0) / 1e9)}
    output.write(json.dumps(header) + "\n")
    for line in lines:
        output.write(json.dumps(line, ensure_ascii=False) + "\n")
    return n
