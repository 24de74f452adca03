"""`agentgate approvals ...`: list, approve, deny, watch."""
from __future__ import annotations

import click

from agentgate.cli.main import Ctx, cli
from agentgate.cli.output import clip, emit_json, fmt_ago, fmt_time, iso_time, table
from agentgate.wire import pb, rpc, state_name

pass_ctx = click.make_pass_decorator(Ctx)


def approval_json(a: "pb.Approval") -> dict:
    return {
        "id": a.id, "state": state_name(a.state), "session_id": a.session_id or None,
        "host": a.host, "target": a.target, "protocol": a.protocol, "command": a.command,
        "requested_by": a.requested_by, "rule": a.rule, "reason": a.reason,
        "created": iso_time(a.created_ns), "expires": iso_time(a.expires_ns),
        "decided": iso_time(a.decided_ns), "decided_by": a.decided_by or None,
        "decision_reason": a.decision_reason or None, "created_by": a.created_by,
    }


def requester(a: "pb.Approval") -> str:
    """The Unix user the held command runs as, on the host whose agent filed it."""
    return f"{a.requested_by or '?'}@{a.host}" if a.host else a.requested_by


def _when(a: "pb.Approval") -> str:
    if a.state == pb.PENDING:
        return f"expires {fmt_time(a.expires_ns)}"
    who = f" by {a.decided_by}" if a.decided_by else ""
    return f"{fmt_ago(a.decided_ns)}{who}"


@cli.group()
def approvals():
    """Just-in-time approvals: risky commands held until a human decides."""


@approvals.command("list")
@click.option("--pending", is_flag=True, help="Only requests still waiting for a decision.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of requests.")
@pass_ctx
def list_(ctx: Ctx, pending, limit, as_json):
    """List approval requests, newest first."""
    resp = ctx.call(ctx.stub(rpc.ApprovalsStub).List,
                    pb.ListApprovalsRequest(pending_only=pending, limit=limit))
    if as_json:
        emit_json([approval_json(a) for a in resp.approvals])
        return
    if not resp.approvals:
        click.echo("no pending approval requests" if pending else "no approval requests", err=True)
        return
    table(["ID", "STATE", "TARGET", "REQUESTED BY", "RULE", "COMMAND", "WHEN"],
          [[a.id, state_name(a.state), a.target, requester(a), a.rule, clip(a.command, 50),
            _when(a)] for a in resp.approvals])


def _decide(ctx: Ctx, approval_id: str, approve: bool, reason: str) -> None:
    a = ctx.call(ctx.stub(rpc.ApprovalsStub).Decide,
                 pb.DecideRequest(id=approval_id, approve=approve, reason=reason or ""))
    click.echo(f"{a.id}: {state_name(a.state)} by {a.decided_by}: {clip(a.command, 80)}")


@approvals.command()
@click.argument("approval_id")
@click.option("--reason", default="", help="Why (recorded with the decision).")
@pass_ctx
def approve(ctx: Ctx, approval_id, reason):
    """Let a held command run. Not a request of your own: one that runs as a Unix
    account linked to your token (unix_users in the collector config)."""
    _decide(ctx, approval_id, True, reason)


@approvals.command()
@click.argument("approval_id")
@click.option("--reason", required=True, help="Why (shown to the agent and recorded).")
@pass_ctx
def deny(ctx: Ctx, approval_id, reason):
    """Refuse a held command; the agent gets an error naming the reason."""
    _decide(ctx, approval_id, False, reason)


@approvals.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def watch(ctx: Ctx, as_json):
    """Print approval requests as they arrive and change (pending ones first). Ctrl-C stops."""
    stub = ctx.stub(rpc.ApprovalsStub)
    for a in ctx.stream(stub.WatchAll, pb.WatchApprovalsRequest(include_existing=True)):
        if as_json:
            emit_json(approval_json(a))
            continue
        line = (f"{fmt_time(a.created_ns if a.state == pb.PENDING else a.decided_ns)}  {a.id}  "
                f"{state_name(a.state):<9} {a.target}  {requester(a)}  {clip(a.command, 60)}")
        if a.state == pb.PENDING:
            line += f"  (rule {a.rule or '-'}, expires {fmt_time(a.expires_ns)})"
        elif a.decided_by:
            line += f"  (by {a.decided_by}{': ' + a.decision_reason if a.decision_reason else ''})"
        click.echo(line)
