"""agentgate-hostagent: the privileged host daemon.

Today it hosts the recording spool and ships it to the collector; interception and
the inline proxy plug into the same process.
"""
from __future__ import annotations

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
from hostagent.stack import run_loop
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
        run_loop(run_daemon(cfg))
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


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="The checks as a JSON array.")
def doctor(config_path, as_json):
    """Check that interception can work on this machine, then prove it with a canary
    connection from a test cgroup. Exit 1 if any check fails."""
    import json as _json
    from hostagent.doctor import run_doctor
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    checks = run_doctor(cfg.intercept.tree)
    if as_json:
        click.echo(_json.dumps([c.__dict__ for c in checks]))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.name:<{width}}  {'ok  ' if c.ok else 'FAIL'}  {c.detail}")
    sys.exit(0 if all(c.ok for c in checks) else 1)


@main.command("ca-cert")
@config_option
@click.option("--path", "show_path", is_flag=True, help="Print the file's path, not the PEM.")
def ca_cert(config_path, show_path):
    """Print the local CA's certificate (made on first use). Enrolled clients that ask
    for TLS get certificates from this CA: give it to them to trust, e.g. PGSSLROOTCERT
    for sslmode=verify-full, or the system trust store."""
    from hostagent.tls import CAError, LocalCA
    try:
        cfg = load_config(config_path)
        ca = LocalCA.load_or_create(cfg.ca_dir)
    except ConfigError as exc:
        fail(str(exc), 2)
    except (CAError, OSError) as exc:
        fail(f"local CA: {exc}", 1)
    click.echo(str(ca.cert_path) if show_path else ca.cert_path.read_text(), nl=show_path)


@main.command()
@config_option
def cleanup(config_path):
    """Remove every trace of interception (for uninstall): end what still runs in the
    tree's session cgroups (a run whose `agentgate run` died must not go on unmonitored),
    detach agentgate's programs, unpin its maps, remove the session cgroups. Processes of
    enrolled units and cgroups are left alone (and from then on unmonitored)."""
    from hostagent.intercept import cgroups
    from hostagent.intercept.loader import detach_ours, pinned_map_ids
    try:
        cfg = load_config(config_path)
        tree = cfg.intercept.tree
        root = cgroups.tree_root(tree)
        paths = [root] + ([p for p in root.rglob("*") if p.is_dir()] if root.exists() else [])
        mount = cgroups.cgroup2_mount()
        external = [mount / c.lstrip("/") for c in cfg.intercept.cgroups]
        for unit in cfg.intercept.units:
            try:
                external.append(cgroups.unit_cgroup(unit))
            except CgroupError:
                external.append(mount / "system.slice" / unit)
        external.append(mount)           # programs on the root, for units and cgroups
        for p in [c for c in root.iterdir() if c.is_dir()] if root.exists() else []:
            try:   # first: nothing of a run may outlive its programs
                cgroups.remove(p)
            except CgroupError:
                pass
        # the tree is ours alone; other cgroups (the root above all) may hold programs of
        # other trees too: only those using this tree's pinned maps are ours
        owner = pinned_map_ids(Path("/sys/fs/bpf") / tree)
        detached = sum(detach_ours(p) for p in paths if p.is_dir()) + \
            sum(detach_ours(p, owner=owner) for p in dict.fromkeys(external) if p.is_dir())
        dropins = Path(cfg.intercept.unit_dropin_dir or "/run/systemd/system")
        for unit in cfg.intercept.units:
            (dropins / f"{unit}.d" / "50-agentgate.conf").unlink(missing_ok=True)
        from hostagent.protocols.ssh.keys import unpublish_tree
        unpublish_tree(tree)     # the proxy's SSH host CA, as OpenSSH clients found it
        bpffs = Path("/sys/fs/bpf")
        pins = [p for p in [bpffs / tree, *bpffs.glob(f"{tree}-run-*")] if p.exists()]
        for p in pins:
            for f in sorted(p.rglob("*"), reverse=True):
                f.rmdir() if f.is_dir() else f.unlink()
            p.rmdir()
        left = []
        for p in sorted(paths[1:], key=lambda x: len(x.parts), reverse=True) + [root]:
            try:
                p.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(p)
    except (ConfigError, InterceptError, CgroupError, OSError) as exc:
        fail(str(exc), 1)
    click.echo(f"detached {detached} program(s), removed {len(pins)} pin folder(s)")
    for p in left:
        click.echo(f"still in use (processes inside): {p}")


if __name__ == "__main__":
    main()
