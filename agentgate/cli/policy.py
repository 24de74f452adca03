"""`agentgate policy check|explain`: validate a policy file, and show what it decides."""
from __future__ import annotations

import click

from agentgate.cli.main import EXIT_USAGE, Failure, cli
from agentgate.cli.output import emit_json
from agentgate.tomlconfig import ConfigError


@cli.group()
def policy():
    """Policy files: check them, and see what they decide for a statement."""


def _load(path: str):
    from hostagent.policy import load_policy
    try:
        return load_policy(path)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False))
def check(file):
    """Validate FILE: syntax, actions, matchers, regexes. Exit 2 with the first problem."""
    p = _load(file)
    click.echo(f"ok: {file}: {len(p.rules)} rule(s), default {p.default}, "
               f"unparseable {p.unparseable}{', audit mode' if p.audit else ''}")


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="Target name the statement goes to.")
@click.option("--sql", help="The statement(s), as the agent would send them (postgres).")
@click.option("--request", "http", metavar="'METHOD PATH'",
              help="An HTTP request (http, https), e.g. 'POST /repos/x/git/refs/main'.")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="A request header (repeatable); Host names the host.")
@click.option("--body", help="The request body (its JSON fields are judged).")
@click.option("--command", "ssh_command", metavar="'COMMAND LINE'",
              help="An SSH exec (ssh), e.g. 'ls; rm -rf /tmp/x': every command it runs "
                   "is judged.")
@click.option("--remote-user", default="root", show_default=True,
              help="The account an SSH command runs as (ssh).")
@click.option("--protocol", default="postgres", show_default=True,
              help="postgres or mysql (how --sql is read), or http/https with --request.")
@click.option("--database", default="", help="Database of the session.")
@click.option("--user", default="", help="The agent's user name.")
@click.option("--exe", default="", help="The agent's executable path.")
@click.option("--json", "as_json", is_flag=True, help="An object with action, rule, reason.")
def explain(file, target, sql, http, headers, body, ssh_command, remote_user, protocol, database,
            user, exe, as_json):
    """Show the decision for SQL (or an HTTP request, or an SSH command) and the rule
    that made it. With several statements, the strictest decides (deny, then review),
    as the proxy does."""
    from hostagent.policy import decide
    from hostagent.protocols.enforce import strictest
    from hostagent.protocols.statements import requests_for
    p = _load(file)
    identity = {"user": user, "exe": exe}
    if http is not None or protocol in ("http", "https"):
        _explain_http(p, target, http, headers, body, protocol, identity, as_json)
        return
    if ssh_command is not None or protocol == "ssh":
        _explain_ssh(p, target, ssh_command, remote_user, identity, as_json)
        return
    if sql is None:
        raise Failure("give --sql (postgres), --request (http, https) or --command (ssh)",
                      EXIT_USAGE)
    if protocol == "postgres":
        from hostagent.protocols.postgres.classify import Unparseable, classify
    elif protocol == "mysql":
        from hostagent.protocols.mysql.classify import Unparseable, classify
    else:
        raise Failure(f"explain reads SQL as postgres or mysql, not {protocol}", EXIT_USAGE)
    try:
        statements = classify(sql)
    except Unparseable:
        statements = [None]
    judged = [(fields, decide(p, req)) for req, fields in requests_for(
        statements, sql, target=target, identity=identity, database=database,
        protocol=protocol)]
    final = strictest(d for _, d in judged)
    if as_json:
        emit_json({**final.as_dict(), "statements": [
            {k: f[k] for k in ("text", "kinds", "tables", "functions", "flags")} | d.as_dict()
            for f, d in judged]})
        return
    click.echo(f"{final.action} (rule {final.rule}){': ' + final.reason if final.reason else ''}")
    if final.would:
        click.echo(f"audit mode: would {final.would}")


def _explain_ssh(p, target, command, remote_user, identity, as_json) -> None:
    from hostagent.policy import decide
    from hostagent.protocols.ssh.requests import Who
    if not command:
        raise Failure("--command takes the command line an agent runs over SSH", EXIT_USAGE)
    req, fields = Who(target, identity, remote_user).command("exec", command)
    d = decide(p, req)
    if as_json:
        emit_json({**d.as_dict(), "commands": fields["commands"], "flags": fields["flags"],
                   "parsed": req.parsed})
        return
    click.echo(f"{d.action} (rule {d.rule}){': ' + d.reason if d.reason else ''}")
    if d.would:
        click.echo(f"audit mode: would {d.would}")
    for c in fields["commands"]:
        click.echo(f"  runs: {c}")


def _explain_http(p, target, http, headers, body, protocol, identity, as_json) -> None:
    from hostagent.policy import decide
    from hostagent.protocols.http.requests import (BadTarget, flatten, normalize_target,
                                                   parse_json, request_for)
    if not http or len(http.split()) != 2:
        raise Failure("--request takes 'METHOD PATH', e.g. 'GET /users?id=1'", EXIT_USAGE)
    method, target_path = http.split()
    try:
        path, query = normalize_target(target_path.encode())
    except BadTarget as exc:
        raise Failure(f"--request: {exc}", EXIT_USAGE) from None
    pairs = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep:
            raise Failure(f"--header takes 'NAME: VALUE', not {h!r}", EXIT_USAGE)
        pairs.append((name.strip().lower().encode(), value.strip().encode()))
    host = next((v for n, v in pairs if n == b"host"), None)
    fields, parsed = None, True
    if body:
        try:
            fields = flatten(parse_json(body.encode()))
        except (ValueError, RecursionError):
            parsed = not any(n == b"content-type" and b"json" in v for n, v in pairs)
    req = request_for(target=target, identity=identity, method=method.upper(), host=host,
                      path=path, query=query, headers=pairs, body_fields=fields,
                      parsed=parsed, protocol=protocol if protocol != "postgres" else "http")
    d = decide(p, req)
    if as_json:
        emit_json({**d.as_dict(), "request": req.text})
        return
    click.echo(f"{d.action} (rule {d.rule}){': ' + d.reason if d.reason else ''}")
    if d.would:
        click.echo(f"audit mode: would {d.would}")
    click.echo(f"  {req.text}")
