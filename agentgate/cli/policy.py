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
@click.option("--sql", required=True, help="The statement(s), as the agent would send them.")
@click.option("--protocol", default="postgres", show_default=True)
@click.option("--database", default="", help="Database of the session.")
@click.option("--user", default="", help="The agent's user name.")
@click.option("--exe", default="", help="The agent's executable path.")
@click.option("--json", "as_json", is_flag=True, help="An object with action, rule, reason.")
def explain(file, target, sql, protocol, database, user, exe, as_json):
    """Show the decision for SQL and the rule that made it. With several statements, the
    strictest decides (deny, then review), as the proxy does."""
    from hostagent.policy import decide
    from hostagent.protocols.enforce import strictest
    from hostagent.protocols.postgres.classify import Unparseable, classify
    from hostagent.protocols.postgres.requests import requests_for
    p = _load(file)
    identity = {"user": user, "exe": exe}
    try:
        statements = classify(sql)
    except Unparseable:
        statements = [None]
    if protocol != "postgres":
        raise Failure("explain knows only postgres statements so far", EXIT_USAGE)
    judged = [(fields, decide(p, req)) for req, fields in requests_for(
        statements, sql, target=target, identity=identity, database=database)]
    final = strictest(d for _, d in judged)
    if as_json:
        emit_json({**final.as_dict(), "statements": [
            {k: f[k] for k in ("text", "kinds", "tables", "functions", "flags")} | d.as_dict()
            for f, d in judged]})
        return
    click.echo(f"{final.action} (rule {final.rule}){': ' + final.reason if final.reason else ''}")
    if final.would:
        click.echo(f"audit mode: would {final.would}")
