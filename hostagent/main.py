"""agentgate-hostagent: the privileged host daemon.

Today it hosts the recording spool and ships it to the collector; interception and
the inline proxy plug into the same process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from agentgate import __version__
from agentgate.cli.output import fmt_bytes
from agentgate.client import ClientConfigError
from agentgate.tomlconfig import ConfigError
from hostagent.config import load_config
from hostagent.recording.recorder import close_orphans
from hostagent.recording.shipper import Shipper
from hostagent.recording.spool import SEGMENT_RE, Spool, SpoolError
from hostagent.registration import heartbeat_loop

log = logging.getLogger("agentgate.hostagent")
config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), envvar="AGENTGATE_HOSTAGENT_CONFIG",
    help="TOML config file [env AGENTGATE_HOSTAGENT_CONFIG].")


def open_spool(cfg) -> Spool:
    return Spool(cfg.spool.dir, max_bytes=cfg.spool.max_bytes,
                 segment_bytes=cfg.spool.segment_bytes,
                 fsync_interval=cfg.spool.fsync_interval_ms / 1000, strict=cfg.spool.strict)


async def _serve(cfg) -> None:
    spool = await asyncio.to_thread(open_spool, cfg)
    log.info("spool %s: %s in %d segment(s) to ship", cfg.spool.dir,
             fmt_bytes(spool.bytes_used()), spool.segment_count())
    orphans = close_orphans(spool)
    if orphans:
        log.warning("closed %d session(s) left open by the previous run", len(orphans))
    shipper = Shipper(spool, cfg.collector)
    tasks = [asyncio.create_task(shipper.run()),
             asyncio.create_task(heartbeat_loop(cfg.collector, cfg.host, cfg.state_dir, spool))]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: flushing what the collector takes within 5s")
    await shipper.drain(5.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    spool.close()


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
        asyncio.run(_serve(cfg))
    except (ConfigError, ClientConfigError, SpoolError) as exc:
        click.echo(f"agentgate-hostagent: error: {exc}", err=True)
        sys.exit(2 if isinstance(exc, (ConfigError, ClientConfigError)) else 1)


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
