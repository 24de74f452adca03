"""Sans-IO protocol layers: bytes in -> actions out. They never touch sockets, clocks or
asyncio; hostagent/proxy/driver.py performs their actions in order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ProtocolError(Exception):
    """The only exception a layer lets escape on bad input; the driver closes that session."""


@dataclass(frozen=True, slots=True)
class ToUpstream:
    data: bytes
    starts: tuple[int, ...] = ()   # statements this sends: the driver times them from here


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class Record:
    """Spool this event before any later action runs (record before execute)."""
    kind: str
    fields: dict = field(default_factory=dict)
    stop: int | None = None   # a statement's answer: the driver adds its duration_us


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Ask a human (the collector's approval workflow) before going on; the driver answers
    with layer.decided(key, approved, reason). Nothing after it is sent until then."""
    key: int
    command: str
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client's leg turns into TLS here (the layer has just answered yes to the
    client's request): the driver handshakes as the server, with a certificate from the
    host agent's local CA, before reading another byte."""


Action = ToUpstream | ToClient | Record | Close | Hold | StartTls


class Layer(Protocol):
    def client_data(self, data: bytes) -> list[Action]: ...
    def upstream_data(self, data: bytes) -> list[Action]: ...
    def client_eof(self) -> list[Action]: ...
    def upstream_eof(self) -> list[Action]: ...
