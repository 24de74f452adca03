"""agentgate-collector: the central gRPC service (grpc.aio)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentgate import __version__
from agentgate.tomlconfig import ConfigError
from agentgate.wire import rpc
from collector.auth import AuthInterceptor
from collector.config import CollectorConfig, load_config
from collector.hub import Hub
from collector.services.agents import AgentsServicer
from collector.services.approvals import ApprovalsServicer, expire_loop
from collector.services.ingest import IngestServicer
from collector.services.sessions import SessionsServicer
from collector.storage import Storage, StorageError, open_storage

log = logging.getLogger("agentgate.collector")

SERVICES = ("agentgate.v1.Ingest", "agentgate.v1.Sessions", "agentgate.v1.Approvals",
            "agentgate.v1.Agents")
OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


class Collector:
    """The server and its background tasks; `start()` binds, `stop()` drains."""

    def __init__(self, cfg: CollectorConfig, store: Storage):
        self.cfg = cfg
        self.store = store
        self.hub = Hub()
        self.server = grpc.aio.server(interceptors=[AuthInterceptor(cfg.tokens)], options=OPTIONS)
        rpc.add_IngestServicer_to_server(IngestServicer(store, self.hub), self.server)
        rpc.add_SessionsServicer_to_server(SessionsServicer(store, self.hub), self.server)
        rpc.add_ApprovalsServicer_to_server(
            ApprovalsServicer(store, self.hub, cfg.approval_ttl_s, cfg.approval_max_ttl_s),
            self.server)
        rpc.add_AgentsServicer_to_server(AgentsServicer(store, cfg.heartbeat_s), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.addresses: list[str] = []
        self._tasks: list[asyncio.Task] = []

    def _bind(self, address: str, creds) -> str:
        try:
            port = (self.server.add_secure_port(address, creds) if creds
                    else self.server.add_insecure_port(address))
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {address} (address in use or not local?)")
        if address.startswith("unix:"):
            return address
        return f"{address.rsplit(':', 1)[0]}:{port}"

    async def start(self) -> None:
        cfg = self.cfg
        creds = None
        if cfg.tls_cert:
            pair = (_read(cfg.tls_key, "TLS key"), _read(cfg.tls_cert, "TLS certificate"))
            creds = grpc.ssl_server_credentials([pair])
        self.addresses.append(self._bind(cfg.listen, creds))
        if cfg.agent_listen:
            mtls = grpc.ssl_server_credentials(
                [(_read(cfg.tls_key, "TLS key"), _read(cfg.tls_cert, "TLS certificate"))],
                root_certificates=_read(cfg.client_ca, "client CA"), require_client_auth=True)
            self.addresses.append(self._bind(cfg.agent_listen, mtls))
        await self.server.start()
        for name in SERVICES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(expire_loop(self.store, self.hub)))

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        for t in self._tasks:
            t.cancel()
        await self.server.stop(grace)
        self.store.close()


async def start_collector(cfg: CollectorConfig) -> Collector:
    """Open the storage and start serving: the daemon, and the embedded ones too."""
    collector = Collector(cfg, await asyncio.to_thread(open_storage, cfg.database))
    await collector.start()
    return collector


async def serve(cfg: CollectorConfig, ready_file: str | None) -> None:
    collector = await start_collector(cfg)
    tls = "TLS" if cfg.tls_cert else "plaintext"
    log.info("agentgate-collector %s listening on %s (%s); database %s", __version__,
             collector.addresses[0], tls, cfg.database)
    if cfg.agent_listen:
        log.info("host agents with client certificates: %s (mTLS)", collector.addresses[1])
    if cfg.open_mode:
        log.warning("no tokens configured: serving loopback only, and every local caller is admin")
    if ready_file:
        tmp = f"{ready_file}.tmp"
        Path(tmp).write_text("\n".join(collector.addresses) + "\n")
        os.replace(tmp, ready_file)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await collector.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="AGENTGATE_COLLECTOR_CONFIG",
              help="TOML config file (listen, database, tls, tokens).")
@click.option("--listen", help="Address to serve on [default: 127.0.0.1:7421]. Port 0 picks one.")
@click.option("--database", help="SQLite database path [default: /var/lib/agentgate/collector.db "
              "as root, else ~/.local/share/agentgate/collector.db].")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help="Write the bound address(es) here once serving (for scripts and tests).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.version_option(__version__, prog_name="agentgate-collector")
def main(config_path, listen, database, ready_file, log_level):
    """The agentgate collector: stores session recordings from host agents, runs the
    approval workflow and serves replay and live tail to the `agentgate` CLI."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="agentgate-collector: %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path)
        if listen:
            cfg.listen = listen
        if database:
            cfg.database = database
        cfg.validate()
        asyncio.run(serve(cfg, ready_file))
    except (ConfigError, StorageError) as exc:
        click.echo(f"agentgate-collector: error: {exc}", err=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
