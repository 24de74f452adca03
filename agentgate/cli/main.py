"""`agentgate`: the admin CLI. Exit codes: 0 ok, 1 failed (e.g. broken chain, not found,
refused), 2 usage, 3 collector unreachable, 4 not authenticated / not allowed, 130 Ctrl-C."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import click
import grpc

from agentgate import __version__
from agentgate.client import (DEFAULT_COLLECTOR, ClientConfigError, CollectorAddress,
                              answers, open_channel)

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 1, 2, 3, 4
RPC_TIMEOUT = 15.0


class Failure(click.ClickException):
    """A one-line error with a meaningful exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None) -> None:
        click.echo(f"agentgate: error: {self.format_message()}", err=True)


def rpc_failure(exc: grpc.RpcError, target: str) -> Failure:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or code.name.lower()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        why = details
        if "Connection refused" in details:
            why = "connection refused (is agentgate-collector running?)"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = "no answer in time"
        elif "failed to connect" in details.lower():
            why = details.split("last error:")[-1].strip()
        return Failure(f"cannot reach the collector at {target}: {why}", EXIT_UNREACHABLE)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Failure(f"not authenticated: {details}", EXIT_AUTH)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Failure(f"not allowed: {details}", EXIT_AUTH)
    return Failure(details, EXIT_FAILED)


@dataclass
class Ctx:
    address: CollectorAddress
    explicit: bool = True    # --collector or AGENTGATE_COLLECTOR given
    _channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = open_channel(self.address)
            if not self.explicit:
                self._fall_back_to_local_store()
        return self._channel

    def _fall_back_to_local_store(self) -> None:
        """No collector configured and none answering at the default address: serve the
        local store (where `agentgate run` records without a collector), if there is one."""
        from agentgate.tomlconfig import default_state_dir
        db = default_state_dir() / "collector.db"
        if not db.exists():
            return
        if answers(self._channel, 0.3):
            return
        from agentgate.cli.local import LocalCollector
        local = LocalCollector(db)
        click.echo(f"(no collector at {self.address.target}: reading the local store {db})",
                   err=True)
        self._channel.close()
        self.address = CollectorAddress(target=local.address, token=self.address.token)
        self._channel = open_channel(self.address)

    def stub(self, cls):
        return cls(self.channel)

    def call(self, method, request, timeout: float | None = RPC_TIMEOUT):
        """A unary call with our token; RPC errors become one-line failures."""
        try:
            return method(request, timeout=timeout, metadata=self.address.metadata())
        except grpc.RpcError as exc:
            raise rpc_failure(exc, self.address.target) from None

    def stream(self, method, request):
        """Iterate a server stream; RPC errors become one-line failures."""
        try:
            yield from method(request, metadata=self.address.metadata())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise rpc_failure(exc, self.address.target) from None


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClientConfigError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
        except grpc.RpcError as exc:
            target = ctx.obj.address.target if isinstance(ctx.obj, Ctx) else "?"
            raise rpc_failure(exc, target) from None
        except BrokenPipeError:
            sys.stderr.close()  # e.g. `| head`: not an error worth a word
            raise SystemExit(0)
        except KeyboardInterrupt:
            click.echo("", err=True)
            raise click.exceptions.Exit(130) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("AGENTGATE_DEBUG"):
                raise
            raise Failure(f"internal error: {type(exc).__name__}: {exc} "
                          "(AGENTGATE_DEBUG=1 shows a traceback)", EXIT_FAILED) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.option("--collector", envvar="AGENTGATE_COLLECTOR", default=DEFAULT_COLLECTOR,
              show_default=True, metavar="HOST:PORT", help="Collector address (env AGENTGATE_COLLECTOR).")
@click.option("--token", envvar="AGENTGATE_TOKEN", metavar="TOKEN",
              help="Bearer token from the collector config (env AGENTGATE_TOKEN).")
@click.option("--ca", envvar="AGENTGATE_CA", type=click.Path(dir_okay=False),
              help="CA certificate (PEM) to verify a TLS collector (env AGENTGATE_CA).")
@click.option("--tls-server-name", envvar="AGENTGATE_TLS_SERVER_NAME", metavar="NAME",
              help="Name expected in the collector's certificate, if not the address's host.")
@click.version_option(__version__, prog_name="agentgate")
@click.pass_context
def cli(ctx, collector, token, ca, tls_server_name):
    """agentgate: watch and control what automated agents do to infrastructure.

    Admin commands talk to the collector: list, replay, export and verify recorded
    sessions, decide just-in-time approvals, tail live events, list host agents.

    Exit codes: 0 ok, 1 failed (broken chain, not found, refused), 2 usage or
    configuration error, 3 collector unreachable, 4 not authenticated or not allowed.
    """
    explicit = ctx.get_parameter_source("collector") != click.core.ParameterSource.DEFAULT
    ctx.obj = Ctx(CollectorAddress(target=collector, token=token or None, ca=ca,
                                   server_name=tls_server_name), explicit=explicit)


def main() -> None:
    from agentgate.cli import admin, approvals, policy, run, sessions  # noqa: F401  (registers commands)
    try:
        cli.main(prog_name="agentgate")
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)
