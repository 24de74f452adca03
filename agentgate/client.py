"""How host agents and the admin CLI reach the collector: channel, TLS, bearer token."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_COLLECTOR = "127.0.0.1:7421"


class ClientConfigError(Exception):
    """A problem with how the collector is to be reached (bad file, unsafe token use)."""


@dataclass(frozen=True)
class CollectorAddress:
    target: str = DEFAULT_COLLECTOR
    token: str | None = None
    ca: str | None = None          # PEM file: verify the collector's certificate (enables TLS)
    cert: str | None = None        # PEM client certificate for mTLS (host agents)
    key: str | None = None
    server_name: str | None = None  # expected name in the collector's certificate

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def is_loopback_target(target: str) -> bool:
    if target.startswith("unix:"):
        return True   # as private as its directory
    host = target.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


def _channel_args(addr: CollectorAddress):
    if addr.token and not addr.tls and not is_loopback_target(addr.target):
        raise ClientConfigError(
            f"refusing to send a token in clear text to {addr.target}: "
            "give the collector's CA certificate (--ca) to use TLS")
    options = list(_OPTIONS)
    if addr.server_name:
        options.append(("grpc.ssl_target_name_override", addr.server_name))
    if not addr.tls:
        return None, options
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(addr.ca, "CA certificate"),
        private_key=_read(addr.key, "client key"),
        certificate_chain=_read(addr.cert, "client certificate"))
    return creds, options


def open_channel(addr: CollectorAddress) -> grpc.Channel:
    creds, options = _channel_args(addr)
    if creds is None:
        return grpc.insecure_channel(addr.target, options=options)
    return grpc.secure_channel(addr.target, creds, options=options)


def answers(channel: grpc.Channel, timeout: float) -> bool:
    """Whether the collector behind `channel` can be reached within `timeout` seconds."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False


def open_aio_channel(addr: CollectorAddress) -> grpc.aio.Channel:
    creds, options = _channel_args(addr)
    if creds is None:
        return grpc.aio.insecure_channel(addr.target, options=options)
    return grpc.aio.secure_channel(addr.target, creds, options=options)
