"""agentgate-hostagent: the privileged host daemon.

Today it hosts the recording spool and ships it to the collector; interception and
the inline proxy plug into the same process.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from agentgate import __version__
from agentgate.cli.output import fmt_bytes
from agentgate.client import ClientConfigError
from agentgate.tomlconfig import ConfigError
from hostagent.config import load_config
from hostagent.daemon import serve as run_daemon
from hostagent.intercept.cgroups import CgroupError
from hostagent.intercept.loader import InterceptError
from hostagent.recording.spool import SEGMENT_RE, SpoolError

log = logging.getLogger("agentgate.hostagent")
config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), envvar="AGENTGATE_HOSTAGENT_CONFIG",
    help="TOML config file [env AGENTGATE_HOSTAGENT_CONFIG].")


def fail(message: str, code: int) -> None:
    click.echo(f"agentgate-hostagent: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentgate-hostagent")
def main():
    """The agentgate host agent (runs as root under systemd)."""


@main.command()
@config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config_path, log_level):
    """Run the daemon: spool recordings and ship them to the collector."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="agentgate-hostagent: %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path)
        asyncio.run(run_daemon(cfg))
    except (ConfigError, ClientConfigError) as exc:
        fail(str(exc), 2)
    except (SpoolError, InterceptError, CgroupError) as exc:
        fail(f"refusing to start: {exc}", 1)


@main.command()
@config_option
def status(config_path):
    """Show the local spool: bytes and segments waiting for the collector's ack."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"agentgate-hostagent: error: {exc}", err=True)
        sys.exit(2)
    d = Path(cfg.spool.dir)
    segs = sorted(p for p in d.iterdir() if SEGMENT_RE.match(p.name)) if d.is_dir() else []
    size = sum(p.stat().st_size for p in segs)
    click.echo(f"spool:    {d}")
    click.echo(f"waiting:  {fmt_bytes(size)} in {len(segs)} segment(s) "
               f"(cap {fmt_bytes(cfg.spool.max_bytes)})")
    click.echo(f"fsync:    every {cfg.spool.fsync_interval_ms:g} ms"
               f"{', strict (append waits for it)' if cfg.spool.strict else ''}")
    click.echo(f"collector: {cfg.collector.target}")


if __name__ == "__main__":
    main()
