"""`agentgate run -- CMD`: run a command as an enrolled agent."""
from __future__ import annotations

import logging
import sys

import click

from agentgate.cli.main import EXIT_USAGE, Failure, cli
from agentgate.tomlconfig import ConfigError


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="AGENTGATE_HOSTAGENT_CONFIG",
              help="Host agent config (targets, mode, spool, collector).")
@click.option("--user", help="Run CMD as this user (recommended: a root agent can leave its cgroup).")
@click.option("--mode", type=click.Choice(["deny", "record", "allow"]),
              help="TCP to destinations that aren't targets: refuse (default), proxy and "
                   "record as raw TCP, or let through and log.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the interception does.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def run(config_path, user, mode, verbose, argv):
    """Run CMD as an enrolled agent and return its exit code.

    CMD runs in a fresh cgroup under the agentgate tree: every TCP connection it (or any
    child) opens goes through the agentgate proxy and is recorded with the process's
    identity; UDP only reaches DNS resolvers; raw sockets are refused. Needs root (to
    load BPF programs). With no collector answering, sessions go to the local store,
    where `agentgate sessions list` finds them afterwards.

    Example: agentgate run --user ci -- psql -h db.internal -c 'select 1'
    """
    from hostagent.config import load_config
    from hostagent.intercept.cgroups import CgroupError
    from hostagent.intercept.loader import InterceptError
    from hostagent.recording.spool import SpoolError
    from hostagent.run import run_command

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="agentgate run: %(message)s")
    try:
        cfg = load_config(config_path)
        rc = run_command(list(argv), cfg, user=user, mode=mode)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    except (InterceptError, CgroupError, SpoolError) as exc:
        raise Failure(f"refusing to run unmonitored: {exc}", 1) from None
    sys.exit(rc)
