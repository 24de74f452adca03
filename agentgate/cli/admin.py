"""`agentgate tail` and `agentgate agents list`."""
from __future__ import annotations

import time

import click

from agentgate.cli.main import Ctx, cli
from agentgate.cli.output import (clip, emit_json, event_json, fmt_ago, fmt_bytes, fmt_time,
                                  iso_time, summarize, table)
from agentgate.wire import event_from_pb, pb, rpc

pass_ctx = click.make_pass_decorator(Ctx)
ONLINE_HEARTBEATS = 3  # an agent missing this many heartbeats is shown offline


@cli.command()
@click.option("--host", help="Only events from this host.")
@click.option("--target", help="Only events of sessions to this target.")
@click.option("--protocol", help="Only this protocol.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def tail(ctx: Ctx, host, target, protocol, as_json):
    """Follow new events from every host as they arrive. Ctrl-C stops."""
    stub = ctx.stub(rpc.SessionsStub)
    req = pb.TailRequest(host=host or "", target=target or "", protocol=protocol or "")
    for t in ctx.stream(stub.Tail, req):
        ev = event_from_pb(t.event)
        if as_json:
            emit_json({**event_json(ev), "host": t.host, "target": t.target,
                       "protocol": t.protocol})
            continue
        click.echo(f"{fmt_time(ev.wall_time_ns)}  {t.host}  {t.target}  {ev.session_id[:8]}  "
                   f"#{ev.seq} {ev.kind}: {clip(summarize(ev), 100)}")


@cli.group()
def agents():
    """Host agents known to the collector."""


@agents.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of host agents.")
@pass_ctx
def agents_list(ctx: Ctx, as_json):
    """List host agents with their last heartbeat and spool backlog."""
    resp = ctx.call(ctx.stub(rpc.AgentsStub).List, pb.ListAgentsRequest())
    now = time.time_ns()

    def online(a) -> bool:
        return now - a.last_seen_ns < ONLINE_HEARTBEATS * 15 * 1_000_000_000

    if as_json:
        emit_json([{"agent_id": a.agent_id, "host": a.host, "version": a.version,
                    "capabilities": list(a.capabilities), "registered": iso_time(a.registered_ns),
                    "last_seen": iso_time(a.last_seen_ns), "online": online(a),
                    "spool_bytes": a.spool_bytes, "unacked_events": a.unacked_events,
                    "lost_kernel_events": a.lost_kernel_events,
                    "principal": a.principal} for a in resp.agents])
        return
    if not resp.agents:
        click.echo("no host agents have registered", err=True)
        return
    table(["AGENT ID", "HOST", "VERSION", "STATUS", "LAST SEEN", "SPOOL", "UNACKED", "CAPABILITIES"],
          [[a.agent_id, a.host, a.version, "online" if online(a) else "offline",
            fmt_ago(a.last_seen_ns), fmt_bytes(a.spool_bytes), a.unacked_events,
            ",".join(a.capabilities) or "-"] for a in resp.agents])
